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
use serde::Deserialize;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::lock::{self, or_new, take, CAS_DEADLINE};
// For callers not yet moved to `reboot::lock`.
pub use super::lock::{Acquire, LockError, Semaphore};

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

/// A short random pause between lost compare-and-swaps: 0 to 8 ms, so contending writers
/// spread out without waiting long (a round trip is a few ms).
fn cas_pause(attempt: u32) {
    if attempt > 0 {
        std::thread::sleep(Duration::from_micros(rand::Rng::random_range(&mut rand::rng(), 0..=8000)));
    }
}

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
}

/// How a wait for a slot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    Acquired,
    AlreadyHeld,
    /// The deadline (the end of the reboot window) came first; the queue entry is gone.
    Deadline,
}

#[derive(Deserialize)]
struct RangeResp {
    #[serde(default)]
    kvs: Vec<Kv>,
    /// Every key in the range, whatever the limit (int64 as a string).
    #[serde(default)]
    count: Option<String>,
}

#[derive(Deserialize)]
struct Kv {
    key: Option<String>,
    value: Option<String>,
    mod_revision: Option<String>,
    create_revision: Option<String>,
}

/// A CAS answer: written, or lost to another writer (with the value that won and its mod revision).
type Cas = Result<(), Option<(Semaphore, String)>>;

/// How a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woke {
    /// An event the caller waited for, seen at this store revision (or later).
    Hit(i64),
    /// Cancelled, compacted or ended early: look again.
    Reset,
    Deadline,
}

/// What a watch waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WaitFor {
    /// The key deleted.
    Deleted,
    /// Any key in the range written (or deleted).
    Changed,
}

/// What a waiter sees in one look (see [`EtcdLock::look`]).
struct View {
    /// Our queue key's create revision (None: not queued).
    my_rev: Option<i64>,
    /// The waiter just before us (None: we are the head, when our create revision was known).
    pred: Option<String>,
    sem: Option<(Semaphore, String)>,
    /// Pending release request keys (the head's look).
    releases: Vec<String>,
    /// The first queue keys, in queue order (the head's look).
    waiters: Vec<String>,
    /// The store revision the look was taken at.
    rev: i64,
    /// When `pred` came from the queue's tail pointer (see `wait_acquire`): the revision it was
    /// queued at, from which its deletion is watched.
    pred_since: Option<i64>,
}

/// The waiting queue and pending release requests, for `lock status`.
#[derive(Debug)]
pub struct Backlog {
    pub waiting: u64,
    pub first_waiters: Vec<String>,
    pub releases_pending: u64,
    pub first_releases: Vec<String>,
}

