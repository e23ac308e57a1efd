//! Fleet reboot coordination: is a reboot needed, may this node take a slot, reboot through
//! logind, and after the boot release the slot only when the node converged and is healthy.
//! Strategies `off`, `immediate`, `etcd` and `fleet_lock`. The decision is `decide::decide`
//! (pure); this module asks the world and feeds the answers back to it.

pub mod decide;
pub mod etcd;
pub mod fleetlock;
pub mod lock;
pub mod settings;
pub mod window;

pub use settings::Settings;

/// The lock service a strategy uses.
pub enum Backend {
    Etcd(etcd::EtcdLock, u64),
    Fleet(fleetlock::FleetLock),
}

impl Backend {
    /// The lock service of a validated `[reboot]` (None: `off` and `immediate` use none).
    pub fn from_settings(s: &Settings) -> anyhow::Result<Option<Backend>> {
        let group = || {
            s.group
                .as_deref()
                .ok_or_else(|| ConfigError::msg("no reboot group: set [reboot] group in /etc/bootstrap/config.toml or name the node (ENV-SERVICE)"))
        };
        Ok(match &s.service {
            settings::Service::None => None,
            settings::Service::Etcd(e) => Some(Backend::Etcd(
                etcd::EtcdLock::with_tls(&e.endpoints, &e.prefix, group()?, &e.tls).map_err(|err| ConfigError::msg(format!("[reboot.etcd]: {err}")))?,
                e.slots,
            )),
            settings::Service::FleetLock(url) => Some(Backend::Fleet(fleetlock::FleetLock::new(url, group()?)?)),
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
                etcd::Waited::Deadline | etcd::Waited::Closed => None,
            }),
            Backend::Fleet(f) => poll_until(|| f.acquire(holder), deadline, std::time::Duration::from_secs(2)),
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

/// Ask `acquire` again with capped, jittered backoff until a slot is ours or `deadline`
/// passes. At the deadline, the last answer decides: "full" is `None`; an unreachable lock
/// service is that error (so a caller holding a record of a slot keeps it: nothing was learnt).
fn poll_until(
    mut acquire: impl FnMut() -> Result<etcd::Acquire, etcd::LockError>,
    deadline: std::time::Instant,
    first_delay: std::time::Duration,
) -> Result<Option<etcd::Acquire>, etcd::LockError> {
    let mut delay = first_delay;
    loop {
        let last = match acquire() {
            Ok(etcd::Acquire::Full) => None,
            Err(e @ etcd::LockError::Unavailable(_)) => Some(e),
            other => return other.map(Some),
        };
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return match last {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=delay.as_millis() as u64);
        std::thread::sleep((delay / 2 + std::time::Duration::from_millis(jitter)).min(left));
        delay = (delay * 2).min(std::time::Duration::from_secs(60));
    }
}

/// The group's etcd semaphore from `[reboot.etcd]` (endpoints, prefix, TLS files).
pub fn etcd_from_config(e: &crate::config::EtcdConfig, group: &str) -> anyhow::Result<etcd::EtcdLock> {
    if e.endpoints.is_empty() {
        return Err(ConfigError::msg("no etcd endpoints: set [reboot.etcd] endpoints in /etc/bootstrap/config.toml").into());
    }
    let tls = settings::etcd_tls(e)?;
    Ok(
        etcd::EtcdLock::with_tls(&e.endpoints, e.prefix.as_deref().unwrap_or(etcd::DEFAULT_PREFIX), group, &tls)
            .map_err(|err| ConfigError::msg(format!("[reboot.etcd]: {err}")))?,
    )
}

use crate::config::RebootStrategy;
use crate::error::ConfigError;
use crate::state::{self, StateDir};
use crate::step::Host;
use decide::{decide, Decision, Inputs, LockAnswer, Need, NeedRecord, RebootState, Why};
use serde::Serialize;
use settings::Check;
use std::path::Path;

/// What the reboot part of a run did (`action` in the report and in `bootstrap reboot`'s
/// output).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// No reboot needed, or the strategy is off.
    #[default]
    None,
    /// Needed, and waits: outside the window, no free slot, the lock service unavailable.
    Pending,
    /// A slot is held and the hooks passed: the caller reboots once its report is written.
    Rebooting,
    /// Back and healthy: the slot was given back.
    Released,
    /// Back from the reboot, but no converge of this boot has succeeded yet.
    Holding,
    /// Unhealthy after the reboot: the slot is kept so the rollout stops here.
    Halted,
    /// A pre-reboot hook failed: slot released, no reboot.
    HookFailed,
}

impl Action {
    /// The run fails with this action (exit 1, report status `failed`).
    pub fn is_failure(self) -> bool {
        matches!(self, Action::Halted | Action::HookFailed)
    }
}

/// What the reboot part of a run decided, for the report.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Outcome {
    /// Why a reboot is needed (None: it is not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub needed: Option<String>,
    pub action: Action,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Ask logind to reboot once the report is written.
    #[serde(skip)]
    pub reboot_now: bool,
}

