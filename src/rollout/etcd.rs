//! The rollout protocol's keys in etcd, under `<prefix>/groups/<group>/v1/rollout/<sha256>/`:
//!
//! | key | value | written by |
//! |---|---|---|
//! | `semaphore`, `queue/<id>`, `tail`, `release/<id>` | the reboot semaphore's layout and queue (`reboot::etcd`): `canary` slots, then `batch`; 0 once halted or aborted (closed: waiters leave) | nodes, by compare-and-swap |
//! | `applied/<id>` | `{"at"}`: the node started applying the bundle under its slot | the node |
//! | `healthy/<id>` | `{"at"}`: applied, and its health checks passed | the node |
//! | `failed/<id>` | `{"at","step","check","reason"}` | the node |
//! | `halt` | `{"node","step","check","reason","at"}`: the first failure; written only if absent | the failing node; `rollout resume` deletes it |
//! | `abort` | `{"at","by"}`: the bundle is bad | `rollout abort` |
//!
//! A finished rollout (no halt, no abort, no slot held, nobody queued, no reporting node's
//! bundle) is deleted a week after its last record, by the canary release of a later rollout
//! ([`Rollouts::prune`]).

use super::View;
use crate::reboot::etcd::{EtcdLock, LockError, Semaphore, Waited};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;

/// The most keys `rollout status` and `fleet status` read in one range.
const STATUS_LIMIT: u64 = 100_000;
/// The keys one range of [`Rollouts::keys_under`] returns (a page, not a limit).
const KEYS_PAGE: u64 = 10_000;

/// A finished rollout's records are deleted once its newest record is this old (and no
/// reporting node runs the bundle): see [`Rollouts::prune`].
pub const PRUNE_AFTER: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);
/// The most rollouts one prune deletes.
const PRUNE_MAX: usize = 16;

/// Semaphores read in one transaction by [`Rollouts::held_by`] (etcd allows 128 operations).
const HELD_READS_PER_TXN: usize = 64;

/// A rollout slot a node holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldSlot {
    pub sha256: String,
    /// `rollout abort`ed: the semaphore is closed, the slot stops nothing.
    pub aborted: bool,
}

/// Why a bundle was halted (the `halt` and `failed/<id>` records).
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Halt {
    pub node: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    pub reason: String,
    pub at: String,
}

/// One rollout, as `rollout status` shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub sha256: String,
    /// `canary` | `rolling` | `halted` | `aborted`
    pub state: String,
    pub slots: u64,
    pub holders: Vec<String>,
    pub waiting: u64,
    pub applied: Vec<String>,
    pub healthy: Vec<String>,
    pub failed: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub halt: Option<Halt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub abort: Option<Value>,
}

/// The key prefix's end for a range over everything under `p`.
pub(crate) fn prefix_end(p: &str) -> String {
    let mut end = p.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    B64.encode(end)
}

pub(crate) fn b64(s: &str) -> String {
    B64.encode(s)
}

/// The (key, value) pairs of a range answer (`kvs`), decoded.
pub(crate) fn kvs(r: &Value) -> Vec<(String, Vec<u8>)> {
    let dec = |v: &Value| B64.decode(v.as_str().unwrap_or_default()).unwrap_or_default();
    r["kvs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|kv| (String::from_utf8_lossy(&dec(&kv["key"])).into_owned(), dec(&kv["value"])))
                .collect()
        })
        .unwrap_or_default()
}

fn count(r: &Value) -> u64 {
    r["count"].as_str().and_then(|c| c.parse().ok()).unwrap_or(0)
}

fn at() -> String {
    crate::clock::now_rfc3339()
}

/// The group's rollouts.
#[derive(Clone)]
pub struct Rollouts {
    /// The group's client, at `<prefix>/groups/<group>/v1`.
    lock: EtcdLock,
}

impl Rollouts {
    pub fn new(svc: &crate::reboot::settings::EtcdService, group: &str) -> Result<Rollouts, crate::error::ConfigError> {
        let lock =
            EtcdLock::with_tls(&svc.endpoints, &svc.prefix, group, &svc.tls).map_err(|e| crate::error::ConfigError::msg(format!("rollout etcd: {e}")))?;
        Ok(Rollouts { lock })
    }

