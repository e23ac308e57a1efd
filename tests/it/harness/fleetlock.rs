//! A FleetLock test server (the protocol airlock serves): POST /v1/pre-reboot and
//! /v1/steady-state with `fleet-lock-protocol: true` and `{"client_params":{"id","group"}}`;
//! a semaphore per group; 200 or 409 with `{"kind","value"}` as airlock answers.

use super::http::{HttpServer, Request, Response};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Default)]
pub struct State {
    pub slots: usize,
    pub holders: BTreeMap<String, Vec<String>>,
    /// Fault injection: path (`/v1/steady-state`) → the status to answer instead, without
    /// touching the semaphore (a proxy timing out, a rate limiter, a server error).
    pub forced: BTreeMap<String, u16>,
}

pub struct FleetLockServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    _http: HttpServer,
}

impl FleetLockServer {
    pub fn start(slots: usize) -> FleetLockServer {
        let state = Arc::new(Mutex::new(State { slots, ..Default::default() }));
        let st = state.clone();
        let http = HttpServer::start(move |req| {
            let (status, text) = answer(req, &st);
            Some(
                Response::new(status, text)
                    .header("Content-Type", "application/json")
                    .header("Connection", "close"),
            )
        });
        FleetLockServer {
            url: http.url.clone(),
            state,
            _http: http,
        }
    }

    /// Answer every request to `path` with `status` (None: serve normally again).
    pub fn force(&self, path: &str, status: Option<u16>) {
        let mut s = self.state.lock().unwrap();
        match status {
            Some(c) => s.forced.insert(path.to_string(), c),
            None => s.forced.remove(path),
        };
    }

    pub fn holders(&self, group: &str) -> Vec<String> {
        self.state.lock().unwrap().holders.get(group).cloned().unwrap_or_default()
    }
}

fn answer(req: &Request, st: &Mutex<State>) -> (u16, String) {
    if req.header("fleet-lock-protocol") != Some("true") {
        return (400, r#"{"kind":"missing_header","value":"fleet-lock-protocol"}"#.into());
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
        return (400, r#"{"kind":"bad_body","value":""}"#.into());
    };
    let (Some(id), Some(group)) = (v["client_params"]["id"].as_str(), v["client_params"]["group"].as_str()) else {
        return (400, r#"{"kind":"bad_client_params","value":""}"#.into());
    };
    let mut s = st.lock().unwrap();
    if let Some((_, code)) = s.forced.iter().find(|(p, _)| req.method == "POST" && req.path == **p) {
        return (*code, r#"{"kind":"injected","value":"test fault"}"#.into());
    }
    let slots = s.slots;
    let holders = s.holders.entry(group.to_string()).or_default();
    if (req.method.as_str(), req.path.as_str()) == ("POST", "/v1/pre-reboot") {
        if holders.iter().any(|h| h == id) {
            return (200, "{}".into());
        }
        if holders.len() >= slots {
            return (409, r#"{"kind":"failed_lock","value":"semaphore full"}"#.into());
        }
        holders.push(id.to_string());
        (200, "{}".into())
    } else if (req.method.as_str(), req.path.as_str()) == ("POST", "/v1/steady-state") {
        holders.retain(|h| h != id);
        (200, "{}".into())
    } else {
        (404, r#"{"kind":"not_found","value":""}"#.into())
    }
}
