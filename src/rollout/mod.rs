//! Rollouts of a new bundle through etcd, and the fleet view (see docs/rollouts.md).
//!
//! With `[rollout] strategy = "canary"` a node applies a bundle whose sha256 differs from its
//! last-good one only while it holds a slot of that bundle's rollout semaphore, kept beside the
//! reboot semaphore at `<prefix>/groups/<group>/v1/rollout/<sha256>/` and driven by the same
//! code (compare-and-swap on revisions, the herd-free queue). The semaphore starts with
//! `canary` slots and grows to `batch` once `canary` nodes are healthy; a failed run or health
//! check halts the bundle (the `halt` record, and the semaphore closes: no slots, waiters leave)
//! and every node keeps converging to its last-good bundle.
//!
//! The decision is [`decide`] (pure, tested over every input); [`etcd`] reads and writes the
//! keys; `agent::converge` feeds the answers back. [`fleet`] is the node's status record.

pub mod etcd;
pub mod fleet;
pub mod fleet_s3;

use crate::config::{OnFailure, RolloutStrategy};
use crate::error::ConfigError;
use crate::reboot::settings::{EtcdService, Health};
use std::time::Duration;

/// How long a run waits for a rollout slot by default: well within the unit's timeout, which
/// must also hold the apply and the health checks (a node that got no slot queues again on its
/// next run, 30 minutes later).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10 * 60);
/// `TimeoutStartSec` of units/bootstrap.service: a run (wait included) must end within it.
pub const UNIT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// What a run keeps of [`UNIT_TIMEOUT`] for applying the new bundle (packages, handlers) once
/// it has its slot, besides the health checks' own time.
pub const APPLY_RESERVE: Duration = Duration::from_secs(10 * 60);
/// The node record's lease by default: three timer periods.
pub const DEFAULT_REPORT_TTL: Duration = Duration::from_secs(90 * 60);
/// The node's own rollout record in the state directory: the good bundle before the current
/// last-good one (what `rollout abort` of the last-good bundle goes back to).
pub const STATE_FILE: &str = "rollout.json";

/// A run on a node that halted a bundle with `on_failure = "halt"`: it keeps the bad bundle and
/// its rollout slot for inspection and applies nothing.
#[derive(Debug, thiserror::Error)]
#[error(
    "bundle {sha} was halted by this node and is kept for inspection (on_failure = \"halt\"): \
     nothing applied; `bootstrap rollout abort {sha}` puts the node back on its last-good bundle, \
     `bootstrap rollout resume {sha}` lets it try again"
)]
pub struct KeptForInspection {
    pub sha: String,
}

/// Whether the run left this node holding a rollout slot for inspection: it halted the bundle
/// in this run (and did not roll back), or an earlier run did. Such a node is not one for its
/// Auto Scaling group to replace: `[asg] unhealthy_after` leaves it alone.
pub fn kept_for_inspection(result: &anyhow::Result<crate::engine::report::Report>) -> bool {
    match result {
        Err(e) => e.downcast_ref::<KeptForInspection>().is_some(),
        Ok(r) => r.rollout.as_ref().is_some_and(halted_here_and_kept),
    }
}

/// Why `[asg] unhealthy_after` must leave this node alone for its rollout slots, or None. A
/// node that holds a slot of a bundle's rollout stops that rollout where it is (the halt names
/// it, the next node waits for it): its group must not replace it underneath. `kept`: this run
/// says the node keeps a slot for inspection; `gated`: `[rollout] strategy = "canary"`;
/// `held`: what etcd says of the slots it holds (None: not asked, no rollout etcd; Err: etcd
/// did not answer). A slot of an aborted bundle stops nothing and does not count. With etcd
/// unreachable a canary node cannot tell, and is not marked.
pub fn unhealthy_hold(kept: bool, gated: bool, held: Option<Result<Vec<etcd::HeldSlot>, String>>) -> Option<String> {
    if kept {
        return Some("holds a rollout slot (kept for inspection)".into());
    }
    match held {
        Some(Ok(slots)) if slots.iter().any(|s| !s.aborted) => Some("holds a rollout slot".into()),
        Some(Err(e)) if gated => Some(format!("cannot tell whether it holds a rollout slot ({e})")),
        _ => None,
    }
}

