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
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const DEFAULT_PREFIX: &str = "com.coreos.airlock";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// A watch is re-armed at least this often (it also ends at the caller's deadline).
const WATCH_CAP: Duration = Duration::from_secs(300);
/// The queue key's lease: a dead waiter leaves the queue this long after its last keepalive.
pub const QUEUE_LEASE_TTL: u64 = 60;
/// How many queued waiters one release looks at to hand freed slots to.
const HANDOVER_LOOKAHEAD: u64 = 64;
/// CAS retries before giving up on a contended key.
/// How long a compare-and-swap keeps retrying against other writers before giving up. A burst
/// of releases (a whole wave of nodes back from their reboots) is many writers on one key: each
/// round one wins, so this is a time budget, not a small attempt count.
const CAS_DEADLINE: Duration = Duration::from_secs(60);

/// A short random pause between lost compare-and-swaps: 0 to 8 ms, so contending writers
/// spread out without waiting long (a round trip is a few ms).
fn cas_pause(attempt: u32) {
    if attempt > 0 {
        std::thread::sleep(Duration::from_micros(rand::Rng::random_range(&mut rand::rng(), 0..=8000)));
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub total_slots: u64,
    #[serde(default)]
    pub holders: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// No endpoint answered, a timeout, a 5xx, or quorum lost: try again later, never reboot.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// The key kept changing under us.
    #[error("etcd semaphore {0} kept changing; gave up after {secs} s", secs = CAS_DEADLINE.as_secs())]
    Conflict(String),
    /// The key holds something that is not a semaphore.
    #[error("etcd key {key} does not hold a semaphore: {why}")]
    Malformed { key: String, why: String },
}

impl LockError {
    pub fn is_transient(&self) -> bool {
        matches!(self, LockError::Unavailable(_) | LockError::Conflict(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// This call took a slot.
    Acquired,
    /// The holder already had one (a run killed after acquiring comes back to its slot).
    AlreadyHeld,
    /// No slot free.
    Full,
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

struct Snapshot {
    my_rev: Option<i64>,
    pred: Option<String>,
    sem: Option<(Semaphore, String)>,
    rev: i64,
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
        }
        Err(LockError::Unavailable(last))
    }

    fn post<T: for<'de> Deserialize<'de>>(&self, path: &str, body: serde_json::Value) -> Result<T, LockError> {
        self.send(path, &body, None)?.json().map_err(|e| LockError::Unavailable(format!("{path}: {e}")))
    }

    /// The semaphore and its mod revision (None: the key does not exist).
    pub fn get(&self) -> Result<Option<(Semaphore, String)>, LockError> {
        let r: RangeResp = self.post("/v3/kv/range", serde_json::json!({ "key": B64.encode(&self.key) }))?;
        let Some(kv) = r.kvs.into_iter().next() else { return Ok(None) };
        let raw = B64.decode(kv.value.unwrap_or_default()).map_err(|e| LockError::Malformed {
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        let sem: Semaphore = serde_json::from_slice(&raw).map_err(|e| LockError::Malformed {
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        Ok(Some((sem, kv.mod_revision.unwrap_or_default())))
    }

    /// Decode the semaphore from a range answer's key-value.
    fn decode(&self, kv: Kv) -> Result<(Semaphore, String), LockError> {
        let raw = B64.decode(kv.value.unwrap_or_default()).map_err(|e| LockError::Malformed {
            key: self.key.clone(),
            why: e.to_string(),
        })?;
        let sem = serde_json::from_slice(&raw).map_err(|e| LockError::Malformed {
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
    fn update<R>(&self, default_slots: u64, mut f: impl FnMut(&mut Semaphore) -> (Option<()>, R)) -> Result<R, LockError> {
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
            match self.cas_with(rev.as_deref(), &sem, &[])? {
                Ok(()) => return Ok(result),
                Err(now) => current = now,
            }
            cas_pause(attempt);
        }
        Err(LockError::Conflict(self.key.clone()))
    }

    /// Take a slot for `id` (idempotent). The semaphore is created with `default_slots` if absent.
    pub fn acquire(&self, id: &str, default_slots: u64) -> Result<Acquire, LockError> {
        self.update(default_slots, |s| take(s, id))
    }

    /// Give `id`'s slot back (idempotent); true when it held one.
    ///
    /// The freed slot goes straight to the first waiter of the `reboot --wait` queue, in the same
    /// transaction (its queue key is deleted with it): a release is one write, and the waiter
    /// learns it from the watch it already has.
    pub fn release(&self, id: &str, _default_slots: u64) -> Result<bool, LockError> {
        let dir = self.queue_dir();
        let read = [
            serde_json::json!({ "request_range": { "key": B64.encode(&self.key) } }),
            serde_json::json!({ "request_range": {
                "key": B64.encode(&dir), "range_end": B64.encode(prefix_end(&dir)), "keys_only": true,
                "sort_order": "ASCEND", "sort_target": "CREATE", "limit": HANDOVER_LOOKAHEAD.to_string(),
            } }),
        ];
        let mut answer: serde_json::Value = self.post("/v3/kv/txn", serde_json::json!({ "success": read }))?;
        let deadline = Instant::now() + CAS_DEADLINE;
        for attempt in 0.. {
            if Instant::now() > deadline {
                break;
            }
            let range = |i: usize| -> Result<Vec<Kv>, LockError> {
                serde_json::from_value::<RangeResp>(answer["responses"][i]["response_range"].clone())
                    .map(|r| r.kvs)
                    .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))
            };
            let Some((mut sem, rev)) = range(0)?.into_iter().next().map(|kv| self.decode(kv)).transpose()? else {
                return Ok(false);
            };
            if !sem.holders.iter().any(|h| h == id) {
                return Ok(false);
            }
            sem.holders.retain(|h| h != id);
            let mut ops = vec![serde_json::json!({ "request_put": {
                "key": B64.encode(&self.key), "value": B64.encode(serde_json::to_vec(&sem).expect("semaphore serializes")),
            } })];
            let free = sem.total_slots.saturating_sub(sem.holders.len() as u64) as usize;
            for kv in range(1)?.into_iter().take(free) {
                let key = String::from_utf8_lossy(&B64.decode(kv.key.clone().unwrap_or_default()).unwrap_or_default()).to_string();
                let holder = key.trim_start_matches(&dir).to_string();
                if !sem.holders.contains(&holder) {
                    sem.holders.push(holder);
                }
                ops.push(serde_json::json!({ "request_delete_range": { "key": B64.encode(&key) } }));
            }
            ops[0] = serde_json::json!({ "request_put": {
                "key": B64.encode(&self.key), "value": B64.encode(serde_json::to_vec(&sem).expect("semaphore serializes")),
            } });
            let compare = serde_json::json!({ "key": B64.encode(&self.key), "result": "EQUAL", "target": "MOD", "mod_revision": rev });
            let r: serde_json::Value = self.post("/v3/kv/txn", serde_json::json!({ "compare": [compare], "success": ops, "failure": read }))?;
            if r["succeeded"] == true {
                return Ok(true);
            }
            self.counters.cas_conflicts.fetch_add(1, Ordering::Relaxed);
            answer = r;
            cas_pause(attempt);
        }
        Err(LockError::Conflict(self.key.clone()))
    }

    /// Change the number of slots (holders over the new limit keep theirs until they release).
    pub fn set_slots(&self, n: u64) -> Result<(), LockError> {
        self.update(n, |s| {
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
            let key = String::from_utf8_lossy(&B64.decode(kv.key.unwrap_or_default()).unwrap_or_default()).to_string();
            let raw = B64.decode(kv.value.unwrap_or_default()).unwrap_or_default();
            let v = serde_json::from_slice(&raw).unwrap_or(serde_json::Value::String(String::from_utf8_lossy(&raw).into()));
            out.push((key.trim_start_matches(&dir).to_string(), v));
        }
        Ok(out)
    }

    fn queue_dir(&self) -> String {
        format!("{}/queue/", self.base)
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

    /// One consistent read, in one request of constant size whatever the queue length: our
    /// queue key's create revision (None: not queued), the waiter just before us (when our
    /// create revision is known), the semaphore with its mod revision, and the store revision.
    fn snapshot(&self, me: &str, my_rev: Option<i64>) -> Result<Snapshot, LockError> {
        let dir = self.queue_dir();
        let mut ops = vec![
            serde_json::json!({ "request_range": { "key": B64.encode(me), "keys_only": true } }),
            serde_json::json!({ "request_range": { "key": B64.encode(&self.key) } }),
        ];
        if let Some(mine) = my_rev {
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&dir), "range_end": B64.encode(prefix_end(&dir)), "keys_only": true,
                "max_create_revision": (mine - 1).to_string(), "sort_order": "DESCEND", "sort_target": "CREATE", "limit": "1",
            } }));
        }
        let r: serde_json::Value = self.post("/v3/kv/txn", serde_json::json!({ "success": ops }))?;
        let range = |i: usize| -> Result<Vec<Kv>, LockError> {
            serde_json::from_value::<RangeResp>(r["responses"][i]["response_range"].clone())
                .map(|r| r.kvs)
                .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))
        };
        let key_of = |kv: Kv| String::from_utf8_lossy(&B64.decode(kv.key.unwrap_or_default()).unwrap_or_default()).to_string();
        let sem = match range(1)?.into_iter().next() {
            Some(kv) => {
                let raw = B64.decode(kv.value.unwrap_or_default()).unwrap_or_default();
                let sem = serde_json::from_slice(&raw).map_err(|e| LockError::Malformed {
                    key: self.key.clone(),
                    why: e.to_string(),
                })?;
                Some((sem, kv.mod_revision.unwrap_or_default()))
            }
            None => None,
        };
        Ok(Snapshot {
            my_rev: range(0)?.into_iter().next().map(|kv| num(&kv.create_revision)),
            pred: if my_rev.is_some() { range(2)?.into_iter().next().map(key_of) } else { None },
            sem,
            rev: r["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0),
        })
    }

    /// The first `n` queue keys, in queue order.
    fn first_waiters(&self, n: u64) -> Result<Vec<String>, LockError> {
        let dir = self.queue_dir();
        let r: RangeResp = self.post(
            "/v3/kv/range",
            serde_json::json!({
                "key": B64.encode(&dir), "range_end": B64.encode(prefix_end(&dir)), "keys_only": true,
                "sort_order": "ASCEND", "sort_target": "CREATE", "limit": n.to_string(),
            }),
        )?;
        Ok(r.kvs
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&B64.decode(kv.key.unwrap_or_default()).unwrap_or_default()).to_string())
            .collect())
    }

    /// Block until `key` changes after revision `after` (a DELETE only, when `delete_only`), the
    /// deadline passes (false), or the stream breaks (an error; the caller looks again).
    fn watch(&self, key: &str, after: i64, delete_only: bool, deadline: Instant) -> Result<bool, LockError> {
        let left = deadline.saturating_duration_since(Instant::now()).min(WATCH_CAP);
        if left.is_zero() {
            return Ok(false);
        }
        let until = Instant::now() + left;
        let body = serde_json::json!({ "create_request": { "key": B64.encode(key), "start_revision": (after + 1).to_string() } });
        let resp = self.send("/v3/watch", &body, Some(left))?;
        let stream = serde_json::Deserializer::from_reader(std::io::BufReader::new(resp)).into_iter::<serde_json::Value>();
        for msg in stream {
            let msg = match msg {
                Ok(m) => m,
                Err(_) if Instant::now() + Duration::from_millis(50) >= until => return Ok(false),
                Err(e) => return Err(LockError::Unavailable(format!("watch {key}: {e}"))),
            };
            if !msg["error"].is_null() {
                return Err(LockError::Unavailable(format!("watch {key}: {}", msg["error"])));
            }
            let res = &msg["result"];
            if res["canceled"] == true || res["compact_revision"].as_str().is_some_and(|r| r != "0") {
                return Ok(true);
            }
            let events = res["events"].as_array().map(Vec::as_slice).unwrap_or_default();
            if events.iter().any(|e| !delete_only || e["type"] == "DELETE") {
                return Ok(true);
            }
        }
        Ok(Instant::now() + Duration::from_millis(50) < until)
    }

    /// Wait in the queue until `id` holds a slot or `deadline` passes. Transient etcd errors
    /// (a member down, quorum lost for a while) are retried until the deadline.
    pub fn wait_acquire(&self, id: &str, default_slots: u64, deadline: Instant) -> Result<Waited, LockError> {
        let lease = self.lease_grant(QUEUE_LEASE_TTL)?;
        let me = format!("{}{id}", self.queue_dir());
        // Queue (or refresh our key's lease); our place is the key's create revision.
        let enqueue = || -> Result<i64, LockError> {
            let r: serde_json::Value = self.post(
                "/v3/kv/put",
                serde_json::json!({ "key": B64.encode(&me), "value": B64.encode(id), "lease": lease, "prev_kv": true }),
            )?;
            let rev = match r["prev_kv"]["create_revision"].as_str() {
                Some(created) => created,
                None => r["header"]["revision"].as_str().unwrap_or("0"),
            };
            Ok(rev.parse().unwrap_or(0))
        };
        let first = enqueue()?;
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
        let result = self.wait_in_queue(id, &me, first, default_slots, deadline, &enqueue);
        drop(stop);
        let _ = keeper.join();
        // A slot granted by the waiter ahead just as our deadline passed goes back at once.
        if matches!(result, Ok(Waited::Deadline)) {
            self.release(id, default_slots)?;
        }
        // Revoking the lease deletes our queue key if it is still there (gave up, or already
        // held), so the next waiter moves up now rather than at lease expiry.
        if self.post::<serde_json::Value>("/v3/lease/revoke", serde_json::json!({ "ID": lease })).is_err() {
            let _ = self.post::<serde_json::Value>("/v3/kv/deleterange", serde_json::json!({ "key": B64.encode(&me) }));
        }
        result
    }

    fn wait_in_queue(
        &self,
        id: &str,
        me: &str,
        queued_at: i64,
        default_slots: u64,
        deadline: Instant,
        enqueue: &dyn Fn() -> Result<i64, LockError>,
    ) -> Result<Waited, LockError> {
        let mut backoff = Duration::from_millis(200);
        let my_rev = std::cell::Cell::new(Some(queued_at));
        let first = std::cell::Cell::new(true);
        loop {
            if Instant::now() >= deadline {
                return Ok(Waited::Deadline);
            }
            let step = (|| -> Result<Option<Waited>, LockError> {
                let snap = self.snapshot(me, my_rev.get())?;
                // Holding already: we were killed after acquiring (first look), or the waiter
                // ahead of us granted us a slot (it hands out every free slot at once).
                if snap.sem.as_ref().is_some_and(|(s, _)| s.holders.iter().any(|h| h == id)) {
                    return Ok(Some(if first.get() { Waited::AlreadyHeld } else { Waited::Acquired }));
                }
                first.set(false);
                if snap.my_rev.is_none() {
                    // Our lease expired (etcd unreachable for a minute): to the back of the queue.
                    my_rev.set(Some(enqueue()?));
                    return Ok(None);
                }
                if snap.my_rev != my_rev.get() {
                    // Learn our place, then read again with it.
                    my_rev.set(snap.my_rev);
                    return Ok(None);
                }
                let rev = snap.rev;
                let (mut s, sem_rev) = or_new(snap.sem, default_slots);
                match snap.pred {
                    None => match take(&mut s, id) {
                        (_, Acquire::AlreadyHeld) => return Ok(Some(Waited::AlreadyHeld)),
                        // The head takes its slot, and when more slots are free it grants them to
                        // the waiters right behind it, in the same transaction that removes their
                        // queue keys. Each granted waiter wakes (its predecessor's key is gone),
                        // finds itself a holder and goes. So a burst of releases costs one write,
                        // and the queue keeps up with many slots.
                        (_, Acquire::Acquired) => {
                            let free = s.total_slots.saturating_sub(s.holders.len() as u64);
                            let mut also = vec![serde_json::json!({ "request_delete_range": { "key": B64.encode(me) } })];
                            if free > 0 {
                                for next in self.first_waiters(free + 1)?.into_iter().filter(|k| k != me).take(free as usize) {
                                    let holder = next.trim_start_matches(&self.queue_dir()).to_string();
                                    if !s.holders.contains(&holder) {
                                        s.holders.push(holder);
                                    }
                                    also.push(serde_json::json!({ "request_delete_range": { "key": B64.encode(&next) } }));
                                }
                            }
                            if self.cas_with(sem_rev.as_deref(), &s, &also)?.is_ok() {
                                return Ok(Some(Waited::Acquired));
                            }
                        }
                        (_, Acquire::Full) => {
                            self.watch(&self.key, rev, false, deadline)?;
                        }
                    },
                    Some(pred) => {
                        self.watch(&pred, rev, true, deadline)?;
                    }
                }
                Ok(None)
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

/// The semaphore as read (with its mod revision), or a new empty one when the key is absent.
fn or_new(read: Option<(Semaphore, String)>, default_slots: u64) -> (Semaphore, Option<String>) {
    match read {
        Some((s, r)) => (s, Some(r)),
        None => (
            Semaphore {
                total_slots: default_slots,
                holders: vec![],
            },
            None,
        ),
    }
}

/// The acquire decision on one read of the semaphore: (write it back?, answer).
fn take(s: &mut Semaphore, id: &str) -> (Option<()>, Acquire) {
    if s.holders.iter().any(|h| h == id) {
        (None, Acquire::AlreadyHeld)
    } else if (s.holders.len() as u64) >= s.total_slots {
        (None, Acquire::Full)
    } else {
        s.holders.push(id.to_string());
        (Some(()), Acquire::Acquired)
    }
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
