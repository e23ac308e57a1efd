//! The IMDSv2 test server as a program, for the demo: serves instance metadata for a node
//! named `--name` (its Name tag) on `--listen` (default 169.254.169.254:80) in the network
//! namespace it is started in (`nsenter -t NODE_PID -n`), with `--user-data FILE`.
//! Test code, not part of the agent: it is never packaged.

#[path = "../tests/it/harness/http.rs"]
mod http;
#[path = "../tests/it/harness/imds.rs"]
mod imds;

use imds::ImdsServer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let name = arg("--name").unwrap_or_else(|| "production-haproxy".into());
    let listen = arg("--listen").unwrap_or_else(|| "169.254.169.254:80".into());
    let mut state = ImdsServer::instance(&name);
    if let Some(region) = arg("--region") {
        state.meta.insert("placement/region".into(), region);
    }
    if let Some(f) = arg("--user-data") {
        state.user_data = Some(std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("reading {f}: {e}")));
    }
    let listener = std::net::TcpListener::bind(&listen).unwrap_or_else(|e| panic!("binding {listen}: {e}"));
    let _srv = ImdsServer::serve_listener(listener, state, format!("http://{listen}"));
    eprintln!("imds_server: serving {name} on {listen}");
    loop {
        std::thread::park();
    }
}
