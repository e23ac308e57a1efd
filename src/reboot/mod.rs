//! Fleet reboot coordination: is a reboot needed, may this node take a slot, reboot through
//! logind, and after the boot release the slot only when the node converged and is healthy.
//! Strategies `off`, `immediate`, `etcd` and `fleet_lock`. The decision is `decide::decide`
//! (pure); this module asks the world and feeds the answers back to it.

pub mod decide;
pub mod etcd;
pub mod fleetlock;
pub mod window;
pub mod lock;

/// The lock service a strategy uses.
pub enum Backend {
    Etcd(etcd::EtcdLock, u64),
    Fleet(fleetlock::FleetLock),
}

impl Backend {
    pub fn from_config(cfg: &RebootConfig, group: &str) -> anyhow::Result<Option<Backend>> {
        Ok(match cfg.strategy.unwrap_or_default() {
            RebootStrategy::Etcd => Some(Backend::Etcd(etcd_from_config(&cfg.etcd, group)?, cfg.etcd.slots.unwrap_or(1))),
            RebootStrategy::FleetLock => {
                let url = cfg
                    .fleet_lock
                    .url
                    .as_deref()
                    .ok_or_else(|| ConfigError::msg("[reboot] strategy = \"fleet_lock\" needs [reboot.fleet_lock] url"))?;
                Some(Backend::Fleet(fleetlock::FleetLock::new(url, group)?))
            }
            _ => None,
        })
    }

    fn acquire(&self, holder: &str) -> Result<etcd::Acquire, etcd::LockError> {
        match self {
            Backend::Etcd(l, slots) => l.acquire(holder, *slots),
            Backend::Fleet(f) => f.acquire(holder),
        }
    }

    /// Block until a slot is ours or `deadline` passes (None: the deadline came first).
    /// etcd queues (see etcd.rs); FleetLock has no watch, so it asks again with capped,
    /// jittered backoff.
    fn wait(&self, holder: &str, deadline: std::time::Instant) -> Result<Option<etcd::Acquire>, etcd::LockError> {
        match self {
            Backend::Etcd(l, slots) => Ok(match l.wait_acquire(holder, *slots, deadline)? {
                etcd::Waited::Acquired => Some(etcd::Acquire::Acquired),
                etcd::Waited::AlreadyHeld => Some(etcd::Acquire::AlreadyHeld),
                etcd::Waited::Deadline => None,
            }),
            Backend::Fleet(f) => {
                let mut delay = std::time::Duration::from_secs(2);
                loop {
                    match f.acquire(holder) {
                        Ok(etcd::Acquire::Full) | Err(etcd::LockError::Unavailable(_)) => {}
                        other => return other.map(Some),
                    }
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=delay.as_millis() as u64);
                    std::thread::sleep((delay / 2 + std::time::Duration::from_millis(jitter)).min(left));
                    delay = (delay * 2).min(std::time::Duration::from_secs(60));
                }
            }
        }
    }

    fn release(&self, holder: &str) -> Result<bool, etcd::LockError> {
        match self {
            Backend::Etcd(l, slots) => l.release(holder, *slots),
            Backend::Fleet(f) => f.release(holder),
        }
    }

    /// Tell operators why this holder keeps its slot (etcd only; FleetLock has no such field).
    fn set_status(&self, holder: &str, status: Option<&serde_json::Value>) {
        if let Backend::Etcd(l, _) = self {
            if let Err(e) = l.set_status(holder, status) {
                tracing::warn!("could not record the holder status in etcd: {e}");
            }
        }
    }
}

