//! The fleet reboot semaphore in etcd v3, compatible with airlock's layout: key
//! `<prefix>/groups/<group>/v1/semaphore`, value `{"total_slots":N,"holders":[…]}`, created if
//! absent and changed only by compare-and-swap transactions on the key's mod revision.
//! Acquire and release are idempotent (a holder that asks again keeps its one slot).
//! Spoken over etcd's v3 JSON gateway with reqwest (see README for why not gRPC).
//!
//! Waiting for a slot (`bootstrap reboot --wait`) without a herd: each waiter puts
//! `<prefix>/groups/<group>/v1/queue/<holder>` under a lease it keeps alive; the keys' create
//! revisions order the queue. Only the head of the queue touches the semaphore: it tries to
//! acquire and, when the semaphore is full, watches the semaphore key. Every other waiter
//! watches only the queue key just before its own and looks again when that key is deleted.
//! So a released slot wakes exactly one waiter (the head), which acquires and deletes its queue
//! key, which wakes exactly one more (the new head): a constant number of requests per slot,
//! whatever the queue length. A dead waiter's key goes with its lease.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod client;
mod queue;

use super::lock::{self, take, CAS_DEADLINE};
// For callers not yet moved to `reboot::lock`.
pub use super::lock::{Acquire, LockError, Semaphore};
use client::{cas_pause, key_of, num, prefix_end, revision, txn_range, Kv, RangeResp};
use queue::{WaitFor, Woke};

pub const DEFAULT_PREFIX: &str = "com.coreos.airlock";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// One request to one member; then the next member is tried. When the leader dies, a write a
/// follower forwarded to it before noticing is lost without an answer until this passes: with
/// 5 s every release in that second waited 5 s (fleet simulation, leader killed: 1.43 × ideal;
/// with 2 s, 1.30-1.34). A retry is safe: every write is a compare-and-swap or an idempotent
/// put. A loaded etcd here answered within 0.6 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// A watch is re-armed at least this often (it also ends at the caller's deadline).
const WATCH_CAP: Duration = Duration::from_secs(300);
/// The queue key's lease: a dead waiter leaves the queue this long after its last keepalive.
pub const QUEUE_LEASE_TTL: u64 = 60;
/// etcd's default limit of operations in one transaction (`--max-txn-ops`).
const MAX_TXN_OPS: usize = 128;
/// How many queued waiters one look reads (the head grants free slots to them).
const HANDOVER_LOOKAHEAD: u64 = 60;
/// How many release requests the head of the queue applies in one write. With the semaphore
/// put, the head's own two deletes and a delete per granted waiter, a write stays within
/// `MAX_TXN_OPS`.
const RELEASE_BATCH: u64 = 64;
/// A newly queued waiter watches the waiter before it (named by the queue's tail pointer) from
/// the revision that one was queued at, when that is at most this many revisions ago; otherwise
/// it looks first (a watch that starts far in the past replays that history).
const TAIL_REPLAY: i64 = 1000;
/// How long a releasing node waits for the head of the queue to apply its release request
/// before writing the semaphore itself.
const HANDOFF: Duration = Duration::from_secs(5);

/// TLS material for https:// endpoints (PEM).
#[derive(Debug, Clone, Default)]
pub struct Tls {
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate followed by its private key.
    pub identity_pem: Option<Vec<u8>>,
}

/// Request counters, shared by clones (the fleet simulation reads them).
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub keepalives: AtomicU64,
    /// Compare-and-swap writes that lost to another writer.
    pub cas_conflicts: AtomicU64,
    /// For each release the head of the queue applied: microseconds from the request to it
    /// being applied.
    pub handoffs: std::sync::Mutex<Vec<u32>>,
}

#[derive(Clone)]
pub struct EtcdLock {
    endpoints: Vec<String>,
    /// `<prefix>/groups/<group>/v1`
    base: String,
    key: String,
    client: reqwest::blocking::Client,
    /// The endpoint that answered last; tried first.
    preferred: Arc<AtomicUsize>,
    pub counters: Arc<Counters>,
    /// A semaphore with no slots is closed: waiters leave the queue (`Waited::Closed`) instead
    /// of waiting for a slot. The rollout semaphores (`rollout/<sha256>/`) close when their
    /// bundle is halted or aborted; the reboot semaphore never does (`lock set-slots 0` pauses
    /// reboots, and the waiters wait).
    closes_at_zero: bool,
}

