//! The launch lifecycle action: heartbeats from a thread while `init` converges (and retries),
//! then CONTINUE once the node converged and is healthy, or ABANDON at the first-boot deadline
//! (sent by the heartbeat thread itself when the deadline passes in the middle of a run, so a
//! hung first boot is still replaced in time). The action is completed once.

use super::api::{self, Client};
use super::Settings;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const CONTINUE: &str = "CONTINUE";
pub const ABANDON: &str = "ABANDON";

/// How the launch action ended (in `last-run.json` as `lifecycle`, and in
/// /var/lib/bootstrap/asg-launch.json).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LaunchOutcome {
    pub group: String,
    pub instance_id: String,
    pub hook: String,
    /// CONTINUE or ABANDON.
    pub result: String,
    pub reason: String,
    /// When `init` started holding the action.
    pub started_at: String,
    /// When the result was sent.
    pub at: String,
    pub heartbeats: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_heartbeat_at: Option<String>,
    /// The API took the result (false: see `error`; the hook's default result applies at its
    /// timeout).
    pub completed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The instance's `autoscaling/target-lifecycle-state` while the action was held
    /// (`InService`, or `Warmed:Stopped` etc. for a launch into a warm pool). None: IMDS did
    /// not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_state: Option<String>,
}

impl LaunchOutcome {
    /// Completed for a launch into a warm pool: the instance's launch into service, later, is
    /// another lifecycle action.
    pub fn warm(&self) -> bool {
        self.target_state.as_deref().is_some_and(is_warm)
    }
}

/// A target lifecycle state of a warm pool (`Warmed:Stopped`, `Warmed:Running`,
/// `Warmed:Hibernated`): the instance is being prepared, not put in service.
pub fn is_warm(target_state: &str) -> bool {
    target_state.starts_with("Warmed:") && target_state != "Warmed:Terminated"
}

/// The launch action being held (asg-launch-pending.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    pub instance_id: String,
    pub hook: String,
    pub started_at: String,
    /// The first-boot deadline, unix seconds.
    pub deadline_unix: i64,
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

#[derive(Default)]
struct Shared {
    /// See [`LaunchOutcome::target_state`].
    target_state: Option<String>,
    heartbeats: u32,
    last_heartbeat_at: Option<String>,
    outcome: Option<LaunchOutcome>,
}

/// Heartbeats for one lifecycle action, from a thread, every `interval` until stopped; at
/// `deadline` (if any) the thread completes the action with ABANDON.
pub struct Heartbeats {
    client: Client,
    hook: String,
    started_at: String,
    shared: Arc<Mutex<Shared>>,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Where the outcome is recorded (the root), with the metrics setting.
    record: Option<(PathBuf, Option<String>)>,
}

