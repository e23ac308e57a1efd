//! `bootstrap watch`: a small blocking poller of the instance metadata item
//! `autoscaling/target-lifecycle-state` (one GET every `watch_interval`, a reused IMDSv2
//! token, no async runtime kept busy). When it reads `Terminated` the node is being scaled in:
//! it holds the terminating lifecycle action (heartbeats), takes the run lock (no timer run
//! starts a change or takes a reboot slot behind the drain), runs the drain hooks
//! (`[[asg.terminate_hook]]`, else the `[[reboot.pre_hook]]` commands) with their timeouts,
//! gives back a reboot slot, every rollout slot and an `unhealthy_after` place the node holds,
//! and completes the action with CONTINUE. Then it exits. When an instance in service reads
//! `Warmed:*` (a scale-in back into the warm pool, ReuseOnScaleIn) it drains the same way,
//! makes the instance a warm one again and goes on watching (see `drain_into_pool`); reading
//! `InService` on a warm instance, it starts `init` (see `launch::start_init_into_service`).

use super::api;
use crate::reboot::settings::Service;
use crate::state::{self, StateDir};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long the drain waits for a running `apply` to finish.
pub const RUN_LOCK_WAIT: Duration = Duration::from_secs(300);
/// The IMDS item.
pub const TARGET_STATE: &str = "autoscaling/target-lifecycle-state";
/// Between two warnings about an unreadable metadata item.
const WARN_EVERY: Duration = Duration::from_secs(600);

/// What the drain did (/var/lib/bootstrap/asg-terminate.json).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Drained {
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_failure: Option<String>,
    pub released_reboot_slot: bool,
    /// The bundles (sha256) whose rollout slot the drain gave back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released_rollout_slots: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle_hook: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    pub completed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Drained for a return into the warm pool (this target state), not a termination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub into_warm_pool: Option<String>,
}

pub struct Watch<'a> {
    pub root: &'a Path,
    pub facts: &'a crate::facts::Facts,
    pub config: &'a crate::config::Config,
    pub settings: &'a super::Settings,
    pub reboot: &'a crate::reboot::Settings,
    pub group: Option<String>,
    pub holder: Option<String>,
    /// Gives back every rollout slot this node holds in its rollout group (the bundles'
    /// sha256); None when the node takes part in no rollout (`[rollout] strategy` not
    /// `canary`). A closure: the rollout protocol lives above this module.
    pub release_rollout_slots: Option<&'a dyn Fn() -> anyhow::Result<Vec<String>>>,
}

/// An instance in service scaled in back into its warm pool (`target`): drained as for a
/// termination; then, before the action is completed (the group stops the instance soon
/// after), the instance is made a warm one again: no `firstboot.done`, its launch record that
/// of a launch into the pool, so that its next launch into service (a new action of the launch
/// hook) is held and completed by `init` again, at the next boot or started by the watcher.
/// The drain record stays until that `init`: until then runs take no reboot slot and no
/// `unhealthy_after` count, and a rollout slot that comes is given back.
fn drain_into_pool(w: &Watch<'_>, target: &str) -> anyhow::Result<Drained> {
    tracing::warn!("this instance is going back into its warm pool ({target}): draining");
    let make_warm = || -> anyhow::Result<()> {
        if let Some(mut o) = super::read_record::<super::launch::LaunchOutcome>(w.root, super::LAUNCH_STATE) {
            o.target_state = Some(target.to_string());
            super::write_record(w.root, super::LAUNCH_STATE, &o);
        }
        // Failed runs counted in service do not follow it into the pool and back.
        StateDir::new(w.root).remove(super::HEALTH_STATE)?;
        StateDir::new(w.root).remove(state::FIRSTBOOT_DONE)
    };
    drain_with(w, Some(target), &make_warm)
}

/// A drain into the warm pool whose completion the API did not take (it is retried).
fn into_pool_unfinished(w: &Watch<'_>) -> bool {
    super::read_record::<Drained>(w.root, super::TERMINATE_STATE).is_some_and(|d| {
        d.into_warm_pool.is_some() && d.instance_id.is_some() && d.instance_id == w.facts.instance_id && d.lifecycle_hook.is_some() && !d.completed
    })
}

/// This instance (`instance_id`) was drained back into its warm pool and has not launched into
/// service since.
pub fn returned_to_pool(root: &Path, instance_id: Option<&str>) -> bool {
    super::read_record::<Drained>(root, super::TERMINATE_STATE)
        .is_some_and(|d| d.into_warm_pool.is_some() && instance_id.is_some() && d.instance_id.as_deref() == instance_id)
}

