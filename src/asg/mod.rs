//! The EC2 Auto Scaling lifecycle (docs/asg.md): `init` holds the launch lifecycle action
//! (heartbeats) while it converges and completes it with CONTINUE only once the node converged
//! and its `[[asg.health]]` checks pass, or ABANDON at the first-boot deadline (`launch`);
//! after `unhealthy_after` failed timer runs the instance is marked Unhealthy so the group
//! replaces it, never while it holds a reboot slot and never for more than `max_unhealthy` of
//! the group at once (`unhealthy`); `bootstrap watch` drains a node that is being scaled in
//! and completes its terminating action (`watch`).

pub mod api;
pub mod launch;
pub mod settings;
pub mod unhealthy;
pub mod watch;

pub use launch::{Launch, LaunchOutcome};
pub use settings::Settings;

use crate::state::StateDir;
use std::fmt::Write as _;
use std::path::Path;

/// The tag EC2 Auto Scaling puts on its instances.
pub const GROUP_TAG: &str = "aws:autoscaling:groupName";
/// How `init` completed the launch action (`LaunchOutcome`), under /var/lib/bootstrap.
pub const LAUNCH_STATE: &str = "asg-launch.json";
/// A launch action held and not completed yet (its hook and wall-clock deadline): a first boot
/// that reboots picks it up again after the boot (the firstboot unit runs `init` while it exists).
pub const LAUNCH_PENDING: &str = "asg-launch-pending.json";
/// Consecutive failed runs and whether the instance was marked Unhealthy.
pub const HEALTH_STATE: &str = "asg-health.json";
/// What `watch` did when the instance was being terminated.
pub const TERMINATE_STATE: &str = "asg-terminate.json";
/// The metrics file, next to the agent's own textfile (node_exporter reads every `*.prom`).
pub const METRICS_FILE: &str = "bootstrap_asg.prom";
/// node_exporter's textfile directory (`metrics::DEFAULT_TEXTFILE`'s).
const DEFAULT_METRICS_DIR: &str = "/var/lib/node_exporter/textfile_collector";

/// This instance's Auto Scaling group and id: None when the lifecycle is off, or the instance
/// is in no group (no `aws:autoscaling:groupName` tag and no `[asg] group`), or has no
/// instance id (off EC2).
pub fn membership(s: &Settings, facts: &crate::facts::Facts, group: Option<String>) -> Option<(String, String)> {
    if !s.enabled {
        return None;
    }
    let group = group.or_else(|| facts.tags.get(GROUP_TAG).cloned())?;
    Some((group, facts.instance_id.clone()?))
}

/// Does `bootstrap watch` have anything to watch here: the instance is in an Auto Scaling
/// group (its tag, or `[asg] group`) and `[asg] enabled` is not `false`. A scale-in drain needs
/// no launch hook, so the watcher runs whatever `enabled` defaults to.
pub fn watches(config: &crate::config::Config, facts: &crate::facts::Facts) -> bool {
    config.asg.enabled != Some(false) && (config.asg.group.is_some() || facts.tags.contains_key(GROUP_TAG))
}

/// The instance's `autoscaling/target-lifecycle-state` (one IMDS read with the timer's short
/// deadline). None: IMDS does not say (not in a group, off EC2, unreachable).
pub fn target_state(config: &crate::config::Config) -> Option<String> {
    let base = config.imds.base_url.clone().unwrap_or_else(|| crate::facts::imds::DEFAULT_BASE_URL.to_string());
    let r = crate::facts::imds::Imds::new(&base, crate::facts::imds::TIMER_DEADLINE).and_then(|i| i.meta(watch::TARGET_STATE));
    match r {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("reading {}: {e:#}", watch::TARGET_STATE);
            None
        }
    }
}

/// The API client for this instance.
pub fn client(s: &Settings, facts: &crate::facts::Facts, group: &str, instance_id: &str) -> api::Client {
    api::Client::new(facts.region.as_deref(), s.endpoint.as_deref(), group, instance_id)
}

fn read_record<T: serde::de::DeserializeOwned>(root: &Path, name: &str) -> Option<T> {
    let b = StateDir::new(root).read(name).ok()??;
    serde_json::from_slice(&b).ok()
}

fn write_record<T: serde::Serialize>(root: &Path, name: &str, v: &T) {
    let r = serde_json::to_vec_pretty(v)
        .map_err(anyhow::Error::from)
        .and_then(|b| StateDir::new(root).write(name, &b));
    if let Err(e) = r {
        tracing::warn!("writing /var/lib/bootstrap/{name}: {e:#}");
    }
}

/// The lifecycle metrics, from the state records.
pub fn render_metrics(launch: Option<&LaunchOutcome>, health: Option<&unhealthy::HealthRecord>) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    if let Some(l) = launch {
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        gauge(
            "bootstrap_asg_launch_result",
            "How init completed the Auto Scaling launch lifecycle action (1 for the result sent).",
            &[(
                format!("{{hook=\"{}\",result=\"{}\",completed=\"{}\"}}", esc(&l.hook), esc(&l.result), l.completed),
                1.0,
            )],
        );
        gauge(
            "bootstrap_asg_launch_heartbeats",
            "Lifecycle heartbeats init recorded while converging.",
            &[(String::new(), l.heartbeats as f64)],
        );
    }
    let h = health.cloned().unwrap_or_default();
    gauge(
        "bootstrap_asg_consecutive_failed_runs",
        "Failed apply runs in a row (unhealthy_after counts these).",
        &[(String::new(), h.consecutive_failures as f64)],
    );
    gauge(
        "bootstrap_asg_marked_unhealthy",
        "1 once this node set its Auto Scaling health to Unhealthy.",
        &[(String::new(), if h.marked_unhealthy_at.is_some() { 1.0 } else { 0.0 })],
    );
    out
}

/// Write `bootstrap_asg.prom` in the directory of the agent's metrics textfile (made when it
/// is configured; by default only when node_exporter's directory exists).
pub fn write_metrics(root: &Path, configured: Option<&str>) {
    let dir = match configured {
        Some(c) => Path::new(c).parent().unwrap_or(Path::new("/")),
        None => Path::new(DEFAULT_METRICS_DIR),
    };
    let path = dir.join(METRICS_FILE).to_string_lossy().into_owned();
    let text = render_metrics(read_record(root, LAUNCH_STATE).as_ref(), read_record(root, HEALTH_STATE).as_ref());
    let r = crate::fsutil::Root::open(root).and_then(|fs| match fs.parent(&path, configured.is_some())? {
        Some(at) => at.write(text.as_bytes(), 0o644, None),
        None => Ok(()),
    });
    if let Err(e) = r {
        tracing::warn!("writing {path}: {e:#}");
    }
}

/// A host for health checks on the live system.
pub fn host(root: &Path, facts: &crate::facts::Facts) -> crate::step::Host {
    crate::step::Host {
        root: root.to_path_buf(),
        facts: facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
        refresh_lists: Default::default(),
        first_boot: false,
    }
}
