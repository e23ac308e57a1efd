//! The engine: steps in order, check → plan → apply, first failure stops the run, notify
//! handlers once at the end, the report.

pub mod report;

use crate::role::{Notify, NotifyAction, Prepared};
use crate::state::{self, StateDir};
use crate::step::Host;
use anyhow::Result;
use report::{notify_report, NotifyStatus, Report, RunStatus, StepReport, StepStatus};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Plan,
    Apply,
}

/// Who the run is about, for the report.
pub struct RunInfo {
    pub role: String,
    pub source: String,
}

pub fn run(steps: &[Prepared], host: &Host, mode: Mode, info: RunInfo) -> Report {
    let started = Instant::now();
    let apply = mode == Mode::Apply;
    let run_span = tracing::info_span!("run", role = %info.role, mode = ?mode);
    let _enter = run_span.enter();
    let mut report = Report {
        version: report::REPORT_VERSION,
        command: if apply { "apply" } else { "plan" }.into(),
        started_at: crate::clock::now_rfc3339(),
        boot_id: host.facts.boot_id.clone(),
        duration_ms: 0,
        role: info.role,
        env: host.facts.env.clone(),
        name: host.facts.name.clone(),
        source: info.source,
        bundle: None,
        root: host.root.display().to_string(),
        status: RunStatus::Ok,
        summary: Default::default(),
        steps: Vec::new(),
        notify: Vec::new(),
        reboot_required: false,
        reboot_pending: false,
        reboot: None,
        rollout: None,
        lifecycle: None,
        error: None,
    };
    let mut pending: BTreeSet<Notify> = if apply && host.is_live() {
        read_pending(&host.root, steps)
    } else {
        BTreeSet::new()
    };
    let mut failed = false;
    for p in steps {
        let t = Instant::now();
        let mut sr = StepReport {
            id: p.id.clone(),
            kind: p.kind.into(),
            role: p.role.clone(),
            at: p.pos.to_string(),
            status: StepStatus::NotRun,
            changes: vec![],
            error: None,
            note: None,
            duration_ms: 0,
        };
        if failed {
            report.steps.push(sr);
            continue;
        }
        let Some(step) = &p.step else {
            sr.status = StepStatus::Skipped;
            sr.note = Some("`when` is false".into());
            report.steps.push(sr);
            continue;
        };
        if step.needs_live_system() && !host.is_live() {
            sr.status = StepStatus::Skipped;
            sr.note = Some("not the live system (--root)".into());
            report.steps.push(sr);
            continue;
        }
        let span = tracing::info_span!("step", id = %p.id);
        let _e = span.enter();
        // A notifying step records its handlers before it changes anything.
        let mut before = |_: &[crate::step::Change]| -> Result<()> {
            if !p.notify.is_empty() && host.is_live() {
                pending.extend(p.notify.iter().cloned());
                write_pending(&host.root, &pending)?;
            }
            Ok(())
        };
        // A daemon-reload owed by earlier unit steps is done before a step that may use
        // systemd's view of the units (see `crate::systemd`).
        let settled = if apply && step.settles_reload_first() {
            host.systemd
                .settle()
                .map_err(|e| e.context("the daemon-reload owed for unit files changed by earlier steps"))
        } else {
            Ok(())
        };
        let result = settled.and_then(|()| step.run(host, if apply { Some(&mut before) } else { None }));
        match result {
            Ok(changes) if changes.is_empty() => {
                sr.status = StepStatus::InSync;
                tracing::debug!("in sync");
            }
            Ok(changes) => {
                sr.status = StepStatus::Changed;
                let fields: Vec<&str> = changes.iter().map(|c| c.field.as_str()).collect();
                tracing::info!(fields = %fields.join(","), "{}", if apply { "changed" } else { "would change" });
                sr.changes = if p.sensitive {
                    changes.iter().map(|c| c.redacted()).collect()
                } else {
                    changes
                };
                report.reboot_required |= p.reboot_required;
                if !apply || !host.is_live() {
                    let (status, why) = if apply {
                        (NotifyStatus::Skipped, Some("not the live system (--root)".to_string()))
                    } else {
                        (NotifyStatus::Pending, None)
                    };
                    for n in &p.notify {
                        if !report.notify.iter().any(|r| r.target == n.to_string()) {
                            report.notify.push(notify_report(n, status, why.clone()));
                        }
                    }
                }
            }
            Err(e) => {
                let msg = format!("{}: step `{}` failed: {e:#}", p.pos, p.id);
                tracing::error!("{msg}");
                sr.status = StepStatus::Failed;
                sr.error = Some(msg.clone());
                report.error = Some(msg);
                failed = true;
            }
        }
        sr.duration_ms = t.elapsed().as_millis() as u64;
        report.steps.push(sr);
    }
    if apply && host.is_live() {
        if failed {
            for n in &pending {
                report
                    .notify
                    .push(notify_report(n, NotifyStatus::Pending, Some("kept for the next successful run".into())));
            }
        } else {
            run_handlers(&mut pending, host, &mut report);
        }
    }
    // A reload still owed (no job came after the last unit step that changed files): now, even
    // after a failed step, so systemd does not keep the old unit files loaded.
    if apply {
        if let Err(e) = host.systemd.settle() {
            let msg = format!("daemon-reload for the changed unit files failed: {e:#}");
            tracing::error!("{msg}");
            report.error.get_or_insert(msg);
            failed = true;
        }
    }
    if failed || report.notify.iter().any(|n| n.status == NotifyStatus::Failed) {
        report.status = RunStatus::Failed;
    }
    report.duration_ms = started.elapsed().as_millis() as u64;
    report.summarize();
    report
}

