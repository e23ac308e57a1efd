//! The rollout gate of a run (`[rollout] strategy = "canary"`): which bundle the run applies,
//! by `rollout::decide` on what etcd says, and the slot around a new bundle: wait for it, apply
//! the bundle under it (its `restart:` handlers too), health checks, then release it or halt
//! the bundle for the group. Also the node's status record for the fleet view.

use super::converge::{apply_bundle, apply_loaded, load, Applied, Bundle, Hooks, RunOptions};
use super::Context;
use crate::config::OnFailure;
use crate::engine::report::{Report, RunStatus};
use crate::engine::{self, Mode};
use crate::rollout::etcd::{Halt, Rollouts};
use crate::rollout::{decide, settle, Fallback, Gate, Inputs, Settings, Settle, Why};
use crate::step::Host;
use serde_json::json;
use std::time::{Duration, Instant};

/// The node's own record of its rollouts (`/var/lib/bootstrap/rollout.json`).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Local {
    /// The good bundle before the current last-good one.
    previous: Option<String>,
    /// The bundle the last gated run fetched: when the group moves on to another, a slot this
    /// node still holds of that one is given back (one request per new bundle, not a scan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fetched: Option<String>,
}

fn write_local(cx: &Context, local: &Local) -> anyhow::Result<()> {
    crate::state::StateDir::new(&cx.root).write(crate::rollout::STATE_FILE, &serde_json::to_vec(local)?)
}

fn read_local(cx: &Context) -> Local {
    crate::state::StateDir::new(&cx.root)
        .read(crate::rollout::STATE_FILE)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn why_str(w: Why) -> &'static str {
    match w {
        Why::Halted => "halted",
        Why::Aborted => "aborted",
        Why::Unavailable => "etcd unavailable",
    }
}

fn now() -> String {
    crate::clock::now_rfc3339()
}

