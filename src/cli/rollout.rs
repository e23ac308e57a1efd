//! `bootstrap rollout status|resume SHA|abort SHA|reap|release HOLDER [--group G]`: operator
//! tools for the rollouts of new bundles (etcd), using this node's agent config for the
//! endpoints.

use super::{NamingArgs, RolloutCmd};
use crate::agent::Context;
use crate::error::ConfigError;
use crate::rollout::etcd::Rollouts;
use std::path::Path;

fn rollouts(cx: &Context, group: Option<&str>) -> anyhow::Result<(Rollouts, String, crate::rollout::Settings)> {
    let s = cx.rollout_tool_settings()?;
    let group = match group {
        Some(g) => g.to_string(),
        None => s
            .group
            .clone()
            .ok_or_else(|| ConfigError::msg("no rollout group: pass --group, set [rollout] group, or name the node (ENV-SERVICE)"))?,
    };
    let svc = s
        .etcd
        .as_ref()
        .ok_or_else(|| ConfigError::msg("no etcd endpoints: set [rollout.etcd] endpoints or [reboot.etcd] endpoints"))?;
    Ok((Rollouts::new(svc, &group)?, group, s))
}

/// A full sha256 (what the keys are named by).
fn sha(s: &str) -> Result<&str, ConfigError> {
    if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(s)
    } else {
        Err(ConfigError::msg(format!(
            "{s:?}: expected the bundle's sha256 (64 hexadecimal digits, as `rollout status` prints it)"
        )))
    }
}

pub fn run(cmd: &RolloutCmd, group: Option<&str>, naming: &NamingArgs) -> anyhow::Result<u8> {
    let cx = Context::gather(Path::new("/"), &super::facts::naming(naming), false)?;
    let (r, group, s) = rollouts(&cx, group)?;
    match cmd {
        RolloutCmd::Status { json } => {
            let all = r.status()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "group": group, "rollouts": all }))?);
                return Ok(0);
            }
            if all.is_empty() {
                println!("group {group}: no rollouts");
            }
            for st in &all {
                println!(
                    "{}  {}  applied {}  healthy {}  failed {}  slots {}/{}",
                    st.sha256,
                    st.state,
                    st.applied.len(),
                    st.healthy.len(),
                    st.failed.len(),
                    st.holders.len(),
                    st.slots
                );
                if let Some(h) = &st.halt {
                    let what = match (&h.check, &h.step) {
                        (Some(c), _) => format!("check {c}"),
                        (None, Some(step)) => format!("step {step}"),
                        (None, None) => "run".to_string(),
                    };
                    println!("  halted by {} at {} ({what}): {}", h.node, h.at, h.reason);
                }
                if let Some(a) = &st.abort {
                    println!("  aborted at {} by {}", a["at"].as_str().unwrap_or("?"), a["by"].as_str().unwrap_or("?"));
                }
                if !st.holders.is_empty() {
                    println!("  holding a slot: {}", st.holders.join(" "));
                }
                if st.waiting > 0 {
                    println!("  waiting for a slot: {}", st.waiting);
                }
            }
        }
        RolloutCmd::Resume { sha256 } => {
            let slots = r.resume(sha(sha256)?, s.canary, s.batch)?;
            println!("group {group}: bundle {sha256} resumed ({slots} slots)");
        }
        RolloutCmd::Abort { sha256 } => {
            let by = if s.holder.is_empty() { cx.facts.hostname.clone() } else { s.holder.clone() };
            r.abort(sha(sha256)?, &by)?;
            println!("group {group}: bundle {sha256} aborted; nodes that applied it go back to their good bundle on their next run");
        }
        RolloutCmd::Reap => {
            use crate::facts::ec2::{Instance, InstanceLookup};
            let mut lookup = InstanceLookup::new(cx.facts.region.as_deref(), cx.config.aws.ec2_endpoint.as_deref());
            for st in r.status()? {
                for h in &st.holders {
                    if !h.starts_with("i-") {
                        println!("kept {h}: not an EC2 instance id");
                        continue;
                    }
                    match lookup.find(h)? {
                        Instance::Gone => {
                            r.give_back(&st.sha256, h)?;
                            println!("removed {h} from bundle {}: instance terminated or unknown", st.sha256);
                        }
                        Instance::Here => println!("kept {h}: instance exists"),
                        Instance::In(region) => println!("kept {h}: instance exists in {region}"),
                    }
                }
            }
        }
        RolloutCmd::Release { holder } => {
            let given = r.give_back_all(holder)?;
            if given.is_empty() {
                println!("group {group}: {holder} holds no rollout slot");
            }
            for sha in given {
                println!("group {group}: {holder}: slot of bundle {sha} given back");
            }
        }
    }
    Ok(0)
}
