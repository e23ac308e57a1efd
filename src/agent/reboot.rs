//! `bootstrap reboot`: the reboot part alone, under the run lock (it never reboots in the
//! middle of an apply).

use super::Context;
use crate::engine::report::RunStatus;
use crate::reboot::{Action, Outcome};
use crate::state::{self, StateDir};
use std::path::Path;
use std::time::Duration;

/// `--request`: ask for a coordinated reboot on the next run.
pub fn request(root: &Path) -> anyhow::Result<()> {
    let now = format!("{}\n", crate::clock::now_rfc3339());
    StateDir::new(root).write_mode(state::REBOOT_REQUESTED, now.as_bytes(), 0o644)
}

/// `--check`: why a reboot is needed now (None: it is not). Read-only.
pub fn check(cx: &Context) -> anyhow::Result<Option<String>> {
    crate::reboot::check(&cx.root, &cx.facts.os.family, &cx.facts.boot_id)
}

/// What coordinating decided, with the run lock still held: the caller prints the outcome,
/// then [`Coordinated::finish`] reboots when it says so and lets the lock go.
pub struct Coordinated {
    pub outcome: Outcome,
    guard: Option<crate::runlock::RunLock>,
}

impl Coordinated {
    /// Reboot when the outcome says so; the exit code (1 when the outcome is a failure).
    pub fn finish(self) -> anyhow::Result<u8> {
        if self.outcome.reboot_now {
            crate::systemd::Systemd::reboot(&crate::systemd::Dbus::default())?;
        }
        drop(self.guard);
        Ok(if self.outcome.action.is_failure() { 1 } else { 0 })
    }
}

/// Take the run lock, then decide and do everything but the reboot itself. With `wait`,
/// block for a slot until the window ends instead of trying once.
pub fn coordinate(cx: &Context, wait: bool, lock_timeout: Duration) -> anyhow::Result<Coordinated> {
    let root = cx.root.as_path();
    let settings = cx.reboot_settings()?;
    let mut guard = Some(crate::runlock::acquire(root, lock_timeout)?);
    let boot_id = cx.facts.boot_id.clone();
    let state = crate::reboot::read_state(root)?;
    // Back from our reboot: the slot goes back only after a successful converge in THIS boot;
    // the report from before the reboot says nothing about the node now.
    if let Some(st) = state.as_ref().filter(|st| st.boot_id != boot_id) {
        match last_run(root)? {
            Some((_, Some(b))) if b == boot_id => {}
            _ => {
                let outcome = Outcome {
                    needed: None,
                    action: Action::Holding,
                    detail: Some(format!(
                        "back from the reboot; no apply has run in this boot yet: the slot of group {} is released after one succeeds",
                        st.group
                    )),
                    reboot_now: false,
                };
                return Ok(Coordinated { outcome, guard });
            }
        }
    }
    // No reboot after a failed run, and after a reboot no release unless the run of this boot
    // succeeded. No report yet is no failure (before any reboot).
    let run_ok = || -> anyhow::Result<bool> { Ok(last_run(root)?.is_none_or(|(ok, _)| ok)) };
    let host = crate::step::Host {
        root: root.to_path_buf(),
        facts: cx.facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
        refresh_lists: Default::default(),
        first_boot: false,
    };
    let ok = run_ok()?;
    let waiting = wait.then_some(crate::reboot::Waiting {
        root,
        lock_timeout,
        guard: &mut guard,
        run_ok: &run_ok,
    });
    let outcome = crate::reboot::coordinate(&host, &settings, crate::reboot::RunResult { ok, changed: None }, waiting)?;
    Ok(Coordinated { outcome, guard })
}

/// The last converge's report: (succeeded, the boot it ran in); None when there is none yet.
/// A report that cannot be read or parsed is an error, not a success.
fn last_run(root: &Path) -> anyhow::Result<Option<(bool, Option<String>)>> {
    let dir = StateDir::new(root);
    let path = dir.path(state::REPORT);
    let Some(b) = dir.read(state::REPORT)? else { return Ok(None) };
    let r: serde_json::Value = serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let ok = serde_json::from_value::<RunStatus>(r["status"].clone()).ok() == Some(RunStatus::Ok);
    Ok(Some((ok, r["boot_id"].as_str().map(str::to_string))))
}
