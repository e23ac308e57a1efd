//! `bootstrap lock status|release ID|set-slots N [--group G]`: operator tools for the fleet
//! reboot semaphore (etcd), using this node's agent config for the endpoints.

use super::{LockCmd, NamingArgs};
use crate::agent::Context;
use crate::reboot::etcd::EtcdLock;
use std::path::Path;

fn lock(cx: &Context, group: Option<&str>) -> anyhow::Result<EtcdLock> {
    let group = match group {
        Some(g) => g.to_string(),
        None => cx.reboot_group()?,
    };
    crate::reboot::etcd_from_config(&cx.config.reboot.etcd, &group)
}

pub fn run(cmd: &LockCmd, group: Option<&str>, naming: &NamingArgs) -> anyhow::Result<u8> {
    let cx = Context::gather(Path::new("/"), &super::facts::naming(naming), false)?;
    let l = lock(&cx, group)?;
    match cmd {
        LockCmd::Status => match l.get()? {
            Some((s, _)) => {
                println!("{}: {}/{} slots held", l.key(), s.holders.len(), s.total_slots);
                let statuses = l.statuses()?;
                for h in &s.holders {
                    match statuses.iter().find(|(id, _)| id == h) {
                        Some((_, st)) => println!(
                            "  {h}  {}: {} (since {})",
                            st["state"].as_str().unwrap_or("?"),
                            st["reason"].as_str().unwrap_or("?"),
                            st["at"].as_str().unwrap_or("?")
                        ),
                        None => println!("  {h}  rebooting or coming back"),
                    }
                }
                let b = l.backlog(10)?;
                let more = |shown: usize, total: u64| match total.saturating_sub(shown as u64) {
                    0 => String::new(),
                    n => format!(" (and {n} more)"),
                };
                if b.waiting > 0 {
                    println!("{} waiting for a slot (reboot --wait), in queue order:", b.waiting);
                    println!("  {}{}", b.first_waiters.join(" "), more(b.first_waiters.len(), b.waiting));
                }
                if b.releases_pending > 0 {
                    println!("{} release requests not yet applied by the queue head:", b.releases_pending);
                    println!("  {}{}", b.first_releases.join(" "), more(b.first_releases.len(), b.releases_pending));
                }
            }
            None => println!("{}: no semaphore yet (created on first acquire)", l.key()),
        },
        LockCmd::Release { id } => {
            let held = l.release_now(id, cx.config.reboot.etcd.slots.unwrap_or(1))?;
            l.set_status(id, None)?;
            println!("{}: {id} {}", l.key(), if held { "released" } else { "held no slot" });
        }
        LockCmd::Reap => {
            let Some((sem, _)) = l.get()? else {
                println!("{}: no semaphore", l.key());
                return Ok(0);
            };
            use crate::facts::ec2::{Instance, InstanceLookup};
            let mut lookup = InstanceLookup::new(cx.facts.region.as_deref(), cx.config.aws.ec2_endpoint.as_deref());
            for h in &sem.holders {
                if !h.starts_with("i-") {
                    println!("kept {h}: not an EC2 instance id");
                    continue;
                }
                match lookup.find(h)? {
                    Instance::Gone => {
                        l.release_now(h, cx.config.reboot.etcd.slots.unwrap_or(1))?;
                        println!("removed {h}: instance terminated or unknown");
                    }
                    Instance::Here => println!("kept {h}: instance exists"),
                    Instance::In(region) => println!("kept {h}: instance exists in {region}"),
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
