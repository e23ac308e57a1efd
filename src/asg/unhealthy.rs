//! `unhealthy_after = N`: after N consecutive failed `apply` runs (a failed run, or a run whose
//! `[[asg.health]]` checks fail), SetInstanceHealth Unhealthy (respecting the group's grace
//! period) so the group replaces the node. Never while the node holds a reboot slot (a node in
//! the middle of a coordinated reboot is not broken, and the rollout stops at it anyway) or a
//! slot of a bundle's rollout (asked of etcd by the caller, `rollout::unhealthy_hold`); never
//! for more than `max_unhealthy` of the group at once: with etcd configured (`[reboot.etcd]`)
//! the node takes a place in `<prefix>/groups/<group>/v1/asg-unhealthy` by compare-and-swap
//! (places older than `MARK_TTL` lapse: those nodes were replaced); without etcd it counts the
//! group's instances already Unhealthy or terminating (DescribeAutoScalingGroups), which two
//! nodes failing in the same second can both pass.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Duration;

/// A place in the etcd record lapses after this: the node was replaced long ago.
pub const MARK_TTL: Duration = Duration::from_secs(3600);
/// The etcd record's name under `<prefix>/groups/<group>/v1/`.
pub const ETCD_RECORD: &str = "asg-unhealthy";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HealthRecord {
    pub consecutive_failures: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marked_unhealthy_at: Option<String>,
    /// Why the node was due but not marked (the last time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_marked: Option<String>,
}

/// What to do after a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing (healthy, not yet due, or already marked).
    Nothing,
    /// Due, but the node holds a reboot slot.
    HoldsSlot,
    /// Due: ask for a place under `max_unhealthy`, then mark.
    Mark,
}

/// The pure decision: the failure count after this run and what to do.
pub fn decide(ok: bool, failures_before: u32, after: u32, marked: bool, holds_slot: bool) -> (u32, Verdict) {
    if ok {
        return (0, Verdict::Nothing);
    }
    let n = failures_before.saturating_add(1);
    let v = if n < after || marked {
        Verdict::Nothing
    } else if holds_slot {
        Verdict::HoldsSlot
    } else {
        Verdict::Mark
    };
    (n, v)
}

/// What the caller knows about the run and the node.
pub struct RunInputs<'a> {
    pub root: &'a Path,
    pub facts: &'a crate::facts::Facts,
    pub config: &'a crate::config::Config,
    pub settings: &'a super::Settings,
    /// `[asg] group` substituted.
    pub group: Option<String>,
    /// The reboot group and this node's holder id (the etcd record's key and entry).
    pub reboot_group: Option<String>,
    pub holder: Option<String>,
    pub ok: bool,
    pub why: Option<String>,
    /// Asked only when the node is due: why its rollout slots hold the mark back (it holds
    /// one, or cannot tell), or None. A closure: the rollout protocol lives above this module.
    pub rollout_hold: &'a dyn Fn() -> Option<String>,
}

/// After an `apply`: count, and mark the instance Unhealthy when it is due and allowed. Errors
/// are logged, never fail the run.
pub fn after_apply(i: RunInputs<'_>) {
    let Some(after) = i.settings.unhealthy_after else { return };
    let Some((group, id)) = super::membership(i.settings, i.facts, i.group.clone()) else {
        return;
    };
    let mut ok = i.ok;
    let mut why = i.why.clone();
    if ok && !i.settings.health.is_empty() {
        let failed = crate::reboot::failed_checks(&super::host(i.root, i.facts), &i.settings.health);
        if !failed.is_empty() {
            ok = false;
            why = Some(format!("[[asg.health]] failed: {}", failed.join("; ")));
        }
    }
    let before: HealthRecord = super::read_record(i.root, super::HEALTH_STATE).unwrap_or_default();
    let reboot_slot = !matches!(crate::reboot::read_state(i.root), Ok(None));
    let (n, mut verdict) = decide(ok, before.consecutive_failures, after, before.marked_unhealthy_at.is_some(), reboot_slot);
    let mut held = "holds a reboot slot".to_string();
    if verdict == Verdict::Mark {
        if let Some(why) = (i.rollout_hold)() {
            (verdict, held) = (Verdict::HoldsSlot, why);
        }
    }
    let mut rec = HealthRecord {
        consecutive_failures: n,
        last_failure: if ok { before.last_failure.clone() } else { Some(crate::clock::now_rfc3339()) },
        marked_unhealthy_at: if ok { None } else { before.marked_unhealthy_at.clone() },
        not_marked: None,
    };
    if !ok {
        tracing::warn!(
            "failed run {n} in a row (unhealthy_after = {after}): {}",
            why.as_deref().unwrap_or("the run failed")
        );
    }
    match verdict {
        Verdict::Nothing => {}
        Verdict::HoldsSlot => {
            tracing::warn!("not marking this instance Unhealthy: it {held}");
            rec.not_marked = Some(held);
        }
        Verdict::Mark => {
            let client = super::client(i.settings, i.facts, &group, &id);
            match admitted(&i, &client).and_then(|place| match place {
                Some(why_not) => Ok(Some(why_not)),
                None => client.set_unhealthy().map(|()| None),
            }) {
                Ok(None) => {
                    tracing::error!("{n} failed runs in a row: marked this instance Unhealthy in Auto Scaling group {group}");
                    rec.marked_unhealthy_at = Some(crate::clock::now_rfc3339());
                }
                Ok(Some(why_not)) => {
                    tracing::warn!("not marking this instance Unhealthy: {why_not}");
                    rec.not_marked = Some(why_not);
                }
                Err(e) => {
                    tracing::warn!("not marking this instance Unhealthy: {e:#}");
                    rec.not_marked = Some(format!("{e:#}"));
                }
            }
        }
    }
    if rec != before {
        super::write_record(i.root, super::HEALTH_STATE, &rec);
    }
    super::write_metrics(i.root, i.config.metrics.textfile.as_deref());
}

