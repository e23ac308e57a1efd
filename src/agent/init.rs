//! First boot: converge (with the first-boot IMDS deadline, see `Context::gather`), install
//! and enable the agent's own units, and write `firstboot.done` only after all of that
//! succeeded. A reboot the converge asked for comes last: the node must come back with its
//! timer and its marker, or nothing would run `apply` to release its reboot slot.

use super::{converge, Context, Hooks, RunOptions};
use crate::engine::report::Report;
use crate::engine::Mode;
use crate::state::{self, StateDir};
use crate::step::unit::{UnitFile, UnitStep};
use crate::step::Step;
use anyhow::{Context as _, Result};

/// The agent's units, as shipped in units/ (ExecStart points at /usr/local/bin/bootstrap).
/// The timer comes last: starting it does the one daemon-reload all three files owe.
pub const UNITS: [(&str, &str); 3] = [
    ("bootstrap.service", include_str!("../../units/bootstrap.service")),
    ("bootstrap-firstboot.service", include_str!("../../units/bootstrap-firstboot.service")),
    ("bootstrap.timer", include_str!("../../units/bootstrap.timer")),
];

/// Converge; once the steps succeeded and before reboot coordination may take a slot and
/// drain the node, install the units and write the marker (a failure there fails the run: no
/// slot is taken, no reboot); then the report is shown and a reboot the run holds a slot for
/// happens.
pub fn run(cx: &Context, o: &RunOptions, show: &mut dyn FnMut(&Report) -> Result<()>) -> Result<Report> {
    let mut after_steps = || -> Result<()> {
        install_units(cx)?;
        let now = format!("{}\n", crate::clock::now_rfc3339());
        StateDir::new(&cx.root).write_mode(state::FIRSTBOOT_DONE, now.as_bytes(), 0o644)
    };
    converge(
        cx,
        o,
        Mode::Apply,
        Hooks {
            after_steps: Some(&mut after_steps),
            show,
        },
    )
}

/// Write the units (ExecStart at this binary), enable the timer and firstboot unit, start
/// the timer. Unit steps do it, so it is idempotent and daemon-reloads (once) only on change.
fn install_units(cx: &Context) -> Result<()> {
    let exe = std::env::current_exe().context("finding the bootstrap binary")?;
    let exe = exe.to_string_lossy();
    let host = crate::step::Host {
        root: cx.root.clone(),
        facts: cx.facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
        refresh_lists: Default::default(),
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
    host.systemd.settle().context("daemon-reload after installing the agent's units")
}
