//! First boot: converge (with the first-boot IMDS deadline, see `Context::gather`), install
//! and enable the agent's own units, and write `firstboot.done` only after all of that
//! succeeded. An instance launched into a warm pool of its Auto Scaling group
//! (`autoscaling/target-lifecycle-state` is `Warmed:*`) is converged and its launch action
//! completed, but gets no `firstboot.done`: its launch into service later is a lifecycle action
//! of its own, which `init` completes again (the firstboot unit at its next boot, or
//! `bootstrap watch` starting that unit when a running warm instance goes into service). A reboot the converge asked for comes last: the node must come back with its
//! timer and its marker, or nothing would run `apply` to release its reboot slot.

use super::{converge, Context, Hooks, RunOptions};
use crate::engine::report::Report;
use crate::engine::Mode;
use crate::state::{self, StateDir};
use crate::step::unit::{UnitFile, UnitStep};
use crate::step::Step;
use anyhow::{Context as _, Result};

/// The agent's units, as shipped in units/ (ExecStart points at /usr/local/bin/bootstrap).
/// The timer comes last: starting it does the one daemon-reload all the files before it owe
/// (two in an Auto Scaling group, where the watcher is started too).
pub const UNITS: [(&str, &str); 4] = [
    ("bootstrap.service", include_str!("../../units/bootstrap.service")),
    ("bootstrap-firstboot.service", include_str!("../../units/bootstrap-firstboot.service")),
    ("bootstrap-watch.service", include_str!("../../units/bootstrap-watch.service")),
    ("bootstrap.timer", include_str!("../../units/bootstrap.timer")),
];

/// Under an Auto Scaling launch hook (`[asg]`, docs/asg.md): hold the launch lifecycle action
/// (heartbeats) while converging, try again after a failure until the first-boot deadline, and
/// complete the action with CONTINUE only after a successful run whose `[[asg.health]]` checks
/// pass, else ABANDON at the deadline (the group replaces the instance). The report
/// (`lifecycle`) and the metrics say which. Without a launch hook: one converge.
pub fn run(cx: &Context, o: &RunOptions, show: &mut dyn FnMut(&Report) -> Result<()>) -> Result<Report> {
    let group = cx.config.asg.group.as_deref().map(|g| cx.substitute(g)).transpose()?;
    let target = crate::asg::watches(&cx.config, &cx.facts)
        .then(|| crate::asg::target_state(&cx.config))
        .flatten();
    // Warm pool: everything but the marker.
    let marker = !target.as_deref().is_some_and(crate::asg::launch::is_warm);
    if !marker {
        tracing::warn!(
            "launched into a warm pool ({}): converging without firstboot.done; init runs again when the instance goes into service",
            target.as_deref().unwrap_or_default()
        );
    }
    if marker {
        // Going into service (again, after a scale-in back into the warm pool): that drain is
        // over, and runs apply again.
        crate::asg::watch::forget_drain_into_pool(&cx.root, cx.facts.instance_id.as_deref());
    }
    let Some(launch) = crate::asg::Launch::start(&cx.root, &cx.facts, &cx.config, group, target)? else {
        return converge_once(cx, o, show, marker);
    };
    loop {
        // The report is shown once, when it is final: after the action was completed (it says
        // how, `lifecycle`), or before a reboot that leaves the action pending. A failed
        // attempt that is tried again is logged (its reason below), not shown.
        let mut before_reboot = |r: &Report| if r.reboot_now() { show(r) } else { Ok(()) };
        let result = converge_once(cx, o, &mut before_reboot, marker);
        if result.as_ref().is_ok_and(|r| r.reboot_now()) {
            // Rebooting (a slot is held for it): the action stays pending; after the boot the
            // firstboot unit runs init again, which holds it again and completes it.
            tracing::warn!("rebooting before the launch lifecycle action is completed: init completes it after the boot");
            return result;
        }
        let failure = match &result {
            Ok(r) if !r.failed() => {
                let failed = launch.failed_checks();
                (!failed.is_empty()).then(|| format!("[[asg.health]] failed: {}", failed.join("; ")))
            }
            Ok(r) => Some(r.error.clone().unwrap_or_else(|| "the run failed".into())),
            Err(e) => Some(format!("{e:#}")),
        };
        let outcome = match failure {
            None => launch.complete(crate::asg::launch::CONTINUE, "converged and healthy".into()),
            Some(why) => {
                tracing::warn!("first boot attempt failed: {why}");
                if launch.wait_retry() {
                    continue;
                }
                launch.complete(
                    crate::asg::launch::ABANDON,
                    format!("not converged and healthy by the first-boot deadline: {why}"),
                )
            }
        };
        return result.and_then(|mut report| {
            if outcome.result != crate::asg::launch::CONTINUE && !report.failed() {
                report.status = crate::engine::report::RunStatus::Failed;
                report
                    .error
                    .get_or_insert_with(|| format!("launch lifecycle action abandoned: {}", outcome.reason));
            }
            report.lifecycle = Some(outcome);
            crate::engine::write_report(&cx.root, &report)?;
            show(&report)?;
            Ok(report)
        });
    }
}

/// Converge; once the steps succeeded and before reboot coordination may take a slot and
/// drain the node, install the units and write the marker (a failure there fails the run: no
/// slot is taken, no reboot); then the report is shown and a reboot the run holds a slot for
/// happens.
fn converge_once(cx: &Context, o: &RunOptions, show: &mut dyn FnMut(&Report) -> Result<()>, marker: bool) -> Result<Report> {
    let mut after_steps = || -> Result<()> {
        install_units(cx)?;
        if !marker {
            return Ok(());
        }
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
        first_boot: false,
    };
    for (name, text) in UNITS {
        let content = text.replace("/usr/local/bin/bootstrap", &exe).into_bytes();
        let (enabled, active) = match name {
            "bootstrap.timer" => (Some(true), Some(true)),
            "bootstrap-firstboot.service" => (Some(true), None),
            // Scale-in can come any time after the launch: in an Auto Scaling group the watcher
            // runs from now on (elsewhere it would exit at once).
            "bootstrap-watch.service" => (Some(true), crate::asg::watches(&cx.config, &cx.facts).then_some(true)),
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