/// Run the gate: see `rollout::decide` for the rules.
pub(super) fn gated(
    cx: &Context,
    o: &RunOptions,
    b: &Bundle<'_>,
    rl: &Settings,
    fetched: crate::source::Fetched,
    hooks: &mut Hooks<'_>,
) -> anyhow::Result<Applied> {
    let (Some(svc), Some(group)) = (&rl.etcd, &rl.group) else {
        return apply_bundle(cx, o, Mode::Apply, b, &fetched, hooks, true);
    };
    let me = rl.holder.as_str();
    let rollouts = Rollouts::new(svc, group)?;
    let new = fetched.sha256.clone();
    let last_good = crate::source::last_good(&cx.root);
    let view = match &new {
        Some(sha) => match rollouts.view(sha, last_good.as_deref(), me) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!("rollout of bundle {sha} in group {group}: {e}; no new bundle is applied");
                None
            }
        },
        None => None,
    };
    // Not in service yet: `init` before its marker (a warm pool instance going into service, a
    // first boot that rebooted). Its launch action holds it out of the load balancer, so it
    // takes the fetched bundle like a new instance (no slot, halted if it fails while in
    // flight) instead of queueing with the action held; a halted or aborted bundle falls back
    // to last-good.
    let out_of_service = o.command == "init"
        && last_good.is_some()
        && !view.as_ref().is_some_and(|v| v.held)
        && !crate::state::StateDir::new(&cx.root).exists(crate::state::FIRSTBOOT_DONE);
    let inputs = Inputs {
        gated: true,
        fetched: new.as_deref(),
        last_good: if out_of_service { None } else { last_good.as_deref() },
        view: view.as_ref(),
        me,
        on_failure: rl.on_failure,
    };
    let gate = match decide(inputs) {
        Gate::Refuse(why) if out_of_service => {
            let fb = if view.as_ref().is_some_and(|v| v.last_good_aborted) {
                Fallback::Previous
            } else {
                Fallback::LastGood
            };
            Gate::Fallback(fb, why)
        }
        g => g,
    };
    tracing::info!(
        ?gate,
        bundle = new.as_deref().unwrap_or("-"),
        last_good = last_good.as_deref().unwrap_or("-"),
        "rollout gate"
    );
    let mut note = json!({ "group": group, "sha256": new, "last_good": last_good });
    if let (Some(sha), Some(_)) = (&new, &view) {
        leave_previous_bundle(cx, &rollouts, sha, me, &mut note);
    }
    let sha = new.clone().unwrap_or_default();
    let mut applied = match gate {
        Gate::Fetched if (last_good.is_none() || out_of_service) && view.is_some() => first_bundle(cx, o, b, rl, &rollouts, &fetched, hooks, &mut note)?,
        Gate::Fetched => {
            let mut a = apply_bundle(cx, o, Mode::Apply, b, &fetched, hooks, true)?;
            note["state"] = "applied".into();
            // Applied and marked good, but the release did not reach etcd (or was killed):
            // give the slot back now (after the reboot, if this run reboots the node).
            if view.as_ref().is_some_and(|v| v.held) && !a.report.failed() && !a.report.reboot_now() {
                match rollouts.healthy(&sha, me, rl.canary, rl.batch) {
                    Ok(()) => note["released_at"] = now().into(),
                    Err(e) => fail(&mut a.report, format!("releasing the rollout slot of bundle {sha}: {e}")),
                }
            }
            a
        }
        // A slot this node holds, on a node drained for a scale-in meanwhile (the drain could
        // not give it back): nothing new either. Kept on a lock timeout (it may be the slot of
        // a bundle whose reboot is not health-checked yet).
        Gate::Held => match relock_undrained(cx, o.lock_timeout, &rollouts, &sha, me)? {
            Some(lock) => {
                let mut applied = under_slot(cx, o, b, rl, &rollouts, &fetched, hooks, &mut note)?;
                applied._lock = Some(lock);
                applied
            }
            None => {
                note["state"] = "drained".into();
                fallback(cx, o, b, Fallback::LastGood, hooks)?
            }
        },
        Gate::Queue(fb) => {
            let a = fallback(cx, o, b, fb, hooks)?;
            if a.report.failed() || a.report.reboot_now() {
                // A failed fallback is no base for a new bundle; a reboot comes first.
                note["state"] = if a.report.failed() { "fallback_failed" } else { "reboot_first" }.into();
                a
            } else {
                drop(a._lock);
                let deadline = rl.wait_deadline(o.started);
                note["queued_at"] = now().into();
                match rollouts.wait_slot(&sha, me, rl.first_slots(), deadline) {
                    Ok(crate::reboot::etcd::Waited::Acquired | crate::reboot::etcd::Waited::AlreadyHeld) => {
                        note["slot_at"] = now().into();
                        // No lock (another run holds it): the slot goes back, for the next node.
                        // Within what the unit's timeout leaves for waiting: the apply and the
                        // health checks after it must still fit.
                        let left = rl.wait_deadline(o.started).saturating_duration_since(Instant::now());
                        let relocked = relock_undrained(cx, o.lock_timeout.min(left), &rollouts, &sha, me).inspect_err(|_| give_back(&rollouts, &sha, me));
                        match relocked? {
                            Some(lock) => {
                                let mut applied = under_slot(cx, o, b, rl, &rollouts, &fetched, hooks, &mut note)?;
                                // The lock taken here outlives the nested one of the apply.
                                applied._lock = Some(lock);
                                applied
                            }
                            None => {
                                note["state"] = "drained".into();
                                Applied { report: a.report, _lock: None }
                            }
                        }
                    }
                    Ok(crate::reboot::etcd::Waited::Closed) => {
                        note["state"] = "halted".into();
                        Applied { report: a.report, _lock: None }
                    }
                    Ok(crate::reboot::etcd::Waited::Deadline) => {
                        note["state"] = "waiting".into();
                        Applied { report: a.report, _lock: None }
                    }
                    Err(e) => {
                        tracing::warn!("waiting for a rollout slot of bundle {sha}: {e}");
                        // The queue may have granted the slot just before the error: not
                        // kept for a run that is not going to use it (best effort).
                        if let Err(e) = rollouts.give_back(&sha, me) {
                            tracing::warn!("giving back a slot of bundle {sha} granted meanwhile: {e}");
                        }
                        note["state"] = "unavailable".into();
                        Applied { report: a.report, _lock: None }
                    }
                }
            }
        }
        Gate::Fallback(fb, why) => {
            note["state"] = why_str(why).into();
            // A slot of a bundle halted elsewhere or aborted (granted while this node waited)
            // is given back: this node will not apply it, and a kept slot would read as in
            // use. On `rollout resume` the node queues again.
            // A node that halted the bundle itself (`on_failure = "rollback"`) keeps its slot:
            // `rollout status` names it, and on resume it tries again first.
            let mine = view.as_ref().and_then(|v| v.halted_by.as_deref()) == Some(me) && why == Why::Halted;
            if view.as_ref().is_some_and(|v| v.held) && matches!(why, Why::Halted | Why::Aborted) && !mine {
                match rollouts.give_back(&sha, me) {
                    Ok(_) => note["slot_given_back"] = true.into(),
                    Err(e) => tracing::warn!("giving back the slot of bundle {sha} ({}): {e}", why_str(why)),
                }
            }
            fallback(cx, o, b, fb, hooks)?
        }
        Gate::Hold => {
            // Still alive and still on the bad bundle: say so in the fleet view.
            publish_record(cx, rl, &held_record(cx, &sha));
            return Err(crate::rollout::KeptForInspection { sha }.into());
        }
        Gate::Refuse(why) => {
            return Err(anyhow::anyhow!(
                "bundle {sha} is {} in group {group} and this node has no last-good bundle to apply instead",
                why_str(why)
            ))
        }
    };
    note["gate"] = format!("{gate:?}").into();
    applied.report.rollout = Some(note);
    // A run that waited for a slot without the run lock does not overwrite the report of a
    // run that started after it and finished meanwhile (that one says what the node is now).
    if applied._lock.is_none() && superseded(cx, &applied.report) {
        tracing::info!("a newer run reported while this one waited for a rollout slot: its report stands");
    } else {
        engine::write_report(&cx.root, &applied.report)?;
    }
    Ok(applied)
}