/// The group's etcd semaphore from `[reboot.etcd]` (endpoints, prefix, TLS files).
pub fn etcd_from_config(e: &crate::config::EtcdConfig, group: &str) -> anyhow::Result<etcd::EtcdLock> {
    if e.endpoints.is_empty() {
        return Err(ConfigError::msg("no etcd endpoints: set [reboot.etcd] endpoints in /etc/bootstrap/config.toml").into());
    }
    let read = |what: &str, f: &str| std::fs::read(f).map_err(|err| ConfigError::msg(format!("[reboot.etcd] {what} {f}: {err}")));
    let identity_pem = match (&e.cert_file, &e.key_file) {
        (Some(c), Some(k)) => {
            let mut pem = read("cert_file", c)?;
            pem.push(b'\n');
            pem.extend(read("key_file", k)?);
            Some(pem)
        }
        (None, None) => None,
        _ => return Err(ConfigError::msg("[reboot.etcd] cert_file and key_file go together").into()),
    };
    let tls = etcd::Tls {
        ca_pem: e.ca_file.as_deref().map(|f| read("ca_file", f)).transpose()?,
        identity_pem,
    };
    Ok(
        etcd::EtcdLock::with_tls(&e.endpoints, e.prefix.as_deref().unwrap_or(etcd::DEFAULT_PREFIX), group, &tls)
            .map_err(|err| ConfigError::msg(format!("[reboot.etcd]: {err}")))?,
    )
}

use crate::config::{RebootConfig, RebootStrategy};
use crate::error::ConfigError;
use crate::step::Host;
use decide::{decide, Decision, Inputs, LockAnswer, RebootState, Why};
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

fn why_text(why: Why, group: &str) -> String {
    match why {
        Why::RunFailed => "not rebooting after a failed run".into(),
        Why::OutsideWindow => "outside the reboot window".into(),
        Why::NoSlot => format!("no free reboot slot in group {group}"),
        Why::LockUnavailable => "reboot lock unavailable, not rebooting".into(),
        Why::Unhealthy => "unhealthy after reboot".into(),
    }
}

/// The window and this node's turn in it.
struct Turn {
    window: Option<window::Window>,
    splay: std::time::Duration,
}

impl Turn {
    fn from_config(cfg: &RebootConfig) -> anyhow::Result<Turn> {
        let window = match (&cfg.window_start, &cfg.window_length) {
            (Some(s), Some(l)) => Some(window::Window::parse(s, l).map_err(|e| ConfigError::msg(format!("[reboot] window: {e}")))?),
            (None, None) => None,
            _ => return Err(ConfigError::msg("[reboot] window_start and window_length go together").into()),
        };
        let splay = match (&cfg.window_splay, &window) {
            (Some(s), _) => humantime::parse_duration(s).map_err(|e| ConfigError::msg(format!("[reboot] window_splay {s:?}: {e}")))?,
            (None, Some(w)) => (w.length.unsigned_abs() / 4).min(std::time::Duration::from_secs(900)),
            (None, None) => std::time::Duration::ZERO,
        };
        Ok(Turn { window, splay })
    }

    /// Ok(end of the window, if any) when this node may go now; Err(why not) otherwise.
    fn now(&self, holder: &str) -> Result<Option<time::OffsetDateTime>, String> {
        let Some(w) = &self.window else { return Ok(None) };
        let now = time::OffsetDateTime::now_utc();
        let Some((start, end)) = w.current(now) else {
            return Err("outside the reboot window".into());
        };
        let mine = window::Window::node_start(start, self.splay, holder);
        if now < mine {
            return Err(format!("in the reboot window; this node's turn starts at {mine} (window_splay)"));
        }
        Ok(Some(end))
    }
}