/// A launch into service after a return into the warm pool: the drain of that return is over.
pub fn forget_drain_into_pool(root: &Path, instance_id: Option<&str>) {
    let Some(d) = super::read_record::<Drained>(root, super::TERMINATE_STATE) else {
        return;
    };
    if d.into_warm_pool.is_some() && instance_id.is_some() && d.instance_id.as_deref() == instance_id {
        if let Err(e) = StateDir::new(root).remove(super::TERMINATE_STATE) {
            tracing::warn!("removing the drain record of the return into the warm pool: {e:#}");
        }
    }
}

/// When `bootstrap watch` drained this instance (`instance_id`) for a scale-in: the drain
/// record's time. A run must apply nothing new on a node going away.
pub fn drained_at(root: &Path, instance_id: Option<&str>) -> Option<String> {
    let d = super::read_record::<Drained>(root, super::TERMINATE_STATE)?;
    (instance_id.is_some() && d.instance_id.as_deref() == instance_id).then_some(d.at)
}

/// Poll until the instance is being terminated, then drain. `once`: look once (None: not
/// terminating).
pub fn run(w: &Watch<'_>, once: bool) -> anyhow::Result<Option<Drained>> {
    let base = w
        .config
        .imds
        .base_url
        .clone()
        .unwrap_or_else(|| crate::facts::imds::DEFAULT_BASE_URL.to_string());
    let mut warned: Option<Instant> = None;
    // A warm pool's instance going into service: `init` started once (see launch.rs).
    let mut into_service = false;
    let mut imds = crate::facts::imds::Imds::new(&base, crate::facts::imds::TIMER_DEADLINE)?;
    tracing::info!("watching {TARGET_STATE} every {}s", w.settings.watch_interval.as_secs());
    loop {
        match imds.meta(TARGET_STATE) {
            // `Warmed:Terminated`: an instance of a warm pool being terminated.
            Ok(Some(s)) if s == "Terminated" || s == "Warmed:Terminated" => return drain(w).map(Some),
            // An instance in service going back into its warm pool (a scale-in with
            // ReuseOnScaleIn; AWS holds the terminating hook's action at Warmed:Pending:Wait):
            // drained the same way, and made ready to launch into service again. A warm pool
            // instance not yet in service (no `firstboot.done`) is being prepared, not scaled in.
            // (Or its drain did that already and the completion is to be retried.)
            Ok(Some(s)) if super::launch::is_warm(&s) && (StateDir::new(w.root).exists(state::FIRSTBOOT_DONE) || into_pool_unfinished(w)) => {
                let d = drain_into_pool(w, &s)?;
                if once || (d.lifecycle_hook.is_some() && !d.completed) {
                    return Ok(Some(d));
                }
                // Back in the pool, the watcher goes on: a running or hibernated instance does
                // not boot, so the watcher is what starts `init` when it goes into service
                // again, and what drains a termination in the pool.
                into_service = false;
            }
            Ok(Some(s)) if s == "InService" && !into_service => {
                into_service = super::launch::start_init_into_service(w.root, w.facts.instance_id.as_deref());
            }
            Ok(_) => {}
            Err(e) => {
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    tracing::warn!("reading {TARGET_STATE}: {e:#}");
                    warned = Some(Instant::now());
                }
                // A fresh client: its retry deadline starts again.
                imds = crate::facts::imds::Imds::new(&base, crate::facts::imds::TIMER_DEADLINE)?;
            }
        }
        if once {
            return Ok(None);
        }
        std::thread::sleep(w.settings.watch_interval);
    }
}

/// The instance is being terminated: hold the action, drain, release, complete.
pub fn drain(w: &Watch<'_>) -> anyhow::Result<Drained> {
    drain_with(w, None, &|| Ok(()))
}