/// `last-run.json` is the report of a run that started after `report`'s.
pub(super) fn superseded(cx: &Context, report: &Report) -> bool {
    let on_disk = crate::state::StateDir::new(&cx.root)
        .read(crate::state::REPORT)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let started = |s: &str| time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok();
    match (
        on_disk.as_ref().and_then(|v| v["started_at"].as_str()).and_then(started),
        started(&report.started_at),
    ) {
        (Some(theirs), Some(ours)) => theirs > ours,
        _ => false,
    }
}

/// A slot came to a run that waited for it without the run lock: take the lock again, and
/// check that `bootstrap watch` did not drain the node meanwhile (a scale-in). Drained: give
/// the slot back, apply nothing new (None). The lock is held from here to the end of the run.
fn relock_undrained(cx: &Context, timeout: Duration, rollouts: &Rollouts, sha: &str, me: &str) -> anyhow::Result<Option<crate::runlock::RunLock>> {
    let lock = crate::runlock::acquire(&cx.root, timeout)?;
    let Some(at) = crate::asg::watch::drained_at(&cx.root, cx.facts.instance_id.as_deref()) else {
        return Ok(Some(lock));
    };
    tracing::warn!("this instance was drained for a scale-in at {at}: bundle {sha} is not applied, its rollout slot is given back");
    give_back(rollouts, sha, me);
    Ok(None)
}

/// Give `me`'s slot of `sha` back; a failure is a warning (the drain or a later run tries again).
fn give_back(rollouts: &Rollouts, sha: &str, me: &str) {
    if let Err(e) = rollouts.give_back(sha, me) {
        tracing::warn!("giving back the rollout slot of bundle {sha}: {e}");
    }
}

