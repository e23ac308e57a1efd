//! `bootstrap apply` and `bootstrap plan`

use super::RunArgs;
use crate::agent::{self, Context};
use crate::engine::report::Report;
use crate::engine::Mode;
use std::io::IsTerminal;
use std::path::PathBuf;

pub fn run(a: &RunArgs, mode: Mode) -> anyhow::Result<u8> {
    let root = a.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let opts = options(a, if mode == Mode::Plan { "plan" } else { "apply" });
    let cx = Context::gather(&root, &super::facts::naming(&a.naming), false)?;
    let hooks = agent::Hooks {
        after_steps: None,
        show: &mut |r| print(a, mode, r),
    };
    let report = agent::converge(&cx, &opts, mode, hooks)?;
    Ok(report.exit_code(a.detailed_exitcodes))
}

/// The run options the flags give (the clock starts here); `command` is what the report names.
pub fn options(a: &RunArgs, command: &'static str) -> agent::RunOptions {
    agent::RunOptions {
        source: a.source.clone(),
        lock_timeout: a.lock_timeout,
        started: std::time::Instant::now(),
        command,
    }
}

/// The report on stdout: JSON with `--json`; else in full on a terminal, for `plan`, or when
/// something changed or failed, and only the summary line otherwise (the timer's journal).
pub fn print(a: &RunArgs, mode: Mode, report: &Report) -> anyhow::Result<()> {
    if a.json {
        println!("{}", crate::engine::report_json(report)?);
    } else if std::io::stdout().is_terminal() || mode == Mode::Plan || report.failed() || report.summary.changed > 0 {
        print!("{}", crate::secrets::redact(&report.human()));
    } else {
        print!(
            "{}",
            crate::secrets::redact(&report.human().lines().last().map(|l| format!("{l}\n")).unwrap_or_default())
        );
    }
    Ok(())
}