    /// Around an existing client (its endpoints, TLS and request counters).
    pub fn from_lock(lock: EtcdLock) -> Rollouts {
        Rollouts { lock }
    }

    pub fn client(&self) -> &EtcdLock {
        &self.lock
    }

    pub fn dir(&self, sha: &str) -> String {
        format!("{}/rollout/{sha}", self.lock.base())
    }

    /// The rollout's semaphore (closing when halted or aborted).
    pub fn semaphore(&self, sha: &str) -> EtcdLock {
        self.lock.rebased(&self.dir(sha)).closing_at_zero()
    }

    /// One consistent read: is `sha` halted or aborted, does `me` hold a slot of it, and is
    /// `last_good` aborted.
    pub fn view(&self, sha: &str, last_good: Option<&str>, me: &str) -> Result<View, LockError> {
        let d = self.dir(sha);
        let mut ops = vec![
            json!({ "request_range": { "key": b64(&format!("{d}/halt")) } }),
            json!({ "request_range": { "key": b64(&format!("{d}/abort")), "count_only": true } }),
            json!({ "request_range": { "key": b64(&format!("{d}/semaphore")) } }),
        ];
        if let Some(lg) = last_good.filter(|lg| *lg != sha) {
            ops.push(json!({ "request_range": { "key": b64(&format!("{}/abort", self.dir(lg))), "count_only": true } }));
        }
        let r = self.lock.gateway("/v3/kv/txn", json!({ "success": ops }))?;
        let resp = |i: usize| r["responses"][i]["response_range"].clone();
        let halted_by = kvs(&resp(0))
            .into_iter()
            .next()
            .map(|(_, v)| serde_json::from_slice::<Halt>(&v).map(|h| h.node).unwrap_or_else(|_| "?".into()));
        let held = match kvs(&resp(2)).into_iter().next() {
            Some((k, v)) => crate::reboot::lock::decode(&v)
                .map_err(|e| LockError::Malformed { key: k, why: e.to_string() })?
                .holds(me),
            None => false,
        };
        Ok(View {
            halted_by,
            aborted: count(&resp(1)) > 0,
            held,
            last_good_aborted: ops_len(&r) > 3 && count(&resp(3)) > 0,
        })
    }

    /// Queue for a slot of `sha`'s rollout until `deadline` (the semaphore is created with
    /// `first_slots`, the canaries').
    pub fn wait_slot(&self, sha: &str, me: &str, first_slots: u64, deadline: Instant) -> Result<Waited, LockError> {
        self.semaphore(sha).wait_acquire(me, first_slots, deadline)
    }

    /// `me` starts applying `sha` under its slot, if the bundle is neither halted nor aborted:
    /// one transaction that checks both (at the leader) and records `applied/<me>`. False:
    /// stopped, nothing recorded, the bundle must not be applied.
    pub fn start_applying(&self, sha: &str, me: &str) -> Result<bool, LockError> {
        let d = self.dir(sha);
        let absent = |k: &str| json!({ "key": b64(&format!("{d}/{k}")), "result": "EQUAL", "target": "VERSION", "version": "0" });
        let r = self.lock.gateway(
            "/v3/kv/txn",
            json!({
                "compare": [absent("halt"), absent("abort")],
                "success": [{ "request_put": { "key": b64(&format!("{d}/applied/{me}")), "value": b64(&json!({ "at": at() }).to_string()) } }],
                "failure": [],
            }),
        )?;
        Ok(r["succeeded"] == true)
    }

    fn put(&self, key: &str, v: &Value) -> Result<(), LockError> {
        self.lock.gateway("/v3/kv/put", json!({ "key": b64(key), "value": b64(&v.to_string()) }))?;
        Ok(())
    }

