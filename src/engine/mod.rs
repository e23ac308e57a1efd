//! The engine: steps in order, check → plan → apply, first failure stops the run, notify
//! handlers once at the end, the report.

pub mod report;

use crate::fsutil;
use crate::role::{Notify, NotifyAction, Prepared};
use crate::step::Host;
use anyhow::{Context, Result};
use report::{notify_report, Report, StepReport, StepStatus};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Instant;

/// Notify targets of changed steps whose handler has not run yet (a failed or killed run
/// keeps them here, so the next successful run still restarts what it should).
pub const PENDING_NOTIFY_PATH: &str = "var/lib/bootstrap/pending-notify.json";

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
        started_at: now_rfc3339(),
        boot_id: host.facts.boot_id.clone(),
        duration_ms: 0,
        role: info.role,
        env: host.facts.env.clone(),
        name: host.facts.name.clone(),
        source: info.source,
        bundle: None,
        root: host.root.display().to_string(),
        status: "ok".into(),
        summary: Default::default(),
        steps: Vec::new(),
        notify: Vec::new(),
        reboot_required: false,
        reboot_pending: false,
        reboot: None,
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
        let result = step.run(host, if apply { Some(&mut before) } else { None });
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
                        ("skipped", Some("not the live system (--root)".to_string()))
                    } else {
                        ("pending", None)
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
                report.notify.push(notify_report(n, "pending", Some("kept for the next successful run".into())));
            }
        } else {
            run_handlers(&mut pending, host, &mut report);
        }
    }
    if failed || report.notify.iter().any(|n| n.status == "failed") {
        report.status = "failed".into();
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
                report.notify.push(notify_report(&n, "done", None));
            }
            Err(e) => {
                let msg = format!("notify {n} failed: {e:#}");
                tracing::error!("{msg}");
                report.error.get_or_insert(msg.clone());
                report.notify.push(notify_report(&n, "failed", Some(format!("{e:#}"))));
            }
        }
    }
    if let Err(e) = write_pending(&host.root, pending) {
        report.error.get_or_insert(format!("{e:#}"));
        report.status = "failed".into();
    }
}

/// The notify targets owed from earlier runs. A record that cannot be read or parsed does not
/// mean "nothing owed": which handlers are owed is unknown, so every handler this role's steps
/// name is run once (a restart too many is the safe side of a restart missed), and the record
/// is rewritten clean after them.
fn read_pending(root: &Path, steps: &[Prepared]) -> BTreeSet<Notify> {
    let path = root.join(PENDING_NOTIFY_PATH);
    let bad = match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeSet::new(),
        Err(e) => e.to_string(),
        Ok(b) => match serde_json::from_slice(&b) {
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
    let path = root.join(PENDING_NOTIFY_PATH);
    if pending.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| format!("removing {}", path.display())),
            _ => Ok(()),
        };
    }
    write_state(root, PENDING_NOTIFY_PATH, &serde_json::to_vec_pretty(pending)?)
}

/// The agent's state directory (relative to the root): only root may look inside, since its
/// files can hold step details.
pub const STATE_DIR: &str = "var/lib/bootstrap";

/// Create `<root>/var/lib/bootstrap` mode 0700, or tighten an existing one that others can
/// read (an older agent made it 0755). Returns its path.
pub fn state_dir(root: &Path) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = root.join(STATE_DIR);
    fsutil::create_parents(&dir)?;
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    // On the live system a symlink to a directory elsewhere (made by root: /var/lib is root's)
    // is followed; under --root it is not, so nothing outside the root is touched.
    let live = root == Path::new("/");
    let md = if live { std::fs::metadata(&dir) } else { std::fs::symlink_metadata(&dir) }.with_context(|| format!("reading {}", dir.display()))?;
    if !md.is_dir() {
        anyhow::bail!(
            "{} is not a directory{}",
            dir.display(),
            if live { "" } else { " (symlinks under --root are not followed)" }
        );
    }
    if md.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).with_context(|| format!("chmod 0700 {}", dir.display()))?;
    }
    Ok(dir)
}

/// Write a state file (`rel` under the root, inside [`STATE_DIR`]) atomically, mode 0600 in the
/// 0700 state directory: `last-run.json`, `pending-notify.json`, `reboot.json`.
pub fn write_state(root: &Path, rel: &str, content: &[u8]) -> Result<()> {
    state_dir(root)?;
    let path = root.join(rel);
    fsutil::create_parents(&path)?;
    fsutil::atomic_write(&path, content, 0o600, None)
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
    write_state(root, report::REPORT_PATH, &json)
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// State files are root's alone: 0600 in a 0700 directory, made so or tightened from an
    /// older agent's 0755; under --root a symlinked state directory is refused, not followed.
    #[test]
    fn state_files_are_private() {
        let root = tempfile::tempdir().unwrap();
        write_state(root.path(), report::REPORT_PATH, b"{}\n").unwrap();
        assert_eq!(mode(&root.path().join(STATE_DIR)), 0o700);
        assert_eq!(mode(&root.path().join(report::REPORT_PATH)), 0o600);

        let old = tempfile::tempdir().unwrap();
        let dir = old.path().join(STATE_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        write_state(old.path(), PENDING_NOTIFY_PATH, b"[]").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&old.path().join(PENDING_NOTIFY_PATH)), 0o600);

        let linked = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(linked.path().join("var/lib")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), linked.path().join(STATE_DIR)).unwrap();
        let err = write_state(linked.path(), report::REPORT_PATH, b"{}").unwrap_err().to_string();
        assert!(err.contains("is not a directory (symlinks under --root are not followed)"), "{err}");
        assert_eq!(mode(elsewhere.path()), 0o755, "nothing outside the root was changed");
    }
}