/// A recorded step-made need (of this boot), Debian/Ubuntu's flag files, RHEL's
/// needs-restarting, or `bootstrap reboot --request`.
pub fn reboot_needed(root: &Path, os_family: &str, need: Option<&Need>) -> Option<String> {
    if let Some(n) = need {
        return Some(format!("step `{}` (reboot_required) changed at {}", n.step, n.since));
    }
    if StateDir::new(root).exists(state::REBOOT_REQUESTED) {
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

/// `bootstrap reboot --check`: is a reboot needed now (read-only; a need recorded in an
/// earlier boot was met by that boot's end).
pub fn check(root: &Path, os_family: &str, boot_id: &str) -> anyhow::Result<Option<String>> {
    let need = read_json::<Need>(root, state::REBOOT_NEEDED)?.filter(|n| n.boot_id == boot_id);
    Ok(reboot_needed(root, os_family, need.as_ref()))
}

/// Run the pre-reboot hooks in order; the first failure is returned.
fn run_hooks(s: &Settings) -> Option<String> {
    run_commands("pre-reboot hook", &s.hooks)
}

/// Run hook commands in order, each with its timeout; the first failure is returned, described
/// with `what` (`pre-reboot hook`, `terminate hook`).
pub fn run_commands(what: &str, hooks: &[settings::Hook]) -> Option<String> {
    for h in hooks {
        let cmd = crate::runner::Cmd {
            argv: h.argv.clone(),
            timeout: Some(h.timeout),
            ..Default::default()
        };
        match crate::runner::run(&cmd) {
            Ok(o) if o.success() => {}
            Ok(o) => return Some(format!("{what} {:?} {}: {}", h.argv, o.describe(), o.tail(5))),
            Err(e) => return Some(format!("{what} {:?}: {e:#}", h.argv)),
        }
    }
    None
}

/// Every health check; the failures, described.
fn failed_health(host: &Host, s: &Settings) -> Vec<String> {
    failed_checks(host, &s.health)
}

/// Every check of `checks` (`[[reboot.health]]`, `[[asg.health]]`); the failures, described.
pub fn failed_checks(host: &Host, checks: &[settings::Health]) -> Vec<String> {
    let mut failed = Vec::new();
    for c in checks {
        match &c.check {
            Check::Unit(u) => match host.systemd.unit_state(u) {
                Ok(st) if st.active_state == "active" => {}
                Ok(st) => failed.push(format!("unit {u} is {}", st.active_state)),
                Err(e) => failed.push(format!("unit {u}: {e:#}")),
            },
            Check::Url(url) => {
                let r = reqwest::blocking::Client::builder()
                    .timeout(c.timeout)
                    .build()
                    .map_err(|e| e.to_string())
                    .and_then(|cl| cl.get(url).send().map_err(|e| e.to_string()));
                match r {
                    Ok(r) if r.status().as_u16() == 200 => {}
                    Ok(r) => failed.push(format!("GET {url}: HTTP {}", r.status())),
                    Err(e) => failed.push(format!("GET {url}: {e}")),
                }
            }
            Check::Command(argv) => match crate::runner::run(&crate::runner::Cmd {
                argv: argv.clone(),
                timeout: Some(c.timeout),
                ..Default::default()
            }) {
                Ok(o) if o.success() => {}
                Ok(o) => failed.push(format!("{argv:?} {}", o.describe())),
                Err(e) => failed.push(format!("{argv:?}: {e:#}")),
            },
        }
    }
    failed
}

/// A state file under `root`: None when absent; a file that cannot be read or parsed is an
/// error naming it (never "nothing recorded").
fn read_json<T: serde::de::DeserializeOwned>(root: &Path, name: &str) -> anyhow::Result<Option<T>> {
    let dir = StateDir::new(root);
    match dir.read(name)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
            anyhow::anyhow!(
                "{} is corrupt ({e}); it is kept as it is: check the reboot slot with `bootstrap lock status`, \
                 release it if it is this node's, then remove the file",
                dir.path(name).display()
            )
        }),
    }
}