impl Heartbeats {
    pub fn start(
        client: Client,
        hook: &str,
        interval: Duration,
        deadline: Option<Instant>,
        record: Option<(PathBuf, Option<String>)>,
        started_at: Option<String>,
    ) -> Heartbeats {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (stop, stopped) = channel::<()>();
        let started_at = started_at.unwrap_or_else(crate::clock::now_rfc3339);
        let thread = {
            let (client, hook, shared, started_at, record) = (client.clone(), hook.to_string(), shared.clone(), started_at.clone(), record.clone());
            std::thread::spawn(move || loop {
                let wait = match deadline {
                    Some(d) => interval.min(d.saturating_duration_since(Instant::now())),
                    None => interval,
                };
                match stopped.recv_timeout(wait) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    tracing::error!("the first-boot deadline passed while converging: abandoning the launch of this instance");
                    let reason = "the first-boot deadline passed while converging".to_string();
                    complete_once(&client, &hook, &shared, &started_at, ABANDON, reason, record.as_ref());
                    return;
                }
                let r = client.heartbeat(&hook);
                let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(()) => {
                        s.heartbeats += 1;
                        s.last_heartbeat_at = Some(crate::clock::now_rfc3339());
                        tracing::debug!("lifecycle heartbeat {} for {hook}", s.heartbeats);
                    }
                    Err(e) => tracing::warn!("{e:#}"),
                }
            })
        };
        Heartbeats {
            client,
            hook: hook.to_string(),
            started_at,
            shared,
            stop: Some(stop),
            thread: Some(thread),
            record,
        }
    }

    /// The instance's target lifecycle state, recorded with the outcome.
    pub fn set_target_state(&self, state: Option<String>) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).target_state = state;
    }

    /// Already completed (by the deadline)?
    pub fn outcome(&self) -> Option<LaunchOutcome> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).outcome.clone()
    }

    fn stop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Stop the heartbeats and complete the action with `result` (unless it was completed
    /// already: that outcome is returned).
    pub fn complete(mut self, result: &str, reason: String) -> LaunchOutcome {
        self.stop();
        complete_once(&self.client, &self.hook, &self.shared, &self.started_at, result, reason, self.record.as_ref())
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Send the result unless one was sent; record it (state file and metrics) when asked to.
fn complete_once(
    client: &Client,
    hook: &str,
    shared: &Mutex<Shared>,
    started_at: &str,
    result: &str,
    reason: String,
    record: Option<&(PathBuf, Option<String>)>,
) -> LaunchOutcome {
    // Held across the call: the heartbeat thread and the caller never both complete.
    let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(o) = &s.outcome {
        return o.clone();
    }
    let sent = client.complete(hook, result);
    let outcome = LaunchOutcome {
        group: client.group.clone(),
        instance_id: client.instance_id.clone(),
        hook: hook.to_string(),
        result: result.to_string(),
        reason,
        started_at: started_at.to_string(),
        at: crate::clock::now_rfc3339(),
        heartbeats: s.heartbeats,
        last_heartbeat_at: s.last_heartbeat_at.clone(),
        completed: sent.is_ok(),
        error: sent.as_ref().err().map(|e| format!("{e:#}")),
        target_state: s.target_state.clone(),
    };
    match &sent {
        Ok(()) => tracing::warn!("lifecycle action of {hook} completed with {result}: {}", outcome.reason),
        Err(e) => tracing::error!("completing the lifecycle action of {hook} with {result}: {e:#}"),
    }
    if let Some((root, metrics)) = record {
        super::write_record(root, super::LAUNCH_STATE, &outcome);
        super::write_metrics(root, metrics.as_deref());
        // Completed (or the API refused it for good): no later boot holds it again.
        if let Err(e) = crate::state::StateDir::new(root).remove(super::LAUNCH_PENDING) {
            tracing::warn!("removing /var/lib/bootstrap/{}: {e:#}", super::LAUNCH_PENDING);
        }
    }
    s.outcome = Some(outcome.clone());
    outcome
}

/// `init`'s hold on the launch action.
pub struct Launch {
    beats: Heartbeats,
    host: crate::step::Host,
    settings: Settings,
    deadline: Instant,
}

impl Launch {
    /// Find the launch hook (named, or the group's one launching hook) and start the
    /// heartbeats. None: the lifecycle is off, the instance is in no group, or the group has
    /// no launching hook. A config mistake is an error (exit 78) before anything ran; an API
    /// failure is logged and `init` runs without the lifecycle (the hook's timeout then
    /// decides).
    /// `target`: the instance's target lifecycle state ([`super::target_state`]).
    pub fn start(
        root: &Path,
        facts: &crate::facts::Facts,
        config: &crate::config::Config,
        group: Option<String>,
        target: Option<String>,
    ) -> Result<Option<Launch>> {
        let settings = Settings::new(&config.asg)?;
        let Some((group, id)) = super::membership(&settings, facts, group) else {
            return Ok(None);
        };
        // Completed once already on this instance (an `init` run again by hand): nothing to
        // hold, unless it was completed in a warm pool and the instance now goes into service
        // (a new launch action, the same hook).
        // Unknown (IMDS did not say): held as if going into service; holding an action that
        // is not there only costs a logged error, missing one costs the instance.
        let into_service = !target.as_deref().is_some_and(is_warm);
        if let Some(done) =
            super::read_record::<LaunchOutcome>(root, super::LAUNCH_STATE).filter(|o| o.instance_id == id && o.completed && !(o.warm() && into_service))
        {
            tracing::info!("launch lifecycle action {} already completed with {} at {}", done.hook, done.result, done.at);
            return Ok(None);
        }
        let client = super::client(&settings, facts, &group, &id);
        let hook = client
            .hooks()
            .and_then(|hooks| api::pick_hook(&hooks, api::LAUNCHING, settings.launch_hook.as_deref()));
        let hook = match hook {
            Ok(Some(h)) => h,
            Ok(None) => {
                tracing::info!("Auto Scaling group {group} has no launching lifecycle hook: nothing to complete");
                return Ok(None);
            }
            Err(e) => {
                tracing::error!("no launch lifecycle action to hold: {e:#}");
                return Ok(None);
            }
        };
        let interval = super::settings::heartbeat_interval(settings.heartbeat_interval, hook.heartbeat_timeout);
        // Held before a reboot of this first boot: the same action, the same wall-clock deadline.
        let pending = super::read_record::<Pending>(root, super::LAUNCH_PENDING)
            .filter(|p| p.instance_id == id && p.hook == hook.name)
            .unwrap_or_else(|| Pending {
                instance_id: id.clone(),
                hook: hook.name.clone(),
                started_at: crate::clock::now_rfc3339(),
                deadline_unix: now_unix().saturating_add(settings.first_boot_deadline.as_secs() as i64),
            });
        super::write_record(root, super::LAUNCH_PENDING, &pending);
        let left = Duration::from_secs(pending.deadline_unix.saturating_sub(now_unix()).max(0) as u64);
        let deadline = Instant::now() + left;
        tracing::info!(
            "holding launch lifecycle action {} of {group}: heartbeat every {}s, deadline in {}s",
            hook.name,
            interval.as_secs(),
            left.as_secs()
        );
        let record = Some((root.to_path_buf(), config.metrics.textfile.clone()));
        let beats = Heartbeats::start(client, &hook.name, interval, Some(deadline), record, Some(pending.started_at));
        beats.set_target_state(target);
        Ok(Some(Launch {
            beats,
            host: super::host(root, facts),
            settings,
            deadline,
        }))
    }

    /// The `[[asg.health]]` checks that fail now.
    pub fn failed_checks(&self) -> Vec<String> {
        crate::reboot::failed_checks(&self.host, &self.settings.health)
    }

    /// After a failed attempt: wait before the next one. False when the deadline came (or the
    /// action was completed at it): no more attempts.
    pub fn wait_retry(&self) -> bool {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || self.beats.outcome().is_some() {
            return false;
        }
        tracing::warn!(
            "first boot failed; trying again in {}s (launch abandoned in {}s)",
            self.settings.retry_interval.min(left).as_secs(),
            left.as_secs()
        );
        std::thread::sleep(self.settings.retry_interval.min(left));
        !self.deadline.saturating_duration_since(Instant::now()).is_zero() && self.beats.outcome().is_none()
    }

    pub fn complete(self, result: &str, reason: String) -> LaunchOutcome {
        self.beats.complete(result, reason)
    }
}

/// A warm pool's running instance going into service (`bootstrap watch` read `InService`):
/// its launch into service is a lifecycle action of its own, held and completed by `init`.
/// Starts the firstboot unit (without waiting: the watcher keeps watching) when this
/// instance's launch action was completed in the warm pool and it has no `firstboot.done`.
/// True when it was started (or there is nothing to start): the watcher asks once.
pub fn start_init_into_service(root: &Path, instance_id: Option<&str>) -> bool {
    let warm_done =
        super::read_record::<LaunchOutcome>(root, super::LAUNCH_STATE).is_some_and(|o| o.warm() && o.completed && Some(o.instance_id.as_str()) == instance_id);
    let marker = crate::state::StateDir::new(root).read(crate::state::FIRSTBOOT_DONE).ok().flatten().is_some();
    // Also an instance drained back into the pool whose launch record could not be marked
    // warm (none was kept: no launch hook held at its first launch).
    let returned = super::watch::returned_to_pool(root, instance_id);
    if !(warm_done || returned) || marker {
        return true;
    }
    tracing::warn!("this warm pool instance is going into service: starting bootstrap-firstboot.service (init)");
    let out = crate::runner::run(&crate::runner::Cmd {
        argv: ["systemctl", "start", "--no-block", "bootstrap-firstboot.service"].map(String::from).to_vec(),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    });
    match out {
        Ok(o) if o.success() => true,
        Ok(o) => {
            tracing::error!("starting bootstrap-firstboot.service: {}", o.describe());
            false
        }
        Err(e) => {
            tracing::error!("starting bootstrap-firstboot.service: {e:#}");
            false
        }
    }
}
