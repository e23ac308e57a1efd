//! `bootstrap reboot [--check|--request|--wait]`: the reboot part alone.

use super::{Context, NamingArgs};
use std::path::Path;

pub fn run(check: bool, request: bool, wait: bool, naming: &NamingArgs) -> anyhow::Result<u8> {
    let root = Path::new("/");
    if request {
        let p = root.join(crate::reboot::REQUEST_PATH);
        crate::fsutil::create_parents(&p)?;
        crate::fsutil::atomic_write(&p, format!("{}\n", crate::engine::now_rfc3339()).as_bytes(), 0o644, None)?;
        println!("reboot requested: the next run takes a slot and reboots");
        return Ok(0);
    }
    let cx = Context::gather(root, naming, false)?;
    if check {
        match crate::reboot::reboot_needed(root, &cx.facts.os.family, false) {
            Some(why) => println!("reboot needed: {why}"),
            None => println!("no reboot needed"),
        }
        return Ok(0);
    }
    // The last converge must not have failed: no reboot after a failed run, and after a reboot
    // the slot is released only if the run since then succeeded. No report yet is no failure.
    let last_ok = match std::fs::read(root.join(crate::engine::report::REPORT_PATH)) {
        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b).is_ok_and(|r| r["status"] == "ok"),
        Err(_) => true,
    };
    let host = crate::step::Host {
        root: root.to_path_buf(),
        facts: cx.facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
    };
    let o = crate::reboot::coordinate(&host, &cx.config.reboot, &cx.reboot_group()?, &cx.holder_id(), last_ok, false, wait)?;
    println!("{}", serde_json::to_string_pretty(&o)?);
    if o.reboot_now {
        host.systemd.reboot()?;
    }
    Ok(if o.action == "halted" || o.action == "hook_failed" { 1 } else { 0 })
}
