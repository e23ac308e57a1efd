//! Fleet reboot coordination: is a reboot needed, may this node take a slot, reboot through
//! logind, and after the boot release the slot only when the node converged and is healthy.
//! Built so far: strategies `off`, `immediate` and `etcd`; not yet: windows, pre-reboot hooks,
//! health checks beyond "the run succeeded", FleetLock, `lock reap`, waiting for a slot.

pub mod decide;
pub mod etcd;

use crate::config::{RebootConfig, RebootStrategy};
use crate::step::Host;
use decide::{next_action, Action, RebootState};
use serde::Serialize;
use std::path::Path;

pub const STATE_PATH: &str = "var/lib/bootstrap/reboot.json";

/// What the reboot part of a run decided, for the report.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// Why a reboot is needed (None: it is not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needed: Option<String>,
    /// acquired | pending | rebooting | released | halted | none
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Ask logind to reboot once the report is written.
    #[serde(skip)]
    pub reboot_now: bool,
}

/// Debian/Ubuntu's flag files, RHEL's needs-restarting, or a changed `reboot_required` step.
pub fn reboot_needed(root: &Path, os_family: &str, step_requested: bool) -> Option<String> {
    if step_requested {
        return Some("a step with reboot_required changed".into());
    }
    for f in ["run/reboot-required", "var/run/reboot-required"] {
        if root.join(f).exists() {
            return Some(format!("/{f} exists"));
        }
    }
    if os_family == "rhel" && root == Path::new("/") {
        let out = crate::runner::run(&crate::runner::Cmd { argv: vec!["needs-restarting".into(), "-r".into()], timeout: Some(std::time::Duration::from_secs(60)), ..Default::default() });
        if out.is_ok_and(|o| o.code == Some(1)) {
            return Some("needs-restarting -r says so".into());
        }
    }
    None
}

fn read_state(root: &Path) -> Option<RebootState> {
    std::fs::read(root.join(STATE_PATH)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn outcome(needed: &Option<String>, action: &str, detail: Option<String>) -> Outcome {
    Outcome { needed: needed.clone(), action: action.into(), detail, reboot_now: false }
}

/// Decide and do everything but the reboot itself (the caller writes its report first, then
/// calls `host.systemd.reboot()` when `reboot_now`).
pub fn coordinate(host: &Host, cfg: &RebootConfig, group: &str, holder: &str, run_ok: bool, step_requested: bool) -> anyhow::Result<Outcome> {
    let strategy = cfg.strategy.unwrap_or_default();
    let needed = reboot_needed(&host.root, &host.facts.os.family, step_requested);
    if strategy == RebootStrategy::Off || !host.is_live() {
        return Ok(outcome(&needed, "none", needed.as_ref().map(|_| "reboot strategy is off".to_string())));
    }
    let lock = match strategy {
        RebootStrategy::Etcd => Some(etcd::EtcdLock::new(&cfg.etcd.endpoints, cfg.etcd.prefix.as_deref().unwrap_or(etcd::DEFAULT_PREFIX), group)?),
        _ => None,
    };
    let slots = cfg.etcd.slots.unwrap_or(1);
    let state = read_state(&host.root);
    match next_action(state.as_ref(), &host.facts.boot_id, needed.is_some()) {
        Action::Nothing => Ok(outcome(&needed, "none", None)),
        Action::ReleaseIfHealthy => {
            if !run_ok {
                return Ok(outcome(&needed, "halted", Some("unhealthy after reboot: the run failed; keeping the slot so the rollout stops here".into())));
            }
            if let Some(l) = &lock {
                l.release(holder, slots).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
            }
            std::fs::remove_file(host.root.join(STATE_PATH))?;
            Ok(outcome(&needed, "released", Some(format!("slot of group {group} released after a healthy boot"))))
        }
        a @ (Action::Acquire | Action::RebootWithSlot) => {
            if !run_ok && a == Action::Acquire {
                return Ok(outcome(&needed, "none", Some("not rebooting after a failed run".into())));
            }
            if let Some(l) = &lock {
                match l.acquire(holder, slots) {
                    Ok(etcd::Acquire::Acquired | etcd::Acquire::AlreadyHeld) => {}
                    Ok(etcd::Acquire::Full) => {
                        // A slot we had was taken away (an operator released it): start over.
                        let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                        return Ok(outcome(&needed, "pending", Some(format!("no free reboot slot in group {group}"))));
                    }
                    Err(e) => return Ok(outcome(&needed, "pending", Some(format!("reboot lock unavailable, not rebooting: {e}")))),
                }
            }
            if a == Action::Acquire {
                let st = RebootState {
                    group: group.to_string(),
                    holder: holder.to_string(),
                    boot_id: host.facts.boot_id.clone(),
                    acquired_at: crate::engine::now_rfc3339(),
                    reason: needed.clone().unwrap_or_default(),
                };
                let path = host.root.join(STATE_PATH);
                crate::fsutil::create_parents(&path)?;
                crate::fsutil::atomic_write(&path, &serde_json::to_vec_pretty(&st)?, 0o644, None)?;
            }
            let mut o = outcome(&needed, "rebooting", Some(format!("holding a slot of group {group}")));
            o.reboot_now = true;
            Ok(o)
        }
    }
}