fn fail(r: &mut Report, msg: String) {
    r.status = RunStatus::Failed;
    r.error.get_or_insert(msg);
}

/// The group moved on from the bundle the last gated run fetched: give back a slot this node
/// still holds of it (kept for inspection, kept across a reboot, granted while it waited),
/// then remember the new one. Best effort: a failure is a warning, tried again next run.
fn leave_previous_bundle(cx: &Context, rollouts: &Rollouts, sha: &str, me: &str, note: &mut serde_json::Value) {
    let local = read_local(cx);
    if local.fetched.as_deref() == Some(sha) {
        return;
    }
    if let Some(prev) = &local.fetched {
        match rollouts.give_back(prev, me) {
            Ok(true) => {
                tracing::info!("gave back the rollout slot of bundle {prev}: the group moved on to {sha}");
                note["gave_back"] = prev.clone().into();
            }
            Ok(false) => {}
            Err(e) => return tracing::warn!("giving back the rollout slot of bundle {prev}: {e}"),
        }
    }
    let local = Local {
        fetched: Some(sha.to_string()),
        ..local
    };
    if let Err(e) = write_local(cx, &local) {
        tracing::warn!("writing /var/lib/bootstrap/{}: {e:#}", crate::rollout::STATE_FILE);
    }
}

/// Apply the fallback bundle (last-good, or the good one before it) from the cache.
fn fallback(cx: &Context, o: &RunOptions, b: &Bundle<'_>, fb: Fallback, hooks: &mut Hooks<'_>) -> anyhow::Result<Applied> {
    let (sha, origin) = match fb {
        Fallback::LastGood => (crate::source::last_good(&cx.root), "last-good"),
        Fallback::Previous => (read_local(cx).previous, "previous-good"),
    };
    let Some(sha) = sha else {
        anyhow::bail!("the rollout gate falls back to the {origin} bundle, but this node has none cached: nothing applied");
    };
    let f = crate::source::from_cache(&cx.root, &sha, b.source, b.verify, origin)?;
    apply_bundle(cx, o, Mode::Apply, b, &f, hooks, true)
}

/// A node's first bundle (no last-good: a new instance), applied without a slot: it is not in
/// service until its launch lifecycle action completes, and making scale-out wait for etcd
/// would be worse. But when the run fails (or the bundle does not load) while the bundle is
/// in flight in the group, the failure halts it as a slot holder's would: the fleet stops a
/// bad bundle whoever fails it first, and `rollout status` says who and why.
#[allow(clippy::too_many_arguments)]
fn first_bundle(
    cx: &Context,
    o: &RunOptions,
    b: &Bundle<'_>,
    rl: &Settings,
    rollouts: &Rollouts,
    fetched: &crate::source::Fetched,
    hooks: &mut Hooks<'_>,
    note: &mut serde_json::Value,
) -> anyhow::Result<Applied> {
    let me = rl.holder.as_str();
    let sha = fetched.sha256.clone().unwrap_or_default();
    let halt_if_in_flight = |note: &mut serde_json::Value, h: Halt| -> anyhow::Result<Option<String>> {
        match rollouts.in_flight(&sha, me) {
            Ok(true) => record_halt(rollouts, &sha, &h, note).map(Some),
            Ok(false) => Ok(None),
            Err(e) => {
                tracing::warn!("bundle {sha} failed on this node; whether it is in flight in the group is unknown ({e}): not halted");
                Ok(None)
            }
        }
    };
    let steps = match load(cx, b, fetched) {
        Ok(s) => s,
        Err(e) => {
            let h = Halt {
                node: me.to_string(),
                step: None,
                check: None,
                reason: format!("did not load: {e:#}"),
                at: now(),
            };
            return Err(match halt_if_in_flight(note, h)? {
                Some(msg) => anyhow::Error::new(e).context(msg),
                None => e.into(),
            });
        }
    };
    // An instance not in service yet that had a good bundle (a warm pool's): that one stays
    // pinned as the good bundle before this one, for `rollout abort` of this one.
    let old_good = crate::source::last_good(&cx.root).filter(|g| *g != sha);
    if old_good.is_some() {
        crate::source::pin_previous(&cx.root, old_good.as_deref())?;
    }
    let mut a = apply_loaded(cx, o, Mode::Apply, b, fetched, &steps, hooks, true)?;
    note["state"] = "applied".into();
    if !a.report.failed() && old_good.is_some() {
        write_local(
            cx,
            &Local {
                previous: old_good,
                ..read_local(cx)
            },
        )?;
    }
    if a.report.failed() {
        let h = Halt {
            node: me.to_string(),
            step: failed_step(&a.report),
            check: None,
            reason: format!("run failed: {}", a.report.error.clone().unwrap_or_default()),
            at: now(),
        };
        if let Some(msg) = halt_if_in_flight(note, h)? {
            a.report.error = Some(msg);
        }
    }
    Ok(a)
}