/// How a wait for a slot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Acquired,
    AlreadyHeld,
    /// The deadline (the end of the reboot window) came first; the queue entry is gone.
    Deadline,
    /// The semaphore was closed (no slots, for one that closes at zero); the queue entry is gone.
    Closed,
}

/// The waiting queue and pending release requests, for `lock status`.
#[derive(Debug)]
pub struct Backlog {
    pub waiting: u64,
    pub first_waiters: Vec<String>,
    pub releases_pending: u64,
    pub first_releases: Vec<String>,
}

impl EtcdLock {
    pub fn new(endpoints: &[String], prefix: &str, group: &str) -> Result<EtcdLock, LockError> {
        EtcdLock::with_tls(endpoints, prefix, group, &Tls::default())
    }

    pub fn with_tls(endpoints: &[String], prefix: &str, group: &str, tls: &Tls) -> Result<EtcdLock, LockError> {
        EtcdLock::at_base(endpoints, &format!("{prefix}/groups/{group}/v1"), tls)
    }

    /// A semaphore with its queue under `base` (`base/semaphore`, `base/queue/`, …): the
    /// reboot semaphore is at `<prefix>/groups/<group>/v1`, a rollout's at
    /// `<prefix>/groups/<group>/v1/rollout/<sha256>`.
    pub fn at_base(endpoints: &[String], base: &str, tls: &Tls) -> Result<EtcdLock, LockError> {
        let bad = |what: &str, e: reqwest::Error| LockError::Malformed {
            key: what.to_string(),
            why: e.to_string(),
        };
        let mut b = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .pool_max_idle_per_host(4);
        if let Some(ca) = &tls.ca_pem {
            for c in reqwest::Certificate::from_pem_bundle(ca).map_err(|e| bad("etcd ca_file", e))? {
                b = b.add_root_certificate(c);
            }
        }
        if let Some(id) = &tls.identity_pem {
            b = b.identity(reqwest::Identity::from_pem(id).map_err(|e| bad("etcd cert_file/key_file", e))?);
        }
        let client = b.build().map_err(|e| LockError::Unavailable(e.to_string()))?;
        let base = base.to_string();
        Ok(EtcdLock {
            endpoints: endpoints.iter().map(|e| e.trim_end_matches('/').to_string()).collect(),
            key: format!("{base}/semaphore"),
            base,
            client,
            // Start at a random member so a fleet spreads its connections over the cluster.
            preferred: Arc::new(AtomicUsize::new(rand::Rng::random_range(&mut rand::rng(), 0..endpoints.len().max(1)))),
            counters: Arc::default(),
            closes_at_zero: false,
        })
    }

    /// This semaphore, at the same place, closing when it has no slots (see `Waited::Closed`).
    pub fn closing_at_zero(mut self) -> EtcdLock {
        self.closes_at_zero = true;
        self
    }

    /// Whether `s` is closed for this lock's waiters.
    fn closed(&self, s: &Semaphore) -> bool {
        self.closes_at_zero && s.total_slots == 0
    }