    /// `me` applied `sha` and is healthy: give the slot back (through the queue head, like a
    /// reboot release: the next node starts as soon as possible), then record it and grow the
    /// semaphore to `batch` once `canary` nodes are healthy (never reopening a closed one).
    pub fn healthy(&self, sha: &str, me: &str, canary: u64, batch: u64) -> Result<(), LockError> {
        let sema = self.semaphore(sha);
        sema.release(me, canary.max(1))?;
        let d = self.dir(sha);
        let hd = format!("{d}/healthy/");
        let r = self.lock.gateway(
            "/v3/kv/txn",
            json!({ "success": [
                { "request_put": { "key": b64(&format!("{hd}{me}")), "value": b64(&json!({ "at": at() }).to_string()) } },
                { "request_range": { "key": b64(&hd), "range_end": prefix_end(&hd), "count_only": true } },
                { "request_range": { "key": b64(&format!("{d}/semaphore")) } },
            ] }),
        )?;
        let healthy = count(&r["responses"][1]["response_range"]);
        let sem = kvs(&r["responses"][2]["response_range"])
            .into_iter()
            .next()
            .and_then(|(_, v)| crate::reboot::lock::decode(&v).ok());
        let want = super::slots_for(false, healthy, canary, batch);
        if sem.is_some_and(|s| s.total_slots != 0 && s.total_slots != want) {
            sema.update_with(want, |s: &mut Semaphore| {
                let grow = s.total_slots != 0 && s.total_slots != want;
                if grow {
                    s.total_slots = want;
                }
                grow
            })?;
        }
        // The canaries of this rollout just became healthy (one node sees this count): once
        // per rollout, old finished rollouts of the group are deleted, after the semaphore grew
        // (the batch is not kept waiting for the clean-up). Never fails the release.
        if healthy == canary.max(1) {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            match self.prune(sha, now, PRUNE_AFTER) {
                Ok(gone) if !gone.is_empty() => tracing::info!("deleted the records of {} finished rollouts: {}", gone.len(), gone.join(" ")),
                Ok(_) => {}
                Err(e) => tracing::warn!("deleting old rollouts of the group: {e}"),
            }
        }
        Ok(())
    }

    /// Halt `sha`: the first failure is the `halt` record (a later one only adds its
    /// `failed/<id>`), and the semaphore closes (no slots: every waiter leaves the queue).
    /// `me` keeps its slot, so `rollout status` shows who holds the halted bundle.
    pub fn halt(&self, sha: &str, h: &Halt) -> Result<(), LockError> {
        let d = self.dir(sha);
        let hk = b64(&format!("{d}/halt"));
        // Every node and `rollout status` read it: the failed run's words go out redacted.
        let redact = crate::secrets::redact;
        let h = Halt {
            node: h.node.clone(),
            step: h.step.as_deref().map(redact),
            check: h.check.as_deref().map(redact),
            reason: redact(&h.reason),
            at: h.at.clone(),
        };
        let v = b64(&serde_json::to_string(&h).unwrap_or_default());
        self.lock.gateway(
            "/v3/kv/txn",
            json!({
                "compare": [{ "key": hk, "result": "EQUAL", "target": "VERSION", "version": "0" }],
                "success": [
                    { "request_put": { "key": hk, "value": v } },
                    { "request_put": { "key": b64(&format!("{d}/failed/{}", h.node)), "value": v } },
                ],
                "failure": [{ "request_put": { "key": b64(&format!("{d}/failed/{}", h.node)), "value": v } }],
            }),
        )?;
        self.close(sha)
    }

    fn close(&self, sha: &str) -> Result<(), LockError> {
        self.semaphore(sha).update_with(0, |s| {
            let open = s.total_slots != 0;
            s.total_slots = 0;
            open
        })
    }

    /// `rollout abort`: the bundle is bad. Nodes that applied it go back to the good bundle
    /// before it on their next run; no node applies it again.
    pub fn abort(&self, sha: &str, by: &str) -> Result<(), LockError> {
        self.put(&format!("{}/abort", self.dir(sha)), &json!({ "at": at(), "by": by }))?;
        self.close(sha)
    }

