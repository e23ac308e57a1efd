//! `bootstrap init`: first boot (see `agent::init`).

use super::{apply, RunArgs};
use crate::agent::{self, Context};
use crate::engine::Mode;
use anyhow::Result;
use std::path::PathBuf;

pub fn run(a: &RunArgs) -> Result<u8> {
    let root = a.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let opts = apply::options(a, "init");
    let cx = Context::gather(&root, &super::facts::naming(&a.naming), true)?;
    let report = agent::init::run(&cx, &opts, &mut |r| apply::print(a, Mode::Apply, r))?;
    Ok(report.exit_code(a.detailed_exitcodes))
}
