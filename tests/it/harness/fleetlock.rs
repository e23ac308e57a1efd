//! A FleetLock test server (the protocol airlock serves): POST /v1/pre-reboot and
//! /v1/steady-state with `fleet-lock-protocol: true` and `{"client_params":{"id","group"}}`;
//! a semaphore per group; 200 or 409 with `{"kind","value"}` as airlock answers.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
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
}

impl FleetLockServer {
    pub fn start(slots: usize) -> FleetLockServer {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State { slots, ..Default::default() }));
        let st = state.clone();
        std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let st = st.clone();
                std::thread::spawn(move || {
                    let mut r = BufReader::new(conn.try_clone().unwrap());
                    let mut conn = conn;
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap_or(0);
                    let mut headers = BTreeMap::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
                        }
                    }
                    let len: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                    let mut body = vec![0u8; len];
                    let _ = r.read_exact(&mut body);
                    let (status, text) = answer(&line, &headers, &body, &st);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = conn.write_all(resp.as_bytes());
                });
            }
        });
        FleetLockServer { url, state }
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

fn answer(line: &str, headers: &BTreeMap<String, String>, body: &[u8], st: &Mutex<State>) -> (u16, String) {
    if headers.get("fleet-lock-protocol").map(String::as_str) != Some("true") {
        return (400, r#"{"kind":"missing_header","value":"fleet-lock-protocol"}"#.into());
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return (400, r#"{"kind":"bad_body","value":""}"#.into());
    };
    let (Some(id), Some(group)) = (v["client_params"]["id"].as_str(), v["client_params"]["group"].as_str()) else {
        return (400, r#"{"kind":"bad_client_params","value":""}"#.into());
    };
    let mut s = st.lock().unwrap();
    if let Some((_, code)) = s.forced.iter().find(|(p, _)| line.starts_with(&format!("POST {p} "))) {
        return (*code, r#"{"kind":"injected","value":"test fault"}"#.into());
    }
    let slots = s.slots;
    let holders = s.holders.entry(group.to_string()).or_default();
    if line.starts_with("POST /v1/pre-reboot ") {
        if holders.iter().any(|h| h == id) {
            return (200, "{}".into());
        }
        if holders.len() >= slots {
            return (409, r#"{"kind":"failed_lock","value":"semaphore full"}"#.into());
        }
        holders.push(id.to_string());
        (200, "{}".into())
    } else if line.starts_with("POST /v1/steady-state ") {
        holders.retain(|h| h != id);
        (200, "{}".into())
    } else {
        (404, r#"{"kind":"not_found","value":""}"#.into())
    }
}