/// Apply the new bundle under this node's slot, check health, then release or halt.
#[allow(clippy::too_many_arguments)]
fn under_slot(
    cx: &Context,
    o: &RunOptions,
    b: &Bundle<'_>,
    rl: &Settings,
    rollouts: &Rollouts,
    fetched: &crate::source::Fetched,
    hooks: &mut Hooks<'_>,
    note: &mut serde_json::Value,
) -> anyhow::Result<Applied> {
    let me = rl.holder.as_str();
    let sha = fetched.sha256.clone().unwrap_or_default();
    let old_good = crate::source::last_good(&cx.root);
    // The bundle may have been halted while this node waited or was away: checked at the
    // leader in the same transaction that records the start, before the host is touched.
    match rollouts.start_applying(&sha, me) {
        Ok(true) => {}
        Ok(false) => {
            if let Err(e) = rollouts.give_back(&sha, me) {
                tracing::warn!("giving back the slot of the halted bundle {sha}: {e}");
            }
            note["state"] = "halted".into();
            return fallback(cx, o, b, Fallback::LastGood, hooks);
        }
        Err(e) => {
            // Nothing new without the lock service; the slot is kept for the next run.
            tracing::warn!("rollout of bundle {sha}: {e}; nothing new applied");
            note["state"] = "unavailable".into();
            return fallback(cx, o, b, Fallback::LastGood, hooks);
        }
    }
    note["applied_at"] = now().into();
    // `current` back on the new bundle (the fallback pointed it at last-good), checked again
    // against the pin and key, and its role loaded: a bundle that does not load (a role file
    // that does not parse, a missing role, a signature that no longer verifies) is a failed
    // run under the slot like any other.
    let loaded = crate::source::from_cache(&cx.root, &sha, b.source, b.verify, fetched.origin).and_then(|f| Ok((load(cx, b, &f)?, f)));
    let (steps, fetched) = match loaded {
        Ok(l) => l,
        Err(e) => {
            let h = Halt {
                node: me.to_string(),
                step: None,
                check: None,
                reason: format!("did not load: {e:#}"),
                at: now(),
            };
            let msg = record_halt(rollouts, &sha, &h, note)?;
            if rl.on_failure == OnFailure::Rollback {
                let mut r = fallback(cx, o, b, Fallback::LastGood, hooks)?;
                note["rolled_back"] = true.into();
                fail(&mut r.report, format!("{msg}; rolled back to the last-good bundle"));
                return Ok(r);
            }
            // Nothing of it ran; the node keeps the slot (and the bundle, in its cache) for
            // inspection, as a node that failed its run under the slot does.
            publish_record(cx, rl, &held_record(cx, &sha));
            return Err(anyhow::Error::new(crate::rollout::KeptForInspection { sha }).context(msg));
        }
    };
    let mut a = apply_loaded(cx, o, Mode::Apply, b, &fetched, &steps, hooks, false)?;
    if a.report.reboot_now() {
        // The apply reboots the node (it holds a reboot slot): the node is not in service
        // until it is back, so it keeps its rollout slot across the reboot (the next node
        // must not start meanwhile) and the bundle is not good yet. The run of the next boot
        // (slot held: `Gate::Held`) checks health, then releases or halts.
        note["state"] = "rebooting".into();
        return Ok(a);
    }
    let failures = if a.report.failed() { Vec::new() } else { health(cx, &rl.health) };
    let run_ok = !a.report.failed();
    match settle(run_ok, failures.is_empty(), rl.on_failure) {
        Settle::Release => {
            if old_good.as_deref() != Some(sha.as_str()) {
                // Pinned in the cache and recorded before last-good moves on (marking prunes),
                // so that `rollout abort` of this bundle finds it to go back to, also after a
                // crash between the two.
                crate::source::pin_previous(&cx.root, old_good.as_deref())?;
                write_local(
                    cx,
                    &Local {
                        previous: old_good.clone(),
                        ..read_local(cx)
                    },
                )?;
            }
            crate::source::mark_good(&cx.root, &sha)?;
            note["healthy_at"] = now().into();
            match rollouts.healthy(&sha, me, rl.canary, rl.batch) {
                Ok(()) => {
                    note["released_at"] = now().into();
                    note["state"] = "healthy".into();
                }
                // Kept: the next run (unchanged bundle, slot held) releases it.
                Err(e) => fail(&mut a.report, format!("releasing the rollout slot of bundle {sha}: {e}")),
            }
            Ok(a)
        }
        Settle::Halt { rollback } => {
            let h = Halt {
                node: me.to_string(),
                step: failed_step(&a.report),
                check: (!failures.is_empty()).then(|| failures.join("; ")),
                reason: if run_ok {
                    format!("health check failed: {}", failures.join("; "))
                } else {
                    format!("run failed: {}", a.report.error.clone().unwrap_or_default())
                },
                at: now(),
            };
            let msg = record_halt(rollouts, &sha, &h, note)?;
            if rollback {
                drop(a);
                let mut r = fallback(cx, o, b, Fallback::LastGood, hooks)?;
                note["rolled_back"] = true.into();
                fail(&mut r.report, format!("{msg}; rolled back to the last-good bundle"));
                Ok(r)
            } else {
                fail(&mut a.report, msg);
                Ok(a)
            }
        }
    }
}