    /// The same client (endpoints, TLS, counters) for the semaphore under another `base`.
    pub fn rebased(&self, base: &str) -> EtcdLock {
        EtcdLock {
            base: base.to_string(),
            key: format!("{base}/semaphore"),
            closes_at_zero: false,
            ..self.clone()
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// `<prefix>/groups/<group>/v1` (or the base given to `at_base`).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Change the semaphore by compare-and-swap (retried): `f` edits it and says whether to write.
    pub fn update_with(&self, default_slots: u64, mut f: impl FnMut(&mut Semaphore) -> bool) -> Result<(), LockError> {
        self.update(default_slots, &[], |s| (f(s).then_some(()), ()))
    }

    /// One request to etcd's v3 JSON gateway (`/v3/kv/txn`, `/v3/kv/range`, …), with the
    /// endpoint failover and timeouts of the lock; keys and values in the body are base64.
    pub fn gateway(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value, LockError> {
        self.post(path, body)
    }

    /// A lease of `ttl` seconds (its ID).
    pub fn grant(&self, ttl: u64) -> Result<String, LockError> {
        self.lease_grant(ttl)
    }

    /// Take a slot for `id` (idempotent). The semaphore is created with `default_slots` if absent.
    /// A release request of ours still pending from an earlier hold goes in the same write, so it
    /// can never free the new slot.
    pub fn acquire(&self, id: &str, default_slots: u64) -> Result<Acquire, LockError> {
        self.update(default_slots, &[self.delete_op(&self.release_key(id))], |s| take(s, id))
    }

    /// Give `id`'s slot back (idempotent); true when it held one. Returns once the semaphore no
    /// longer lists `id`.
    ///
    /// When nodes wait in the `reboot --wait` queue, the release is a request for the queue's
    /// head: one uncontended put of `release/<id>`. The head applies every pending request and
    /// grants the freed slots in one compare-and-swap (deleting the requests in it), so a wave
    /// of nodes back from their reboots at once is one write per node plus one, not a fight of
    /// every releaser over the semaphore (each lost compare-and-swap is a raft proposal too).
    /// When nobody waits, or the head does not apply the request within `HANDOFF`, the releaser
    /// writes the semaphore itself.
    pub fn release(&self, id: &str, _default_slots: u64) -> Result<bool, LockError> {
        let queue = self.queue_dir();
        let rkey = self.release_key(id);
        let r: serde_json::Value = self.post(
            "/v3/kv/txn",
            serde_json::json!({ "success": [
                { "request_put": { "key": B64.encode(&rkey), "value": B64.encode(id) } },
                { "request_range": { "key": B64.encode(&self.key) } },
                { "request_range": { "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true, "limit": "1" } },
            ] }),
        )?;
        let range = |i| txn_range(&r, i);
        let held = match range(1)?.into_iter().next() {
            Some(kv) => self.decode(kv)?.0.holds(id),
            None => false,
        };
        if !held {
            self.post::<serde_json::Value>("/v3/kv/deleterange", serde_json::json!({ "key": B64.encode(&rkey) }))?;
            return Ok(false);
        }
        if !range(2)?.is_empty() {
            // The head deletes the request in the write that applies it.
            let at = revision(&r);
            let asked = Instant::now();
            if let Ok(Woke::Hit(_)) = self.wait_for(&rkey, None, WaitFor::Deleted, at, false, Instant::now() + HANDOFF) {
                let us = asked.elapsed().as_micros().min(u32::MAX as u128) as u32;
                self.counters.handoffs.lock().unwrap_or_else(|e| e.into_inner()).push(us);
                return Ok(true);
            }
        }
        tracing::debug!(holder = id, "the queue head did not apply the release request: writing the semaphore");
        self.give_back(id)?;
        Ok(true)
    }

    /// Give `id`'s slot back by writing the semaphore directly (idempotent); true when it held
    /// one. For operators and reapers (`lock release`, `lock reap`).
    pub fn release_now(&self, id: &str, _default_slots: u64) -> Result<bool, LockError> {
        self.give_back(id)
    }

    /// One compare-and-swap (retried) removes `id`, applies every pending release request, and
    /// hands the freed slots to the first waiters of the queue, deleting their queue keys: a
    /// waiter learns of its slot from the watch it already has.
    fn give_back(&self, id: &str) -> Result<bool, LockError> {
        let (queue, release) = (self.queue_dir(), self.release_dir());
        let rkey = self.release_key(id);
        // Read-only, so etcd serves it in parallel (reads inside a write run in its apply loop).
        let read = serde_json::json!({ "success": [
            { "request_range": { "key": B64.encode(&self.key) } },
            { "request_range": {
                "key": B64.encode(&release), "range_end": B64.encode(prefix_end(&release)), "keys_only": true,
                "limit": RELEASE_BATCH.to_string(),
            } },
            { "request_range": {
                "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true,
                "sort_order": "ASCEND", "sort_target": "CREATE", "limit": HANDOVER_LOOKAHEAD.to_string(),
            } },
        ] });
        let deadline = Instant::now() + CAS_DEADLINE;
        for attempt in 0.. {
            if Instant::now() > deadline {
                break;
            }
            let r: serde_json::Value = self.post("/v3/kv/txn", read.clone())?;
            let range = |i| txn_range(&r, i);
            let sem = range(0)?.into_iter().next().map(|kv| self.decode(kv)).transpose()?;
            let Some((mut sem, rev)) = sem else { return Ok(false) };
            if !lock::give_back(&mut sem, id) {
                return Ok(false);
            }
            let mut also = vec![self.delete_op(&rkey)];
            let releases: Vec<String> = range(1)?.into_iter().map(key_of).filter(|k| *k != rkey).collect();
            self.settle(&mut sem, &releases, &range(2)?.into_iter().map(key_of).collect::<Vec<_>>(), None, &mut also);
            if self.cas_with(Some(&rev), &sem, &also)?.is_ok() {
                return Ok(true);
            }
            cas_pause(attempt);
        }
        Err(LockError::Conflict(self.key.clone()))
    }

    /// Change the number of slots (holders over the new limit keep theirs until they release).
    pub fn set_slots(&self, n: u64) -> Result<(), LockError> {
        self.update(n, &[], |s| {
            s.total_slots = n;
            (Some(()), ())
        })
    }

    /// Record why `holder` keeps its slot (`halted: …`), or clear it (None). `lock status`
    /// prints it next to the holder. A separate key, so the semaphore stays airlock's format.
    pub fn set_status(&self, holder: &str, status: Option<&serde_json::Value>) -> Result<(), LockError> {
        let key = B64.encode(format!("{}/status/{holder}", self.base));
        match status {
            Some(v) => self.post::<serde_json::Value>("/v3/kv/put", serde_json::json!({ "key": key, "value": B64.encode(v.to_string()) }))?,
            None => self.post::<serde_json::Value>("/v3/kv/deleterange", serde_json::json!({ "key": key }))?,
        };
        Ok(())
    }

    /// Every recorded holder status.
    pub fn statuses(&self) -> Result<Vec<(String, serde_json::Value)>, LockError> {
        let dir = format!("{}/status/", self.base);
        let r: RangeResp = self.post(
            "/v3/kv/range",
            serde_json::json!({ "key": B64.encode(&dir), "range_end": B64.encode(prefix_end(&dir)) }),
        )?;
        let mut out = Vec::new();
        for kv in r.kvs {
            let raw = B64.decode(kv.value.clone().unwrap_or_default()).unwrap_or_default();
            let key = key_of(kv);
            let v = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::String(String::from_utf8_lossy(&raw).into()));
            out.push((key.trim_start_matches(&dir).to_string(), v));
        }
        Ok(out)
    }

    /// What `lock status` shows besides the holders: how many nodes wait (`--wait`), the first
    /// `first` of them in queue order, and the release requests the queue head has not applied
    /// yet. Two bounded reads, whatever the queue's length.
    pub fn backlog(&self, first: usize) -> Result<Backlog, LockError> {
        let (queue, release) = (self.queue_dir(), self.release_dir());
        let q: RangeResp = self.post(
            "/v3/kv/range",
            serde_json::json!({
                "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true,
                "sort_order": "ASCEND", "sort_target": "CREATE", "limit": first.max(1).to_string(),
            }),
        )?;
        let r: RangeResp = self.post(
            "/v3/kv/range",
            serde_json::json!({
                "key": B64.encode(&release), "range_end": B64.encode(prefix_end(&release)), "keys_only": true,
                "limit": first.max(1).to_string(),
            }),
        )?;
        let strip = |dir: &str, kvs: Vec<Kv>| -> Vec<String> { kvs.into_iter().map(|kv| key_of(kv).trim_start_matches(dir).to_string()).take(first).collect() };
        Ok(Backlog {
            waiting: num(&q.count) as u64,
            first_waiters: strip(&queue, q.kvs),
            releases_pending: num(&r.count) as u64,
            first_releases: strip(&release, r.kvs),
        })
    }

    fn queue_dir(&self) -> String {
        format!("{}/queue/", self.base)
    }

    fn release_dir(&self) -> String {
        format!("{}/release/", self.base)
    }

    fn release_key(&self, id: &str) -> String {
        format!("{}{id}", self.release_dir())
    }

    /// Wait in the queue until `id` holds a slot or `deadline` passes. Transient etcd errors
    /// (a member down, quorum lost for a while) are retried until the deadline.
    pub fn wait_acquire(&self, id: &str, default_slots: u64, deadline: Instant) -> Result<Waited, LockError> {
        let lease = self.lease_grant(QUEUE_LEASE_TTL)?;
        let me = format!("{}{id}", self.queue_dir());
        let enqueue = || self.enqueue(id, &me, &lease);
        let queued = enqueue()?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let keeper = {
            let this = self.clone();
            let lease = lease.clone();
            std::thread::spawn(move || {
                let every = Duration::from_secs(QUEUE_LEASE_TTL / 3);
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                    // Errors and expiry show up as our key missing from the queue; the waiter re-enqueues.
                    let _ = this.lease_keepalive(&lease);
                }
            })
        };
        let left = Cell::new(false);
        let result = self.wait_in_queue(id, &me, queued, default_slots, deadline, &enqueue, &left);
        drop(stop);
        let _ = keeper.join();
        // A slot granted by the waiter ahead just as our deadline passed goes back at once.
        if matches!(result, Ok(Waited::Deadline | Waited::Closed)) {
            self.release_now(id, default_slots)?;
        }
        // Revoking the lease deletes our queue key if it is still there (gave up, or already
        // held), so the next waiter moves up now rather than at lease expiry. When the write that
        // gave us our slot deleted it, the lease, with nothing left under it, just expires: one
        // raft proposal less per slot.
        if left.get() {
            return result;
        }
        if self.post::<serde_json::Value>("/v3/lease/revoke", serde_json::json!({ "ID": lease })).is_err() {
            let _ = self.post::<serde_json::Value>("/v3/kv/deleterange", serde_json::json!({ "key": B64.encode(&me) }));
        }
        result
    }
}

impl EtcdLock {
    /// Read-modify-write of a small JSON record of the group, `<prefix>/groups/<group>/v1/NAME`,
    /// by compare-and-swap on its revision (retried until it sticks). `f` sees the current value
    /// (None: absent) and returns the new one (None: leave the key as it is) and its answer.
    pub fn update_record<R>(&self, name: &str, mut f: impl FnMut(Option<&serde_json::Value>) -> (Option<serde_json::Value>, R)) -> Result<R, LockError> {
        let key = format!("{}/{name}", self.base);
        let k64 = B64.encode(&key);
        let decode = |kvs: Vec<Kv>| -> Result<Option<(serde_json::Value, String)>, LockError> {
            let Some(kv) = kvs.into_iter().next() else { return Ok(None) };
            let raw = B64.decode(kv.value.unwrap_or_default()).map_err(|e| LockError::Malformed {
                key: key.clone(),
                why: e.to_string(),
            })?;
            let v = serde_json::from_slice(&raw).map_err(|e| LockError::Malformed {
                key: key.clone(),
                why: e.to_string(),
            })?;
            Ok(Some((v, kv.mod_revision.unwrap_or_default())))
        };
        let r: RangeResp = self.post("/v3/kv/range", serde_json::json!({ "key": k64 }))?;
        let mut current = decode(r.kvs)?;
        let deadline = Instant::now() + CAS_DEADLINE;
        for attempt in 0.. {
            if Instant::now() > deadline {
                break;
            }
            let (new, answer) = f(current.as_ref().map(|(v, _)| v));
            let Some(new) = new else { return Ok(answer) };
            let compare = match &current {
                Some((_, rev)) => serde_json::json!({ "key": k64, "result": "EQUAL", "target": "MOD", "mod_revision": rev }),
                None => serde_json::json!({ "key": k64, "result": "EQUAL", "target": "VERSION", "version": "0" }),
            };
            let r: serde_json::Value = self.post(
                "/v3/kv/txn",
                serde_json::json!({
                    "compare": [compare],
                    "success": [{ "request_put": { "key": k64, "value": B64.encode(new.to_string()) } }],
                    "failure": [{ "request_range": { "key": k64 } }],
                }),
            )?;
            if r["succeeded"] == true {
                return Ok(answer);
            }
            current = decode(txn_range(&r, 0)?)?;
            cas_pause(attempt);
        }
        Err(LockError::Conflict(key))
    }
}