fn run_handlers(pending: &mut BTreeSet<Notify>, host: &Host, report: &mut Report) {
    for n in pending.clone() {
        let r = match n.action {
            NotifyAction::Restart => host.systemd.restart(&n.unit),
            NotifyAction::Reload => host.systemd.reload(&n.unit),
        };
        match r {
            Ok(()) => {
                tracing::info!(target_unit = %n.unit, "notify {n} done");
                pending.remove(&n);
                report.notify.push(notify_report(&n, NotifyStatus::Done, None));
            }
            Err(e) => {
                let msg = format!("notify {n} failed: {e:#}");
                tracing::error!("{msg}");
                report.error.get_or_insert(msg.clone());
                report.notify.push(notify_report(&n, NotifyStatus::Failed, Some(format!("{e:#}"))));
            }
        }
    }
    if let Err(e) = write_pending(&host.root, pending) {
        report.error.get_or_insert(format!("{e:#}"));
        report.status = RunStatus::Failed;
    }
}

/// The notify targets owed from earlier runs. A record that cannot be read or parsed does not
/// mean "nothing owed": which handlers are owed is unknown, so every handler this role's steps
/// name is run once (a restart too many is the safe side of a restart missed), and the record
/// is rewritten clean after them.
fn read_pending(root: &Path, steps: &[Prepared]) -> BTreeSet<Notify> {
    let dir = StateDir::new(root);
    let path = dir.path(state::PENDING_NOTIFY);
    let bad = match dir.read(state::PENDING_NOTIFY) {
        Ok(None) => return BTreeSet::new(),
        Err(e) => format!("{e:#}"),
        Ok(Some(b)) => match serde_json::from_slice(&b) {
            Ok(p) => return p,
            Err(e) => e.to_string(),
        },
    };
    let all: BTreeSet<Notify> = steps.iter().flat_map(|p| p.notify.iter().cloned()).collect();
    let names: Vec<String> = all.iter().map(|n| n.to_string()).collect();
    tracing::warn!(
        "{}: {bad}: the owed handlers are unknown, running every handler of the role: {}",
        path.display(),
        if names.is_empty() { "none".to_string() } else { names.join(", ") }
    );
    all
}

fn write_pending(root: &Path, pending: &BTreeSet<Notify>) -> Result<()> {
    let dir = StateDir::new(root);
    if pending.is_empty() {
        return dir.remove(state::PENDING_NOTIFY);
    }
    dir.write(state::PENDING_NOTIFY, &serde_json::to_vec_pretty(pending)?)
}

/// The report as JSON, every string redacted (never the structure: a short secret cannot make
/// the document invalid). For `last-run.json` and `--json`.
pub fn report_json(report: &Report) -> Result<String> {
    Ok(crate::secrets::redact_json(&serde_json::to_string_pretty(report)?))
}

/// Write the report atomically to `<root>/var/lib/bootstrap/last-run.json`.
pub fn write_report(root: &Path, report: &Report) -> Result<()> {
    let mut json = report_json(report)?.into_bytes();
    json.push(b'\n');
    StateDir::new(root).write(state::REPORT, &json)
}
