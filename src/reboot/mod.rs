//! Fleet reboot coordination: is a reboot needed, may this node take a slot, reboot through
//! logind, and after the boot release the slot only when the node converged and is healthy.
//! Strategies `off`, `immediate`, `etcd` and `fleet_lock`; not yet: waiting for a slot
//! (`reboot --wait`), a random delay inside the window.

pub mod decide;
pub mod etcd;
pub mod fleetlock;
pub mod window;

/// The lock service a strategy uses.
enum Backend {
    Etcd(etcd::EtcdLock, u64),
    Fleet(fleetlock::FleetLock),
}

impl Backend {
    fn acquire(&self, holder: &str) -> Result<etcd::Acquire, etcd::LockError> {
        match self {
            Backend::Etcd(l, slots) => l.acquire(holder, *slots),
            Backend::Fleet(f) => f.acquire(holder),
        }
    }

    fn release(&self, holder: &str) -> Result<bool, etcd::LockError> {
        match self {
            Backend::Etcd(l, slots) => l.release(holder, *slots),
            Backend::Fleet(f) => f.release(holder),
        }
    }
}

use crate::config::{RebootConfig, RebootStrategy};
use crate::step::Host;
use decide::{next_action, Action, RebootState};
use serde::Serialize;
use std::path::Path;

pub const STATE_PATH: &str = "var/lib/bootstrap/reboot.json";
/// Written by `bootstrap reboot --request`; removed after the reboot it asked for.
pub const REQUEST_PATH: &str = "var/lib/bootstrap/reboot-requested";
const HOOK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
    if root.join(REQUEST_PATH).exists() {
        return Some("requested with bootstrap reboot --request".into());
    }
    for f in ["run/reboot-required", "var/run/reboot-required"] {
        if root.join(f).exists() {
            return Some(format!("/{f} exists"));
        }
    }
    if os_family == "rhel" && root == Path::new("/") {
        let out = crate::runner::run(&crate::runner::Cmd {
            argv: vec!["needs-restarting".into(), "-r".into()],
            timeout: Some(std::time::Duration::from_secs(60)),
            ..Default::default()
        });
        if out.is_ok_and(|o| o.code == Some(1)) {
            return Some("needs-restarting -r says so".into());
        }
    }
    None
}

fn duration(s: &Option<String>, default: std::time::Duration) -> anyhow::Result<std::time::Duration> {
    match s {
        Some(t) => humantime::parse_duration(t).map_err(|e| crate::error::ConfigError::msg(format!("[reboot] timeout {t:?}: {e}")).into()),
        None => Ok(default),
    }
}

/// Run the pre-reboot hooks in order; the first failure is returned.
fn run_hooks(cfg: &RebootConfig) -> anyhow::Result<Option<String>> {
    for h in &cfg.pre_hook {
        let cmd = crate::runner::Cmd {
            argv: h.command.clone(),
            timeout: Some(duration(&h.timeout, HOOK_TIMEOUT)?),
            ..Default::default()
        };
        let out = crate::runner::run(&cmd);
        match out {
            Ok(o) if o.success() => {}
            Ok(o) => return Ok(Some(format!("pre-reboot hook {:?} {}: {}", h.command, o.describe(), o.tail(5)))),
            Err(e) => return Ok(Some(format!("pre-reboot hook {:?}: {e:#}", h.command))),
        }
    }
    Ok(None)
}

/// Every health check; the failures, described.
fn failed_health(host: &Host, cfg: &RebootConfig) -> anyhow::Result<Vec<String>> {
    let mut failed = Vec::new();
    for c in &cfg.health {
        let timeout = duration(&c.timeout, HEALTH_TIMEOUT)?;
        match (&c.unit, &c.url, &c.command) {
            (Some(u), None, None) => match host.systemd.unit_state(u) {
                Ok(s) if s.active_state == "active" => {}
                Ok(s) => failed.push(format!("unit {u} is {}", s.active_state)),
                Err(e) => failed.push(format!("unit {u}: {e:#}")),
            },
            (None, Some(url), None) => {
                let r = reqwest::blocking::Client::builder().timeout(timeout).build()?.get(url).send();
                match r {
                    Ok(r) if r.status().as_u16() == 200 => {}
                    Ok(r) => failed.push(format!("GET {url}: HTTP {}", r.status())),
                    Err(e) => failed.push(format!("GET {url}: {e}")),
                }
            }
            (None, None, Some(argv)) => match crate::runner::run(&crate::runner::Cmd {
                argv: argv.clone(),
                timeout: Some(timeout),
                ..Default::default()
            }) {
                Ok(o) if o.success() => {}
                Ok(o) => failed.push(format!("{argv:?} {}", o.describe())),
                Err(e) => failed.push(format!("{argv:?}: {e:#}")),
            },
            _ => return Err(crate::error::ConfigError::msg("[[reboot.health]]: give exactly one of unit, url, command").into()),
        }
    }
    Ok(failed)
}