/// Decide and do everything but the reboot itself (the caller writes its report first, then
/// calls `host.systemd.reboot()` when `reboot_now`). With `wait`, block for a slot until the
/// window ends instead of trying once.
pub fn coordinate(host: &Host, cfg: &RebootConfig, group: &str, holder: &str, run_ok: bool, step_requested: bool, wait: bool) -> anyhow::Result<Outcome> {
    let strategy = cfg.strategy.unwrap_or_default();
    let needed = reboot_needed(&host.root, &host.facts.os.family, step_requested);
    if strategy == RebootStrategy::Off || !host.is_live() {
        return Ok(outcome(&needed, "none", needed.as_ref().map(|_| "reboot strategy is off".to_string())));
    }
    let lock = Backend::from_config(cfg, group)?;
    let turn = Turn::from_config(cfg)?;
    let state = read_state(&host.root);
    let mut inputs = Inputs {
        state: state.as_ref(),
        boot_id: &host.facts.boot_id,
        needed: needed.is_some(),
        run_ok,
        in_window: turn.now(holder).is_ok(),
        lock: None,
        healthy: None,
    };
    let mut detail: Option<String> = None;
    let mut health_failures = Vec::new();
    loop {
        match decide(&inputs) {
            Decision::Nothing => return Ok(outcome(&needed, "none", None)),
            Decision::Pending(why) => {
                if state.as_ref().is_some_and(|s| s.boot_id == host.facts.boot_id) {
                    let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                }
                let text = match (why, turn.now(holder)) {
                    (Why::OutsideWindow, Err(w)) => w,
                    _ => why_text(why, group),
                };
                let text = match &detail {
                    Some(d) => format!("{text}: {d}"),
                    None => text,
                };
                return Ok(outcome(&needed, "pending", Some(text)));
            }
            Decision::AskLock => {
                let answer = match &lock {
                    None => Ok(Some(etcd::Acquire::Acquired)),
                    Some(l) if wait => {
                        let deadline = match turn.now(holder) {
                            Ok(Some(end)) => {
                                let left = (end - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
                                std::time::Instant::now() + left.unsigned_abs()
                            }
                            // No window: wait as long as it takes (a year is "forever" here).
                            _ => std::time::Instant::now() + std::time::Duration::from_secs(365 * 86400),
                        };
                        l.wait(holder, deadline)
                    }
                    Some(l) => l.acquire(holder).map(Some),
                };
                inputs.lock = Some(match answer {
                    Ok(Some(etcd::Acquire::Acquired | etcd::Acquire::AlreadyHeld)) => LockAnswer::Got,
                    Ok(Some(etcd::Acquire::Full)) => LockAnswer::Full,
                    // The wait reached the end of the window.
                    Ok(None) => {
                        detail = Some("waited for a slot until the window closed".into());
                        LockAnswer::Full
                    }
                    Err(e) => {
                        detail = Some(e.to_string());
                        LockAnswer::Unavailable
                    }
                });
                // The window may have closed while we waited.
                inputs.in_window = turn.now(holder).is_ok();
            }
            Decision::GiveBack(why) => {
                if let Some(l) = &lock {
                    l.release(holder).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
                }
                let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                let text = match why {
                    Why::OutsideWindow if inputs.lock == Some(LockAnswer::Got) => "the reboot window closed while acquiring; slot released".to_string(),
                    w => format!("{}; slot released", why_text(w, group)),
                };
                return Ok(outcome(&needed, "pending", Some(text)));
            }
            Decision::Reboot => {
                if let Some(why) = run_hooks(cfg)? {
                    if let Some(l) = &lock {
                        l.release(holder)
                            .map_err(|e| anyhow::anyhow!("releasing the reboot slot after a failed hook: {e}"))?;
                    }
                    let _ = std::fs::remove_file(host.root.join(STATE_PATH));
                    return Ok(outcome(&needed, "hook_failed", Some(format!("{why}; slot released, not rebooting"))));
                }
                if state.is_none() {
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
                return Ok(o);
            }
            Decision::CheckHealth => {
                health_failures = failed_health(host, cfg)?;
                inputs.healthy = Some(health_failures.is_empty());
            }
            Decision::Release => {
                let _ = std::fs::remove_file(host.root.join(REQUEST_PATH));
                if let Some(l) = &lock {
                    l.release(holder).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
                    l.set_status(holder, None);
                }
                std::fs::remove_file(host.root.join(STATE_PATH))?;
                return Ok(outcome(
                    &needed,
                    "released",
                    Some(format!("slot of group {group} released after a healthy boot")),
                ));
            }
            Decision::Halt(why) => {
                let reason = match why {
                    Why::RunFailed => "unhealthy after reboot: the run failed".to_string(),
                    _ => format!("unhealthy after reboot: {}", health_failures.join("; ")),
                };
                if let Some(l) = &lock {
                    l.set_status(
                        holder,
                        Some(&serde_json::json!({ "state": "halted", "reason": reason, "at": crate::engine::now_rfc3339() })),
                    );
                }
                return Ok(outcome(
                    &needed,
                    "halted",
                    Some(format!("{reason}; keeping the slot so the rollout stops here")),
                ));
            }
        }
    }
}