    /// `rollout resume`: lift the halt (not an abort) and reopen the semaphore with the slots
    /// its healthy nodes call for. The node that halted it applies it again on its next run
    /// (it still holds its slot).
    pub fn resume(&self, sha: &str, canary: u64, batch: u64) -> Result<u64, LockError> {
        let d = self.dir(sha);
        let hd = format!("{d}/healthy/");
        let r = self.lock.gateway(
            "/v3/kv/txn",
            json!({ "success": [
                { "request_range": { "key": b64(&format!("{d}/abort")), "count_only": true } },
                { "request_range": { "key": b64(&hd), "range_end": prefix_end(&hd), "count_only": true } },
            ] }),
        )?;
        if count(&r["responses"][0]["response_range"]) > 0 {
            return Err(LockError::Malformed {
                key: format!("{d}/abort"),
                why: "the bundle was aborted; an aborted bundle is not resumed (publish a new bundle)".into(),
            });
        }
        let want = super::slots_for(false, count(&r["responses"][1]["response_range"]), canary, batch);
        self.lock.gateway("/v3/kv/deleterange", json!({ "key": b64(&format!("{d}/halt")) }))?;
        self.semaphore(sha).update_with(want, |s| {
            s.total_slots = want;
            true
        })?;
        Ok(want)
    }

    /// Whether `sha` is still going out in the group (see [`super::in_flight`]): one read of
    /// the abort record and the node records. A run that failed a first bundle asks it, to
    /// know whether its failure halts the bundle.
    pub fn in_flight(&self, sha: &str, me: &str) -> Result<bool, LockError> {
        let nodes = format!("{}/nodes/", self.lock.base());
        let r = self.lock.gateway(
            "/v3/kv/txn",
            json!({ "success": [
                { "request_range": { "key": b64(&format!("{}/abort", self.dir(sha))), "count_only": true } },
                { "request_range": { "key": b64(&nodes), "range_end": prefix_end(&nodes), "limit": STATUS_LIMIT.to_string() } },
            ] }),
        )?;
        if count(&r["responses"][0]["response_range"]) > 0 {
            return Ok(false);
        }
        let records: Vec<(String, Option<String>)> = kvs(&r["responses"][1]["response_range"])
            .into_iter()
            .map(|(k, v)| {
                let holder = k.strip_prefix(&nodes).unwrap_or(&k).to_string();
                let bundle = serde_json::from_slice::<Value>(&v)
                    .ok()
                    .and_then(|rec| rec["bundle"]["sha256"].as_str().map(str::to_string));
                (holder, bundle)
            })
            .collect();
        Ok(super::in_flight(sha, me, records.iter().map(|(h, b)| (h.as_str(), b.as_deref()))))
    }

    /// Give `me`'s slot of `sha` back directly (a holder that found the bundle stopped).
    pub fn give_back(&self, sha: &str, me: &str) -> Result<bool, LockError> {
        self.semaphore(sha).release_now(me, 1)
    }

    /// Every rollout slot `me` holds in the group: one keys-only range over the group's
    /// rollouts, then reads of the semaphores there are (in transactions of
    /// `HELD_READS_PER_TXN`). A bundle that is aborted is said so (its slot no longer stops
    /// anything: the semaphore is closed).
    pub fn held_by(&self, me: &str) -> Result<Vec<HeldSlot>, LockError> {
        let dir = format!("{}/rollout/", self.lock.base());
        let mut sems = Vec::new();
        let mut aborted = std::collections::BTreeSet::new();
        for k in self.keys_under(&dir)? {
            let Some(rest) = k.strip_prefix(&dir) else { continue };
            match rest.split_once('/') {
                Some((sha, "semaphore")) => sems.push(sha.to_string()),
                Some((sha, "abort")) => {
                    aborted.insert(sha.to_string());
                }
                _ => {}
            }
        }
        let mut held = Vec::new();
        for chunk in sems.chunks(HELD_READS_PER_TXN) {
            let ops: Vec<Value> = chunk
                .iter()
                .map(|sha| json!({ "request_range": { "key": b64(&format!("{dir}{sha}/semaphore")) } }))
                .collect();
            let r = self.lock.gateway("/v3/kv/txn", json!({ "success": ops }))?;
            for (i, sha) in chunk.iter().enumerate() {
                for (k, v) in kvs(&r["responses"][i]["response_range"]) {
                    let sem = crate::reboot::lock::decode(&v).map_err(|e| LockError::Malformed { key: k, why: e.to_string() })?;
                    if sem.holds(me) {
                        held.push(HeldSlot {
                            sha256: sha.clone(),
                            aborted: aborted.contains(sha),
                        });
                    }
                }
            }
        }
        Ok(held)
    }