/// The slot record (reboot.json): None when this node holds no slot by its own records.
pub fn read_state(root: &Path) -> anyhow::Result<Option<RebootState>> {
    read_json(root, state::REBOOT)
}

/// Written 0600: the reason can name a step.
fn write_json<T: Serialize>(root: &Path, name: &str, v: &T) -> anyhow::Result<()> {
    StateDir::new(root).write(name, &serde_json::to_vec_pretty(v)?)
}

fn remove(root: &Path, name: &str) -> anyhow::Result<()> {
    StateDir::new(root).remove(name)
}

/// The step-made need that holds now, its record updated (written before anything else, so
/// neither a closed window nor a killed run loses it; removed after a boot).
fn carry_need(root: &Path, boot_id: &str, changed: Option<&str>) -> anyhow::Result<Option<Need>> {
    let record = read_json::<Need>(root, state::REBOOT_NEEDED)?;
    let (need, todo) = decide::carry_need(record.as_ref(), boot_id, changed, &crate::clock::now_rfc3339());
    match todo {
        NeedRecord::Keep => {}
        NeedRecord::Write(n) => write_json(root, state::REBOOT_NEEDED, &n)?,
        NeedRecord::Remove => remove(root, state::REBOOT_NEEDED)?,
    }
    Ok(need)
}

fn outcome(needed: &Option<String>, action: Action, detail: Option<String>) -> Outcome {
    Outcome {
        needed: needed.clone(),
        action,
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

/// Ok(end of the window, if any) when this node may go now; Err(why not) otherwise.
fn turn_now(s: &Settings) -> Result<Option<time::OffsetDateTime>, String> {
    let Some(w) = &s.window else { return Ok(None) };
    let now = time::OffsetDateTime::now_utc();
    let Some((start, end)) = w.current(now) else {
        return Err("outside the reboot window".into());
    };
    let mine = window::Window::node_start(start, s.splay, &s.holder);
    if now < mine {
        return Err(format!("in the reboot window; this node's turn starts at {mine} (window_splay)"));
    }
    Ok(Some(end))
}

/// `bootstrap reboot --wait`: the run lock is let go while blocked for a slot, and taken again
/// once the slot is ours; then whether the last converge (finished meanwhile) succeeded.
pub struct Waiting<'a> {
    pub root: &'a Path,
    pub lock_timeout: std::time::Duration,
    /// The run lock: held, except while blocked for a slot.
    pub guard: &'a mut Option<crate::runlock::RunLock>,
    pub run_ok: &'a dyn Fn() -> anyhow::Result<bool>,
}

/// What the run being coordinated did.
pub struct RunResult<'a> {
    pub ok: bool,
    /// The first `reboot_required` step this run changed.
    pub changed: Option<&'a str>,
}