fn read_state(root: &Path) -> Option<RebootState> {
    std::fs::read(root.join(STATE_PATH)).ok().and_then(|b| serde_json::from_slice(&b).ok())
}

fn outcome(needed: &Option<String>, action: &str, detail: Option<String>) -> Outcome {
    Outcome {
        needed: needed.clone(),
        action: action.into(),
        detail,
        reboot_now: false,
    }
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
        RebootStrategy::Etcd => Some(Backend::Etcd(
            etcd::EtcdLock::new(&cfg.etcd.endpoints, cfg.etcd.prefix.as_deref().unwrap_or(etcd::DEFAULT_PREFIX), group)?,
            cfg.etcd.slots.unwrap_or(1),
        )),
        RebootStrategy::FleetLock => {
            let url = cfg
                .fleet_lock
                .url
                .as_deref()
                .ok_or_else(|| crate::error::ConfigError::msg("[reboot] strategy = \"fleet_lock\" needs [reboot.fleet_lock] url"))?;
            Some(Backend::Fleet(fleetlock::FleetLock::new(url, group)?))
        }
        _ => None,
    };
    let state = read_state(&host.root);
    match next_action(state.as_ref(), &host.facts.boot_id, needed.is_some()) {
        Action::Nothing => Ok(outcome(&needed, "none", None)),
        Action::ReleaseIfHealthy => {
            if !run_ok {
                return Ok(outcome(
                    &needed,
                    "halted",
                    Some("unhealthy after reboot: the run failed; keeping the slot so the rollout stops here".into()),
                ));
            }
            let failed = failed_health(host, cfg)?;
            if !failed.is_empty() {
                return Ok(outcome(
                    &needed,
                    "halted",
                    Some(format!(
                        "unhealthy after reboot: {}; keeping the slot so the rollout stops here",
                        failed.join("; ")
                    )),
                ));
            }
            let _ = std::fs::remove_file(host.root.join(REQUEST_PATH));
            if let Some(l) = &lock {
                l.release(holder).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
            }
            std::fs::remove_file(host.root.join(STATE_PATH))?;
            Ok(outcome(
                &needed,
                "released",
                Some(format!("slot of group {group} released after a healthy boot")),
            ))
        }
        a @ (Action::Acquire | Action::RebootWithSlot) => {
            if !run_ok && a == Action::Acquire {
                return Ok(outcome(&needed, "none", Some("not rebooting after a failed run".into())));
            }
            let window = match (&cfg.window_start, &cfg.window_length) {
                (Some(s), Some(l)) => Some(window::Window::parse(s, l).map_err(|e| crate::error::ConfigError::msg(format!("[reboot] window: {e}")))?),
                (None, None) => None,
                _ => return Err(crate::error::ConfigError::msg("[reboot] window_start and window_length go together").into()),
            };
            let inside = || window.as_ref().is_none_or(|w| w.contains(time::OffsetDateTime::now_utc()));
            if !inside() {
                return Ok(outcome(&needed, "pending", Some("outside the reboot window".into())));
            }
            if let Some(l) = &lock {
                match l.acquire(holder) {
                    Ok(etcd::Acquire::Acquired | etcd::Acquire::AlreadyHeld) => {}
                    Ok(etcd::Acquire::Full) => {
                        // A slot we had was taken away (an operator released it): start over.
                        let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                        return Ok(outcome(&needed, "pending", Some(format!("no free reboot slot in group {group}"))));
                    }
                    Err(e) => return Ok(outcome(&needed, "pending", Some(format!("reboot lock unavailable, not rebooting: {e}")))),
                }
            }
            // The window may have closed while we waited for the lock: give the slot back.
            if !inside() {
                if let Some(l) = &lock {
                    l.release(holder).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
                }
                let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                return Ok(outcome(
                    &needed,
                    "pending",
                    Some("the reboot window closed while acquiring; slot released".into()),
                ));
            }
            if let Some(why) = run_hooks(cfg)? {
                if let Some(l) = &lock {
                    l.release(holder)
                        .map_err(|e| anyhow::anyhow!("releasing the reboot slot after a failed hook: {e}"))?;
                }
                let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                return Ok(outcome(&needed, "hook_failed", Some(format!("{why}; slot released, not rebooting"))));
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