/// The first failed step of a run.
fn failed_step(r: &Report) -> Option<String> {
    r.steps.iter().find(|s| s.status == engine::report::StepStatus::Failed).map(|s| s.id.clone())
}

/// Halt `sha` for the group (`h`: who, why), noted in the run's rollout note; the message the
/// run fails with.
fn record_halt(rollouts: &Rollouts, sha: &str, h: &Halt, note: &mut serde_json::Value) -> anyhow::Result<String> {
    tracing::error!("bundle {sha} halted for the group: {}", h.reason);
    note["state"] = "halted_here".into();
    note["halt"] = serde_json::to_value(h)?;
    let recorded = rollouts.halt(sha, h);
    if let Err(e) = &recorded {
        tracing::error!("recording the halt of bundle {sha} in etcd: {e}");
    }
    Ok(format!(
        "bundle {sha} {}; halted for the group{}",
        h.reason,
        if recorded.is_ok() {
            ""
        } else {
            " (NOT recorded in etcd: it was unreachable)"
        }
    ))
}

/// The fleet view's record of a node that keeps a halted bundle for inspection.
fn held_record(cx: &Context, sha: &str) -> crate::rollout::fleet::Record {
    crate::rollout::fleet::Record {
        name: node_name(cx),
        instance_id: cx.facts.instance_id.clone(),
        bundle: crate::rollout::fleet::BundleRef {
            sha256: Some(sha.to_string()),
            origin: "held".into(),
        },
        status: "held".into(),
        at: now(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    }
}

/// The rollout's health checks, each retried for up to its timeout (a service just restarted
/// may need a moment); the failures, described.
fn health(cx: &Context, checks: &[crate::reboot::settings::Health]) -> Vec<String> {
    if checks.is_empty() {
        return Vec::new();
    }
    let host = Host {
        root: cx.root.clone(),
        facts: cx.facts.clone(),
        systemd: Box::new(crate::systemd::Dbus::default()),
        refresh_lists: Default::default(),
        first_boot: false,
    };
    let deadline = Instant::now() + checks.iter().map(|c| c.timeout).max().unwrap_or_default();
    loop {
        let failures = crate::reboot::failed_checks(&host, checks);
        if failures.is_empty() || Instant::now() >= deadline {
            return failures;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Put this node's status record for the fleet view (in etcd when it is configured, at
/// `[report] s3` when that is set). Best effort: a failure is a warning, never a failed run.
pub(super) fn publish(cx: &Context, rl: &Settings, report: &Report) {
    let value = match serde_json::to_value(report) {
        Ok(v) => v,
        Err(e) => return tracing::warn!("node record: {e}"),
    };
    let rec = crate::rollout::fleet::record_of(&value, &node_name(cx), cx.facts.instance_id.as_deref());
    publish_record(cx, rl, &rec);
}

/// A run that failed before it had a report (no bundle to apply, a role that does not load, a
/// config error) puts a `failed` record with its error, so the fleet view shows the node
/// failing rather than, one TTL later, not reporting. Not for a run that only waited for the
/// run lock (another run is in progress and will report), nor for a node kept for inspection
/// (it put its `held` record), nor when the config itself cannot say where records go.
pub(super) fn publish_error(cx: &Context, e: &anyhow::Error) {
    if e.downcast_ref::<crate::error::LockTimeout>().is_some() || e.downcast_ref::<crate::rollout::KeptForInspection>().is_some() {
        return;
    }
    let Ok(rl) = cx.rollout_settings() else { return };
    let msg = crate::rollout::fleet::error_text(&format!("{e:#}"));
    let rec = crate::rollout::fleet::Record {
        name: node_name(cx),
        instance_id: cx.facts.instance_id.clone(),
        bundle: crate::rollout::fleet::BundleRef {
            sha256: None,
            origin: "none".into(),
        },
        status: "failed".into(),
        at: now(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        error: Some(msg),
        ..Default::default()
    };
    publish_record(cx, &rl, &rec);
}

fn node_name(cx: &Context) -> String {
    cx.facts.name.clone().unwrap_or_else(|| cx.facts.hostname.clone())
}

/// Put `rec` (only from the live system: never from an image build under --root), with the
/// node's rollout group, to etcd and to S3 as configured. Best effort.
fn publish_record(cx: &Context, rl: &Settings, rec: &crate::rollout::fleet::Record) {
    if cx.root != std::path::Path::new("/") {
        return;
    }
    let rec = crate::rollout::fleet::Record {
        group: rl.group.clone(),
        ..rec.clone()
    };
    if let Some(t) = &rl.report_s3 {
        match crate::rollout::fleet_s3::put(t, &rec) {
            Ok(()) => tracing::debug!("node record put at {}", t.url()),
            Err(e) => tracing::warn!("putting the node record in S3 (fleet view): {e}"),
        }
    }
    let (Some(svc), Some(group)) = (&rl.etcd, &rl.group) else { return };
    if rl.holder.is_empty() {
        return;
    }
    let r = Rollouts::new(svc, group)
        .map_err(anyhow::Error::from)
        .and_then(|r| Ok(crate::rollout::fleet::publish(&r, &rl.holder, &rec, rl.report_ttl)?));
    if let Err(e) = r {
        tracing::warn!("publishing the node record to etcd (fleet view): {e:#}");
    }
}
