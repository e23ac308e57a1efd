//! `bootstrap init`: first boot. Gather facts (with the first-boot IMDS deadline), read the
//! user-data config, fetch the bundle, apply the role, install and enable the agent's own
//! units, and write `firstboot.done` only after all of that succeeded. A reboot the converge
//! asked for comes last: the node must come back with its timer and its marker, or nothing
//! would run `apply` to release its reboot slot.

use super::{apply, Context, RunArgs};
use crate::engine::Mode;
use crate::step::unit::{UnitFile, UnitStep};
use crate::step::Step;
use anyhow::{Context as _, Result};
use std::path::PathBuf;

/// The agent's units, as shipped in units/ (ExecStart points at /usr/local/bin/bootstrap).
pub const UNITS: [(&str, &str); 3] = [
    ("bootstrap.service", include_str!("../../units/bootstrap.service")),
    ("bootstrap.timer", include_str!("../../units/bootstrap.timer")),
    ("bootstrap-firstboot.service", include_str!("../../units/bootstrap-firstboot.service")),
];

pub fn run(a: &RunArgs) -> Result<u8> {
    let root = a.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let start = std::time::Instant::now();
    let cx = Context::gather(&root, &a.naming, true)?;
    let c = apply::converge(&cx, a, Mode::Apply).inspect_err(|e| apply::failed_metrics(&cx, e, start))?;
    let ok = matches!((a.detailed_exitcodes, c.code), (true, 0 | 2) | (false, 0));
    if !ok {
        return Ok(c.code);
    }
    // If this fails with a slot held, reboot.json (this boot) keeps it on record: the next
    // init resumes with it.
    install_units(&cx)?;
    let now = format!("{}\n", crate::clock::now_rfc3339());
    crate::state::StateDir::new(&root).write_mode(crate::state::FIRSTBOOT_DONE, now.as_bytes(), 0o644)?;
    if c.reboot_now {
        apply::reboot()?;
    }
    Ok(c.code)
}

/// Write the units (ExecStart at this binary), enable the timer and firstboot unit, start
/// the timer. Unit steps do it, so it is idempotent and daemon-reloads only on change.
fn install_units(cx: &Context) -> Result<()> {
    let exe = std::env::current_exe().context("finding the bootstrap binary")?;
    let exe = exe.to_string_lossy();
    let host = crate::step::Host {
        root: cx.root.clone(),
        facts: cx.facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
    };
    for (name, text) in UNITS {
        let content = text.replace("/usr/local/bin/bootstrap", &exe).into_bytes();
        let (enabled, active) = match name {
            "bootstrap.timer" => (Some(true), Some(true)),
            "bootstrap-firstboot.service" => (Some(true), None),
            _ => (None, None),
        };
        let step = Step::Unit(UnitStep {
            name: name.to_string(),
            files: vec![UnitFile {
                display: format!("/etc/systemd/system/{name}"),
                content,
                field: "content".into(),
            }],
            enabled,
            active,
            masked: None,
            sensitive: false,
        });
        let mut noop = |_: &[crate::step::Change]| Ok(());
        let changes = step.run(&host, Some(&mut noop)).with_context(|| format!("installing {name}"))?;
        if !changes.is_empty() {
            tracing::info!("installed {name}");
        }
    }
    Ok(())
}
