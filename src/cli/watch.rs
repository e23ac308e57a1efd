//! `bootstrap watch`: drain this node when its Auto Scaling group terminates it (see
//! `asg::watch`).

use crate::agent::Context;
use anyhow::Result;
use std::path::{Path, PathBuf};

pub fn run(once: bool, root: Option<&Path>) -> Result<u8> {
    let root = root.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let cx = Context::gather(&root, &super::facts::naming(&super::NamingArgs::default()), false)?;
    let settings = crate::asg::Settings::new(&cx.config.asg)?;
    let group = cx.config.asg.group.as_deref().map(|g| cx.substitute(g)).transpose()?;
    if !crate::asg::watches(&cx.config, &cx.facts) {
        tracing::info!("not in an Auto Scaling group (no aws:autoscaling:groupName tag, no [asg] group) or [asg] enabled = false: nothing to watch");
        return Ok(0);
    }
    // The watcher runs on nodes in a group whatever `[asg] enabled` defaults to: a scale-in
    // drain needs no launch hook.
    let mut settings = settings;
    settings.enabled = true;
    let reboot = cx.reboot_settings()?;
    let rollout = match cx.rollout_gate_settings() {
        Ok(r) => Some(r).filter(|r| r.gated() && !r.holder.is_empty()),
        Err(e) => {
            tracing::warn!("[rollout]: {e}; no rollout slot is given back in a drain");
            None
        }
    };
    let release = || -> anyhow::Result<Vec<String>> {
        let Some(rl) = &rollout else { return Ok(Vec::new()) };
        let (Some(svc), Some(group)) = (&rl.etcd, &rl.group) else {
            return Ok(Vec::new());
        };
        let r = crate::rollout::etcd::Rollouts::new(svc, group)?;
        r.give_back_all(&rl.holder)
            .map_err(|e| anyhow::anyhow!("rollout slots of {} in group {group}: {e}", rl.holder))
    };
    let w = crate::asg::watch::Watch {
        root: &cx.root,
        facts: &cx.facts,
        config: &cx.config,
        settings: &settings,
        reboot: &reboot,
        group,
        holder: cx.holder_id().ok(),
        release_rollout_slots: rollout.is_some().then_some(&release as &dyn Fn() -> anyhow::Result<Vec<String>>),
    };
    match crate::asg::watch::run(&w, once)? {
        Some(d) => {
            println!("{}", serde_json::to_string_pretty(&d)?);
            // A completion the API did not take exits 1: systemd starts the watcher again, which
            // retries only the completion. A failed drain hook is in the journal and the record;
            // it is not run again (the termination goes on either way).
            Ok(if d.lifecycle_hook.is_some() && !d.completed { 1 } else { 0 })
        }
        None => Ok(0),
    }
}