/// Decide and do everything but the reboot itself (the caller writes its report first, then
/// calls `host.systemd.reboot()` when `reboot_now`). With `wait`, block for a slot until the
/// window ends instead of trying once.
pub fn coordinate(host: &Host, s: &Settings, run: RunResult, mut wait: Option<Waiting>) -> anyhow::Result<Outcome> {
    let need = if host.is_live() {
        carry_need(&host.root, &host.facts.boot_id, run.changed)?
    } else {
        None
    };
    let needed = match (&need, run.changed) {
        (None, Some(step)) => Some(format!("step `{step}` (reboot_required) changed")),
        _ => reboot_needed(&host.root, &host.facts.os.family, need.as_ref()),
    };
    if s.strategy == RebootStrategy::Off || !host.is_live() {
        return Ok(outcome(&needed, Action::None, needed.as_ref().map(|_| "reboot strategy is off".to_string())));
    }
    let state = read_state(&host.root)?;
    let lock = Backend::from_settings(s)?;
    let group = s.group.clone().unwrap_or_default();
    let holder = s.holder.as_str();
    let this_boot = |st: &Option<RebootState>| st.as_ref().is_some_and(|st| st.boot_id == host.facts.boot_id);
    let mut recorded = state.is_some();
    let mut inputs = Inputs {
        state: state.as_ref(),
        boot_id: &host.facts.boot_id,
        needed: needed.is_some(),
        run_ok: run.ok,
        in_window: turn_now(s).is_ok(),
        lock: None,
        healthy: None,
    };
    let mut detail: Option<String> = None;
    let mut health_failures = Vec::new();
    loop {
        match decide(&inputs) {
            Decision::Nothing => return Ok(outcome(&needed, Action::None, None)),
            Decision::Pending(why) => {
                // Only the lock service's "not yours" drops a record of this boot.
                if this_boot(&state) && inputs.lock == Some(LockAnswer::Full) {
                    remove(&host.root, state::REBOOT)?;
                }
                let text = match (why, turn_now(s)) {
                    (Why::OutsideWindow, Err(w)) => w,
                    _ => why_text(why, &group),
                };
                let text = match &detail {
                    Some(d) => format!("{text}: {d}"),
                    None => text,
                };
                return Ok(outcome(&needed, Action::Pending, Some(text)));
            }
            Decision::Keep(why) => {
                let text = format!(
                    "{}: {}; keeping the slot record {} until the lock service answers",
                    why_text(why, &group),
                    detail.as_deref().unwrap_or("no answer"),
                    StateDir::new(Path::new("/")).path(state::REBOOT).display()
                );
                return Ok(outcome(&needed, Action::Pending, Some(text)));
            }
            Decision::AskLock => {
                let answer = match (&lock, wait.as_mut()) {
                    (None, _) => Ok(Some(etcd::Acquire::Acquired)),
                    (Some(l), Some(w)) => {
                        let deadline = match turn_now(s) {
                            Ok(Some(end)) => {
                                let left = (end - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
                                std::time::Instant::now() + left.unsigned_abs()
                            }
                            // No window: wait as long as it takes (a year is "forever" here).
                            _ => std::time::Instant::now() + std::time::Duration::from_secs(365 * 86400),
                        };
                        // Runs go on while this one queues.
                        *w.guard = None;
                        l.wait(holder, deadline)
                    }
                    (Some(l), None) => l.acquire(holder).map(Some),
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
                if inputs.lock == Some(LockAnswer::Got) {
                    // On record before anything else can fail or be killed (hooks, the run
                    // lock): a later run finds the slot and uses or releases it.
                    if !recorded {
                        let st = RebootState {
                            group: group.clone(),
                            holder: holder.to_string(),
                            boot_id: host.facts.boot_id.clone(),
                            acquired_at: crate::clock::now_rfc3339(),
                            reason: needed.clone().unwrap_or_default(),
                        };
                        if let Err(e) = write_json(&host.root, state::REBOOT, &st) {
                            // Unrecorded, the slot would leak: give it back now.
                            if let Some(l) = &lock {
                                if let Err(r) = l.release(holder) {
                                    return Err(e.context(format!("the slot of group {group} is held unrecorded: releasing it failed: {r}")));
                                }
                            }
                            return Err(e.context("recording the reboot slot; it was released again"));
                        }
                        recorded = true;
                    }
                    if let Some(w) = wait.as_mut() {
                        if w.guard.is_none() {
                            *w.guard = Some(crate::runlock::acquire(w.root, w.lock_timeout)?);
                            inputs.run_ok = (w.run_ok)()?;
                        }
                    }
                }
                // The window may have closed while we waited.
                inputs.in_window = turn_now(s).is_ok();
            }
            Decision::GiveBack(why) => {
                if let Some(l) = &lock {
                    l.release(holder).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
                }
                remove(&host.root, state::REBOOT)?;
                let text = match why {
                    Why::OutsideWindow if inputs.lock == Some(LockAnswer::Got) => "the reboot window closed while acquiring; slot released".to_string(),
                    w => format!("{}; slot released", why_text(w, &group)),
                };
                return Ok(outcome(&needed, Action::Pending, Some(text)));
            }
            Decision::Reboot => {
                if let Some(why) = run_hooks(s) {
                    if let Some(l) = &lock {
                        l.release(holder)
                            .map_err(|e| anyhow::anyhow!("releasing the reboot slot after a failed hook ({why}): {e}"))?;
                    }
                    remove(&host.root, state::REBOOT)?;
                    return Ok(outcome(&needed, Action::HookFailed, Some(format!("{why}; slot released, not rebooting"))));
                }
                let mut o = outcome(&needed, Action::Rebooting, Some(format!("holding a slot of group {group}")));
                o.reboot_now = true;
                return Ok(o);
            }
            Decision::CheckHealth => {
                health_failures = failed_health(host, s);
                inputs.healthy = Some(health_failures.is_empty());
            }
            Decision::Release => {
                let _ = StateDir::new(&host.root).remove(state::REBOOT_REQUESTED);
                if let Some(l) = &lock {
                    l.release(holder).map_err(|e| anyhow::anyhow!("releasing the reboot slot: {e}"))?;
                    l.set_status(holder, None);
                }
                remove(&host.root, state::REBOOT)?;
                return Ok(outcome(
                    &needed,
                    Action::Released,
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
                        Some(&serde_json::json!({ "state": "halted", "reason": reason, "at": crate::clock::now_rfc3339() })),
                    );
                }
                return Ok(outcome(
                    &needed,
                    Action::Halted,
                    Some(format!("{reason}; keeping the slot so the rollout stops here")),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A lock service that stays unreachable until the deadline is an error, not "full": the
    /// caller must not conclude that its slot is gone and drop its record.
    #[test]
    fn a_wait_that_ends_unreachable_is_an_error_not_full() {
        let deadline = Instant::now() + Duration::from_millis(30);
        let down = poll_until(|| Err(etcd::LockError::Unavailable("down".into())), deadline, Duration::from_millis(5));
        assert!(matches!(down, Err(etcd::LockError::Unavailable(_))), "{down:?}");
        let full = poll_until(|| Ok(etcd::Acquire::Full), Instant::now() + Duration::from_millis(30), Duration::from_millis(5));
        assert!(matches!(full, Ok(None)), "{full:?}");
        let mut n = 0;
        let got = poll_until(
            || {
                n += 1;
                if n < 3 {
                    Err(etcd::LockError::Unavailable("down".into()))
                } else {
                    Ok(etcd::Acquire::Acquired)
                }
            },
            Instant::now() + Duration::from_secs(5),
            Duration::from_millis(5),
        );
        assert!(matches!(got, Ok(Some(etcd::Acquire::Acquired))), "{got:?}");
    }
}
