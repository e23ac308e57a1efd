//! FleetLock client (the protocol Zincati speaks to airlock): `POST /v1/pre-reboot` to take a
//! slot, `POST /v1/steady-state` to give it back, header `fleet-lock-protocol: true`, body
//! `{"client_params":{"id":…,"group":…}}`. Only 200 means yes (the protocol: "any other status
//! code means failure"). No answer, 408, 429 or 5xx: the lock service is unavailable, ask again
//! later. Another 4xx on pre-reboot: no slot. A release is done only on a 200; anything else
//! keeps the slot on record until a later run gets one.

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

    /// `Ok(None)` on 200; `Ok(Some(reason))` on a refusal (a 4xx but 408 and 429); no answer,
    /// 408, 429, 5xx and anything else are `Unavailable`.
    fn post(&self, path: &str, id: &str) -> Result<Option<String>, LockError> {
        let url = format!("{}{path}", self.url);
        let body = serde_json::json!({ "client_params": { "id": id, "group": self.group } });
        let r = self
            .client
            .post(&url)
            .header("fleet-lock-protocol", "true")
            .json(&body)
            .send()
            .map_err(|e| LockError::Unavailable(format!("{url}: {e}")))?;
        let status = r.status().as_u16();
        let class = classify(status);
        if class == Class::Yes {
            return Ok(None);
        }
        let text: String = r.text().unwrap_or_default().trim().chars().take(200).collect();
        let why = format!("{url}: HTTP {status}: {text}");
        tracing::info!("{why}");
        match class {
            Class::Unavailable => Err(LockError::Unavailable(why)),
            _ => Ok(Some(why)),
        }
    }

    /// Recursive per the protocol: asking again while holding answers yes.
    pub fn acquire(&self, id: &str) -> Result<Acquire, LockError> {
        Ok(match self.post("/v1/pre-reboot", id)? {
            None => Acquire::Acquired,
            Some(_) => Acquire::Full,
        })
    }

    /// Released only on a 200 (idempotent per the protocol: a holder of nothing gets one too).
    /// Anything else is an error, so the slot stays on record (reboot.json) for a later run.
    pub fn release(&self, id: &str) -> Result<bool, LockError> {
        match self.post("/v1/steady-state", id)? {
            None => Ok(true),
            Some(why) => Err(LockError::Unavailable(format!("release refused: {why}"))),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Yes,
    Refused,
    Unavailable,
}

fn classify(status: u16) -> Class {
    match status {
        200 => Class::Yes,
        // Timeouts and throttling, and what a wrong URL, proxy or credential answers: the lock
        // service did not say no, so nothing may be concluded about the slot.
        401 | 403 | 404 | 405 | 407 | 408 | 421 | 429 => Class::Unavailable,
        400..=499 => Class::Refused,
        _ => Class::Unavailable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_200_is_yes() {
        use Class::*;
        for (status, want) in [
            (200, Yes),
            (201, Unavailable),
            (204, Unavailable),
            (302, Unavailable),
            (400, Refused),
            (401, Unavailable),
            (403, Unavailable),
            (404, Unavailable),
            (405, Unavailable),
            (409, Refused),
            (408, Unavailable),
            (429, Unavailable),
            (500, Unavailable),
            (503, Unavailable),
        ] {
            assert_eq!(classify(status), want, "HTTP {status}");
        }
    }
}