/// A run's rollout note (`Report::rollout`) of a node that halted the bundle and kept it.
fn halted_here_and_kept(note: &serde_json::Value) -> bool {
    note["state"] == "halted_here" && note["rolled_back"] != true
}

/// `[rollout]` and `[report]`, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub strategy: RolloutStrategy,
    pub canary: u64,
    pub batch: u64,
    pub group: Option<String>,
    pub on_failure: OnFailure,
    pub wait: Duration,
    pub health: Vec<Health>,
    /// `[rollout.etcd]`, else `[reboot.etcd]` (None: no endpoints in either).
    pub etcd: Option<EtcdService>,
    /// This node's id (instance id, else machine id); empty when it has none.
    pub holder: String,
    /// The node record's lease.
    pub report_ttl: Duration,
    /// `[report] s3`: where the record also goes (set by `Context::rollout_settings`, which
    /// knows the facts to substitute).
    pub report_s3: Option<fleet_s3::Target>,
    /// The running system (`--root /`): only it is gated; an image build never is.
    pub live: bool,
}

impl Settings {
    /// `group`: `[rollout] group` substituted, else ENV-SERVICE. `live`: only the running
    /// system is gated (an image build under --root is not), so only then do etcd, the group
    /// and the holder id matter. `run`: for a run (the operator commands name their group with
    /// `--group` and need no holder id).
    pub fn new(
        cfg: &crate::config::Config,
        group: Option<String>,
        holder: Result<String, ConfigError>,
        live: bool,
        run: bool,
    ) -> Result<Settings, ConfigError> {
        let r = &cfg.rollout;
        let strategy = r.strategy.unwrap_or_default();
        let dur = |what: &str, v: &Option<String>, d: Duration| -> Result<Duration, ConfigError> {
            match v {
                Some(t) => humantime::parse_duration(t).map_err(|e| ConfigError::msg(format!("{what} {t:?}: {e}"))),
                None => Ok(d),
            }
        };
        let batch = r.batch.unwrap_or(1);
        if batch == 0 {
            return Err(ConfigError::msg("[rollout] batch = 0: at least one node must be able to apply a new bundle"));
        }
        let etcd_cfg = if r.etcd.endpoints.is_empty() { &cfg.reboot.etcd } else { &r.etcd };
        let section = if r.etcd.endpoints.is_empty() { "[reboot.etcd]" } else { "[rollout.etcd]" };
        let etcd = if etcd_cfg.endpoints.is_empty() {
            None
        } else {
            for ep in &etcd_cfg.endpoints {
                crate::config::check_url(&format!("{section} endpoints"), ep)?;
            }
            if etcd_cfg.cert_file.is_some() != etcd_cfg.key_file.is_some() {
                return Err(ConfigError::msg(format!("{section} cert_file and key_file go together")));
            }
            Some(EtcdService {
                endpoints: etcd_cfg.endpoints.clone(),
                prefix: etcd_cfg.prefix.clone().unwrap_or_else(|| crate::reboot::etcd::DEFAULT_PREFIX.to_string()),
                slots: 1,
                tls: if live {
                    crate::reboot::settings::etcd_tls(etcd_cfg)?
                } else {
                    Default::default()
                },
            })
        };
        let gated = strategy == RolloutStrategy::Canary && live;
        if gated && etcd.is_none() {
            return Err(ConfigError::msg(
                "[rollout] strategy = \"canary\" needs etcd: set [rollout.etcd] endpoints or [reboot.etcd] endpoints",
            ));
        }
        let holder = match holder {
            Ok(h) => h,
            Err(e) if gated && run => return Err(e),
            Err(_) => String::new(),
        };
        if gated && run && group.is_none() {
            return Err(ConfigError::msg("no rollout group: set [rollout] group or name the node (ENV-SERVICE)"));
        }
        let health = crate::reboot::settings::health_checks("[[rollout.health]]", &r.health)?;
        let wait = dur("[rollout] wait", &r.wait, DEFAULT_WAIT)?;
        let wait = if gated { fitted_wait(r.wait.as_deref(), wait, &health)? } else { wait };
        Ok(Settings {
            strategy,
            canary: r.canary.unwrap_or(1),
            batch,
            group,
            on_failure: r.on_failure.unwrap_or_default(),
            wait,
            health,
            etcd,
            holder,
            report_ttl: dur("[report] ttl", &cfg.report.ttl, DEFAULT_REPORT_TTL)?,
            report_s3: None,
            live,
        })
    }