    /// Every key under `dir`, in ranges of [`KEYS_PAGE`] keys (keys only): a slot must be
    /// found however many records the group's rollouts have, and no one request may take long
    /// enough to meet the client's timeout.
    fn keys_under(&self, dir: &str) -> Result<Vec<String>, LockError> {
        let mut out = Vec::new();
        let mut from = dir.to_string();
        loop {
            let r = self.lock.gateway(
                "/v3/kv/range",
                json!({ "key": b64(&from), "range_end": prefix_end(dir), "keys_only": true, "limit": KEYS_PAGE.to_string() }),
            )?;
            let page: Vec<String> = kvs(&r).into_iter().map(|(k, _)| k).collect();
            let more = r["more"].as_bool() == Some(true);
            match (more, page.last()) {
                (true, Some(last)) => from = format!("{last}\0"),
                _ => {
                    out.extend(page);
                    return Ok(out);
                }
            }
            out.extend(page);
        }
    }

    /// Give back every rollout slot `me` holds in the group (a node going away: `bootstrap
    /// watch`'s drain); the bundles' sha256 whose slot it gave back.
    pub fn give_back_all(&self, me: &str) -> Result<Vec<String>, LockError> {
        let mut out = Vec::new();
        for h in self.held_by(me)? {
            if self.give_back(&h.sha256, me)? {
                out.push(h.sha256);
            }
        }
        Ok(out)
    }

