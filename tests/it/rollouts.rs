//! Rollouts of a new bundle through one real etcd shared by booted nodes (`[rollout] strategy =
//! "canary"`): a bad bundle stops at the canary, the others keep their config, `rollout abort`
//! puts the canary back, a fixed bundle goes out one node at a time; with etcd down no node
//! applies a new bundle and drift is still corrected.

use crate::harness::etcd::Etcd;
use crate::harness::node::Node;
use crate::harness::support::*;
use std::io::{Read, Write};
use std::path::Path;

pub const GROUP: &str = "production-lb";

/// A free loopback port (the nodes share the host's network).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET http://127.0.0.1:PORT/ → (status, body); (0, error) when nothing answers.
pub fn http_get(port: u16) -> (u16, String) {
    let mut s = match std::net::TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(e) => return (0, e.to_string()),
    };
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    write!(s, "GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_string();
    (status, body)
}

/// The `lb` role: haproxy answering `status` with `body` on the port its env overlay names.
fn lb_bundle(dir: &Path, ports: &[u16], status: u16, body: &str) {
    let role = format!(
        r#"schema = 1
[[step]]
kind = "package"
names = ["haproxy"]

[[step]]
kind = "file"
path = "/etc/haproxy/haproxy.cfg"
template = true
content = """
global
    log stdout format raw local0
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend web
    bind 127.0.0.1:{{{{ port }}}}
    http-request return status {status} content-type text/plain string {body}
"""
notify = ["restart:haproxy.service"]

[[step]]
kind = "unit"
name = "haproxy.service"
enabled = true
active = true
"#
    );
    std::fs::create_dir_all(dir.join("roles/lb/env")).unwrap();
    std::fs::write(dir.join("roles/lb/role.toml"), role).unwrap();
    for (i, p) in ports.iter().enumerate() {
        std::fs::write(dir.join(format!("roles/lb/env/n{}.toml", i + 1)), format!("[vars]\nport = {p}\n")).unwrap();
    }
}

/// Build `src` into `<out>/lb.tar.gz` (replaced atomically); its sha256.
pub fn publish(src: &Path, out: &Path) -> String {
    let tmp = out.join(".lb.tar.gz.new");
    let r = agent(&["bundle", "build", src.to_str().unwrap(), "-o", tmp.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let bytes = std::fs::read(&tmp).unwrap();
    std::fs::rename(&tmp, out.join("lb.tar.gz")).unwrap();
    let _ = std::fs::remove_file(out.join(".lb.tar.gz.new.sha256"));
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&bytes))
}

pub fn apply(n: &Node, i: usize) -> Run {
    n.agent(&["apply", "--source", "/srv/bundle/lb.tar.gz", "--name", &format!("n{}-lb", i + 1)])
}

/// RFC 3339 (UTC) → seconds, for comparing times of the nodes' reports (one host clock).
fn secs(t: &serde_json::Value) -> f64 {
    let t = t.as_str().unwrap_or_else(|| panic!("not a time: {t}"));
    let (date, time) = t.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<f64> = date.split('-').map(|x| x.parse().unwrap()).collect();
    let h: Vec<f64> = time.split(':').map(|x| x.parse().unwrap()).collect();
    ((d[0] * 12.0 + d[1]) * 31.0 + d[2]) * 86400.0 + h[0] * 3600.0 + h[1] * 60.0 + h[2]
}

fn starts(n: &Node, cursor: &str) -> usize {
    n.journal_since(cursor, "haproxy.service")
        .lines()
        .filter(|l| l.starts_with("Started haproxy"))
        .count()
}

