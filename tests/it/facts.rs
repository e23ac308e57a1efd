//! Facts from the IMDSv2 test server: naming sources, faults, deadlines.

use crate::harness::imds::ImdsServer;
use crate::harness::support::*;

/// A root whose agent config points at `imds`.
fn root_with_imds(imds: &str) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), &format!("[imds]\nbase_url = \"{imds}\"\n"));
    root
}

fn facts(root: &std::path::Path, extra: &[&str]) -> (Run, serde_json::Value) {
    let mut args = vec!["facts", "--format", "json", "--root", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = agent(&args);
    let v = serde_json::from_str(&r.stdout).unwrap_or(serde_json::Value::Null);
    (r, v)
}

#[test]
fn facts_from_imds_and_naming_sources_in_order() {
    let srv = ImdsServer::start(ImdsServer::instance("production-haproxy"));
    let root = root_with_imds(&srv.addr);
    let (r, f) = facts(root.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(
        (f["env"].as_str(), f["service"].as_str(), f["name_source"].as_str()),
        (Some("production"), Some("haproxy"), Some("tag:Name"))
    );
    assert_eq!(f["instance_id"], "i-0123456789abcdef0");
    assert_eq!(f["region"], "eu-west-1");
    assert_eq!(f["availability_zone"], "eu-west-1b");
    assert_eq!(f["tags"]["Name"], "production-haproxy");
    assert!(f.get("public_ipv4").is_none(), "404 means absent");

    // No Name tag: the autoscaling group tag.
    srv.state.lock().unwrap().tags.as_mut().unwrap().remove("Name");
    let (_, f) = facts(root.path(), &[]);
    assert_eq!(
        (f["name"].as_str(), f["name_source"].as_str()),
        (Some("production-haproxy-asg"), Some("tag:aws:autoscaling:groupName"))
    );
    // User-data config beats tags; the agent config beats user-data; flags beat everything.
    srv.state.lock().unwrap().user_data = Some("#bootstrap-config\n[naming]\nname = \"staging-web\"\n".into());
    let (_, f) = facts(root.path(), &[]);
    assert_eq!((f["name"].as_str(), f["name_source"].as_str()), (Some("staging-web"), Some("user-data")));
    write_config(root.path(), &format!("[imds]\nbase_url = \"{}\"\n[naming]\nname = \"qa-db\"\n", srv.addr));
    let (_, f) = facts(root.path(), &[]);
    assert_eq!((f["name"].as_str(), f["name_source"].as_str()), (Some("qa-db"), Some("config")));
    let (_, f) = facts(root.path(), &["--name", "prod-cache"]);
    assert_eq!((f["name"].as_str(), f["name_source"].as_str()), (Some("prod-cache"), Some("flags")));
    // A shell-script user-data is left alone.
    srv.state.lock().unwrap().user_data = Some("#!/bin/sh\necho hi\n".into());
    write_config(root.path(), &format!("[imds]\nbase_url = \"{}\"\n", srv.addr));
    let (r, f) = facts(root.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f["name_source"], "tag:aws:autoscaling:groupName");
    // A broken user-data config is a config error naming it.
    srv.state.lock().unwrap().user_data = Some("#bootstrap-config\n[naming]\nnmae = \"x\"\n".into());
    let (r, _) = facts(root.path(), &[]);
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("user-data:3:1: unknown field `nmae`"), "{}", r.stderr);
}

#[test]
fn imds_faults_retry_refresh_and_deadline() {
    // The first three token PUTs fail with 503: retried with backoff, then success.
    let mut st = ImdsServer::instance("production-haproxy");
    st.fail_token_puts = 3;
    let srv = ImdsServer::start(st);
    let root = root_with_imds(&srv.addr);
    let (r, f) = facts(root.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f["service"], "haproxy");
    assert_eq!(srv.state.lock().unwrap().puts, 4, "one token after three 503s");

    // Expired token: one refresh (a 401, then a new PUT), then success.
    let srv = ImdsServer::start(ImdsServer::instance("production-haproxy"));
    srv.expire_tokens();
    let root = root_with_imds(&srv.addr);
    assert_eq!(facts(root.path(), &[]).0.code, 0);
    let (puts, unauthorized) = {
        let s = srv.state.lock().unwrap();
        (s.puts, s.unauthorized)
    };
    assert_eq!((puts, unauthorized), (1, 0));
    // A client whose token dies mid-run refreshes once (library level, to expire between calls).
    let client = bootstrap::facts::imds::Imds::new(&srv.addr, std::time::Duration::from_secs(5)).unwrap();
    assert_eq!(client.meta("instance-id").unwrap().as_deref(), Some("i-0123456789abcdef0"));
    srv.expire_tokens();
    assert_eq!(client.meta("instance-type").unwrap().as_deref(), Some("t3.small"));
    let s = srv.state.lock().unwrap();
    assert_eq!((s.puts, s.unauthorized), (3, 1), "exactly one refresh after the 401");
    drop(s);

    // IMDS never answers: the run fails within the deadline (10 s for non-first-boot runs), naming IMDS.
    let mut st = ImdsServer::instance("production-haproxy");
    st.silent = true;
    let srv = ImdsServer::start(st);
    let root = root_with_imds(&srv.addr);
    let (r, _) = facts(root.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.stderr.contains("instance metadata service at http://127.0.0.1:") && r.stderr.contains("did not answer the token request within 10s"),
        "{}",
        r.stderr
    );
}

#[test]
fn name_tag_from_describe_tags_when_metadata_has_no_tags() {
    let moto = crate::harness::moto::Moto::start();
    let id = moto.run_instance(&[("Name", "production-haproxy")]);
    let mut st = ImdsServer::instance("ignored");
    st.tags = None; // instance metadata tags not enabled: 404
    st.meta.insert("instance-id".into(), id.clone());
    st.meta.insert("placement/region".into(), "us-east-1".into());
    let srv = ImdsServer::start(st);
    let root = tempfile::tempdir().unwrap();
    write_config(
        root.path(),
        &format!("[imds]\nbase_url = \"{}\"\n[aws]\nec2_endpoint = \"{}\"\n", srv.addr, moto.url),
    );
    let r: Run = cmd(&["facts", "--format", "json", "--root", root.path().to_str().unwrap()])
        .envs(crate::harness::moto::AWS_ENV)
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{}", r.all());
    let f: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(f["instance_id"], id.as_str());
    assert_eq!((f["name"].as_str(), f["name_source"].as_str()), (Some("production-haproxy"), Some("tag:Name")));
    assert!(!moto.requests("POST /").is_empty(), "DescribeTags went to moto");
}
