//! `bootstrap apply` and `bootstrap plan`

use super::RunArgs;
use crate::engine::{self, Mode, RunInfo};
use crate::error::ConfigError;
use crate::step::Host;
use std::io::IsTerminal;
use std::path::PathBuf;

pub fn run(a: &RunArgs, mode: Mode) -> anyhow::Result<u8> {
    let root = a.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    if !root.is_absolute() || !root.is_dir() {
        return Err(ConfigError::msg(format!("--root {}: must be an existing directory given as an absolute path", root.display())).into());
    }
    let facts = crate::facts::gather_local(&root, &super::facts::naming(&a.naming)).map_err(|e| ConfigError::msg(format!("{e:#}")))?;
    let role = facts.service.clone().ok_or_else(|| ConfigError::msg("no role to apply: pass --role ROLE or --name ENV-SERVICE"))?;
    let source = a.source.as_deref().ok_or_else(|| ConfigError::msg("no bundle source: pass --source DIR (a directory holding roles/)"))?;
    let bundle = crate::source::resolve_local(source)?;

    let env = crate::template::environment();
    let roles = crate::role::resolve(&bundle, &role, &env)?;
    let vars = crate::role::merged_vars(&roles, facts.env.as_deref())?;
    let steps = crate::role::prepare(&roles, &vars, &facts, &root, &env)?;

    // Everything above only reads; the host is touched from here on.
    let _lock = match mode {
        Mode::Apply => Some(crate::runlock::acquire(&root, a.lock_timeout)?),
        Mode::Plan => None,
    };
    let host = Host { root: root.clone(), facts, systemd: Box::new(crate::systemd::Dbus::default()) };
    let report = engine::run(&steps, &host, mode, RunInfo { role, source: source.to_string() });
    if mode == Mode::Apply {
        engine::write_report(&root, &report)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if std::io::stdout().is_terminal() || mode == Mode::Plan || report.failed() || report.summary.changed > 0 {
        print!("{}", report.human());
    } else {
        print!("{}", report.human().lines().last().map(|l| format!("{l}\n")).unwrap_or_default());
    }
    Ok(report.exit_code(a.detailed_exitcodes))
}