/// Show 1: three nodes, one etcd, canary = 1, batch = 1.
#[test]
fn a_bad_bundle_stops_at_the_canary_and_a_fixed_one_goes_out_one_node_at_a_time() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    lb_bundle(src.path(), &ports, 200, "v1");
    let v1 = publish(src.path(), out.path());
    let nodes: Vec<Node> = (0..3).map(|_| Node::boot_host_net(out.path())).collect();
    for (i, n) in nodes.iter().enumerate() {
        n.write_config(&format!(
            "[rollout]\nstrategy = \"canary\"\ncanary = 1\nbatch = 1\ngroup = \"{GROUP}\"\nwait = \"10m\"\n\
             [[rollout.health]]\nurl = \"http://127.0.0.1:{}/\"\ntimeout = \"3s\"\n\
             [reboot.etcd]\nendpoints = [\"{}\"]\n",
            ports[i],
            etcd.endpoints()[0]
        ));
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.machine_id()).collect();

    // The first bundle of a node needs no slot (it has nothing else to converge to); twice.
    for (i, n) in nodes.iter().enumerate() {
        let r = apply(n, i);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(http_get(ports[i]), (200, "v1".into()));
        let r = apply(n, i);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(n.report()["summary"]["changed"], 0, "second run changes nothing: {:#}", n.report());
        assert_eq!(n.report()["bundle"]["sha256"], v1.as_str());
    }

    // A bad bundle: haproxy starts, but answers 503, so the health check fails.
    lb_bundle(src.path(), &ports, 503, "v2");
    let v2 = publish(src.path(), out.path());
    let runs: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes.iter().enumerate().map(|(i, n)| s.spawn(move || apply(n, i))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let reports: Vec<serde_json::Value> = nodes.iter().map(|n| n.report()).collect();
    let canaries: Vec<usize> = (0..3).filter(|&i| reports[i]["bundle"]["sha256"] == v2.as_str()).collect();
    assert_eq!(canaries.len(), 1, "exactly one node applied the bad bundle: {reports:#?}");
    let c = canaries[0];
    assert_eq!(runs[c].code, 1, "{}", runs[c].all());
    assert!(reports[c]["error"].as_str().unwrap().contains("HTTP 503"), "{:#}", reports[c]);
    for i in (0..3).filter(|&i| i != c) {
        assert_eq!(runs[i].code, 0, "{}", runs[i].all());
        assert_eq!(reports[i]["bundle"]["sha256"], v1.as_str(), "{:#}", reports[i]);
        assert_eq!(reports[i]["rollout"]["state"], "halted", "{:#}", reports[i]);
        assert_eq!(http_get(ports[i]), (200, "v1".into()), "node {i} still serves the old config");
    }
    assert_eq!(http_get(ports[c]).0, 503, "the canary keeps the bad bundle for inspection");

    // The operator sees the halt: which node, which check.
    let other = (c + 1) % 3;
    let r = nodes[other].agent(&["rollout", "status"]);
    assert_eq!(r.code, 0, "{}", r.all());
    eprintln!("rollout status:\n{}", r.stdout);
    assert!(r.stdout.contains(&format!("{v2}  halted  applied 1  healthy 0  failed 1")), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("halted by {} at ", ids[c])) && r.stdout.contains(&format!("GET http://127.0.0.1:{}/: HTTP 503", ports[c])),
        "{}",
        r.stdout
    );
    let j: serde_json::Value = serde_json::from_str(&nodes[other].agent(&["rollout", "status", "--json"]).stdout).unwrap();
    let ro = j["rollouts"].as_array().unwrap().iter().find(|r| r["sha256"] == v2.as_str()).unwrap().clone();
    assert_eq!(ro["applied"], serde_json::json!([ids[c]]), "{ro:#}");
    assert_eq!(ro["halt"]["node"], ids[c].as_str());
    // The halted canary applies nothing on its next run (kept for inspection), and fails.
    let r = apply(&nodes[c], c);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("kept for inspection"), "{}", r.all());
    let j: serde_json::Value = serde_json::from_str(&nodes[other].agent(&["fleet", "status", "--json"]).stdout).unwrap();
    assert_eq!(j["groups"][0]["nodes"][&ids[c]]["status"], "held", "{j:#}");
    assert_eq!(j["groups"][0]["nodes"][&ids[c]]["bundle"]["sha256"], v2.as_str(), "{j:#}");
    // The others' next runs still converge the old bundle.
    let r = apply(&nodes[other], other);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[other].report()["bundle"]["sha256"], v1.as_str());

    // Abort: the canary goes back to its last-good bundle.
    let r = nodes[other].agent(&["rollout", "abort", &v2]);
    assert_eq!(r.code, 0, "{}", r.all());
    let r = apply(&nodes[c], c);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[c].report()["bundle"]["sha256"], v1.as_str(), "{:#}", nodes[c].report());
    assert_eq!(http_get(ports[c]), (200, "v1".into()));
    assert!(nodes[other].agent(&["rollout", "status"]).stdout.contains(&format!("{v2}  aborted")));

    // A fixed bundle reaches all three, one at a time, haproxy restarted once per node.
    lb_bundle(src.path(), &ports, 200, "v3");
    let v3 = publish(src.path(), out.path());
    let cursors: Vec<String> = nodes.iter().map(|n| n.journal_cursor()).collect();
    let runs: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes.iter().enumerate().map(|(i, n)| s.spawn(move || apply(n, i))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut spans = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(runs[i].code, 0, "{}", runs[i].all());
        let rep = n.report();
        assert_eq!(rep["bundle"]["sha256"], v3.as_str(), "{rep:#}");
        assert_eq!(rep["rollout"]["state"], "healthy", "{rep:#}");
        assert_eq!(http_get(ports[i]), (200, "v3".into()));
        assert_eq!(starts(n, &cursors[i]), 1, "haproxy restarted once on node {i}");
        spans.push((secs(&rep["rollout"]["applied_at"]), secs(&rep["rollout"]["healthy_at"]), i));
    }
    spans.sort_by(|a, b| a.partial_cmp(b).unwrap());
    eprintln!("applied..healthy per node (s): {spans:?}");
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "two nodes applied the bundle at once: {spans:?}");
    }
    for (i, n) in nodes.iter().enumerate() {
        let r = apply(n, i);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(n.report()["summary"]["changed"], 0, "{:#}", n.report());
        assert_eq!(n.report()["rollout"]["gate"], "Fetched");
    }
    let r = nodes[0].agent(&["rollout", "status"]);
    assert!(
        r.stdout.contains(&format!("{v3}  rolling  applied 3  healthy 3  failed 0  slots 0/1")),
        "{}",
        r.stdout
    );
    let r = nodes[0].agent(&["fleet", "status"]);
    let mut sorted = ids.clone();
    sorted.sort();
    assert!(
        r.stdout.contains(&format!("  {:<14} ok           3  {}", &v3[..12], sorted.join(" "))),
        "{}",
        r.stdout
    );
}

/// `on_failure = "rollback"`: the canary that fails its health check halts the bundle and
/// re-applies its last-good bundle in the same run; its later runs converge last-good.
#[test]
fn on_failure_rollback_puts_the_canary_back_in_the_same_run() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let nodes: Vec<Node> = (0..2).map(|_| Node::boot_host_net(out.path())).collect();
    for n in &nodes {
        n.write_config(&format!(
            "[rollout]\nstrategy = \"canary\"\non_failure = \"rollback\"\n\
             [[rollout.health]]\ncommand = [\"grep\", \"-qxv\", \"bad\", \"/etc/web.conf\"]\n\
             [reboot.etcd]\nendpoints = [\"{}\"]\n",
            etcd.endpoints()[0]
        ));
        assert_eq!(apply_web(n).code, 0);
    }
    web_bundle(src.path(), "bad");
    let bad = publish_web(src.path(), out.path());
    let r = apply_web(&nodes[0]);
    assert_eq!(r.code, 1, "{}", r.all());
    let rep = nodes[0].report();
    assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
    assert_eq!(rep["rollout"]["rolled_back"], true, "{rep:#}");
    assert!(rep["error"].as_str().unwrap().contains("rolled back to the last-good bundle"), "{rep:#}");
    assert_eq!(std::fs::read_to_string(nodes[0].merged.join("etc/web.conf")).unwrap(), "v1\n");
    let st = nodes[1].agent(&["rollout", "status", "--group", "production-web"]).stdout;
    assert!(st.contains(&format!("{bad}  halted  applied 1  healthy 0  failed 1")), "{st}");
    assert!(st.contains(&format!("halted by {} at ", nodes[0].machine_id())) && st.contains("grep"), "{st}");
    for n in &nodes {
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(n.report()["bundle"]["sha256"], v1.as_str());
        assert_eq!(n.report()["summary"]["changed"], 0);
    }
    // The canary that halted the bundle keeps its slot (rollout status names it; on resume it
    // tries again first), also after its later runs.
    assert_eq!(
        status_of(&etcd, "production-web", &bad).holders,
        std::slice::from_ref(&nodes[0].machine_id()),
        "the canary gave back the slot of the bundle it halted"
    );
}

