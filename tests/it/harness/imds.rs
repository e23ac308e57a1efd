//! An IMDSv2 test server (no real one exists off EC2) that follows the protocol: a token from
//! `PUT /latest/api/token` with the TTL header, 401 for a missing, unknown or expired token,
//! the meta-data tree, user-data, instance tags; with fault injection. Runs in-process on
//! loopback, or inside a node's network namespace on 169.254.169.254:80.

#![allow(dead_code)]

use super::http::{bind_in_netns, HttpServer, Request, Response};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct State {
    pub meta: BTreeMap<String, String>,
    pub user_data: Option<String>,
    /// None: tags are not allowed in metadata (404).
    pub tags: Option<BTreeMap<String, String>>,
    tokens: BTreeMap<String, Instant>,
    next_token: u64,
    /// Fault: answer this many token PUTs with 503.
    pub fail_token_puts: u32,
    /// Fault: accept connections but never answer.
    pub silent: bool,
    pub puts: u32,
    pub gets: u32,
    pub unauthorized: u32,
}

pub struct ImdsServer {
    pub state: Arc<Mutex<State>>,
    pub addr: String,
    _http: HttpServer,
}

impl ImdsServer {
    /// An instance named `name` (a Name tag) with the usual metadata.
    pub fn instance(name: &str) -> State {
        let mut meta = BTreeMap::new();
        for (k, v) in [
            ("instance-id", "i-0123456789abcdef0"),
            ("placement/region", "eu-west-1"),
            ("placement/availability-zone", "eu-west-1b"),
            ("instance-type", "t3.small"),
            ("ami-id", "ami-0abcdef1234567890"),
            ("local-ipv4", "10.1.2.3"),
            ("mac", "02:00:00:00:00:01"),
            // The instance role's credentials, as the AWS SDKs' default chain reads them.
            ("iam/security-credentials/", "bootstrap-node"),
            (
                "iam/security-credentials/bootstrap-node",
                r#"{"Code":"Success","LastUpdated":"2026-01-01T00:00:00Z","Type":"AWS-HMAC","AccessKeyId":"testing","SecretAccessKey":"testing","Token":"testing","Expiration":"2099-01-01T00:00:00Z"}"#,
            ),
        ] {
            meta.insert(k.to_string(), v.to_string());
        }
        let tags = BTreeMap::from([
            ("Name".to_string(), name.to_string()),
            ("aws:autoscaling:groupName".to_string(), format!("{name}-asg")),
        ]);
        State {
            meta,
            tags: Some(tags),
            ..Default::default()
        }
    }

    pub fn start(state: State) -> ImdsServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        Self::serve(listener, state, addr)
    }

    /// Serve on 169.254.169.254:80 inside the network namespace of process `pid` (a node's
    /// PID 1). The address must already be on the node's `lo`.
    pub fn start_in_netns(pid: i32, state: State) -> ImdsServer {
        let listener = bind_in_netns(&format!("/proc/{pid}/ns/net"), "169.254.169.254:80");
        Self::serve(listener, state, "http://169.254.169.254".into())
    }

    pub fn serve_listener(listener: TcpListener, state: State, addr: String) -> ImdsServer {
        Self::serve(listener, state, addr)
    }

    fn serve(listener: TcpListener, state: State, addr: String) -> ImdsServer {
        let state = Arc::new(Mutex::new(state));
        let st = state.clone();
        let http = HttpServer::serve(listener, addr.clone(), move |req| handle(req, &st));
        ImdsServer { state, addr, _http: http }
    }

    /// Make every issued token invalid (as if its TTL ran out).
    pub fn expire_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }
}

fn handle(req: &Request, st: &Mutex<State>) -> Option<Response> {
    if st.lock().unwrap().silent {
        return None;
    }
    let (status, text) = respond(&req.method, &req.path, &req.headers, st);
    let mut resp = Response::new(status, text).header("Content-Type", "text/plain");
    // Real IMDS echoes the token's TTL on the token response; the AWS SDKs insist on it.
    if (status, req.path.as_str()) == (200, "/latest/api/token") {
        let ttl = req.header("x-aws-ec2-metadata-token-ttl-seconds").unwrap_or_default();
        resp = resp.header("X-aws-ec2-metadata-token-ttl-seconds", ttl);
    }
    Some(resp.header("Connection", "keep-alive"))
}

fn respond(method: &str, path: &str, headers: &BTreeMap<String, String>, st: &Mutex<State>) -> (u16, String) {
    let mut s = st.lock().unwrap();
    if path == "/latest/api/token" {
        if method != "PUT" {
            return (405, String::new());
        }
        s.puts += 1;
        if s.fail_token_puts > 0 {
            s.fail_token_puts -= 1;
            return (503, String::new());
        }
        let Some(ttl) = headers
            .get("x-aws-ec2-metadata-token-ttl-seconds")
            .and_then(|t| t.parse::<u64>().ok())
            .filter(|t| (1..=21600).contains(t))
        else {
            return (400, "missing or invalid X-aws-ec2-metadata-token-ttl-seconds".into());
        };
        s.next_token += 1;
        let token = format!("token-{}-{}", s.next_token, std::process::id());
        s.tokens.insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
        return (200, token);
    }
    if method != "GET" {
        return (405, String::new());
    }
    s.gets += 1;
    let valid = headers
        .get("x-aws-ec2-metadata-token")
        .and_then(|t| s.tokens.get(t))
        .is_some_and(|exp| *exp > Instant::now());
    if !valid {
        s.unauthorized += 1;
        return (401, String::new());
    }
    let Some(rest) = path.strip_prefix("/latest/") else {
        return (404, String::new());
    };
    if rest == "user-data" {
        return match &s.user_data {
            Some(u) => (200, u.clone()),
            None => (404, String::new()),
        };
    }
    let Some(key) = rest.strip_prefix("meta-data/") else {
        return (404, String::new());
    };
    if key == "tags/instance" {
        return match &s.tags {
            Some(t) => (200, t.keys().cloned().collect::<Vec<_>>().join("\n")),
            None => (404, String::new()),
        };
    }
    if let Some(tag) = key.strip_prefix("tags/instance/") {
        return match s.tags.as_ref().and_then(|t| t.get(tag)) {
            Some(v) => (200, v.clone()),
            None => (404, String::new()),
        };
    }
    match s.meta.get(key) {
        Some(v) => (200, v.clone()),
        None => (404, String::new()),
    }
}

impl ImdsServer {
    /// Set (or with None remove) a meta-data item while the server runs, e.g.
    /// `autoscaling/target-lifecycle-state` going from `InService` to `Terminated`.
    pub fn set_meta(&self, key: &str, value: Option<&str>) {
        let mut s = self.state.lock().unwrap();
        match value {
            Some(v) => s.meta.insert(key.to_string(), v.to_string()),
            None => s.meta.remove(key),
        };
    }

    /// An instance of Auto Scaling group `group` (the tag EC2 Auto Scaling sets) with this id,
    /// in us-east-1 (moto's default region), `InService`.
    pub fn asg_instance(name: &str, group: &str, instance_id: &str) -> State {
        let mut st = ImdsServer::instance(name);
        st.meta.insert("instance-id".into(), instance_id.into());
        st.meta.insert("placement/region".into(), "us-east-1".into());
        st.meta.insert("placement/availability-zone".into(), "us-east-1a".into());
        st.meta.insert("autoscaling/target-lifecycle-state".into(), "InService".into());
        st.tags
            .get_or_insert_with(Default::default)
            .insert("aws:autoscaling:groupName".into(), group.into());
        st
    }
}