/// A place under `max_unhealthy`: None when granted, else why not.
fn admitted(i: &RunInputs<'_>, client: &super::api::Client) -> anyhow::Result<Option<String>> {
    let max = i.settings.max_unhealthy;
    let size = match max {
        super::settings::MaxUnhealthy::Count(_) => None,
        super::settings::MaxUnhealthy::Percent(_) => Some(client.unhealthy_others()?.0),
    };
    match (etcd(i.config, i.reboot_group.as_deref())?, &i.holder) {
        (Some(lock), Some(holder)) => {
            let limit = max.limit(size.unwrap_or(0)) as usize;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let answer = lock.update_record(ETCD_RECORD, |cur| {
                let mut places = live_places(cur, now);
                if places.iter().any(|(h, _)| h == holder) {
                    return (None, None);
                }
                if places.len() >= limit {
                    return (None, Some(format!("{} of the group already marked (max_unhealthy {limit})", places.len())));
                }
                places.push((holder.clone(), now));
                (Some(places_json(&places)), None)
            })?;
            Ok(answer)
        }
        _ => {
            let (size, others) = client.unhealthy_others()?;
            let limit = max.limit(size);
            Ok((others >= limit).then(|| format!("{others} other instances of the group are Unhealthy or terminating (max_unhealthy {limit})")))
        }
    }
}

/// The etcd lock service of `[reboot.etcd]`, when it has endpoints.
pub fn etcd(config: &crate::config::Config, reboot_group: Option<&str>) -> anyhow::Result<Option<crate::reboot::etcd::EtcdLock>> {
    match reboot_group {
        Some(g) if !config.reboot.etcd.endpoints.is_empty() => Ok(Some(crate::reboot::etcd_from_config(&config.reboot.etcd, g)?)),
        _ => Ok(None),
    }
}

/// The record's places that have not lapsed: (holder, unix time marked).
pub fn live_places(cur: Option<&serde_json::Value>, now: i64) -> Vec<(String, i64)> {
    cur.and_then(|v| v["holders"].as_array())
        .map(|a| {
            a.iter()
                .filter_map(|e| Some((e["id"].as_str()?.to_string(), e["at"].as_i64()?)))
                .filter(|(_, at)| now - at < MARK_TTL.as_secs() as i64)
                .collect()
        })
        .unwrap_or_default()
}

pub fn places_json(places: &[(String, i64)]) -> serde_json::Value {
    serde_json::json!({ "holders": places.iter().map(|(id, at)| serde_json::json!({"id": id, "at": at})).collect::<Vec<_>>() })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every combination: a good run resets; a node is marked only when due, not yet marked
    /// and holding no reboot slot.
    #[test]
    fn decide_every_case() {
        for ok in [false, true] {
            for before in 0..5u32 {
                for after in 1..4u32 {
                    for marked in [false, true] {
                        for slot in [false, true] {
                            let (n, v) = decide(ok, before, after, marked, slot);
                            if ok {
                                assert_eq!((n, v), (0, Verdict::Nothing));
                                continue;
                            }
                            assert_eq!(n, before + 1);
                            let due = n >= after && !marked;
                            let want = match (due, slot) {
                                (false, _) => Verdict::Nothing,
                                (true, true) => Verdict::HoldsSlot,
                                (true, false) => Verdict::Mark,
                            };
                            assert_eq!(v, want, "ok={ok} before={before} after={after} marked={marked} slot={slot}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn lapsed_places_drop_out() {
        let v = places_json(&[("i-old".into(), 0), ("i-new".into(), 5000)]);
        assert_eq!(live_places(Some(&v), 5100), [("i-new".to_string(), 5000)]);
        assert!(live_places(None, 0).is_empty());
        assert!(live_places(Some(&serde_json::json!({"x": 1})), 0).is_empty());
    }
}