    /// When a run that started at `started` stops waiting for a slot: after `wait`, and never
    /// so late that the apply and the health checks no longer fit in the unit's timeout (an
    /// earlier part of the run, the fallback apply, took some of it).
    pub fn wait_deadline(&self, started: std::time::Instant) -> std::time::Instant {
        let latest = started + UNIT_TIMEOUT.saturating_sub(APPLY_RESERVE.saturating_add(health_budget(&self.health)));
        (std::time::Instant::now() + self.wait).min(latest)
    }

    /// Whether new bundles go through rollout slots.
    pub fn gated(&self) -> bool {
        self.live && self.strategy == RolloutStrategy::Canary && self.etcd.is_some() && self.group.is_some()
    }

    /// The slots of a rollout semaphore when it is created: the canaries'.
    pub fn first_slots(&self) -> u64 {
        if self.canary == 0 {
            self.batch
        } else {
            self.canary
        }
    }
}

/// The most the health checks of a rollout take: they are retried for up to the longest
/// timeout, and the last round takes up to every check's timeout.
fn health_budget(health: &[Health]) -> Duration {
    // Saturating: a timeout from the config may be anything humantime parses.
    let longest = health.iter().map(|h| h.timeout).max().unwrap_or_default();
    health.iter().fold(longest, |sum, h| sum.saturating_add(h.timeout))
}

/// `[rollout] wait` (`configured`: as written; None: the default), checked to leave room in
/// `bootstrap.service`'s timeout for the apply ([`APPLY_RESERVE`]) and the health checks: a
/// run systemd kills mid-apply is the worst way for a rollout to fail. A configured wait that
/// does not fit is refused (naming the key); the default is shortened to what fits.
fn fitted_wait(configured: Option<&str>, wait: Duration, health: &[Health]) -> Result<Duration, ConfigError> {
    let budget = health_budget(health);
    let fits = UNIT_TIMEOUT.saturating_sub(APPLY_RESERVE.saturating_add(budget));
    let h = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    let why = format!(
        "a run under bootstrap.service (TimeoutStartSec={}) must hold the wait, the apply of the new bundle ({} kept for it) \
         and the [[rollout.health]] checks (up to {}: retried for the longest timeout, then one more round)",
        h(UNIT_TIMEOUT),
        h(APPLY_RESERVE),
        h(budget)
    );
    if fits.is_zero() {
        return Err(ConfigError::msg(format!(
            "[[rollout.health]]: the checks' timeouts leave no time to wait for a rollout slot: {why}"
        )));
    }
    match configured {
        Some(text) if wait > fits => Err(ConfigError::msg(format!(
            "[rollout] wait = {text:?} is too long: {why}; the longest wait that fits is {}",
            h(fits)
        ))),
        _ => Ok(wait.min(fits)),
    }
}

/// What etcd says about the fetched bundle's rollout (one consistent read).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Who halted it (None: not halted).
    pub halted_by: Option<String>,
    /// `rollout abort`: the bundle is bad.
    pub aborted: bool,
    /// This node holds one of its slots (a run killed while applying it, or granted while away).
    pub held: bool,
    /// The node's last-good bundle was aborted (then the good bundle before it is the fallback).
    pub last_good_aborted: bool,
}

/// The bundle a node falls back to while a new one may not be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    LastGood,
    /// The good bundle before last-good (last-good was aborted).
    Previous,
}

/// Why the fetched bundle is not applied in this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    Halted,
    Aborted,
    /// etcd did not answer: never a new bundle without its slot.
    Unavailable,
}

