//! `bootstrap facts`

use super::{FactsFormat, NamingArgs};
use crate::agent::Context;
use std::path::Path;

pub fn naming(n: &NamingArgs) -> crate::facts::NamingFlags {
    crate::facts::NamingFlags {
        name: n.name.clone(),
        env: n.env.clone(),
        role: n.role.clone(),
    }
}

pub fn run(n: &NamingArgs, format: FactsFormat, root: Option<&Path>) -> anyhow::Result<u8> {
    let cx = Context::gather(root.unwrap_or(Path::new("/")), &naming(n), false)?;
    match format {
        FactsFormat::Json => println!("{}", serde_json::to_string_pretty(&cx.facts)?),
        FactsFormat::Env => print!("{}", cx.facts.to_env()),
        FactsFormat::Text => print!("{}", cx.facts.to_text()),
    }
    Ok(0)
}
