//! Transport to etcd's v3 JSON gateway: the endpoints tried in turn (the one that answered last
//! first) with the connect and request timeouts, the range and compare-and-swap helpers on the
//! semaphore key, and leases.

use super::EtcdLock;
use crate::reboot::lock::{self, or_new, LockError, Semaphore, CAS_DEADLINE};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A short random pause between lost compare-and-swaps: 0 to 8 ms, so contending writers
/// spread out without waiting long (a round trip is a few ms).
pub(super) fn cas_pause(attempt: u32) {
    if attempt > 0 {
        std::thread::sleep(Duration::from_micros(rand::Rng::random_range(&mut rand::rng(), 0..=8000)));
    }
}

#[derive(Deserialize)]
pub(super) struct RangeResp {
    #[serde(default)]
    pub(super) kvs: Vec<Kv>,
    /// Every key in the range, whatever the limit (int64 as a string).
    #[serde(default)]
    pub(super) count: Option<String>,
}

#[derive(Deserialize)]
pub(super) struct Kv {
    pub(super) key: Option<String>,
    pub(super) value: Option<String>,
    pub(super) mod_revision: Option<String>,
    pub(super) create_revision: Option<String>,
}

/// A CAS answer: written, or lost to another writer (with the value that won and its mod revision).
pub(super) type Cas = Result<(), Option<(Semaphore, String)>>;

pub(super) fn num(s: &Option<String>) -> i64 {
    s.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// etcd's "range_end" for every key under `prefix`.
pub(super) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("non-empty prefix") += 1;
    end
}

/// The key-values in a transaction's answer to its `i`-th operation, a range.
pub(super) fn txn_range(r: &serde_json::Value, i: usize) -> Result<Vec<Kv>, LockError> {
    serde_json::from_value::<RangeResp>(r["responses"][i]["response_range"].clone())
        .map(|r| r.kvs)
        .map_err(|e| LockError::Unavailable(format!("txn answer: {e}")))
}

/// The store revision an answer was taken at (0 if absent).
pub(super) fn revision(r: &serde_json::Value) -> i64 {
    r["header"]["revision"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0)
}

impl EtcdLock {
    /// Send to the endpoint that answered last, then the others.
    pub(super) fn send(&self, path: &str, body: &serde_json::Value, timeout: Option<Duration>) -> Result<reqwest::blocking::Response, LockError> {
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

    pub(super) fn post<T: for<'de> Deserialize<'de>>(&self, path: &str, body: serde_json::Value) -> Result<T, LockError> {
        self.send(path, &body, None)?.json().map_err(|e| LockError::Unavailable(format!("{path}: {e}")))
    }

    /// The semaphore and its mod revision (None: the key does not exist).
    pub fn get(&self) -> Result<Option<(Semaphore, String)>, LockError> {
        let r: RangeResp = self.post("/v3/kv/range", serde_json::json!({ "key": B64.encode(&self.key) }))?;
        r.kvs.into_iter().next().map(|kv| self.decode(kv)).transpose()
    }

    /// Decode the semaphore from a range answer's key-value.
    pub(super) fn decode(&self, kv: Kv) -> Result<(Semaphore, String), LockError> {
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
    pub(super) fn cas_with(&self, rev: Option<&str>, new: &Semaphore, also: &[serde_json::Value]) -> Result<Cas, LockError> {
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
        Ok(Err(txn_range(&r, 0)?.into_iter().next().map(|kv| self.decode(kv)).transpose()?))
    }

    /// Read-modify-CAS until it sticks. `f` returns the new value, or None to leave the key.
    pub(super) fn update<R>(
        &self,
        default_slots: u64,
        also: &[serde_json::Value],
        mut f: impl FnMut(&mut Semaphore) -> (Option<()>, R),
    ) -> Result<R, LockError> {
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

    pub(super) fn delete_op(&self, key: &str) -> serde_json::Value {
        serde_json::json!({ "request_delete_range": { "key": B64.encode(key) } })
    }

    pub(super) fn lease_grant(&self, ttl: u64) -> Result<String, LockError> {
        let r: serde_json::Value = self.post("/v3/lease/grant", serde_json::json!({ "TTL": ttl.to_string() }))?;
        r["ID"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| LockError::Unavailable(format!("lease grant: no ID in {r}")))
    }

    /// Renew the lease; false when it has expired.
    pub(super) fn lease_keepalive(&self, id: &str) -> Result<bool, LockError> {
        self.counters.keepalives.fetch_add(1, Ordering::Relaxed);
        let r: serde_json::Value = self.post("/v3/lease/keepalive", serde_json::json!({ "ID": id }))?;
        Ok(r["result"]["TTL"].as_str().and_then(|t| t.parse::<i64>().ok()).unwrap_or(0) > 0)
    }
}

/// The key of a range answer's key-value, decoded.
pub(super) fn key_of(kv: Kv) -> String {
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
