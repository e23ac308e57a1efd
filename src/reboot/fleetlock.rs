//! FleetLock client (the protocol Zincati speaks to airlock): `POST /v1/pre-reboot` to take a
//! slot, `POST /v1/steady-state` to give it back, header `fleet-lock-protocol: true`, body
//! `{"client_params":{"id":…,"group":…}}`. 200 means yes; another 4xx means no slot; 5xx or no
//! answer means the lock service is unavailable.

use super::lock::{Acquire, LockError};
use std::time::Duration;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct FleetLock {
    url: String,
    group: String,
    client: reqwest::blocking::Client,
}

impl FleetLock {
    pub fn new(url: &str, group: &str) -> Result<FleetLock, LockError> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .build()
            .map_err(|e| LockError::Unavailable(e.to_string()))?;
        Ok(FleetLock {
            url: url.trim_end_matches('/').to_string(),
            group: group.to_string(),
            client,
        })
    }

    /// Some(true) on 200, Some(false) on a refusal (4xx).
    fn post(&self, path: &str, id: &str) -> Result<bool, LockError> {
        let url = format!("{}{path}", self.url);
        let body = serde_json::json!({ "client_params": { "id": id, "group": self.group } });
        let r = self
            .client
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .json(&body)
            .send()
            .map_err(|e| LockError::Unavailable(format!("{url}: {e}")))?;
        let status = r.status();
        if status.is_success() {
            Ok(true)
        } else if status.is_server_error() {
            Err(LockError::Unavailable(format!("{url}: HTTP {status}")))
        } else {
            tracing::info!("{url}: HTTP {status}: {}", r.text().unwrap_or_default().trim());
            Ok(false)
        }
    }

    /// Recursive per the protocol: asking again while holding answers yes.
    pub fn acquire(&self, id: &str) -> Result<Acquire, LockError> {
        Ok(if self.post("/v1/pre-reboot", id)? { Acquire::Acquired } else { Acquire::Full })
    }

    pub fn release(&self, id: &str) -> Result<bool, LockError> {
        self.post("/v1/steady-state", id)
    }
}
