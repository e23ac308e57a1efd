//! The fleet reboot semaphore in etcd v3, compatible with airlock's layout: key
//! `<prefix>/groups/<group>/v1/semaphore`, value `{"total_slots":N,"holders":[…]}`, created if
//! absent and changed only by compare-and-swap transactions on the key's mod revision.
//! Acquire and release are idempotent (a holder that asks again keeps its one slot).
//! Spoken over etcd's v3 JSON gateway with reqwest (see README for why not gRPC).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const DEFAULT_PREFIX: &str = "com.coreos.airlock";
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// CAS retries before giving up on a contended key.
const MAX_CAS_ATTEMPTS: usize = 32;

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
    #[error("etcd semaphore {0} kept changing; gave up after {MAX_CAS_ATTEMPTS} attempts")]
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

pub struct EtcdLock {
    endpoints: Vec<String>,
    key: String,
    client: reqwest::blocking::Client,
}

#[derive(Deserialize)]
struct RangeResp {
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Deserialize)]
struct Kv {
    value: Option<String>,
    mod_revision: Option<String>,
}

#[derive(Deserialize)]
struct TxnResp {
    #[serde(default)]
    succeeded: bool,
}

impl EtcdLock {
    pub fn new(endpoints: &[String], prefix: &str, group: &str) -> Result<EtcdLock, LockError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        Ok(EtcdLock {
            endpoints: endpoints.iter().map(|e| e.trim_end_matches('/').to_string()).collect(),
            key: format!("{prefix}/groups/{group}/v1/semaphore"),
            client,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// POST to the first endpoint that answers.
    fn post<T: for<'de> Deserialize<'de>>(&self, path: &str, body: serde_json::Value) -> Result<T, LockError> {
        let mut last = String::from("no endpoints configured");
        for ep in &self.endpoints {
            match self.client.post(format!("{ep}{path}")).json(&body).send() {
                Ok(r) if r.status().is_success() => return r.json().map_err(|e| LockError::Unavailable(format!("{ep}: {e}"))),
                Ok(r) => last = format!("{ep}{path}: HTTP {} {}", r.status(), r.text().unwrap_or_default().trim()),
                Err(e) => last = format!("{ep}: {e}"),
            }
        }
        Err(LockError::Unavailable(last))
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

    /// Write `new` only if the key is still at `rev` (None: only if it does not exist).
    fn cas(&self, rev: Option<&str>, new: &Semaphore) -> Result<bool, LockError> {
        let key = B64.encode(&self.key);
        let compare = match rev {
            Some(r) => serde_json::json!({ "key": key, "result": "EQUAL", "target": "MOD", "mod_revision": r }),
            None => serde_json::json!({ "key": key, "result": "EQUAL", "target": "VERSION", "version": "0" }),
        };
        let value = B64.encode(serde_json::to_vec(new).expect("semaphore serializes"));
        let r: TxnResp = self.post(
            "/v3/kv/txn",
            serde_json::json!({ "compare": [compare], "success": [{ "request_put": { "key": key, "value": value } }] }),
        )?;
        Ok(r.succeeded)
    }

    /// Read-modify-CAS until it sticks. `f` returns the new value, or None to leave the key.
    fn update<R>(&self, default_slots: u64, mut f: impl FnMut(&mut Semaphore) -> (Option<()>, R)) -> Result<R, LockError> {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (mut sem, rev) = match self.get()? {
                Some((s, r)) => (s, Some(r)),
                None => (
                    Semaphore {
                        total_slots: default_slots,
                        holders: vec![],
                    },
                    None,
                ),
            };
            let (write, result) = f(&mut sem);
            if write.is_none() {
                return Ok(result);
            }
            if self.cas(rev.as_deref(), &sem)? {
                return Ok(result);
            }
        }
        Err(LockError::Conflict(self.key.clone()))
    }

    /// Take a slot for `id` (idempotent). The semaphore is created with `default_slots` if absent.
    pub fn acquire(&self, id: &str, default_slots: u64) -> Result<Acquire, LockError> {
        self.update(default_slots, |s| {
            if s.holders.iter().any(|h| h == id) {
                (None, Acquire::AlreadyHeld)
            } else if (s.holders.len() as u64) >= s.total_slots {
                (None, Acquire::Full)
            } else {
                s.holders.push(id.to_string());
                (Some(()), Acquire::Acquired)
            }
        })
    }

    /// Give `id`'s slot back (idempotent); true when it held one.
    pub fn release(&self, id: &str, default_slots: u64) -> Result<bool, LockError> {
        self.update(default_slots, |s| {
            let before = s.holders.len();
            s.holders.retain(|h| h != id);
            if s.holders.len() == before {
                (None, false)
            } else {
                (Some(()), true)
            }
        })
    }

    /// Change the number of slots (holders over the new limit keep theirs until they release).
    pub fn set_slots(&self, n: u64) -> Result<(), LockError> {
        self.update(n, |s| {
            s.total_slots = n;
            (Some(()), ())
        })
    }
}