/// What a run applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The fetched bundle, without a slot: the `immediate` strategy, a bundle without a sha256
    /// (a directory), the node's last-good bundle itself, or a node's first bundle (no
    /// last-good to keep converging).
    Fetched,
    /// The fetched bundle, under the slot this node already holds.
    Held,
    /// The fallback now (drift corrected), then queue for a slot and apply the fetched bundle
    /// when one comes within `[rollout] wait`.
    Queue(Fallback),
    /// Only the fallback; the fetched bundle is not applied.
    Fallback(Fallback, Why),
    /// Nothing: this node halted the fetched bundle (`on_failure = "halt"`) and keeps it for
    /// inspection until `rollout abort` or `rollout resume`.
    Hold,
    /// Nothing, and the run fails: a first bundle that is halted or aborted.
    Refuse(Why),
}

/// The inputs of [`decide`].
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub gated: bool,
    /// The fetched bundle's sha256 (None: a directory).
    pub fetched: Option<&'a str>,
    pub last_good: Option<&'a str>,
    /// None: etcd unavailable.
    pub view: Option<&'a View>,
    pub me: &'a str,
    pub on_failure: OnFailure,
}

/// The rollout gate: which bundle a run applies. Invariants (the test enumerates them): a
/// bundle different from last-good is applied only with a slot held (`Held`, or `Queue` once
/// granted), never when etcd is unavailable (except a node's very first bundle), halted or
/// aborted; a node always has something to converge to unless it holds a halted bundle for
/// inspection or has nothing safe.
pub fn decide(i: Inputs<'_>) -> Gate {
    let (Some(new), true) = (i.fetched, i.gated) else {
        return Gate::Fetched;
    };
    let Some(v) = i.view else {
        return match i.last_good {
            Some(lg) if lg != new => Gate::Fallback(Fallback::LastGood, Why::Unavailable),
            _ => Gate::Fetched,
        };
    };
    let Some(last_good) = i.last_good else {
        return match (v.aborted, v.halted_by.is_some()) {
            (true, _) => Gate::Refuse(Why::Aborted),
            (false, true) => Gate::Refuse(Why::Halted),
            (false, false) => Gate::Fetched,
        };
    };
    if last_good == new {
        return if v.aborted {
            Gate::Fallback(Fallback::Previous, Why::Aborted)
        } else {
            Gate::Fetched
        };
    }
    let fb = if v.last_good_aborted { Fallback::Previous } else { Fallback::LastGood };
    if v.aborted {
        return Gate::Fallback(fb, Why::Aborted);
    }
    match &v.halted_by {
        Some(who) if who == i.me && i.on_failure == OnFailure::Halt => Gate::Hold,
        Some(_) => Gate::Fallback(fb, Why::Halted),
        None if v.held => Gate::Held,
        None => Gate::Queue(fb),
    }
}

/// After a node applied a bundle under its slot: its next move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Healthy: record it, grow the semaphore to `batch` when the canaries are healthy, release.
    Release,
    /// Failed: halt the bundle (and keep the slot: the halt names this node), then stay on the
    /// new bundle (`halt`) or re-apply the fallback (`rollback`).
    Halt { rollback: bool },
}

/// The settle decision (pure).
pub fn settle(run_ok: bool, healthy: bool, on_failure: OnFailure) -> Settle {
    if run_ok && healthy {
        Settle::Release
    } else {
        Settle::Halt {
            rollback: on_failure == OnFailure::Rollback,
        }
    }
}

/// Whether bundle `sha` is still going out in its group, by the nodes' records (the fleet
/// view: `(holder, bundle sha256)` of every node reporting): some node other than `me` runs
/// another bundle. A node that fails its first bundle (no last-good: it applied it without a
/// slot) halts it only then; once every other node runs it, the bundle is out and proven, and
/// the failure is the new node's own (a halt then would refuse every later new instance).
pub fn in_flight<'a>(sha: &str, me: &str, records: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> bool {
    records.into_iter().any(|(holder, bundle)| holder != me && bundle.is_some_and(|b| b != sha))
}