    /// Delete the records of the group's finished rollouts (at most `PRUNE_MAX`, never
    /// `keep`'s): no `halt` and no `abort` (an operator's decision, and what keeps a bad bundle
    /// from going out again, stay until deleted by hand), no slot held, nobody queued, no
    /// reporting node's bundle (`nodes/<holder>`), and the newest `at` of its `applied`,
    /// `healthy` and `failed` records at least `retain` before `now` (unix seconds). Each is one
    /// transaction that deletes `<sha>/` only if its semaphore did not change since it was
    /// read and its queue is still empty. The sha256s deleted.
    pub fn prune(&self, keep: &str, now: i64, retain: std::time::Duration) -> Result<Vec<String>, LockError> {
        #[derive(Default)]
        struct Seen {
            stopped: bool,
            queued: bool,
            /// (mod revision, holders) of the semaphore.
            sem: Option<(String, usize)>,
            newest: Option<i64>,
        }
        let dir = format!("{}/rollout/", self.lock.base());
        let r = self.lock.gateway(
            "/v3/kv/range",
            json!({ "key": b64(&dir), "range_end": prefix_end(&dir), "limit": STATUS_LIMIT.to_string() }),
        )?;
        let revs: Vec<String> = r["kvs"]
            .as_array()
            .map(|a| a.iter().map(|kv| kv["mod_revision"].as_str().unwrap_or_default().to_string()).collect())
            .unwrap_or_default();
        let mut all: BTreeMap<String, Seen> = BTreeMap::new();
        for ((k, v), rev) in kvs(&r).into_iter().zip(revs) {
            let Some(rest) = k.strip_prefix(&dir) else { continue };
            let Some((sha, kind)) = rest.split_once('/') else { continue };
            let s = all.entry(sha.to_string()).or_default();
            let kind = kind.split('/').next().unwrap_or_default();
            match kind {
                "halt" | "abort" => s.stopped = true,
                "queue" => s.queued = true,
                "semaphore" => match crate::reboot::lock::decode(&v) {
                    Ok(sem) => s.sem = Some((rev, sem.holders.len())),
                    // Not ours to judge: kept.
                    Err(_) => s.stopped = true,
                },
                "applied" | "healthy" | "failed" => {
                    let at = serde_json::from_slice::<Value>(&v)
                        .ok()
                        .and_then(|j| j["at"].as_str().and_then(|t| humantime::parse_rfc3339_weak(t).ok()))
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs() as i64);
                    match at {
                        Some(t) => s.newest = Some(s.newest.map_or(t, |n| n.max(t))),
                        // A record without a time: not known to be old, kept.
                        None => s.newest = Some(now),
                    }
                }
                _ => {}
            }
        }
        let candidates: Vec<(String, String)> = all
            .into_iter()
            .filter(|(sha, s)| {
                sha != keep
                    && !s.stopped
                    && !s.queued
                    && s.sem.as_ref().is_some_and(|(_, holders)| *holders == 0)
                    && s.newest.is_some_and(|t| now.saturating_sub(t) >= retain.as_secs() as i64)
            })
            .filter_map(|(sha, s)| Some((sha, s.sem?.0)))
            .collect();
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // The bundles the reporting nodes run are kept: `rollout status` still shows them.
        let nd = format!("{}/nodes/", self.lock.base());
        let r = self.lock.gateway(
            "/v3/kv/range",
            json!({ "key": b64(&nd), "range_end": prefix_end(&nd), "limit": STATUS_LIMIT.to_string() }),
        )?;
        let running: std::collections::BTreeSet<String> = kvs(&r)
            .into_iter()
            .filter_map(|(_, v)| serde_json::from_slice::<Value>(&v).ok()?["bundle"]["sha256"].as_str().map(str::to_string))
            .collect();
        let mut gone = Vec::new();
        for (sha, rev) in candidates.into_iter().filter(|(sha, _)| !running.contains(sha)).take(PRUNE_MAX) {
            let d = format!("{dir}{sha}/");
            let q = format!("{d}queue/");
            let r = self.lock.gateway(
                "/v3/kv/txn",
                json!({
                    "compare": [
                        { "key": b64(&format!("{d}semaphore")), "result": "EQUAL", "target": "MOD", "mod_revision": rev },
                        { "key": b64(&q), "range_end": prefix_end(&q), "result": "EQUAL", "target": "CREATE", "create_revision": "0" },
                        { "key": b64(&format!("{d}halt")), "result": "EQUAL", "target": "VERSION", "version": "0" },
                        { "key": b64(&format!("{d}abort")), "result": "EQUAL", "target": "VERSION", "version": "0" },
                    ],
                    "success": [{ "request_delete_range": { "key": b64(&d), "range_end": prefix_end(&d) } }],
                    "failure": [],
                }),
            )?;
            if r["succeeded"] == true {
                gone.push(sha);
            }
        }
        Ok(gone)
    }

    /// Every rollout recorded for the group, by sha256.
    pub fn status(&self) -> Result<Vec<Status>, LockError> {
        let dir = format!("{}/rollout/", self.lock.base());
        let r = self.lock.gateway(
            "/v3/kv/range",
            json!({ "key": b64(&dir), "range_end": prefix_end(&dir), "limit": STATUS_LIMIT.to_string() }),
        )?;
        let mut all: BTreeMap<String, Status> = BTreeMap::new();
        for (k, v) in kvs(&r) {
            let Some(rest) = k.strip_prefix(&dir) else { continue };
            let mut parts = rest.splitn(3, '/');
            let (Some(sha), Some(kind)) = (parts.next(), parts.next()) else { continue };
            let id = parts.next().unwrap_or_default().to_string();
            let s = all.entry(sha.to_string()).or_insert_with(|| Status {
                sha256: sha.to_string(),
                ..Default::default()
            });
            match kind {
                "semaphore" => {
                    if let Ok(sem) = crate::reboot::lock::decode(&v) {
                        s.slots = sem.total_slots;
                        s.holders = sem.holders;
                    }
                }
                "queue" => s.waiting += 1,
                "applied" => s.applied.push(id),
                "healthy" => s.healthy.push(id),
                "failed" => s.failed.push(id),
                "halt" => s.halt = serde_json::from_slice(&v).ok(),
                "abort" => s.abort = serde_json::from_slice(&v).ok(),
                _ => {}
            }
        }
        Ok(all
            .into_values()
            .map(|mut s| {
                s.state = if s.abort.is_some() {
                    "aborted"
                } else if s.halt.is_some() {
                    "halted"
                } else if s.healthy.is_empty() {
                    "canary"
                } else {
                    "rolling"
                }
                .into();
                s
            })
            .collect())
    }
}

fn ops_len(r: &Value) -> usize {
    r["responses"].as_array().map(Vec::len).unwrap_or(0)
}