fn num(s: &Option<String>) -> i64 {
    s.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// etcd's "range_end" for every key under `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

impl EtcdLock {
    pub fn new(endpoints: &[String], prefix: &str, group: &str) -> Result<EtcdLock, LockError> {
        EtcdLock::with_tls(endpoints, prefix, group, &Tls::default())
    }

    pub fn with_tls(endpoints: &[String], prefix: &str, group: &str, tls: &Tls) -> Result<EtcdLock, LockError> {
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
        let base = format!("{prefix}/groups/{group}/v1");
        Ok(EtcdLock {
            endpoints: endpoints.iter().map(|e| e.trim_end_matches('/').to_string()).collect(),
            key: format!("{base}/semaphore"),
            base,
            client,
            // Start at a random member so a fleet spreads its connections over the cluster.
            preferred: Arc::new(AtomicUsize::new(rand::Rng::random_range(&mut rand::rng(), 0..endpoints.len().max(1)))),
            counters: Arc::default(),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Send to the endpoint that answered last, then the others.
    fn send(&self, path: &str, body: &serde_json::Value, timeout: Option<Duration>) -> Result<reqwest::blocking::Response, LockError> {
        let mut last = String::from("no endpoints configured");
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed);
        for k in 0..n {
            let i = (first + k) % n;
            let ep = &self.endpoints[i];
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let mut rq = self.client.post(format!("{ep}{path}")).json(body);
            if let Some(t) = timeout {
                rq = rq.timeout(t);
            }
            match rq.send() {
                Ok(r) if r.status().is_success() => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(r);
                }
                Ok(r) => last = format!("{ep}{path}: HTTP {} {}", r.status(), r.text().unwrap_or_default().trim()),
                Err(e) => last = format!("{ep}{path}: {}", error_chain(&e)),
            }
            if k + 1 < n {
                tracing::debug!("etcd: {last}; asking the next endpoint");
            }
        }
        Err(LockError::Unavailable(last))
    }

    fn post<T: for<'de> Deserialize<'de>>(&self, path: &str, body: serde_json::Value) -> Result<T, LockError> {
        self.send(path, &body, None)?.json().map_err(|e| LockError::Unavailable(format!("{path}: {e}")))
    }

    /// The semaphore and its mod revision (None: the key does not exist).
    pub fn get(&self) -> Result<Option<(Semaphore, String)>, LockError> {
        let r: RangeResp = self.post("/v3/kv/range", serde_json::json!({ "key": B64.encode(&self.key) }))?;
        r.kvs.into_iter().next().map(|kv| self.decode(kv)).transpose()
    }

    /// Decode the semaphore from a range answer's key-value.
    fn decode(&self, kv: Kv) -> Result<(Semaphore, String), LockError> {
        let raw = B64.decode(kv.value.unwrap_or_default()).map_err(|e| LockError::Malformed {
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        let sem = lock::decode(&raw).map_err(|e| LockError::Malformed {
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        Ok((sem, kv.mod_revision.unwrap_or_default()))
    }

    /// Write `new` only if the key is still at `rev` (None: only if it does not exist), doing
    /// `also` (more request ops) in the same transaction. When another writer got there first,
    /// the same round trip brings back what it wrote, so a retry needs no extra read.
    fn cas_with(&self, rev: Option<&str>, new: &Semaphore, also: &[serde_json::Value]) -> Result<Cas, LockError> {
        let key = B64.encode(&self.key);
        let compare = match rev {
            Some(r) => serde_json::json!({ "key": key, "result": "EQUAL", "target": "MOD", "mod_revision": r }),
            None => serde_json::json!({ "key": key, "result": "EQUAL", "target": "VERSION", "version": "0" }),
        };
        let value = B64.encode(serde_json::to_vec(new).expect("semaphore serializes"));
        let mut ops = vec![serde_json::json!({ "request_put": { "key": key, "value": value } })];
        ops.extend_from_slice(also);
        let r: serde_json::Value = self.post(
            "/v3/kv/txn",
            serde_json::json!({ "compare": [compare], "success": ops, "failure": [{ "request_range": { "key": key } }] }),
        )?;
        if r["succeeded"] == true {
            return Ok(Ok(()));
        }
        self.counters.cas_conflicts.fetch_add(1, Ordering::Relaxed);
        let kvs: RangeResp =
            serde_json::from_value(r["responses"][0]["response_range"].clone()).map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))?;
        Ok(Err(kvs.kvs.into_iter().next().map(|kv| self.decode(kv)).transpose()?))
    }

    /// Read-modify-CAS until it sticks. `f` returns the new value, or None to leave the key.
    fn update<R>(&self, default_slots: u64, also: &[serde_json::Value], mut f: impl FnMut(&mut Semaphore) -> (Option<()>, R)) -> Result<R, LockError> {
        let mut current = self.get()?;
        let deadline = Instant::now() + CAS_DEADLINE;
        for attempt in 0.. {
            if Instant::now() > deadline {
                break;
            }
            let (mut sem, rev) = or_new(current, default_slots);
            let (write, result) = f(&mut sem);
            if write.is_none() {
                return Ok(result);
            }
            match self.cas_with(rev.as_deref(), &sem, also)? {
                Ok(()) => return Ok(result),
                Err(now) => current = now,
            }
            cas_pause(attempt);
        }
        Err(LockError::Conflict(self.key.clone()))
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
        let range = |i: usize| -> Result<Vec<Kv>, LockError> {
            serde_json::from_value::<RangeResp>(r["responses"][i]["response_range"].clone())
                .map(|r| r.kvs)
                .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))
        };
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
            let at = r["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
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
            let range = |i: usize| -> Result<Vec<Kv>, LockError> {
                serde_json::from_value::<RangeResp>(r["responses"][i]["response_range"].clone())
                    .map(|r| r.kvs)
                    .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))
            };
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

    /// Apply the pending release requests `releases` to `s`, then hand its free slots to the
    /// first `waiters` (queue keys, in order; `me` skipped), adding the deletes to `ops`, which
    /// then leave room for the semaphore's put within `MAX_TXN_OPS`.
    fn settle(&self, s: &mut Semaphore, releases: &[String], waiters: &[String], me: Option<&str>, ops: &mut Vec<serde_json::Value>) {
        let (queue, release) = (self.queue_dir(), self.release_dir());
        let released: Vec<&str> = releases.iter().map(|k| k.trim_start_matches(&release)).collect();
        ops.extend(releases.iter().map(|k| self.delete_op(k)));
        let room = (MAX_TXN_OPS - 1).saturating_sub(ops.len());
        let waiters: Vec<&String> = waiters.iter().filter(|k| Some(k.as_str()) != me).collect();
        let holders: Vec<&str> = waiters.iter().map(|k| k.trim_start_matches(&queue)).collect();
        let granted = lock::settle(s, &released, &holders, room);
        ops.extend(waiters[..granted].iter().map(|k| self.delete_op(k)));
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

    fn delete_op(&self, key: &str) -> serde_json::Value {
        serde_json::json!({ "request_delete_range": { "key": B64.encode(key) } })
    }

    fn lease_grant(&self, ttl: u64) -> Result<String, LockError> {
        let r: serde_json::Value = self.post("/v3/lease/grant", serde_json::json!({ "TTL": ttl.to_string() }))?;
        r["ID"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| LockError::Unavailable(format!("lease grant: no ID in {r}")))
    }

    /// Renew the lease; false when it has expired.
    fn lease_keepalive(&self, id: &str) -> Result<bool, LockError> {
        self.counters.keepalives.fetch_add(1, Ordering::Relaxed);
        let r: serde_json::Value = self.post("/v3/lease/keepalive", serde_json::json!({ "ID": id }))?;
        Ok(r["result"]["TTL"].as_str().and_then(|t| t.parse::<i64>().ok()).unwrap_or(0) > 0)
    }

    /// One consistent read, of bounded size whatever the queue length: our queue key, the
    /// semaphore, the waiter just before us (the newest key created before ours, `my_rev`), and
    /// for a `head` look the pending release requests and the first `HANDOVER_LOOKAHEAD`
    /// waiters in queue order. Reads sorted by create revision cost etcd time linear in the
    /// queue's length, so a newly queued waiter, far back, looks only for its predecessor; a
    /// waiter woken by its predecessor leaving is likely the head now and reads both; the head
    /// (`my_rev` None) needs no predecessor: later keys queue behind it.
    ///
    /// `seen`: a store revision this client has already seen on the member it talks to (its own
    /// write, or the watch event that woke it). Then the read is served by that member without
    /// a round of raft (`serializable`): under load a linearizable read waits for the member to
    /// apply everything proposed before it, which is the latency a hand-over should not pay. It
    /// is as fresh as what prompted it: an answer older than `seen` (another member answered)
    /// is read again linearizably. Writes stay compare-and-swaps, so a read that is a little
    /// old can cost a retry, never a slot.
    fn look(&self, me: &str, my_rev: Option<i64>, head: bool, seen: Option<i64>) -> Result<View, LockError> {
        let v = self.look_once(me, my_rev, head, seen.is_some())?;
        match seen {
            Some(r) if v.rev < r => self.look_once(me, my_rev, head, false),
            _ => Ok(v),
        }
    }

    fn look_once(&self, me: &str, my_rev: Option<i64>, head: bool, serializable: bool) -> Result<View, LockError> {
        let pred = !head || my_rev.is_some();
        let (queue, release) = (self.queue_dir(), self.release_dir());
        let mut ops = vec![
            serde_json::json!({ "request_range": { "key": B64.encode(me), "keys_only": true } }),
            serde_json::json!({ "request_range": { "key": B64.encode(&self.key) } }),
        ];
        if head {
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&release), "range_end": B64.encode(prefix_end(&release)), "keys_only": true,
                "limit": RELEASE_BATCH.to_string(),
            } }));
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true,
                "sort_order": "ASCEND", "sort_target": "CREATE", "limit": HANDOVER_LOOKAHEAD.to_string(),
            } }));
        }
        if let Some(mine) = my_rev.filter(|_| pred) {
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true,
                "max_create_revision": (mine - 1).to_string(), "sort_order": "DESCEND", "sort_target": "CREATE", "limit": "1",
            } }));
        }
        if serializable {
            for op in &mut ops {
                op["request_range"]["serializable"] = true.into();
            }
        }
        let r: serde_json::Value = self.post("/v3/kv/txn", serde_json::json!({ "success": ops }))?;
        let range = |i: usize| -> Result<Vec<Kv>, LockError> {
            serde_json::from_value::<RangeResp>(r["responses"][i]["response_range"].clone())
                .map(|r| r.kvs)
                .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))
        };
        let keys = |i: usize| -> Result<Vec<String>, LockError> { Ok(range(i)?.into_iter().map(key_of).collect()) };
        Ok(View {
            my_rev: range(0)?.first().map(|kv| num(&kv.create_revision)),
            pred: match my_rev.filter(|_| pred) {
                Some(_) => keys(if head { 4 } else { 2 })?.into_iter().next(),
                None => None,
            },
            sem: range(1)?.into_iter().next().map(|kv| self.decode(kv)).transpose()?,
            releases: if head { keys(2)? } else { Vec::new() },
            waiters: if head { keys(3)? } else { Vec::new() },
            rev: r["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0),
            pred_since: None,
        })
    }

    /// Block until `key` (or a key in [`key`, `range_end`)) is deleted or changed (`what`) after
    /// store revision `after`, the watch is reset (cancelled, compacted, stream ended early: the
    /// caller looks again), or the deadline passes. A broken connection is an error.
    ///
    /// The watch starts at the current revision, not at `after + 1`: etcd serves a watch that
    /// starts in the past from a catch-up loop that runs every 100 ms, which would add up to
    /// that much to every hand-over (measured: median 45 ms a release, 14 ms this way). What
    /// happened between `after` and the watch's start is read once instead (a count, bounded).
    /// `from_past`: start at `after + 1` after all, for a waiter in no hurry (newly queued,
    /// likely far back), which saves that read. With the queue's tail pointer (see
    /// `wait_acquire`) an arrival costs etcd three requests: lease, enqueue, watch (fleet
    /// simulation, 1000 nodes arriving within a second, 50 slots: median 1.10 × ideal, against
    /// 1.12 with a look per arrival and 1.17 with a catch-up read as well).
    #[allow(clippy::too_many_arguments)]
    fn wait_for(&self, key: &str, range_end: Option<&[u8]>, what: WaitFor, after: i64, from_past: bool, deadline: Instant) -> Result<Woke, LockError> {
        let left = deadline.saturating_duration_since(Instant::now()).min(WATCH_CAP);
        if left.is_zero() {
            return Ok(Woke::Deadline);
        }
        let until = Instant::now() + left;
        let mut create = serde_json::json!({ "key": B64.encode(key) });
        if from_past {
            create["start_revision"] = (after + 1).to_string().into();
        }
        if let Some(end) = range_end {
            create["range_end"] = B64.encode(end).into();
        }
        let resp = self.send("/v3/watch", &serde_json::json!({ "create_request": create }), Some(left))?;
        let stream = serde_json::Deserializer::from_reader(std::io::BufReader::new(resp)).into_iter::<serde_json::Value>();
        for msg in stream {
            let msg = match msg {
                Ok(m) => m,
                Err(_) if Instant::now() + Duration::from_millis(50) >= until => return Ok(Woke::Deadline),
                Err(e) => return Err(LockError::Unavailable(format!("watch {key}: {e}"))),
            };
            if !msg["error"].is_null() {
                return Err(LockError::Unavailable(format!("watch {key}: {}", msg["error"])));
            }
            let res = &msg["result"];
            if res["canceled"] == true || res["compact_revision"].as_str().is_some_and(|r| r != "0") {
                return Ok(Woke::Reset);
            }
            if res["created"] == true {
                let start = res["header"]["revision"].as_str().and_then(|v| v.parse::<i64>().ok()).unwrap_or(i64::MAX);
                if !from_past && start > after {
                    if let Some(at) = self.happened(key, range_end, what, after)? {
                        return Ok(Woke::Hit(at));
                    }
                }
                continue;
            }
            let events = res["events"].as_array().map(Vec::as_slice).unwrap_or_default();
            if events.iter().any(|e| what == WaitFor::Changed || e["type"] == "DELETE") {
                let at = res["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
                return Ok(Woke::Hit(at));
            }
        }
        Ok(if Instant::now() + Duration::from_millis(50) < until {
            Woke::Reset
        } else {
            Woke::Deadline
        })
    }

    /// Whether what `wait_for` waits for already happened after revision `after` (the key is
    /// gone, or a key in the range was written since), and the revision this read saw.
    fn happened(&self, key: &str, range_end: Option<&[u8]>, what: WaitFor, after: i64) -> Result<Option<i64>, LockError> {
        let mut q = serde_json::json!({ "key": B64.encode(key), "count_only": true });
        if let Some(end) = range_end {
            q["range_end"] = B64.encode(end).into();
        }
        if what == WaitFor::Changed {
            q["min_mod_revision"] = (after + 1).to_string().into();
        }
        let r: serde_json::Value = self.post("/v3/kv/range", q)?;
        let count = r["count"].as_str().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        let at = r["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
        Ok(match what {
            WaitFor::Deleted => count == 0,
            WaitFor::Changed => count > 0,
        }
        .then_some(at))
    }

    /// Wait in the queue until `id` holds a slot or `deadline` passes. Transient etcd errors
    /// (a member down, quorum lost for a while) are retried until the deadline.
    pub fn wait_acquire(&self, id: &str, default_slots: u64, deadline: Instant) -> Result<Waited, LockError> {
        let lease = self.lease_grant(QUEUE_LEASE_TTL)?;
        let me = format!("{}{id}", self.queue_dir());
        // Queue (or refresh our key's lease) in one write that also moves the queue's tail
        // pointer to us and reads the semaphore. Our place is the key's create revision; the
        // tail's previous value is the waiter queued just before us, so finding it costs etcd
        // nothing (a read sorted by create revision would scan the whole queue, and a burst of
        // arrivals would scan it once each).
        let tail = format!("{}/tail", self.base);
        let enqueue = || -> Result<View, LockError> {
            let r: serde_json::Value = self.post(
                "/v3/kv/txn",
                serde_json::json!({ "success": [
                    { "request_put": { "key": B64.encode(&me), "value": B64.encode(id), "lease": lease, "prev_kv": true } },
                    { "request_put": { "key": B64.encode(&tail), "value": B64.encode(&me), "prev_kv": true } },
                    { "request_range": { "key": B64.encode(&self.key) } },
                ] }),
            )?;
            let rev: i64 = r["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0);
            let prev = |i: usize| -> Option<Kv> { serde_json::from_value(r["responses"][i]["response_put"]["prev_kv"].clone()).ok() };
            let sem = serde_json::from_value::<RangeResp>(r["responses"][2]["response_range"].clone())
                .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))?
                .kvs
                .into_iter()
                .next()
                .map(|kv| self.decode(kv))
                .transpose()?;
            let (pred, pred_since) = match prev(1) {
                Some(kv) => {
                    let since = num(&kv.mod_revision);
                    let key = String::from_utf8_lossy(&B64.decode(kv.value.unwrap_or_default()).unwrap_or_default()).to_string();
                    (Some(key).filter(|k| *k != me), Some(since))
                }
                None => (None, None),
            };
            Ok(View {
                my_rev: Some(prev(0).map(|kv| num(&kv.create_revision)).unwrap_or(rev)),
                pred,
                sem,
                releases: Vec::new(),
                waiters: Vec::new(),
                rev,
                pred_since,
            })
        };
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
        if matches!(result, Ok(Waited::Deadline)) {
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

    /// The head of the queue, on what it saw: apply the pending release requests, take a slot
    /// when one is free and grant the other free slots to the waiters right behind, all in one
    /// compare-and-swap that also removes their queue keys and ours. Each granted waiter wakes
    /// (its predecessor's key is gone), finds itself a holder and goes; the first waiter not
    /// granted becomes the head. While the semaphore is full the head watches the release
    /// requests and the semaphore, nothing else.
    fn lead(&self, id: &str, me: &str, mut seen: Option<View>, default_slots: u64, deadline: Instant, left: &Cell<bool>) -> Result<Option<Waited>, LockError> {
        // The revision of the event that woke us, for the next look (see `look`).
        let mut woke_at = None;
        loop {
            if Instant::now() >= deadline {
                return Ok(Some(Waited::Deadline));
            }
            let v = match seen.take() {
                Some(v) => v,
                None => self.look(me, None, true, woke_at.take())?,
            };
            let (mut s, sem_rev) = or_new(v.sem, default_slots);
            if s.holds(id) {
                left.set(v.my_rev.is_none());
                return Ok(Some(Waited::Acquired));
            }
            if v.my_rev.is_none() {
                return Ok(None);
            }
            // Pending release requests first, then our slot, then the other free ones.
            let mut ops = Vec::new();
            self.settle(&mut s, &v.releases, &[], None, &mut ops);
            let acquired = take(&mut s, id).1 == Acquire::Acquired;
            if acquired {
                ops.push(self.delete_op(me));
                ops.push(self.delete_op(&self.release_key(id)));
                self.settle(&mut s, &[], &v.waiters, Some(me), &mut ops);
            }
            if ops.is_empty() {
                // The watch covers [release/, semaphore]: the release requests and the semaphore.
                let mut end = self.key.clone().into_bytes();
                end.push(0);
                if let Woke::Hit(at) = self.wait_for(&self.release_dir(), Some(&end), WaitFor::Changed, v.rev, false, deadline)? {
                    woke_at = Some(at);
                }
                continue;
            }
            let won = self.cas_with(sem_rev.as_deref(), &s, &ops)?.is_ok();
            tracing::debug!(holder = id, won, acquired, releases = v.releases.len(), "queue head wrote the semaphore");
            if won && acquired {
                left.set(true);
                return Ok(Some(Waited::Acquired));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn wait_in_queue(
        &self,
        id: &str,
        me: &str,
        queued: View,
        default_slots: u64,
        deadline: Instant,
        enqueue: &dyn Fn() -> Result<View, LockError>,
        left: &Cell<bool>,
    ) -> Result<Waited, LockError> {
        let mut backoff = Duration::from_millis(200);
        let mut first = true;
        let mut my_rev = queued.my_rev;
        // A revision seen on the member we talk to (our write, the event that woke us): the
        // next look may be served by it alone (see `look`).
        let mut seen = Some(queued.rev);
        // The enqueue's answer, which serves as the first look when it names the waiter before us.
        let mut ready = Some(queued);
        let mut woken = false;
        loop {
            if Instant::now() >= deadline {
                return Ok(Waited::Deadline);
            }
            let step = (|| -> Result<Option<Waited>, LockError> {
                let v = match ready.take() {
                    // Unless that waiter was queued so long ago that watching its key from then
                    // would replay much history: then a look finds it, as it does after a wake.
                    Some(v) if v.pred.is_some() && v.pred_since.is_some_and(|p| v.rev - p <= TAIL_REPLAY) => {
                        seen = None;
                        v
                    }
                    _ => self.look(me, my_rev, woken, seen.take())?,
                };
                woken = false;
                // Holding already: we were killed after acquiring (first look), or the waiter
                // ahead of us granted us a slot (it hands out every free slot at once).
                if v.sem.as_ref().is_some_and(|(s, _)| s.holds(id)) {
                    left.set(v.my_rev.is_none());
                    return Ok(Some(if first { Waited::AlreadyHeld } else { Waited::Acquired }));
                }
                first = false;
                if v.my_rev.is_none() {
                    // Our lease expired (etcd unreachable for a minute): to the back of the queue.
                    let q = enqueue()?;
                    (my_rev, seen) = (q.my_rev, Some(q.rev));
                    ready = Some(q);
                    return Ok(None);
                }
                if v.my_rev != my_rev {
                    // Learn our place, then look again with it.
                    (my_rev, seen) = (v.my_rev, Some(v.rev));
                    return Ok(None);
                }
                match v.pred.clone() {
                    None => {
                        let seen = (!v.waiters.is_empty()).then_some(v);
                        self.lead(id, me, seen, default_slots, deadline, left)
                    }
                    Some(pred) => {
                        // Newly queued, likely far back: no hurry, so no catch-up read either.
                        let after = v.pred_since.unwrap_or(v.rev);
                        if let Woke::Hit(at) = self.wait_for(&pred, None, WaitFor::Deleted, after, !woken, deadline)? {
                            (woken, seen) = (true, Some(at));
                        }
                        Ok(None)
                    }
                }
            })();
            match step {
                Ok(Some(w)) => return Ok(w),
                Ok(None) => backoff = Duration::from_millis(200),
                Err(e) if e.is_transient() => {
                    tracing::debug!("waiting for a reboot slot: {e}; retrying");
                    let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=backoff.as_millis() as u64);
                    std::thread::sleep((backoff / 2 + Duration::from_millis(jitter)).min(deadline.saturating_duration_since(Instant::now())));
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The key of a range answer's key-value, decoded.
fn key_of(kv: Kv) -> String {
    String::from_utf8_lossy(&B64.decode(kv.key.unwrap_or_default()).unwrap_or_default()).to_string()
}

/// A reqwest error with its causes ("connection refused" sits a few levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
