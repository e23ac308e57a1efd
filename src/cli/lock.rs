//! `bootstrap lock status|release ID|set-slots N [--group G]`: operator tools for the fleet
//! reboot semaphore (etcd), using this node's agent config for the endpoints.

use super::{Context, LockCmd, NamingArgs};
use crate::error::ConfigError;
use crate::reboot::etcd::{EtcdLock, DEFAULT_PREFIX};
use std::path::Path;

fn lock(cx: &Context, group: Option<&str>) -> anyhow::Result<EtcdLock> {
    let r = &cx.config.reboot;
    if r.etcd.endpoints.is_empty() {
        return Err(ConfigError::msg("no etcd endpoints: set [reboot.etcd] endpoints in /etc/bootstrap/config.toml").into());
    }
    let group = match group {
        Some(g) => g.to_string(),
        None => cx.reboot_group()?,
    };
    Ok(EtcdLock::new(&r.etcd.endpoints, r.etcd.prefix.as_deref().unwrap_or(DEFAULT_PREFIX), &group)?)
}

pub fn run(cmd: &LockCmd, group: Option<&str>, naming: &NamingArgs) -> anyhow::Result<u8> {
    let cx = Context::gather(Path::new("/"), naming, false)?;
    let l = lock(&cx, group)?;
    match cmd {
        LockCmd::Status => match l.get()? {
            Some((s, _)) => {
                println!("{}: {}/{} slots held", l.key(), s.holders.len(), s.total_slots);
                for h in &s.holders {
                    println!("  {h}");
                }
            }
            None => println!("{}: no semaphore yet (created on first acquire)", l.key()),
        },
        LockCmd::Release { id } => {
            let held = l.release(id, cx.config.reboot.etcd.slots.unwrap_or(1))?;
            println!("{}: {id} {}", l.key(), if held { "released" } else { "held no slot" });
        }
        LockCmd::Reap => {
            let Some((sem, _)) = l.get()? else {
                println!("{}: no semaphore", l.key());
                return Ok(0);
            };
            for h in &sem.holders {
                if !h.starts_with("i-") {
                    println!("kept {h}: not an EC2 instance id");
                    continue;
                }
                if crate::facts::ec2::instance_gone(cx.facts.region.as_deref(), cx.config.aws.ec2_endpoint.as_deref(), h)? {
                    l.release(h, cx.config.reboot.etcd.slots.unwrap_or(1))?;
                    println!("removed {h}: instance terminated or unknown");
                } else {
                    println!("kept {h}: instance exists");
                }
            }
        }
        LockCmd::SetSlots { n } => {
            l.set_slots(*n)?;
            println!("{}: total_slots = {n}", l.key());
        }
    }
    Ok(0)
}
