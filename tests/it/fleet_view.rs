//! The fleet view: three booted nodes put their status records in one real etcd after every
//! run; `fleet status` shows them per bundle and status, and a node stopped for longer than
//! the records' TTL as not reporting.

use crate::harness::etcd::Etcd;
use crate::harness::node::Node;
use crate::rollouts::{apply_web, publish_web, web_bundle};
use std::time::{Duration, Instant};

fn fleet(n: &Node) -> serde_json::Value {
    let r = n.agent(&["fleet", "status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

#[test]
fn fleet_status_lists_nodes_per_bundle_and_the_ones_not_reporting() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let mut nodes: Vec<Node> = (0..3).map(|_| Node::boot_host_net(out.path())).collect();
    for n in &nodes {
        n.write_config(&format!(
            "[rollout]\nstrategy = \"canary\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n[report]\nttl = \"6s\"\n",
            etcd.endpoints()[0]
        ));
    }
    let ids: Vec<String> = nodes.iter().map(|n| n.machine_id()).collect();
    // Node 2 cannot converge: its /etc/web.conf is a directory.
    std::fs::create_dir_all(nodes[1].merged.join("etc/web.conf/x")).unwrap();
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(apply_web(n).code, if i == 1 { 1 } else { 0 });
    }

    let r = nodes[0].agent(&["fleet", "status"]);
    assert_eq!(r.code, 0, "{}", r.all());
    eprintln!("fleet status:\n{}", r.stdout);
    let short = &v1[..12];
    let mut ok = [ids[0].clone(), ids[2].clone()];
    ok.sort();
    assert!(r.stdout.contains("group production-web: 3 reporting, 0 not reporting"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("  {short:<14} ok           2  {}", ok.join(" "))), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("  {short:<14} failed       1  {}", ids[1])), "{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("  failed: {} (production-web) at step file:/etc/web.conf", ids[1])),
        "{}",
        r.stdout
    );

    let j = fleet(&nodes[0]);
    let g = &j["groups"][0];
    assert_eq!(g["group"], "production-web");
    assert_eq!(g["nodes"].as_object().unwrap().len(), 3, "{j:#}");
    let rec = &g["nodes"][&ids[0]];
    assert_eq!(rec["bundle"]["sha256"], v1.as_str());
    assert_eq!(rec["status"], "ok");
    assert_eq!(rec["name"], "production-web");
    assert_eq!(rec["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(g["nodes"][&ids[1]]["status"], "failed");
    assert_eq!(g["nodes"][&ids[1]]["failed_step"], "file:/etc/web.conf");
    assert_eq!(g["nodes"][&ids[1]]["failed"], 1);

    // Node 3 stops; the others keep running (their records are renewed by their runs).
    nodes[2].sh("systemctl poweroff");
    nodes[2].wait_exit(Duration::from_secs(60));
    std::fs::remove_dir_all(nodes[1].merged.join("etc/web.conf")).unwrap();
    let start = Instant::now();
    loop {
        for n in &nodes[..2] {
            assert_eq!(apply_web(n).code, 0);
        }
        let j = fleet(&nodes[0]);
        let g = &j["groups"][0];
        if g["not_reporting"].get(&ids[2]).is_some() {
            assert!(g["nodes"].get(&ids[2]).is_none(), "{j:#}");
            assert_eq!(g["nodes"][&ids[0]]["status"], "ok", "{j:#}");
            assert_eq!(g["nodes"][&ids[1]]["status"], "ok", "{j:#}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(90), "node 3 never listed as not reporting: {j:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
    let r = nodes[0].agent(&["fleet", "status", "--group", "production-web"]);
    eprintln!("fleet status:\n{}", r.stdout);
    assert!(
        r.stdout.contains(&format!("  not reporting: {} (production-web), last report ", ids[2])),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("2 reporting, 1 not reporting"), "{}", r.stdout);
}
