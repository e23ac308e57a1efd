//! The fleet view: three booted nodes put their status records in one real etcd after every
//! run; `fleet status` shows them per bundle and status, and a node stopped for longer than
//! the records' TTL as not reporting. Without etcd: a node puts its record in S3 (moto), and
//! `fleet status --source s3://…` reads the records there.

use crate::harness::etcd::Etcd;
use crate::harness::imds::ImdsServer;
use crate::harness::moto::{Moto, AWS_ENV};
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

/// An object under moto's bucket, raw (moto wants some Authorization header).
fn s3_get(moto: &Moto, path: &str) -> Option<Vec<u8>> {
    let r = reqwest::blocking::Client::new()
        .get(format!("{}/{path}", moto.url))
        .header("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request")
        .send()
        .unwrap();
    r.status().is_success().then(|| r.bytes().unwrap().to_vec())
}

/// The keys under `prefix` in `bucket` (ListObjectsV2, one page: the test makes a handful).
fn s3_keys(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let body = String::from_utf8(s3_get(moto, &format!("{bucket}?list-type=2&prefix={prefix}")).unwrap()).unwrap();
    body.split("<Key>").skip(1).map(|s| s.split("</Key>").next().unwrap().to_string()).collect()
}

/// The fleet view without etcd: a booted node puts its record at `[report] s3` in moto after
/// every run (a failed one too, never for `plan` or an image build under --root), overwriting
/// its one object; `fleet status --source s3://…` shows it, a record older than the staleness
/// limit as not reporting, and objects that are not records as unreadable.
#[test]
fn fleet_status_from_s3_records() {
    let moto = Moto::start();
    moto.put("fleet", vec![]);
    let imds = ImdsServer::start(ImdsServer::instance("production-web"));
    let id = "i-0123456789abcdef0"; // the instance id ImdsServer::instance gives
    let key = format!("nodes/production/web/{id}.json");
    let out = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    web_bundle(src.path(), "v1");
    let v1 = publish_web(src.path(), out.path());
    let config = format!(
        "[imds]\nbase_url = \"{}\"\n[report]\nttl = \"10m\"\ns3 = \"s3://fleet/nodes/${{env}}/${{service}}/${{instance_id}}.json\"\n\
         s3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\n",
        imds.addr, moto.url
    );
    let node = Node::boot_host_net(out.path());
    node.write_config(&config);
    let run = |verb: &str| node.agent_env(&[verb, "--source", "/srv/bundle/web.tar.gz"], &AWS_ENV);
    let record = || -> serde_json::Value {
        let b = s3_get(&moto, &format!("fleet/{key}")).expect("the node's record in S3");
        serde_json::from_slice(&b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b)))
    };

    // A failed run publishes too: /etc/web.conf is a directory.
    std::fs::create_dir_all(node.merged.join("etc/web.conf/x")).unwrap();
    let r = run("apply");
    assert_eq!(r.code, 1, "{}", r.all());
    let rec = record();
    assert_eq!(rec["status"], "failed", "{rec:#}");
    assert_eq!(rec["failed_step"], "file:/etc/web.conf", "{rec:#}");
    assert_eq!(rec["instance_id"], id);
    assert_eq!(rec["group"], "production-web");

    // Fixed: the next run overwrites the same key; a third changes nothing and overwrites it
    // again. One object for the node, whatever the runs.
    std::fs::remove_dir_all(node.merged.join("etc/web.conf")).unwrap();
    let r = run("apply");
    assert_eq!(r.code, 0, "{}", r.all());
    let first = record();
    assert_eq!(first["status"], "ok", "{first:#}");
    assert_eq!(first["changed"], 1, "{first:#}");
    let r = run("apply");
    assert_eq!(r.code, 0, "{}", r.all());
    let second = record();
    assert_eq!((second["status"].as_str(), second["changed"].as_u64()), (Some("ok"), Some(0)), "{second:#}");
    assert!(second["at"].as_str() > first["at"].as_str(), "{first:#} {second:#}");
    assert_eq!(s3_keys(&moto, "fleet", "nodes/"), vec![key.as_str()]);
    assert_eq!(moto.requests(&format!("PUT /fleet/{key}")).len(), 3);

    // `plan` never publishes.
    let r = run("plan");
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(moto.requests(&format!("PUT /fleet/{key}")).len(), 3);

    // Another node's record from two hours ago (stale with a TTL of 10m), an object that is
    // not JSON, one too large to be a record.
    let old = humantime::format_rfc3339(std::time::SystemTime::now() - Duration::from_secs(2 * 3600)).to_string();
    let stale = serde_json::json!({
        "name": "production-web", "instance_id": "i-0stale", "bundle": { "sha256": v1, "origin": "cache" },
        "status": "ok", "changed": 0, "failed": 0, "failed_step": null, "at": old,
        "agent_version": "0.1.0", "reboot": "none", "group": "production-web",
    });
    moto.put("fleet/nodes/production/web/i-0stale.json", stale.to_string().into_bytes());
    moto.put("fleet/nodes/production/web/garbage.json", b"{\"name\": tru".to_vec());
    moto.put("fleet/nodes/huge.json", vec![b' '; 100_000]);

    let status = |extra: &[&str]| {
        let mut args = vec!["fleet", "status", "--source", "s3://fleet/nodes/"];
        args.extend_from_slice(extra);
        let r = node.agent_env(&args, &AWS_ENV);
        assert_eq!(r.code, 0, "{}", r.all());
        r.stdout
    };
    let text = status(&[]);
    eprintln!("fleet status --source:\n{text}");
    let short = &v1[..12];
    assert!(text.contains("group production-web: 1 reporting, 1 not reporting"), "{text}");
    assert!(text.contains(&format!("  {short:<14} ok           1  {id}\n")), "{text}");
    assert!(
        text.contains(&format!("  not reporting: i-0stale (production-web), last report {old}")),
        "{text}"
    );
    assert!(
        text.contains("unreadable: s3://fleet/nodes/production/web/garbage.json: not a node record"),
        "{text}"
    );
    assert!(
        text.contains("unreadable: s3://fleet/nodes/huge.json: 100000 bytes: larger than 65536 bytes"),
        "{text}"
    );

    let j: serde_json::Value = serde_json::from_str(&status(&["--json"])).unwrap();
    let groups = j["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{j:#}");
    let g = &groups[0];
    assert_eq!(g["group"], "production-web");
    assert_eq!(g["nodes"].as_object().unwrap().len(), 1, "{j:#}");
    let rec = &g["nodes"][id];
    assert_eq!(rec["bundle"]["sha256"], v1.as_str());
    assert_eq!((rec["status"].as_str(), rec["name"].as_str()), (Some("ok"), Some("production-web")));
    assert_eq!(rec["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(g["not_reporting"]["i-0stale"]["at"], old.as_str());
    let bad: Vec<&str> = j["unreadable"].as_array().unwrap().iter().map(|u| u["key"].as_str().unwrap()).collect();
    assert_eq!(bad.len(), 2, "{j:#}");
    assert!(bad.contains(&"s3://fleet/nodes/production/web/garbage.json"), "{j:#}");

    // A longer staleness limit: the old record counts as reporting; another group: none.
    let j: serde_json::Value = serde_json::from_str(&status(&["--json", "--stale", "3h"])).unwrap();
    assert_eq!(j["groups"][0]["nodes"].as_object().unwrap().len(), 2, "{j:#}");
    let j: serde_json::Value = serde_json::from_str(&status(&["--json", "--group", "staging-web"])).unwrap();
    assert_eq!(j["groups"].as_array().unwrap().len(), 0, "{j:#}");

    // More records than one page of a listing (1000): all read.
    let at = humantime::format_rfc3339(std::time::SystemTime::now()).to_string();
    let t0 = Instant::now();
    let client = reqwest::blocking::Client::new();
    std::thread::scope(|s| {
        for t in 0..8 {
            let (client, at, url) = (&client, &at, &moto.url);
            s.spawn(move || {
                for i in (t..1005).step_by(8) {
                    let r = serde_json::json!({ "name": "production-db", "status": "ok", "at": at, "group": "production-db" });
                    let resp = client
                        .put(format!("{url}/fleet/many/i-{i:05}.json"))
                        .header("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request")
                        .body(r.to_string())
                        .send()
                        .unwrap();
                    assert!(resp.status().is_success(), "{}", resp.status());
                }
            });
        }
    });
    let t1 = Instant::now();
    let r = node.agent_env(&["fleet", "status", "--source", "s3://fleet/many/", "--json"], &AWS_ENV);
    eprintln!("1005 PUTs by the test: {:?}; fleet status --source over them: {:?}", t1 - t0, t1.elapsed());
    assert_eq!(r.code, 0, "{}", r.all());
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(j["groups"][0]["nodes"].as_object().unwrap().len(), 1005);
    assert_eq!(j["groups"][0]["nodes"]["i-01004"]["status"], "ok");
    assert!(
        moto.requests("GET /fleet?list-type=2").len() + moto.requests("GET /fleet/?list-type=2").len() >= 2,
        "{:?}",
        moto.requests("list-type")
    );

    // An image build under --root never publishes (its config is still checked).
    let root = tempfile::tempdir().unwrap();
    crate::harness::support::write_config(root.path(), &config);
    let r = crate::harness::support::cmd(&[
        "apply",
        "--root",
        root.path().to_str().unwrap(),
        "--source",
        out.path().join("web.tar.gz").to_str().unwrap(),
        "--name",
        "production-web",
    ])
    .envs(AWS_ENV)
    .output()
    .unwrap();
    assert_eq!(r.status.code(), Some(0), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(
        moto.requests("PUT /fleet/nodes/production/web/i-").len(),
        4,
        "3 runs and the stale record put by the test"
    );

    // S3 that accepts connections and never answers: the run still succeeds, with a warning,
    // once the PUT's own deadline has passed.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung = format!("http://{}", silent.local_addr().unwrap());
    node.write_config(&config.replace(&moto.url, &hung));
    let r = run("apply");
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(
        r.stderr
            .contains(&format!("putting the node record in S3 (fleet view): s3://fleet/{key}: no answer within 10s")),
        "{}",
        r.stderr
    );
    drop(silent);

    // A malformed [report] s3 is a config error naming the key, before anything changes.
    node.write_config(&config.replace("${instance_id}.json", "${instance_id}-${zone}.json"));
    let r = run("apply");
    assert_eq!(r.code, 78, "{}", r.all());
    assert!(
        r.stderr.contains("[report] s3") && r.stderr.contains("unknown substitution ${zone}"),
        "{}",
        r.stderr
    );
}

/// A run that fails before it has a report (the bundle's role file does not parse, or the
/// bundle cannot be fetched and there is no last-good) still puts a `failed` record with the
/// error, so the fleet view shows the node failing instead of, one TTL later, not reporting.
/// (The record is redacted as it leaves the node, `Record::to_json`, as every record is.)
#[test]
fn a_run_that_fails_before_its_report_is_listed_failed_with_its_error() {
    let etcd = Etcd::start(1);
    let out = tempfile::tempdir().unwrap();
    let n = Node::boot_host_net(out.path());
    n.write_config(&format!("[reboot.etcd]\nendpoints = [\"{}\"]\n[report]\nttl = \"10m\"\n", etcd.endpoints()[0]));
    let id = n.machine_id();
    // No bundle at the source and none cached.
    let r = apply_web(&n);
    assert_ne!(r.code, 0, "{}", r.all());
    let j = fleet(&n);
    let rec = &j["groups"][0]["nodes"][&id];
    assert_eq!(rec["status"], "failed", "{j:#}");
    assert!(rec["error"].as_str().unwrap_or_default().contains("/srv/bundle/web.tar.gz"), "{j:#}");
    let table = n.agent(&["fleet", "status"]).stdout;
    assert!(table.contains(&format!("  failed: {id} (production-web): ")), "{table}");

    // A role file that does not parse.
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(src.path().join("roles/web")).unwrap();
    std::fs::write(
        src.path().join("roles/web/role.toml"),
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/x\"\ncontent = unquoted\n",
    )
    .unwrap();
    crate::rollouts::publish_unchecked(src.path(), out.path());
    let r = apply_web(&n);
    assert_ne!(r.code, 0, "{}", r.all());
    let j = fleet(&n);
    let rec = &j["groups"][0]["nodes"][&id];
    assert_eq!(rec["status"], "failed", "{j:#}");
    assert!(rec["error"].as_str().unwrap_or_default().contains("role.toml"), "{j:#}");
}