/// The `web` role: one file, whose content names the bundle.
pub fn web_bundle(dir: &Path, version: &str) {
    std::fs::create_dir_all(dir.join("roles/web")).unwrap();
    std::fs::write(
        dir.join("roles/web/role.toml"),
        format!("schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"{version}\\n\"\n"),
    )
    .unwrap();
}

pub fn publish_web(src: &Path, out: &Path) -> String {
    let tmp = out.join(".web.tar.gz.new");
    let r = agent(&["bundle", "build", src.to_str().unwrap(), "-o", tmp.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let bytes = std::fs::read(&tmp).unwrap();
    std::fs::rename(&tmp, out.join("web.tar.gz")).unwrap();
    let _ = std::fs::remove_file(out.join(".web.tar.gz.new.sha256"));
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&bytes))
}

pub fn apply_web(n: &Node) -> Run {
    n.agent(&["apply", "--source", "/srv/bundle/web.tar.gz", "--name", "production-web"])
}

/// Show 2: etcd down while a new bundle is out: no node applies it, the old one still
/// corrects drift; etcd back, the new bundle goes out.
#[test]
fn with_etcd_down_no_node_applies_a_new_bundle_and_drift_is_still_corrected() {
    let mut etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let nodes: Vec<Node> = (0..2).map(|_| Node::boot_host_net(out.path())).collect();
    for n in &nodes {
        n.write_config(&format!(
            "[rollout]\nstrategy = \"canary\"\n[[rollout.health]]\ncommand = [\"true\"]\n[reboot.etcd]\nendpoints = [\"{}\"]\n",
            etcd.endpoints()[0]
        ));
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    web_bundle(src.path(), "v2");
    let v2 = publish_web(src.path(), out.path());
    etcd.kill(0);
    for n in &nodes {
        std::fs::write(n.merged.join("etc/web.conf"), "drifted\n").unwrap();
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
        let rep = n.report();
        assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
        assert_eq!(rep["rollout"]["state"], "etcd unavailable", "{rep:#}");
        assert_eq!(
            std::fs::read_to_string(n.merged.join("etc/web.conf")).unwrap(),
            "v1\n",
            "drift corrected to the old bundle"
        );
    }
    etcd.restart(0);
    for n in &nodes {
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(n.report()["bundle"]["sha256"], v2.as_str(), "{:#}", n.report());
        assert_eq!(std::fs::read_to_string(n.merged.join("etc/web.conf")).unwrap(), "v2\n");
    }
}

/// The protocol's keys against a real etcd, without nodes: the canary's slot, waiters that
/// leave when the bundle is halted (the semaphore closes), the halt record, resume (slots for
/// the phase), the canaries healthy growing the semaphore to `batch`, abort (not resumable).
#[test]
fn halt_closes_the_queue_resume_reopens_it_and_abort_is_final() {
    use bootstrap::reboot::etcd::Waited;
    use bootstrap::rollout::etcd::{Halt, Rollouts};
    use std::time::{Duration, Instant};
    let etcd = Etcd::start(1);
    let r = Rollouts::from_lock(etcd.lock("production-x"));
    let sha = "ab".repeat(32);
    let soon = || Instant::now() + Duration::from_secs(60);
    assert_eq!(r.wait_slot(&sha, "n1", 1, soon()).unwrap(), Waited::Acquired);
    let waiters: Vec<_> = ["n2", "n3"]
        .iter()
        .map(|id| {
            let (r, sha) = (r.clone(), sha.clone());
            std::thread::spawn(move || r.wait_slot(&sha, id, 1, Instant::now() + Duration::from_secs(60)).unwrap())
        })
        .collect();
    let start = Instant::now();
    while r.semaphore(&sha).backlog(10).unwrap().waiting < 2 {
        assert!(start.elapsed() < Duration::from_secs(30), "the waiters never queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = r.view(&sha, Some("old"), "n1").unwrap();
    assert!(v.held && v.halted_by.is_none() && !v.aborted, "{v:?}");
    let h = Halt {
        node: "n1".into(),
        step: None,
        check: Some("GET http://127.0.0.1/: HTTP 503".into()),
        reason: "health check failed".into(),
        at: "t".into(),
    };
    r.halt(&sha, &h).unwrap();
    for w in waiters {
        assert_eq!(w.join().unwrap(), Waited::Closed, "a waiter of a halted bundle leaves the queue");
    }
    assert_eq!(r.semaphore(&sha).backlog(10).unwrap().waiting, 0);
    assert_eq!(r.view(&sha, Some("old"), "n2").unwrap().halted_by.as_deref(), Some("n1"));
    // A second failure does not replace the first halt record.
    r.halt(
        &sha,
        &Halt {
            node: "n9".into(),
            ..h.clone()
        },
    )
    .unwrap();
    let st = r.status().unwrap();
    assert_eq!(st.len(), 1);
    assert_eq!(
        (st[0].state.as_str(), st[0].slots, st[0].holders.clone()),
        ("halted", 0, vec!["n1".to_string()])
    );
    assert_eq!(st[0].halt.as_ref().unwrap(), &h);
    assert_eq!(st[0].failed, ["n1", "n9"]);
    assert!(st[0].applied.is_empty());
    // A node that got its slot just before the halt cannot start: the start transaction fails.
    assert!(!r.start_applying(&sha, "n1").unwrap(), "started a halted bundle");
    // A node arriving now is told so at once.
    assert_eq!(r.wait_slot(&sha, "n4", 1, soon()).unwrap(), Waited::Closed);

    // Resume: canary slots again (no node healthy yet); the halted canary still holds its slot.
    assert_eq!(r.resume(&sha, 1, 2).unwrap(), 1);
    assert_eq!(
        r.view(&sha, Some("old"), "n1").unwrap(),
        bootstrap::rollout::View {
            held: true,
            ..Default::default()
        }
    );
    assert!(r.start_applying(&sha, "n1").unwrap());
    // The canary healthy: the semaphore grows to the batch, its slot goes back.
    r.healthy(&sha, "n1", 1, 2).unwrap();
    let (s, _) = r.semaphore(&sha).get().unwrap().unwrap();
    assert_eq!((s.total_slots, s.holders.len()), (2, 0));
    assert_eq!(r.status().unwrap()[0].state, "rolling");
    assert_eq!(r.wait_slot(&sha, "n2", 1, soon()).unwrap(), Waited::Acquired);
    assert_eq!(r.wait_slot(&sha, "n3", 1, soon()).unwrap(), Waited::Acquired);

    // Abort: final; and a node whose last-good it was learns it from its gate read.
    r.abort(&sha, "operator").unwrap();
    assert!(!r.start_applying(&sha, "n2").unwrap(), "started an aborted bundle");
    assert!(r.view(&sha, Some("old"), "n2").unwrap().aborted);
    assert!(r.view("cd".repeat(32).as_str(), Some(&sha), "n2").unwrap().last_good_aborted);
    let e = r.resume(&sha, 1, 2).unwrap_err().to_string();
    assert!(e.contains("aborted"), "{e}");
    assert_eq!(r.status().unwrap()[0].state, "aborted");
}

/// A halt record goes to the group's etcd, which every node and `rollout status` read: a secret
/// in the failed run's error (a command's output, say) is redacted before it is written, in the
/// halt record and in the node's `failed/` record.
#[test]
fn a_secret_in_the_halt_reason_never_reaches_etcd() {
    use bootstrap::rollout::etcd::{Halt, Rollouts};
    let etcd = Etcd::start(1);
    let r = Rollouts::from_lock(etcd.lock("production-y"));
    let sha = "cd".repeat(32);
    let secret = "hunter2-rollout-secret-value";
    bootstrap::secrets::register(secret);
    let h = Halt {
        node: "n1".into(),
        step: Some("exec:deploy".into()),
        check: Some(format!("command `check --token {secret}` exited 1")),
        reason: format!("run failed: step exec:deploy: {secret} rejected"),
        at: "t".into(),
    };
    r.halt(&sha, &h).unwrap();
    let status = r.status().unwrap();
    let s = status.iter().find(|s| s.sha256 == sha).expect("the halted rollout is listed");
    let shown = serde_json::to_string(s).unwrap();
    assert!(shown.contains("rejected") && shown.contains("check --token"), "{shown}");
    assert!(!shown.contains(secret), "{shown}");
    let raw = etcd.ctl(&["get", "", "--prefix"]);
    assert!(raw.contains("run failed: step exec:deploy"), "the halt is in etcd: {raw}");
    assert!(!raw.contains(secret), "{raw}");
}

/// Old rollouts do not pile up in etcd: when the canaries of a new rollout become healthy, the
/// group's finished rollouts whose newest record is older than `PRUNE_AFTER` are deleted, and
/// nothing else: not a halted or aborted bundle (they keep a bad bundle from going out again),
/// not one whose slot is held or that has a node queued, not the bundle a reporting node runs,
/// not a recent one.
#[test]
fn finished_rollouts_older_than_a_week_are_deleted_and_nothing_else() {
    use bootstrap::reboot::etcd::Waited;
    use bootstrap::rollout::etcd::{Halt, Rollouts};
    use std::time::{Duration, Instant};
    let etcd = Etcd::start(1);
    let r = Rollouts::from_lock(etcd.lock("production-z"));
    let soon = || Instant::now() + Duration::from_secs(30);
    let old = serde_json::json!({ "at": "2026-01-01T00:00:00Z" }).to_string();
    // A rollout of `sha` finished by n1, its records dated `at`; with 2 canaries (n1 alone is
    // not the canaries becoming healthy: these releases delete nothing).
    let done = |sha: &str, at: Option<&str>| {
        assert_eq!(r.wait_slot(sha, "n1", 1, soon()).unwrap(), Waited::Acquired);
        assert!(r.start_applying(sha, "n1").unwrap());
        r.healthy(sha, "n1", 2, 2).unwrap();
        if let Some(at) = at {
            for k in ["applied", "healthy"] {
                etcd.ctl(&["put", &format!("{}/{k}/n1", r.dir(sha)), at]);
            }
        }
    };
    let sha = |c: char| c.to_string().repeat(64);
    let (a, b, c, d, e, q, f, g) = (sha('a'), sha('b'), sha('c'), sha('d'), sha('e'), sha('9'), sha('f'), sha('1'));
    done(&a, Some(&old));
    // Halted long ago by n1.
    assert_eq!(r.wait_slot(&b, "n1", 1, soon()).unwrap(), Waited::Acquired);
    r.halt(
        &b,
        &Halt {
            node: "n1".into(),
            reason: "health check failed".into(),
            at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        },
    )
    .unwrap();
    assert!(r.give_back(&b, "n1").unwrap());
    done(&c, Some(&old));
    r.abort(&c, "operator").unwrap();
    etcd.ctl(&["put", &format!("{}/abort", r.dir(&c)), &old]);
    // Old, but a reporting node runs it.
    done(&d, Some(&old));
    let node = serde_json::json!({ "name": "n9", "bundle": { "sha256": d, "origin": "s3" }, "status": "ok" }).to_string();
    etcd.ctl(&["put", &format!("{}/nodes/n9", etcd.lock("production-z").base()), &node]);
    // Old, but a node holds a slot of it (say it was granted one and went quiet).
    done(&e, Some(&old));
    assert_eq!(r.wait_slot(&e, "n2", 1, soon()).unwrap(), Waited::Acquired);
    // Old, but a node is queued for it.
    done(&q, Some(&old));
    etcd.ctl(&["put", &format!("{}/queue/n3", r.dir(&q)), "n3"]);
    // Finished recently.
    done(&f, None);
    let listed = |r: &Rollouts| -> Vec<String> { r.status().unwrap().into_iter().map(|s| s.sha256).collect() };
    assert_eq!(listed(&r).len(), 7);

    // A new rollout (canary = 1): its canary's release deletes `a`, only.
    assert_eq!(r.wait_slot(&g, "n1", 1, soon()).unwrap(), Waited::Acquired);
    assert!(r.start_applying(&g, "n1").unwrap());
    r.healthy(&g, "n1", 1, 2).unwrap();
    let mut want = vec![b.clone(), c.clone(), d.clone(), e.clone(), q.clone(), f.clone(), g.clone()];
    want.sort();
    assert_eq!(listed(&r), want, "only the old finished rollout is deleted");
    let left = etcd.ctl(&["get", &r.dir(&a), "--prefix", "--keys-only"]);
    assert!(left.trim().is_empty(), "records of {a} left: {left}");
    // The kept ones are whole: the halt still stops the bad bundle, the abort too.
    assert_eq!(r.wait_slot(&b, "n4", 1, soon()).unwrap(), Waited::Closed);
    assert!(r.view(&c, None, "n4").unwrap().aborted);
    assert_eq!(r.status().unwrap().iter().find(|s| s.sha256 == e).unwrap().holders, ["n2"]);
    // A deleted rollout of a bundle fetched again starts over, canary first.
    assert_eq!(r.wait_slot(&a, "n5", 1, soon()).unwrap(), Waited::Acquired);
    let (s, _) = r.semaphore(&a).get().unwrap().unwrap();
    assert_eq!((s.total_slots, s.holders), (1, vec!["n5".to_string()]));
}

/// The `web` role with `extra` appended (more steps, or broken TOML).
fn web_role(dir: &Path, version: &str, extra: &str) {
    web_bundle(dir, version);
    let role = dir.join("roles/web/role.toml");
    let text = std::fs::read_to_string(&role).unwrap();
    std::fs::write(role, format!("{text}{extra}")).unwrap();
}

/// `src/roles` packed into `<out>/web.tar.gz` as is, without `bundle build`'s checks: how a
/// role file that does not parse gets into a bundle (another builder, a hand-made tarball).
pub fn publish_unchecked(src: &Path, out: &Path) -> String {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    tar.mode(tar::HeaderMode::Deterministic);
    tar.append_dir_all("roles", src.join("roles")).unwrap();
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    let tmp = out.join(".web.tar.gz.new");
    std::fs::write(&tmp, &bytes).unwrap();
    std::fs::rename(&tmp, out.join("web.tar.gz")).unwrap();
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(&bytes))
}

fn canary_config(etcd: &Etcd, extra: &str) -> String {
    format!(
        "[rollout]\nstrategy = \"canary\"\ncanary = 1\nbatch = 1\nwait = \"20s\"\n\
         [[rollout.health]]\ncommand = [\"true\"]\n{extra}[reboot.etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoints()[0]
    )
}

fn status_of(etcd: &Etcd, group: &str, sha: &str) -> bootstrap::rollout::etcd::Status {
    let st = bootstrap::rollout::etcd::Rollouts::from_lock(etcd.lock(group)).status().unwrap();
    st.into_iter()
        .find(|s| s.sha256 == sha)
        .unwrap_or_else(|| panic!("no rollout of {sha} in etcd"))
}

/// A bundle that does not even load under the slot (its role file does not parse) is a failed
/// run like any other: the canary records the halt naming the file and the slot stays named
/// for inspection; the others leave the queue and keep converging their last-good bundle;
/// `rollout abort` puts the canary back.
#[test]
fn a_bundle_that_fails_to_load_under_the_slot_halts_the_rollout() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let nodes: Vec<Node> = (0..3).map(|_| Node::boot_host_net(out.path())).collect();
    for n in &nodes {
        n.write_config(&canary_config(&etcd, ""));
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.machine_id()).collect();
    web_role(src.path(), "v2", "[[step]]\nkind = \"file\"\npath = \n");
    let bad = publish_unchecked(src.path(), out.path());
    let runs: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = nodes.iter().map(|n| s.spawn(move || apply_web(n))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let failed: Vec<usize> = (0..3).filter(|&i| runs[i].code != 0).collect();
    assert_eq!(
        failed.len(),
        1,
        "exactly one node took the bundle: {:#?}",
        runs.iter().map(Run::all).collect::<Vec<_>>()
    );
    let c = failed[0];
    let out_c = runs[c].all();
    assert!(out_c.contains("roles/web/role.toml") && out_c.contains("halted for the group"), "{out_c}");
    let st = status_of(&etcd, "production-web", &bad);
    assert_eq!(st.state, "halted", "{st:#?}");
    let h = st.halt.clone().unwrap();
    assert_eq!(h.node, ids[c]);
    assert!(h.reason.contains("roles/web/role.toml"), "the reason names the file: {h:#?}");
    assert_eq!(
        (st.applied.clone(), st.failed.clone(), st.holders.clone()),
        (vec![ids[c].clone()], vec![ids[c].clone()], vec![ids[c].clone()])
    );
    let shown = nodes[(c + 1) % 3].agent(&["rollout", "status", "--group", "production-web"]).stdout;
    assert!(
        shown.contains(&format!("{bad}  halted  applied 1  healthy 0  failed 1")) && shown.contains("role.toml"),
        "{shown}"
    );
    for i in (0..3).filter(|&i| i != c) {
        let rep = nodes[i].report();
        assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
        assert_eq!(rep["rollout"]["state"], "halted", "{rep:#}");
        std::fs::write(nodes[i].merged.join("etc/web.conf"), "drifted\n").unwrap();
        let r = apply_web(&nodes[i]);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(nodes[i].report()["bundle"]["sha256"], v1.as_str());
        assert_eq!(
            std::fs::read_to_string(nodes[i].merged.join("etc/web.conf")).unwrap(),
            "v1\n",
            "still converging"
        );
    }
    // The canary keeps it for inspection (on_failure = "halt"), until the operator aborts it.
    let r = apply_web(&nodes[c]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("kept for inspection"), "{}", r.all());
    let r = nodes[c].agent(&["rollout", "abort", &bad, "--group", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let r = apply_web(&nodes[c]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[c].report()["bundle"]["sha256"], v1.as_str());
    assert_eq!(std::fs::read_to_string(nodes[c].merged.join("etc/web.conf")).unwrap(), "v1\n");
}

/// A new bundle whose apply reboots the node (a `reboot_required` step, reboot slot taken):
/// the rollout slot is kept across the reboot and the bundle is not marked good before it, so
/// the next node does not start while this one is down; the run after the reboot checks
/// health and releases the slot.
#[test]
fn a_bundle_that_reboots_the_node_keeps_its_slot_across_the_reboot() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let mut nodes: Vec<Node> = (0..2).map(|_| Node::boot_host_net(out.path())).collect();
    for n in &nodes {
        // Reboots coordinated by etcd too, with room for both nodes: only the rollout slot
        // keeps them apart.
        n.write_config(
            &canary_config(&etcd, "[reboot]\nstrategy = \"etcd\"\n")
                .replace("wait = \"20s\"", "wait = \"3s\"")
                .replace("[reboot.etcd]\nendpoints", "[reboot.etcd]\nslots = 2\nendpoints"),
        );
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.machine_id()).collect();
    web_role(src.path(), "v2", "");
    let role = src.path().join("roles/web/role.toml");
    let text = std::fs::read_to_string(&role).unwrap();
    std::fs::write(&role, format!("{text}reboot_required = true\n")).unwrap();
    let v2 = publish_web(src.path(), out.path());
    let last_good = |n: &Node| {
        std::fs::read_link(n.merged.join("var/lib/bootstrap/bundles/last-good"))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };

    // The canary applies it and reboots, its rollout slot held, the bundle not yet good.
    let _ = apply_web(&nodes[0]);
    assert_eq!(nodes[0].wait_exit(std::time::Duration::from_secs(60)), 133, "the canary did not reboot");
    let st = status_of(&etcd, "production-web", &v2);
    assert_eq!(st.holders, [ids[0].clone()], "the slot is kept across the reboot: {st:#?}");
    assert!(st.healthy.is_empty(), "not healthy before the reboot: {st:#?}");
    assert_eq!(last_good(&nodes[0]), v1, "not marked good before the reboot");

    // Meanwhile the other node gets no slot: it stays on the old bundle.
    let r = apply_web(&nodes[1]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = nodes[1].report();
    assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
    assert_eq!(rep["rollout"]["state"], "waiting", "{rep:#}");

    // Back: the run of the new boot checks health, marks it good and releases the slot.
    nodes[0].boot_again();
    let rep = nodes[0].report();
    assert_eq!(rep["rollout"]["state"], "rebooting", "the run before the reboot: {rep:#}");
    let r = apply_web(&nodes[0]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = nodes[0].report();
    assert_eq!(
        (rep["rollout"]["gate"].as_str(), rep["rollout"]["state"].as_str()),
        (Some("Held"), Some("healthy")),
        "{rep:#}"
    );
    assert_eq!(rep["bundle"]["sha256"], v2.as_str());
    assert_eq!(last_good(&nodes[0]), v2);
    let st = status_of(&etcd, "production-web", &v2);
    assert!(st.holders.is_empty() && st.healthy == [ids[0].clone()], "{st:#?}");

    // Now the other node takes the slot, and it too keeps it across its reboot.
    let _ = apply_web(&nodes[1]);
    assert_eq!(nodes[1].wait_exit(std::time::Duration::from_secs(60)), 133, "the second node did not reboot");
    assert_eq!(status_of(&etcd, "production-web", &v2).holders, [ids[1].clone()]);
    nodes[1].boot_again();
    let r = apply_web(&nodes[1]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[1].report()["rollout"]["state"], "healthy");
    let st = status_of(&etcd, "production-web", &v2);
    assert_eq!((st.holders.len(), st.healthy.len()), (0, 2), "{st:#?}");
}

/// A new instance (no last-good bundle) applies the fetched bundle without a slot; when that
/// bundle is in flight in its group (the other nodes still run another one) and the run
/// fails, it halts the bundle like a slot holder would: the fleet stops it, and `rollout
/// status` names the new instance and its step.
#[test]
fn a_new_instance_that_fails_a_bundle_in_flight_halts_it() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let nodes: Vec<Node> = (0..2).map(|_| Node::boot_host_net(out.path())).collect();
    for n in &nodes {
        n.write_config(&canary_config(&etcd, ""));
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    // A bad bundle is published; before the old node's timer fires, the group scales out.
    web_role(
        src.path(),
        "v2",
        "[[step]]\nid = \"migrate\"\nkind = \"exec\"\ncommand = [\"false\"]\ncreates = \"/nonexistent\"\n",
    );
    let bad = publish_web(src.path(), out.path());
    let new = Node::boot_host_net(out.path());
    new.write_config(&canary_config(&etcd, ""));
    let r = apply_web(&new);
    assert_eq!(r.code, 1, "{}", r.all());
    let rep = new.report();
    assert_eq!(rep["rollout"]["gate"], "Fetched", "{rep:#}");
    assert_eq!(rep["rollout"]["state"], "halted_here", "{rep:#}");
    assert!(rep["error"].as_str().unwrap().contains("halted for the group"), "{rep:#}");
    let st = status_of(&etcd, "production-web", &bad);
    assert_eq!(st.state, "halted", "{st:#?}");
    let h = st.halt.clone().unwrap();
    assert_eq!((h.node.as_str(), h.step.as_deref()), (new.machine_id().as_str(), Some("migrate")), "{h:#?}");
    let shown = nodes[0].agent(&["rollout", "status", "--group", "production-web"]).stdout;
    assert!(shown.contains(&format!("{bad}  halted")) && shown.contains("migrate"), "{shown}");
    // The old nodes never apply it.
    for n in &nodes {
        let r = apply_web(n);
        assert_eq!(r.code, 0, "{}", r.all());
        let rep = n.report();
        assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
        assert_eq!(rep["rollout"]["state"], "halted", "{rep:#}");
    }
    assert!(status_of(&etcd, "production-web", &bad).applied.is_empty());
}

/// `rollout abort` of a node's last-good bundle sends it back to the good bundle before it
/// (rollout.json `previous`): that bundle stays in the cache however many newer bundles were
/// fetched (and halted or aborted) since, so the fallback can load it.
#[test]
fn the_previous_good_bundle_survives_cache_pruning() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let node = Node::boot_host_net(out.path());
    node.write_config(&canary_config(&etcd, ""));
    let rollouts = bootstrap::rollout::etcd::Rollouts::from_lock(etcd.lock("production-web"));
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    assert_eq!(apply_web(&node).code, 0);
    web_bundle(src.path(), "v2");
    let v2 = publish_web(src.path(), out.path());
    let r = apply_web(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["rollout"]["state"], "healthy", "{:#}", node.report());
    // More bundles than the cache keeps besides current and last-good, each aborted before
    // the node got to it (fetched and cached, never applied).
    let mut bad = String::new();
    for i in 3..(3 + bootstrap::source::KEEP_OLDER + 1) {
        web_bundle(src.path(), &format!("v{i}"));
        bad = publish_web(src.path(), out.path());
        rollouts.abort(&bad, "test").unwrap();
        let r = apply_web(&node);
        assert_eq!(r.code, 0, "{}", r.all());
        assert_eq!(node.report()["bundle"]["sha256"], v2.as_str(), "{:#}", node.report());
    }
    // v2 turns out bad too: the node goes back to v1.
    rollouts.abort(&v2, "test").unwrap();
    let r = apply_web(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
    assert_eq!(rep["bundle"]["origin"], "previous-good", "{rep:#}");
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/web.conf")).unwrap(), "v1\n");
    assert!(!bad.is_empty());
}

/// A node granted a slot of a bundle that another node then halted (or an operator aborted)
/// gives the slot back when its run falls back to last-good: a slot kept by a node that will
/// not apply the bundle would be listed as in use by `rollout status`, hold back
/// `[asg] unhealthy_after` on that node for good, and take a place of the batch on resume.
#[test]
fn a_slot_of_a_bundle_halted_elsewhere_is_given_back_by_the_fallback() {
    use bootstrap::rollout::etcd::{Halt, Rollouts};
    use std::time::{Duration, Instant};
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    publish_web(src.path(), out.path());
    let n = Node::boot_host_net(out.path());
    n.write_config(&canary_config(&etcd, ""));
    let r = apply_web(&n);
    assert_eq!(r.code, 0, "{}", r.all());
    web_bundle(src.path(), "v2");
    let v2 = publish_web(src.path(), out.path());
    // Granted while it waited (its run was killed then), and halted by another node since.
    let me = n.machine_id();
    let rollouts = Rollouts::from_lock(etcd.lock("production-web"));
    assert_eq!(
        rollouts.wait_slot(&v2, &me, 1, Instant::now() + Duration::from_secs(30)).unwrap(),
        bootstrap::reboot::etcd::Waited::Acquired
    );
    let h = Halt {
        node: "another-node".into(),
        step: None,
        check: Some("GET http://127.0.0.1/: HTTP 503".into()),
        reason: "health check failed".into(),
        at: "t".into(),
    };
    rollouts.halt(&v2, &h).unwrap();
    assert_eq!(status_of(&etcd, "production-web", &v2).holders, std::slice::from_ref(&me));

    let r = apply_web(&n);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(n.report()["rollout"]["state"], "halted", "{:#}", n.report());
    assert_eq!(std::fs::read_to_string(n.merged.join("etc/web.conf")).unwrap(), "v1\n");
    let st = status_of(&etcd, "production-web", &v2);
    assert!(st.holders.is_empty(), "the fallback kept the slot of the halted bundle: {st:#?}");
    assert!(rollouts.held_by(&me).unwrap().is_empty());
    // Again: nothing changes.
    let r = apply_web(&n);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(n.report()["summary"]["changed"], 0);
}

/// Slots of nodes that will never give them back: `rollout reap` gives back the slots of
/// holders whose EC2 instance is terminated or unknown (as `lock reap` does for reboot slots;
/// other ids are kept), and `rollout release HOLDER` gives back one holder's slots by hand.
#[test]
fn rollout_reap_and_release_give_back_the_slots_of_dead_holders() {
    use bootstrap::rollout::etcd::Rollouts;
    use std::time::{Duration, Instant};
    let etcd = Etcd::start(1);
    let moto = crate::harness::moto::Moto::start();
    let live = moto.run_instance(&[("Name", "production-web")]);
    let dead = moto.run_instance(&[("Name", "production-web")]);
    moto.terminate(&dead);
    let r = Rollouts::from_lock(etcd.lock("production-web"));
    let (a, b) = ("aa".repeat(32), "bb".repeat(32));
    let soon = || Instant::now() + Duration::from_secs(30);
    for (sha, holder) in [(&a, dead.as_str()), (&a, live.as_str()), (&b, "i-0000000000000dead"), (&b, "machine-abc")] {
        assert_eq!(r.wait_slot(sha, holder, 4, soon()).unwrap(), bootstrap::reboot::etcd::Waited::Acquired);
    }
    let out = tempfile::tempdir().unwrap();
    let node = Node::boot_host_net(out.path());
    node.write_config(&format!(
        "[reboot.etcd]\nendpoints = [\"{}\"]\n[aws]\nec2_endpoint = \"{}\"\n",
        etcd.endpoints()[0],
        moto.url
    ));
    let env = "AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true";
    let run = node.sh(&format!("{env} bootstrap rollout reap --group production-web"));
    assert_eq!(run.code, 0, "{}", run.all());
    for line in [
        format!("removed {dead} from bundle {a}: instance terminated or unknown"),
        format!("removed i-0000000000000dead from bundle {b}: instance terminated or unknown"),
        format!("kept {live}: instance exists"),
        "kept machine-abc: not an EC2 instance id".to_string(),
    ] {
        assert!(run.stdout.contains(&line), "no {line:?} in:\n{}", run.all());
    }
    let holders = |sha: &str| status_of(&etcd, "production-web", sha).holders;
    assert_eq!(holders(&a), std::slice::from_ref(&live));
    assert_eq!(holders(&b), ["machine-abc"]);
    // Again: nothing left to reap.
    let again = node.sh(&format!("{env} bootstrap rollout reap --group production-web"));
    assert!(!again.stdout.contains("removed"), "{}", again.all());

    let run = node.sh("bootstrap rollout release machine-abc --group production-web");
    assert_eq!(run.code, 0, "{}", run.all());
    assert!(run.stdout.contains(&format!("machine-abc: slot of bundle {b} given back")), "{}", run.all());
    assert!(holders(&b).is_empty());
    let run = node.sh("bootstrap rollout release machine-abc --group production-web");
    assert!(run.stdout.contains("machine-abc holds no rollout slot"), "{}", run.all());
    assert_eq!(holders(&a), [live]);
}

/// A node that kept a slot of a bundle (here: it halted it with `on_failure = "halt"`, kept
/// for inspection) gives that slot back once the group moves on to another bundle without an
/// abort: the node leaves the old bundle, and a slot kept for good would hold back
/// `[asg] unhealthy_after` on it and read as in use in `rollout status`.
#[test]
fn a_slot_of_a_bundle_the_group_moved_on_from_is_given_back() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    publish_web(src.path(), out.path());
    let n = Node::boot_host_net(out.path());
    n.write_config(&canary_config(&etcd, "").replace(
        "[[rollout.health]]\ncommand = [\"true\"]\n",
        "[[rollout.health]]\ncommand = [\"grep\", \"-qxv\", \"bad\", \"/etc/web.conf\"]\n",
    ));
    assert_eq!(apply_web(&n).code, 0);
    web_bundle(src.path(), "bad");
    let bad = publish_web(src.path(), out.path());
    let r = apply_web(&n);
    assert_eq!(r.code, 1, "{}", r.all());
    let me = n.machine_id();
    assert_eq!(
        status_of(&etcd, "production-web", &bad).holders,
        std::slice::from_ref(&me),
        "kept for inspection"
    );

    // A fixed bundle, no abort: the node leaves the bad one (and takes the new one's slot).
    web_bundle(src.path(), "v3");
    let v3 = publish_web(src.path(), out.path());
    let r = apply_web(&n);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(n.report()["bundle"]["sha256"], v3.as_str(), "{:#}", n.report());
    let st = status_of(&etcd, "production-web", &bad);
    assert!(st.holders.is_empty(), "the slot of the bundle left behind is still held: {st:#?}");
    assert!(bootstrap::rollout::etcd::Rollouts::from_lock(etcd.lock("production-web"))
        .held_by(&me)
        .unwrap()
        .is_empty());
}

/// A run that waited for a rollout slot without the run lock and gave up does not overwrite
/// what a run that started and finished during its wait reported (`last-run.json`, the fleet
/// record): the newer run's report stands.
#[test]
fn a_run_that_waited_for_a_slot_does_not_overwrite_a_newer_report() {
    use bootstrap::rollout::etcd::Rollouts;
    use std::time::{Duration, Instant};
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    publish_web(src.path(), out.path());
    let n = Node::boot_host_net(out.path());
    n.write_config(&canary_config(&etcd, "").replace("wait = \"20s\"", "wait = \"8s\""));
    assert_eq!(apply_web(&n).code, 0);
    web_bundle(src.path(), "v2");
    let v2 = publish_web(src.path(), out.path());
    let rollouts = Rollouts::from_lock(etcd.lock("production-web"));
    let soon = Instant::now() + Duration::from_secs(30);
    assert_eq!(rollouts.wait_slot(&v2, "other", 1, soon).unwrap(), bootstrap::reboot::etcd::Waited::Acquired);
    // The timer's run applies last-good (its report is written), then waits for the slot (8 s) ...
    let before = n.report()["started_at"].clone();
    let waiting = n.sh("systemd-run --unit=waiter bootstrap apply --source /srv/bundle/web.tar.gz --name production-web");
    assert_eq!(waiting.code, 0, "{}", waiting.all());
    let start = Instant::now();
    while n.report()["started_at"] == before {
        assert!(start.elapsed() < Duration::from_secs(30), "the waiting run never applied last-good");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    // ... while an operator applies a directory by hand.
    std::fs::create_dir_all(n.merged.join("srv/hand/roles/web")).unwrap();
    std::fs::write(n.merged.join("srv/hand/roles/web/role.toml"), "schema = 1\n").unwrap();
    let r = n.agent(&["apply", "--source", "/srv/hand", "--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(n.report()["source"], "/srv/hand");
    let start = Instant::now();
    while n.sh("systemctl is-active waiter").stdout.trim() == "active" {
        assert!(start.elapsed() < Duration::from_secs(60), "the waiting run never ended");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = n.sh("journalctl -u waiter -o cat --no-pager").stdout;
    assert!(log.contains("web:"), "the waiting run did not finish its run: {log}");
    assert_eq!(n.report()["source"], "/srv/hand", "the older run's report overwrote the newer one: {log}");
}

/// The drain's give-back finds a node's rollout slot however many rollout records the group has:
/// past the 100,000 keys one etcd range returns (a large fleet's week of rollouts), the slot
/// of a bundle whose keys sort last is still found and given back.
#[test]
fn held_slots_are_found_past_one_range_of_rollout_keys() {
    use bootstrap::reboot::etcd::Waited;
    use bootstrap::rollout::etcd::Rollouts;
    use std::time::{Duration, Instant};
    let etcd = Etcd::start(1);
    let lock = etcd.lock("production-web");
    let dir = format!("{}/rollout/", lock.base());
    let r = Rollouts::from_lock(lock);
    // 100,100 records of an old bundle whose sha256 sorts first, in transactions of 128 puts.
    let old = "0".repeat(64);
    let b64 = |s: &str| base64::Engine::encode(&base64::engine::general_purpose::STANDARD, s);
    let http = reqwest::blocking::Client::new();
    let url = format!("{}/v3/kv/txn", etcd.endpoints()[0]);
    let keys: Vec<String> = (0..100_100).map(|i| format!("{dir}{old}/applied/i-{i:08}")).collect();
    for chunk in keys.chunks(128) {
        let ops: Vec<serde_json::Value> = chunk
            .iter()
            .map(|k| serde_json::json!({ "request_put": { "key": b64(k), "value": b64("{}") } }))
            .collect();
        let resp = http.post(&url).json(&serde_json::json!({ "success": ops })).send().unwrap();
        assert!(resp.status().is_success(), "{:?}", resp.text());
    }
    let new = "f".repeat(64);
    assert_eq!(
        r.wait_slot(&new, "i-me", 1, Instant::now() + Duration::from_secs(30)).unwrap(),
        Waited::Acquired
    );
    let held: Vec<String> = r.held_by("i-me").unwrap().into_iter().map(|h| h.sha256).collect();
    assert_eq!(held, std::slice::from_ref(&new));
    assert_eq!(r.give_back_all("i-me").unwrap_or_else(|e| panic!("{e}")), [new]);
    assert!(r.held_by("i-me").unwrap().is_empty());
}