/// [`drain`]; `before_complete` runs after the drain, before the action is completed (and
/// again when a completion is retried).
fn drain_with(w: &Watch<'_>, into_pool: Option<&str>, before_complete: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<Drained> {
    // Drained once already (the watcher started again): nothing is done twice, only a
    // completion the API did not take is tried again.
    // (A termination after a drain into the warm pool is a drain of its own.)
    let earlier = super::read_record::<Drained>(w.root, super::TERMINATE_STATE)
        .filter(|d| d.instance_id.is_some() && d.instance_id == w.facts.instance_id && d.into_warm_pool.as_deref() == into_pool);
    if let Some(mut done) = earlier {
        tracing::info!("this instance was drained at {}", done.at);
        let member = super::membership(w.settings, w.facts, w.group.clone());
        if let Err(e) = before_complete() {
            tracing::error!("{e:#}");
        }
        if let (Some(hook), false, Some((group, id))) = (done.lifecycle_hook.clone(), done.completed, member) {
            match super::client(w.settings, w.facts, &group, &id).complete(&hook, super::launch::CONTINUE) {
                Ok(()) => {
                    tracing::warn!("terminating lifecycle action of {hook} completed with CONTINUE");
                    (done.completed, done.error) = (true, None);
                }
                Err(e) => done.error = Some(format!("{e:#}")),
            }
            super::write_record(w.root, super::TERMINATE_STATE, &done);
        }
        return Ok(done);
    }
    if into_pool.is_none() {
        tracing::warn!("this instance is being terminated by its Auto Scaling group: draining");
    }
    let mut out = Drained {
        instance_id: w.facts.instance_id.clone(),
        into_warm_pool: into_pool.map(str::to_string),
        ..Default::default()
    };
    let member = super::membership(w.settings, w.facts, w.group.clone());
    let mut beats = None;
    if let Some((group, id)) = &member {
        let client = super::client(w.settings, w.facts, group, id);
        match client
            .hooks()
            .and_then(|h| api::pick_hook(&h, api::TERMINATING, w.settings.terminate_lifecycle_hook.as_deref()))
        {
            Ok(Some(h)) => {
                let every = super::settings::heartbeat_interval(w.settings.heartbeat_interval, h.heartbeat_timeout);
                out.lifecycle_hook = Some(h.name.clone());
                beats = Some(super::launch::Heartbeats::start(client, &h.name, every, None, None, None));
            }
            Ok(None) => tracing::info!("Auto Scaling group {group} has no terminating lifecycle hook: draining without one"),
            Err(e) => tracing::error!("{e:#}"),
        }
    }
    // No timer run in the middle of the drain, and none taking a reboot slot after it.
    let _lock = match crate::runlock::acquire(w.root, RUN_LOCK_WAIT) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!("draining without the run lock: {e:#}");
            None
        }
    };
    let hooks = w.settings.terminate_hooks.as_ref().unwrap_or(&w.reboot.hooks);
    out.hook_failure = crate::reboot::run_commands("terminate hook", hooks);
    if let Some(f) = &out.hook_failure {
        tracing::error!("{f}");
    }
    match release_slot(w) {
        Ok(released) => out.released_reboot_slot = released,
        Err(e) => tracing::error!("releasing the reboot slot: {e:#}"),
    }
    // A slot of a bundle's rollout would stop the group's rollout until someone released it.
    if let Some(release) = w.release_rollout_slots {
        match release() {
            Ok(shas) => {
                for sha in &shas {
                    tracing::warn!("rollout slot of bundle {sha} released: this instance is going away");
                }
                out.released_rollout_slots = shas;
            }
            Err(e) => tracing::error!("releasing the rollout slots: {e:#}"),
        }
    }
    if let Err(e) = release_unhealthy_place(w) {
        tracing::warn!("giving back the unhealthy_after place: {e:#}");
    }
    if let Err(e) = before_complete() {
        out.error = Some(format!("{e:#}"));
        tracing::error!("{e:#}");
    }
    if let Some(b) = beats {
        let o = b.complete(super::launch::CONTINUE, "drained".into());
        out.result = Some(o.result);
        out.completed = o.completed;
        out.error = o.error.or(out.error.take());
    }
    out.at = crate::clock::now_rfc3339();
    super::write_record(w.root, super::TERMINATE_STATE, &out);
    Ok(out)
}

/// Give back the reboot slot this node holds by its records (reboot.json), then remove the
/// record. True when a slot was held.
fn release_slot(w: &Watch<'_>) -> anyhow::Result<bool> {
    if crate::reboot::read_state(w.root)?.is_none() {
        return Ok(false);
    }
    let holder = w.holder.as_deref().ok_or_else(|| anyhow::anyhow!("no holder id for this node"))?;
    let group = w.reboot.group.as_deref().ok_or_else(|| anyhow::anyhow!("no reboot group"))?;
    match &w.reboot.service {
        Service::Etcd(e) => {
            let lock = crate::reboot::etcd::EtcdLock::with_tls(&e.endpoints, &e.prefix, group, &e.tls)?;
            lock.release_now(holder, e.slots)?;
        }
        Service::FleetLock(url) => {
            crate::reboot::fleetlock::FleetLock::new(url, group)?.release(holder)?;
        }
        Service::None => {}
    }
    StateDir::new(w.root).remove(state::REBOOT)?;
    tracing::warn!("reboot slot of group {group} released: this instance is going away");
    Ok(true)
}

fn release_unhealthy_place(w: &Watch<'_>) -> anyhow::Result<()> {
    let (Some(lock), Some(holder)) = (super::unhealthy::etcd(w.config, w.reboot.group.as_deref())?, &w.holder) else {
        return Ok(());
    };
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    lock.update_record(super::unhealthy::ETCD_RECORD, |cur| {
        let places = super::unhealthy::live_places(cur, now);
        if !places.iter().any(|(h, _)| h == holder) {
            return (None, ());
        }
        let left: Vec<_> = places.into_iter().filter(|(h, _)| h != holder).collect();
        (Some(super::unhealthy::places_json(&left)), ())
    })?;
    Ok(())
}