/// The slots a rollout semaphore should have: closed (0) once halted or aborted, the canaries'
/// until `canary` nodes are healthy, then `batch`.
pub fn slots_for(halted_or_aborted: bool, healthy: u64, canary: u64, batch: u64) -> u64 {
    if halted_or_aborted {
        0
    } else if healthy >= canary {
        batch
    } else {
        canary.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node kept for inspection is told apart from every other outcome of a run, so that
    /// `[asg] unhealthy_after` never has its group replace it.
    #[test]
    fn a_node_kept_for_inspection_is_recognised() {
        let kept: anyhow::Result<crate::engine::report::Report> = Err(KeptForInspection { sha: "ab".into() }.into());
        assert!(kept_for_inspection(&kept));
        let other: anyhow::Result<crate::engine::report::Report> = Err(anyhow::anyhow!("a step failed"));
        assert!(!kept_for_inspection(&other));
        assert!(halted_here_and_kept(&serde_json::json!({ "state": "halted_here" })));
        assert!(!halted_here_and_kept(&serde_json::json!({ "state": "halted_here", "rolled_back": true })));
        for state in ["healthy", "halted", "waiting", "unavailable", "applied"] {
            assert!(!halted_here_and_kept(&serde_json::json!({ "state": state })), "{state}");
        }
    }

    /// `unhealthy_after` is held back by any rollout slot of a bundle not aborted, by a node
    /// kept for inspection, and by etcd not answering a canary node; by nothing else.
    #[test]
    fn a_rollout_slot_or_not_knowing_holds_the_unhealthy_mark_back() {
        let slot = |sha: &str, aborted| etcd::HeldSlot { sha256: sha.into(), aborted };
        let down = || Some(Err("etcd unreachable: connection refused".to_string()));
        for gated in [false, true] {
            for held in [None, Some(Ok(vec![])), Some(Ok(vec![slot("a", false)])), down()] {
                assert_eq!(unhealthy_hold(true, gated, held).as_deref(), Some("holds a rollout slot (kept for inspection)"));
            }
            assert_eq!(unhealthy_hold(false, gated, None), None);
            assert_eq!(unhealthy_hold(false, gated, Some(Ok(vec![]))), None);
            assert_eq!(unhealthy_hold(false, gated, Some(Ok(vec![slot("a", true)]))), None, "an aborted bundle's slot");
            for slots in [vec![slot("a", false)], vec![slot("a", true), slot("b", false)]] {
                assert_eq!(unhealthy_hold(false, gated, Some(Ok(slots))).as_deref(), Some("holds a rollout slot"));
            }
        }
        let why = unhealthy_hold(false, true, down()).unwrap();
        assert!(why.contains("etcd unreachable") && why.contains("connection refused"), "{why}");
        assert_eq!(unhealthy_hold(false, false, down()), None, "no canary strategy: no slot to hold");
    }

    /// Every combination of the gate's inputs, checked against the rules the fleet relies on.
    #[test]
    fn the_gate_never_applies_an_unslotted_or_stopped_bundle() {
        let shas = [None, Some("a"), Some("b")];
        let mut n = 0;
        for gated in [false, true] {
            for fetched in shas {
                for last_good in shas {
                    for on_failure in [OnFailure::Halt, OnFailure::Rollback] {
                        for reachable in [false, true] {
                            for halted_by in [None, Some("me"), Some("other")] {
                                for aborted in [false, true] {
                                    for held in [false, true] {
                                        for last_good_aborted in [false, true] {
                                            let v = View {
                                                halted_by: halted_by.map(str::to_string),
                                                aborted,
                                                held,
                                                last_good_aborted,
                                            };
                                            let i = Inputs {
                                                gated,
                                                fetched,
                                                last_good,
                                                view: reachable.then_some(&v),
                                                me: "me",
                                                on_failure,
                                            };
                                            check(i, decide(i));
                                            n += 1;
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(n, 2 * 3 * 3 * 2 * 2 * 3 * 2 * 2 * 2);
    }

    fn check(i: Inputs<'_>, g: Gate) {
        let new_bundle = i.fetched.is_some() && i.fetched != i.last_good;
        let stopped = i.view.is_some_and(|v| v.halted_by.is_some() || v.aborted);
        let ctx = format!("{i:?} -> {g:?}");
        if !i.gated || i.fetched.is_none() {
            assert_eq!(g, Gate::Fetched, "{ctx}");
            return;
        }
        match g {
            Gate::Fetched => {
                // Without a slot only what the node already runs, or a node's first bundle
                // that etcd does not (or cannot) say is stopped.
                assert!(!new_bundle || (i.last_good.is_none() && !stopped), "{ctx}");
                assert!(!(i.view.is_some_and(|v| v.aborted)), "an aborted bundle is never applied: {ctx}");
            }
            Gate::Held | Gate::Queue(_) => {
                let v = i.view.expect("a slot needs etcd");
                assert!(new_bundle && i.last_good.is_some(), "{ctx}");
                assert!(!stopped, "{ctx}");
                assert_eq!(g == Gate::Held, v.held, "{ctx}");
            }
            Gate::Fallback(fb, why) => {
                assert!(i.last_good.is_some(), "{ctx}");
                assert_eq!(why == Why::Unavailable, i.view.is_none(), "{ctx}");
                if fb == Fallback::Previous {
                    let v = i.view.expect("previous only on etcd's word");
                    assert!(v.aborted || v.last_good_aborted, "{ctx}");
                }
            }
            Gate::Hold => {
                let v = i.view.expect("hold only on etcd's word");
                assert_eq!(v.halted_by.as_deref(), Some(i.me), "{ctx}");
                assert!(!v.aborted && i.on_failure == OnFailure::Halt && new_bundle, "{ctx}");
            }
            Gate::Refuse(_) => assert!(i.last_good.is_none() && stopped, "{ctx}"),
        }
        // etcd down: never a new bundle (a first bundle aside).
        if i.view.is_none() && i.last_good.is_some() && new_bundle {
            assert_eq!(g, Gate::Fallback(Fallback::LastGood, Why::Unavailable), "{ctx}");
        }
    }

    #[test]
    fn settle_and_slots() {
        assert_eq!(settle(true, true, OnFailure::Halt), Settle::Release);
        assert_eq!(settle(false, true, OnFailure::Halt), Settle::Halt { rollback: false });
        assert_eq!(settle(true, false, OnFailure::Rollback), Settle::Halt { rollback: true });
        assert_eq!(slots_for(false, 0, 1, 50), 1);
        assert_eq!(slots_for(false, 1, 1, 50), 50);
        assert_eq!(slots_for(false, 2, 3, 50), 3);
        assert_eq!(slots_for(true, 10, 1, 50), 0);
        assert_eq!(slots_for(false, 0, 0, 5), 5);
    }

    #[test]
    fn a_bundle_is_in_flight_while_another_node_runs_another_one() {
        assert!(in_flight("new", "me", [("a", Some("old")), ("b", Some("new"))]));
        assert!(!in_flight("new", "me", [("a", Some("new")), ("b", Some("new"))]), "out everywhere: done");
        assert!(!in_flight("new", "me", [("me", Some("old"))]), "only this node's own record");
        assert!(!in_flight("new", "me", []), "the group's only node");
        assert!(!in_flight("new", "me", [("a", None)]), "a directory source says nothing");
    }

    fn parse(text: &str, live: bool) -> Result<Settings, ConfigError> {
        let c = crate::config::Config::parse(std::path::Path::new("config.toml"), text).unwrap();
        Settings::new(&c, Some("production-web".into()), Ok("i-1".into()), live, true)
    }

    /// The slot wait, the apply of the new bundle and its health checks all run inside one
    /// `bootstrap.service` run: a wait that leaves no room for them is refused at config load
    /// (systemd would kill the run mid-apply), and the default leaves room.
    #[test]
    fn the_wait_fits_in_the_unit_timeout() {
        let unit = include_str!("../../units/bootstrap.service");
        assert!(
            unit.contains("\nTimeoutStartSec=30min\n"),
            "units/bootstrap.service changed its timeout: {unit}"
        );
        assert_eq!(UNIT_TIMEOUT, Duration::from_secs(30 * 60));
        let etcd = "[reboot.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
        let canary = |keys: &str, tables: &str| parse(&format!("[rollout]\nstrategy = \"canary\"\n{keys}{tables}{etcd}"), true);
        let d = canary("", "").unwrap();
        assert!(d.wait + APPLY_RESERVE <= UNIT_TIMEOUT, "the default wait leaves room: {:?}", d.wait);
        for wait in ["25m", "30m", "2h"] {
            let e = canary(&format!("wait = \"{wait}\"\n"), "").map(|_| ()).unwrap_err().to_string();
            assert!(
                e.contains(&format!("[rollout] wait = \"{wait}\"")) && e.contains("TimeoutStartSec"),
                "{wait}: {e}"
            );
        }
        assert_eq!(canary("wait = \"15m\"\n", "").unwrap().wait, Duration::from_secs(15 * 60));
        // The health checks' time counts too.
        let slow = "[[rollout.health]]\nurl = \"http://127.0.0.1/\"\ntimeout = \"5m\"\n";
        let e = canary("wait = \"15m\"\n", slow).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("[rollout] wait") && e.contains("[[rollout.health]]"), "{e}");
        assert!(canary("wait = \"5m\"\n", slow).is_ok());
        // Not gated (immediate, or an image build): the wait is never used, never refused.
        assert!(parse("[rollout]\nwait = \"2h\"\n", true).is_ok());
        // A health check timeout too large to add up is refused like any other that does not
        // fit, not a panic.
        for t in ["500000000000y", "300000000000y"] {
            let huge = format!("[[rollout.health]]\nurl = \"http://127.0.0.1/\"\ntimeout = \"{t}\"\n");
            let e = canary("", &format!("{huge}{huge}")).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("[[rollout.health]]"), "{t}: {e}");
        }
    }

    #[test]
    fn settings() {
        let s = parse(
            "[rollout]\nstrategy = \"canary\"\nbatch = 50\non_failure = \"rollback\"\nwait = \"5m\"\n\
             [[rollout.health]]\nurl = \"http://127.0.0.1/\"\n[reboot.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n",
            true,
        )
        .unwrap();
        assert!(s.gated());
        assert_eq!(
            (s.canary, s.batch, s.wait, s.on_failure),
            (1, 50, Duration::from_secs(300), OnFailure::Rollback)
        );
        assert_eq!(s.etcd.as_ref().unwrap().endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(s.health.len(), 1);
        let s = parse(
            "[rollout.etcd]\nendpoints = [\"http://a:1\"]\n[reboot.etcd]\nendpoints = [\"http://b:1\"]\n",
            true,
        )
        .unwrap();
        assert!(!s.gated(), "immediate by default");
        assert_eq!(s.etcd.unwrap().endpoints, ["http://a:1"], "[rollout.etcd] wins");
        let cases = [
            ("[rollout]\nstrategy = \"canary\"\n", "needs etcd"),
            ("[rollout]\nbatch = 0\n", "batch = 0"),
            ("[rollout]\nwait = \"soon\"\n", "[rollout] wait \"soon\""),
            ("[[rollout.health]]\nunit = \"x\"\n", "[[rollout.health]] #1"),
            ("[report]\nttl = \"x\"\n", "[report] ttl"),
            ("[rollout.etcd]\nendpoints = [\"e:1\"]\n", "[rollout.etcd] endpoints"),
        ];
        for (text, want) in cases {
            let e = parse(text, true).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        // An image build is never gated.
        assert!(!parse("[rollout]\nstrategy = \"canary\"\n", false).unwrap().gated());
        assert!(
            !parse(
                "[rollout]\nstrategy = \"canary\"\n[reboot.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n",
                false
            )
            .unwrap()
            .gated(),
            "an image build with etcd configured is not gated either"
        );
        let c = crate::config::Config::parse(std::path::Path::new("c"), "[rollout]\nstrategy = \"canary\"\nstrategy2 = 1\n");
        assert!(c.unwrap_err().to_string().contains("unknown field `strategy2`"));
    }
}
