//! `bootstrap reboot [--check|--request|--wait]`: the reboot part alone, under the run lock (it
//! never reboots in the middle of an apply).

use super::{Context, NamingArgs};
use crate::state::{self, StateDir};
use std::path::Path;

pub fn run(check: bool, request: bool, wait: bool, lock_timeout: std::time::Duration, naming: &NamingArgs) -> anyhow::Result<u8> {
    let root = Path::new("/");
    if request {
        let now = format!("{}\n", crate::clock::now_rfc3339());
        StateDir::new(root).write_mode(state::REBOOT_REQUESTED, now.as_bytes(), 0o644)?;
        println!("reboot requested: the next run takes a slot and reboots");
        return Ok(0);
    }
    let cx = Context::gather(root, naming, false)?;
    if check {
        match crate::reboot::check(root, &cx.facts.os.family, &cx.facts.boot_id)? {
            Some(why) => println!("reboot needed: {why}"),
            None => println!("no reboot needed"),
        }
        return Ok(0);
    }
    let settings = cx.reboot_settings()?;
    let mut guard = Some(crate::runlock::acquire(root, lock_timeout)?);
    let boot_id = cx.facts.boot_id.clone();
    let state = crate::reboot::read_state(root)?;
    // Back from our reboot: the slot goes back only after a successful converge in THIS boot;
    // the report from before the reboot says nothing about the node now.
    if let Some(st) = state.as_ref().filter(|st| st.boot_id != boot_id) {
        match last_run(root)? {
            Some((_, Some(b))) if b == boot_id => {}
            _ => {
                let o = crate::reboot::Outcome {
                    needed: None,
                    action: crate::reboot::Action::Holding,
                    detail: Some(format!(
                        "back from the reboot; no apply has run in this boot yet: the slot of group {} is released after one succeeds",
                        st.group
                    )),
                    reboot_now: false,
                };
                println!("{}", serde_json::to_string_pretty(&o)?);
                return Ok(0);
            }
        }
    }
    // No reboot after a failed run, and after a reboot no release unless the run of this boot
    // succeeded. No report yet is no failure (before any reboot).
    let run_ok = || -> anyhow::Result<bool> { Ok(last_run(root)?.is_none_or(|(ok, _)| ok)) };
    let host = crate::step::Host {
        root: root.to_path_buf(),
        facts: cx.facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
    };
    let ok = run_ok()?;
    let waiting = wait.then_some(crate::reboot::Waiting {
        root,
        lock_timeout,
        guard: &mut guard,
        run_ok: &run_ok,
    });
    let o = crate::reboot::coordinate(&host, &settings, crate::reboot::RunResult { ok, changed: None }, waiting)?;
    println!("{}", serde_json::to_string_pretty(&o)?);
    if o.reboot_now {
        host.systemd.reboot()?;
    }
    drop(guard);
    Ok(if o.action.is_failure() { 1 } else { 0 })
}

/// The last converge's report: (succeeded, the boot it ran in); None when there is none yet.
/// A report that cannot be read or parsed is an error, not a success.
fn last_run(root: &Path) -> anyhow::Result<Option<(bool, Option<String>)>> {
    let dir = StateDir::new(root);
    let path = dir.path(state::REPORT);
    let Some(b) = dir.read(state::REPORT)? else { return Ok(None) };
    let r: serde_json::Value = serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(Some((r["status"] == "ok", r["boot_id"].as_str().map(str::to_string))))
}
