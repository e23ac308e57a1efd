//! The Auto Scaling lifecycle on booted nodes (issue 19): the IMDS test server (the group tag,
//! `autoscaling/target-lifecycle-state` switched at runtime) and moto's Auto Scaling backend
//! (group, launch configuration, lifecycle hooks, instance health) behind the harness's
//! recording proxy for the two lifecycle-action calls moto does not implement (see
//! `harness::moto::AsgProxy`). Order is proven by timestamps: the node writes `date +%s.%N`
//! from its steps and hooks, the proxy stamps every call on the same clock.

use crate::harness::etcd::Etcd;
use crate::harness::imds::ImdsServer;
use crate::harness::moto::{AsgCall, Moto, AWS_ENV};
use crate::harness::node::Node;
use crate::harness::support::*;
use std::time::{Duration, Instant};

const GROUP: &str = "production-web-asg";
const LAUNCHING: &str = "autoscaling:EC2_INSTANCE_LAUNCHING";
const TERMINATING: &str = "autoscaling:EC2_INSTANCE_TERMINATING";

/// A role whose one step takes 4 s and stamps its start and end.
const SLOW_ROLE: &str = r#"schema = 1
[[step]]
kind = "exec"
command = ["sh", "-c", "date +%s.%N > /var/tmp/slow.start; sleep 4; date +%s.%N > /var/tmp/slow.done"]
creates = "/var/tmp/slow.done"
"#;

/// A role that always fails, counting its attempts.
const FAILING_ROLE: &str = r#"schema = 1
[[step]]
kind = "exec"
command = ["sh", "-c", "date +%s.%N >> /var/tmp/attempts; exit 3"]
creates = "/var/tmp/never"
"#;

struct Fleet {
    moto: Moto,
    proxy: crate::harness::moto::AsgProxy,
    imds: ImdsServer,
    id: String,
    node: Node,
    _bundle: tempfile::TempDir,
}

/// moto with the group and its hooks, the proxy, IMDS for the group's instance, and a node on
/// the host's network (it reaches all three, and etcd, on loopback) with `role` as `web`.
fn fleet(role: &str, extra_config: &str) -> Fleet {
    fleet_in(bundle(&[("roles/web/role.toml", role)]), "/srv/bundle", extra_config)
}

/// `fleet`, with the bundle directory `b` (the node's /srv/bundle) and `[bundle] source`.
fn fleet_in(b: tempfile::TempDir, source: &str, extra_config: &str) -> Fleet {
    let moto = Moto::start();
    let id = moto.create_asg(GROUP, &[("launch", LAUNCHING, 30), ("drain", TERMINATING, 30)]);
    let proxy = moto.asg_proxy();
    let imds = ImdsServer::start(ImdsServer::asg_instance("production-web", GROUP, &id));
    let node = Node::boot_host_net(b.path());
    node.write_config(&format!(
        "[imds]\nbase_url = \"{}\"\n[bundle]\nsource = \"{source}\"\n[metrics]\ntextfile = \"/var/lib/metrics/bootstrap.prom\"\n{extra_config}\n[asg]\nendpoint = \"{}\"\nheartbeat_interval = \"1s\"\n",
        imds.addr, proxy.url
    ));
    Fleet {
        moto,
        proxy,
        imds,
        id,
        node,
        _bundle: b,
    }
}

fn stamp(node: &Node, file: &str) -> f64 {
    let t = std::fs::read_to_string(node.merged.join(file.trim_start_matches('/'))).unwrap();
    t.trim().parse().unwrap_or_else(|e| panic!("{file}: {t:?}: {e}"))
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn only(calls: Vec<AsgCall>) -> AsgCall {
    assert_eq!(calls.len(), 1, "{calls:?}");
    calls.into_iter().next().unwrap()
}

/// Issue 19, show 1 (success): `init` holds the launch action with heartbeats during a slow
/// step, and completes it with CONTINUE only after the run converged and the `[[asg.health]]`
/// check passed; the report and the metrics say so; a second `init` completes nothing again.
#[test]
fn init_continues_the_launch_only_after_convergence_with_heartbeats_meanwhile() {
    let f = fleet(SLOW_ROLE, "");
    f.node.write_config(&format!(
        "{}enabled = true\n[[asg.health]]\ncommand = [\"test\", \"-e\", \"/var/tmp/slow.done\"]\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    let r = f.node.agent_env(&["init", "--json"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    let shown: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("init --json printed no single report ({e}):\n{}", r.stdout));
    assert_eq!(shown["lifecycle"]["result"], "CONTINUE", "the report shown says how the launch ended: {shown}");
    let (start, done) = (stamp(&f.node, "/var/tmp/slow.start"), stamp(&f.node, "/var/tmp/slow.done"));
    let complete = only(f.proxy.ok_calls("CompleteLifecycleAction"));
    assert_eq!(complete.params["LifecycleActionResult"], "CONTINUE");
    assert_eq!(
        (
            complete.params["LifecycleHookName"].as_str(),
            complete.params["AutoScalingGroupName"].as_str(),
            complete.params["InstanceId"].as_str()
        ),
        ("launch", GROUP, f.id.as_str())
    );
    assert!(complete.at > done, "CONTINUE at {} before the slow step ended at {done}", complete.at);
    let beats = f.proxy.ok_calls("RecordLifecycleActionHeartbeat");
    let during: Vec<&AsgCall> = beats.iter().filter(|b| b.at > start && b.at < done).collect();
    assert!(during.len() >= 2, "heartbeats during the 4 s step: {beats:?} (step {start}..{done})");
    assert!(beats.iter().all(|b| b.at < complete.at && b.params["LifecycleHookName"] == "launch"));
    println!(
        "launch: {} heartbeats, {} during the slow step; CONTINUE {:.3} s after the step ended",
        beats.len(),
        during.len(),
        complete.at - done
    );
    let rep = f.node.report();
    assert_eq!(rep["lifecycle"]["result"], "CONTINUE", "{rep}");
    assert_eq!(rep["lifecycle"]["completed"], true);
    assert_eq!(rep["lifecycle"]["heartbeats"].as_u64().unwrap() as usize, beats.len());
    let prom = std::fs::read_to_string(f.node.merged.join("var/lib/metrics/bootstrap_asg.prom")).unwrap();
    assert!(
        prom.contains("bootstrap_asg_launch_result{hook=\"launch\",result=\"CONTINUE\",completed=\"true\"} 1"),
        "{prom}"
    );
    assert!(f.node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    // In a group, init leaves the scale-in watcher running.
    assert_eq!(f.node.sh("systemctl is-active bootstrap-watch.service").stdout.trim(), "active");

    // Again: nothing changes, nothing is completed twice.
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f.node.report()["summary"]["changed"], 0);
    assert_eq!(f.proxy.ok_calls("CompleteLifecycleAction").len(), 1);
    assert!(f.proxy.calls.lock().unwrap().iter().all(|c| c.status == 200), "a refused call");
}

/// Issue 19, show 1 (failure): an `init` that keeps failing tries again until the first-boot
/// deadline and then completes the launch with ABANDON (not before the deadline, never
/// CONTINUE); the report says so and no firstboot marker is written.
#[test]
fn init_that_keeps_failing_abandons_the_launch_at_the_deadline() {
    let f = fleet(FAILING_ROLE, "");
    f.node.write_config(&format!(
        "{}enabled = true\nfirst_boot_deadline = \"6s\"\nretry_interval = \"1s\"\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    let t0 = now_unix();
    let r = f.node.agent_env(&["init", "--json"], &AWS_ENV);
    assert_eq!(r.code, 1, "{}", r.all());
    // One report on stdout, the final one: it says how the launch action ended.
    let shown: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("init --json printed no single report ({e}):\n{}", r.stdout));
    assert_eq!(shown["lifecycle"]["result"], "ABANDON", "{shown}");
    assert_eq!(shown["status"], "failed", "{shown}");
    let complete = only(f.proxy.ok_calls("CompleteLifecycleAction"));
    assert_eq!(complete.params["LifecycleActionResult"], "ABANDON");
    assert!(
        complete.at >= t0 + 6.0,
        "ABANDON {:.3} s after init started, before the 6 s deadline",
        complete.at - t0
    );
    let attempts = std::fs::read_to_string(f.node.merged.join("var/tmp/attempts")).unwrap();
    assert!(attempts.lines().count() >= 2, "init tried again before abandoning: {attempts}");
    println!(
        "abandon: {} attempts, ABANDON {:.3} s after init started (deadline 6 s)",
        attempts.lines().count(),
        complete.at - t0
    );
    let rep = f.node.report();
    assert_eq!(rep["lifecycle"]["result"], "ABANDON", "{rep}");
    assert_eq!(rep["status"], "failed");
    assert!(rep["lifecycle"]["reason"].as_str().unwrap().contains("first-boot deadline"), "{rep}");
    assert!(!f.node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    assert!(std::fs::read_to_string(f.node.merged.join("var/lib/metrics/bootstrap_asg.prom"))
        .unwrap()
        .contains("result=\"ABANDON\""));
}

fn write_reboot_state(node: &Node, id: &str) {
    // What reboot coordination leaves while a node holds a slot, here from before its reboot.
    let st = serde_json::json!({
        "group": "production-web", "holder": id, "boot_id": "00000000000000000000000000000000",
        "acquired_at": "2026-11-30T00:00:00Z", "reason": "test: a slot taken before the reboot",
    });
    let r = node.sh("install -d -m 0700 /var/lib/bootstrap && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    std::fs::write(node.merged.join("var/lib/bootstrap/reboot.json"), st.to_string()).unwrap();
}

/// Issue 19, show 2: `unhealthy_after = 2`: the first failed timer run marks nothing, the
/// second sets the instance Unhealthy in moto (respecting the grace period), taking a place in
/// the group's etcd record; a third does not call again. A node that holds a reboot slot is
/// never marked, however often it fails.
#[test]
fn two_failed_runs_mark_the_instance_unhealthy_but_not_while_it_holds_a_reboot_slot() {
    let etcd = Etcd::start(1);
    let f = fleet(
        FAILING_ROLE,
        &format!("[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n", etcd.endpoints()[0]),
    );
    f.node.write_config(&format!(
        "{}unhealthy_after = 2\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    let apply = || f.node.agent_env(&["apply"], &AWS_ENV);
    let r = apply();
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(f.moto.asg_health(&f.id), "Healthy");
    assert!(f.proxy.ok_calls("SetInstanceHealth").is_empty());
    let r = apply();
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(f.moto.asg_health(&f.id), "Unhealthy", "{}", r.all());
    let set = only(f.proxy.ok_calls("SetInstanceHealth"));
    assert_eq!(
        (set.params["HealthStatus"].as_str(), set.params["ShouldRespectGracePeriod"].as_str()),
        ("Unhealthy", "true")
    );
    let record = etcd.ctl(&["get", "--print-value-only", "com.coreos.airlock/groups/production-web/v1/asg-unhealthy"]);
    assert!(record.contains(&f.id), "{record}");
    assert_eq!(apply().code, 1);
    assert_eq!(f.proxy.ok_calls("SetInstanceHealth").len(), 1, "marked twice");
    let prom = std::fs::read_to_string(f.node.merged.join("var/lib/metrics/bootstrap_asg.prom")).unwrap();
    assert!(
        prom.contains("bootstrap_asg_marked_unhealthy 1") && prom.contains("bootstrap_asg_consecutive_failed_runs 3"),
        "{prom}"
    );

    // The same node healthy again, then failing while it holds a reboot slot (back from its
    // reboot, not converging: the rollout stops here, the group must not replace it).
    f.moto
        .autoscaling(&[("Action", "SetInstanceHealth"), ("InstanceId", &f.id), ("HealthStatus", "Healthy")]);
    std::fs::remove_file(f.node.merged.join("var/lib/bootstrap/asg-health.json")).unwrap();
    etcd.lock("production-web").acquire(&f.id, 1).unwrap();
    write_reboot_state(&f.node, &f.id);
    for _ in 0..3 {
        assert_eq!(apply().code, 1);
    }
    assert_eq!(f.moto.asg_health(&f.id), "Healthy");
    assert_eq!(f.proxy.ok_calls("SetInstanceHealth").len(), 1, "marked while holding a reboot slot");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.node.merged.join("var/lib/bootstrap/asg-health.json")).unwrap()).unwrap();
    assert_eq!(rec["not_marked"], "holds a reboot slot", "{rec}");
    assert_eq!(rec["consecutive_failures"], 3);
    assert_eq!(etcd.holders("production-web"), std::slice::from_ref(&f.id));
}

/// Issue 19, show 3: `bootstrap-watch.service` on the node leaves an InService instance
/// alone; when IMDS says `Terminated` it runs the drain hook, gives back the reboot slot in
/// etcd, and completes the terminating action with CONTINUE after the drain, then exits.
#[test]
fn watcher_drains_releases_the_slot_and_continues_the_termination() {
    let etcd = Etcd::start(1);
    let f = fleet(
        SLOW_ROLE,
        &format!("[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n", etcd.endpoints()[0]),
    );
    f.node.write_config(&format!(
        "{}watch_interval = \"1s\"\n[[asg.terminate_hook]]\ncommand = [\"sh\", \"-c\", \"sleep 2; date +%s.%N > /var/tmp/drained\"]\ntimeout = \"30s\"\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    etcd.lock("production-web").acquire(&f.id, 1).unwrap();
    write_reboot_state(&f.node, &f.id);
    // The unit as packaged, with the instance role's credentials of this test.
    let unit = std::fs::read_to_string(repo().join("units/bootstrap-watch.service")).unwrap();
    std::fs::write(f.node.merged.join("etc/systemd/system/bootstrap-watch.service"), unit).unwrap();
    let dropin = f.node.merged.join("etc/systemd/system/bootstrap-watch.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    let env: String = AWS_ENV.iter().map(|(k, v)| format!("Environment={k}={v}\n")).collect();
    std::fs::write(dropin.join("aws.conf"), format!("[Service]\n{env}")).unwrap();
    let r = f
        .node
        .sh("systemctl daemon-reload && systemctl start bootstrap-watch.service && systemctl is-active bootstrap-watch.service");
    assert_eq!(r.stdout.trim(), "active", "{}", r.all());

    // In service: polled, nothing done.
    let polled = || f.imds.state.lock().unwrap().gets;
    let before = polled();
    let start = Instant::now();
    while polled() < before + 3 {
        assert!(start.elapsed() < Duration::from_secs(30), "the watcher does not poll");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!f.node.merged.join("var/tmp/drained").exists());
    assert!(f.proxy.ok_calls("CompleteLifecycleAction").is_empty());
    assert_eq!(etcd.holders("production-web"), std::slice::from_ref(&f.id));

    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Terminated"));
    let start = Instant::now();
    while f.node.sh("systemctl is-active bootstrap-watch.service").stdout.trim() == "active" {
        assert!(start.elapsed() < Duration::from_secs(60), "the watcher did not finish its drain");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = f.node.sh("journalctl -u bootstrap-watch.service -o cat --no-pager").stdout;
    assert_eq!(
        f.node.sh("systemctl show -p Result --value bootstrap-watch.service").stdout.trim(),
        "success",
        "{log}"
    );
    let drained = stamp(&f.node, "/var/tmp/drained");
    assert!(etcd.holders("production-web").is_empty(), "slot still held: {log}");
    assert!(!f.node.merged.join("var/lib/bootstrap/reboot.json").exists());
    let complete = only(f.proxy.ok_calls("CompleteLifecycleAction"));
    assert_eq!(
        (complete.params["LifecycleHookName"].as_str(), complete.params["LifecycleActionResult"].as_str()),
        ("drain", "CONTINUE")
    );
    assert!(complete.at > drained, "CONTINUE at {} before the drain hook ended at {drained}", complete.at);
    let beats = f.proxy.ok_calls("RecordLifecycleActionHeartbeat");
    assert!(
        beats.iter().all(|b| b.params["LifecycleHookName"] == "drain" && b.at < complete.at),
        "{beats:?}"
    );
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.node.merged.join("var/lib/bootstrap/asg-terminate.json")).unwrap()).unwrap();
    assert_eq!(
        (rec["released_reboot_slot"].as_bool(), rec["completed"].as_bool()),
        (Some(true), Some(true)),
        "{rec}"
    );
    // Started again (the instance still says Terminated): nothing is done twice.
    let r = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(stamp(&f.node, "/var/tmp/drained"), drained, "the drain hook ran again");
    assert_eq!(f.proxy.ok_calls("CompleteLifecycleAction").len(), 1);
    println!(
        "watch: drained, slot released, CONTINUE {:.3} s after the drain hook ended, {} heartbeats",
        complete.at - drained,
        beats.len()
    );
}

/// `max_unhealthy` without etcd: the node counts the group's other instances already Unhealthy
/// (DescribeAutoScalingGroups) and is not marked while that reaches the limit; once the other
/// one is healthy again, its next failed run marks it.
#[test]
fn without_etcd_an_unhealthy_neighbour_holds_the_mark_back() {
    let moto = Moto::start();
    let ids = moto.create_asg_of(GROUP, &[], 2);
    let (id, other) = (ids[0].clone(), ids[1].clone());
    let proxy = moto.asg_proxy();
    let imds = ImdsServer::start(ImdsServer::asg_instance("production-web", GROUP, &id));
    let b = bundle(&[("roles/web/role.toml", FAILING_ROLE)]);
    let node = Node::boot_host_net(b.path());
    node.write_config(&format!(
        "[imds]\nbase_url = \"{}\"\n[bundle]\nsource = \"/srv/bundle\"\n[asg]\nendpoint = \"{}\"\nunhealthy_after = 1\nmax_unhealthy = \"1\"\n",
        imds.addr, proxy.url
    ));
    moto.autoscaling(&[("Action", "SetInstanceHealth"), ("InstanceId", &other), ("HealthStatus", "Unhealthy")]);
    for _ in 0..2 {
        assert_eq!(node.agent_env(&["apply"], &AWS_ENV).code, 1);
    }
    assert_eq!(moto.asg_health(&id), "Healthy");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(node.merged.join("var/lib/bootstrap/asg-health.json")).unwrap()).unwrap();
    assert!(rec["not_marked"].as_str().unwrap().contains("1 other instances"), "{rec}");
    moto.autoscaling(&[("Action", "SetInstanceHealth"), ("InstanceId", &other), ("HealthStatus", "Healthy")]);
    assert_eq!(node.agent_env(&["apply"], &AWS_ENV).code, 1);
    assert_eq!(moto.asg_health(&id), "Unhealthy");
    assert_eq!(only(proxy.ok_calls("SetInstanceHealth")).params["InstanceId"], id);
}

/// A first boot that reboots (a reboot needed and allowed, `immediate` here) leaves the launch
/// action pending; after the boot the firstboot unit runs `init` again, which holds the same
/// action (heartbeats on both sides of the reboot) and completes it with CONTINUE once the node
/// converged in its new boot.
#[test]
fn a_first_boot_reboot_keeps_the_launch_pending_until_after_the_boot() {
    let mut f = fleet("schema = 1\n", "[reboot]\nstrategy = \"immediate\"\n");
    f.node.write_config(&format!(
        "{}enabled = true\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    assert!(f.node.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    // The firstboot unit that init installs runs with the instance role's credentials of this test.
    let dropin = f.node.merged.join("etc/systemd/system/bootstrap-firstboot.service.d");
    std::fs::create_dir_all(&dropin).unwrap();
    let env: String = AWS_ENV.iter().map(|(k, v)| format!("Environment={k}={v}\n")).collect();
    std::fs::write(dropin.join("aws.conf"), format!("[Service]\n{env}")).unwrap();
    let _ = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(f.node.wait_exit(Duration::from_secs(60)), 133, "init rebooted");
    let rebooted = now_unix();
    assert!(f.proxy.ok_calls("CompleteLifecycleAction").is_empty(), "completed before the reboot");
    assert!(f.node.merged.join("var/lib/bootstrap/asg-launch-pending.json").exists());
    f.node.boot_again();
    let start = Instant::now();
    while f.proxy.ok_calls("CompleteLifecycleAction").is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the launch was not completed after the boot: {}",
            f.node.sh("journalctl -b -u bootstrap-firstboot.service -o cat --no-pager").stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let complete = only(f.proxy.ok_calls("CompleteLifecycleAction"));
    assert_eq!(complete.params["LifecycleActionResult"], "CONTINUE");
    assert!(complete.at > rebooted);
    let rep = f.node.report();
    assert_eq!(rep["lifecycle"]["result"], "CONTINUE", "{rep}");
    assert!(!f.node.merged.join("var/lib/bootstrap/asg-launch-pending.json").exists());
    // The firstboot unit does not run again on the next boot.
    let cond = f.node.sh("systemctl show -p ConditionResult --value bootstrap-firstboot.service").stdout;
    assert_eq!(cond.trim(), "yes");
}

/// A timer run that only waited for the run lock (another run, or the watcher's drain, held
/// it) says nothing about the node's health: it is not counted towards `unhealthy_after`.
#[test]
fn runs_that_only_waited_for_the_run_lock_do_not_count() {
    let f = fleet("schema = 1\n", "");
    f.node.write_config(&format!(
        "{}unhealthy_after = 1\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    let r = f
        .node
        .sh("mkdir -p /run/bootstrap && (setsid flock /run/bootstrap/lock sleep 120 >/dev/null 2>&1 &) && sleep 0.5 && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    for _ in 0..2 {
        let r = f.node.agent_env(&["apply", "--lock-timeout", "1s"], &AWS_ENV);
        assert_eq!(r.code, 1, "{}", r.all());
        assert!(r.stderr.contains("another bootstrap run"), "{}", r.all());
    }
    assert_eq!(f.moto.asg_health(&f.id), "Healthy");
    assert!(f.proxy.ok_calls("SetInstanceHealth").is_empty());
    assert!(!f.node.merged.join("var/lib/bootstrap/asg-health.json").exists());
}

/// A terminating action the API refused to complete: `watch` exits 1 (systemd starts it again)
/// and the next start completes it without draining twice.
#[test]
fn watcher_retries_only_a_refused_completion() {
    let f = fleet("schema = 1\n", "");
    f.node.write_config(&format!(
        "{}[[asg.terminate_hook]]\ncommand = [\"sh\", \"-c\", \"date +%s.%N >> /var/tmp/drains\"]\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Terminated"));
    f.proxy.refuse_completions.store(1, std::sync::atomic::Ordering::SeqCst);
    let r = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(f.proxy.ok_calls("CompleteLifecycleAction").is_empty());
    let r = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(only(f.proxy.ok_calls("CompleteLifecycleAction")).params["LifecycleActionResult"], "CONTINUE");
    let drains = std::fs::read_to_string(f.node.merged.join("var/tmp/drains")).unwrap();
    assert_eq!(drains.lines().count(), 1, "drained twice");
    let r = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f.proxy.ok_calls("CompleteLifecycleAction").len(), 1);
}

/// The `web` role of the rollout tests: `/etc/web.conf` names the bundle; the run fails while
/// `/var/tmp/break` exists on the node.
fn web_role(src: &std::path::Path, version: &str) {
    std::fs::create_dir_all(src.join("roles/web")).unwrap();
    std::fs::write(
        src.join("roles/web/role.toml"),
        format!(
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"{version}\\n\"\n\
             [[step]]\nkind = \"exec\"\ncommand = [\"false\"]\nonlyif = [\"test\", \"-e\", \"/var/tmp/break\"]\n"
        ),
    )
    .unwrap();
}

/// A node of the group under `[rollout] strategy = "canary"` over `etcd` (`etcd_section`:
/// `[rollout.etcd]` or `[reboot.etcd]`), its bundle `/srv/bundle/web.tar.gz` built from `src`
/// into `out`; `v1` applied (a node's first bundle needs no slot). The bundle's sha256.
fn rollout_fleet(etcd: &Etcd, etcd_section: &str, rollout: &str) -> (Fleet, tempfile::TempDir, String) {
    let src = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    web_role(src.path(), "v1");
    let v1 = crate::rollouts::publish_web(src.path(), out.path());
    let f = fleet_in(
        out,
        "/srv/bundle/web.tar.gz",
        &format!(
            "[rollout]\nstrategy = \"canary\"\nwait = \"10m\"\n{rollout}\n[{etcd_section}]\nendpoints = [\"{}\"]\n",
            etcd.endpoints()[0]
        ),
    );
    let r = f.node.agent_env(&["apply"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f.node.report()["bundle"]["sha256"], v1.as_str());
    (f, src, v1)
}

fn publish_version(f: &Fleet, src: &std::path::Path, version: &str) -> String {
    web_role(src, version);
    crate::rollouts::publish_web(src, f._bundle.path())
}

fn web_conf(f: &Fleet) -> String {
    std::fs::read_to_string(f.node.merged.join("etc/web.conf")).unwrap()
}

fn rollout_status(f: &Fleet, sha: &str) -> serde_json::Value {
    let r = f.node.agent(&["rollout", "status", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    j["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["sha256"] == sha)
        .unwrap_or_else(|| panic!("no rollout {sha}: {j:#}"))
        .clone()
}

/// Issue 19, show 3 with a rollout slot: a node scaled in while it holds a slot of a bundle's
/// rollout gives it back in its drain (it would block the group's rollout until someone
/// released it by hand), and says so in its drain record; `rollout status` shows the slot free
/// and the next node gets it at once. Another node's slot is left alone.
#[test]
fn the_drain_gives_back_a_rollout_slot_the_node_holds() {
    use bootstrap::reboot::etcd::Waited;
    let etcd = Etcd::start(1);
    let (f, src, _v1) = rollout_fleet(&etcd, "reboot.etcd", "canary = 1\nbatch = 2\n");
    let v2 = publish_version(&f, src.path(), "v2");
    let v3 = publish_version(&f, src.path(), "v3");
    // The node was granted v2's canary slot while it queued (its run killed with the instance's
    // scale-in, say); another node holds a slot of v3.
    let r = bootstrap::rollout::etcd::Rollouts::from_lock(etcd.lock("production-web"));
    let soon = || Instant::now() + Duration::from_secs(30);
    assert_eq!(r.wait_slot(&v2, &f.id, 1, soon()).unwrap(), Waited::Acquired);
    assert_eq!(r.wait_slot(&v3, "i-other", 1, soon()).unwrap(), Waited::Acquired);
    assert_eq!(rollout_status(&f, &v2)["holders"], serde_json::json!([f.id]));
    // A `[report] s3` the node refuses (no `${instance_id}`: every node would write one
    // object) and a rollout health check it refuses (two checks in one) fail its runs, but the
    // watcher needs only the rollout's etcd, group and holder to give the slot back.
    let config = f.node.merged.join("etc/bootstrap/config.toml");
    let good = std::fs::read_to_string(&config).unwrap();
    let bad = format!("{good}\n[report]\ns3 = \"s3://fleet/nodes/one.json\"\n[[rollout.health]]\nunit = \"web.service\"\nurl = \"http://127.0.0.1/\"\n");
    std::fs::write(&config, bad).unwrap();

    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Terminated"));
    let w = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(w.code, 0, "{}", w.all());
    // (`rollout status` reads the whole config.)
    std::fs::write(&config, good).unwrap();
    let st = rollout_status(&f, &v2);
    assert_eq!(
        st["holders"],
        serde_json::json!([]),
        "the drained node still holds its slot: {st:#}\n{}",
        w.all()
    );
    assert_eq!(rollout_status(&f, &v3)["holders"], serde_json::json!(["i-other"]), "another node's slot");
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.node.merged.join("var/lib/bootstrap/asg-terminate.json")).unwrap()).unwrap();
    assert_eq!(rec["released_rollout_slots"], serde_json::json!([v2]), "{rec}");
    assert_eq!(only(f.proxy.ok_calls("CompleteLifecycleAction")).params["LifecycleActionResult"], "CONTINUE");
    // The group's rollout goes on: the next node gets the slot now, not after a timeout.
    assert_eq!(
        r.wait_slot(&v2, "i-next", 1, Instant::now() + Duration::from_secs(5)).unwrap(),
        Waited::Acquired
    );
}

/// A run queued for a rollout slot (it dropped the run lock while it waits) whose slot comes
/// after the watcher drained the node: it gives the slot back and applies nothing new on a
/// node that is going away (the old bundle stays, no `applied` record in etcd).
#[test]
fn a_run_queued_for_a_rollout_slot_applies_nothing_once_the_node_was_drained() {
    let etcd = Etcd::start(1);
    let (f, src, v1) = rollout_fleet(&etcd, "reboot.etcd", "");
    let v2 = publish_version(&f, src.path(), "v2");
    // The canary slot is another node's: this node's run queues.
    let r = bootstrap::rollout::etcd::Rollouts::from_lock(etcd.lock("production-web"));
    assert_eq!(
        r.wait_slot(&v2, "i-canary", 1, Instant::now() + Duration::from_secs(30)).unwrap(),
        bootstrap::reboot::etcd::Waited::Acquired
    );
    std::thread::scope(|s| {
        let run = s.spawn(|| f.node.agent_env(&["apply"], &AWS_ENV));
        let start = Instant::now();
        while r.semaphore(&v2).backlog(10).unwrap().waiting < 1 {
            assert!(start.elapsed() < Duration::from_secs(60), "the run never queued");
            std::thread::sleep(Duration::from_millis(100));
        }
        f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Terminated"));
        let w = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
        assert_eq!(w.code, 0, "{}", w.all());
        assert!(f.node.merged.join("var/lib/bootstrap/asg-terminate.json").exists());
        // The canary is done: its slot goes to the queued run of the drained node.
        assert!(r.give_back(&v2, "i-canary").unwrap());
        let run = run.join().unwrap();
        assert_eq!(run.code, 0, "{}", run.all());
    });
    assert_eq!(web_conf(&f), "v1\n", "the drained node applied the new bundle");
    let rep = f.node.report();
    assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
    assert_eq!(rep["rollout"]["state"], "drained", "{rep:#}");
    let st = rollout_status(&f, &v2);
    assert_eq!(st["holders"], serde_json::json!([]), "{st:#}");
    assert_eq!(st["applied"], serde_json::json!([]), "{st:#}");
}

/// Issue 19: `unhealthy_after` never marks a node that holds a rollout slot, whatever left it
/// holding one: here the canary that halted a bad bundle with `on_failure = "rollback"` (its
/// run failed; it keeps the slot so the halt names it). With etcd unreachable a canary node
/// cannot know, and is not marked either. A slot of an aborted bundle no longer counts: then
/// a failing node is marked. (`[rollout.etcd]` only: `max_unhealthy` is checked with the
/// Auto Scaling API, which does not need etcd.)
#[test]
fn unhealthy_after_never_marks_a_node_holding_a_rollout_slot() {
    let mut etcd = Etcd::start(1);
    let (f, src, v1) = rollout_fleet(
        &etcd,
        "rollout.etcd",
        "on_failure = \"rollback\"\n[[rollout.health]]\ncommand = [\"grep\", \"-qxv\", \"bad\", \"/etc/web.conf\"]\n",
    );
    f.node.write_config(&format!(
        "{}unhealthy_after = 1\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    let health = || -> serde_json::Value { serde_json::from_slice(&std::fs::read(f.node.merged.join("var/lib/bootstrap/asg-health.json")).unwrap()).unwrap() };
    let bad = publish_version(&f, src.path(), "bad");
    let r = f.node.agent_env(&["apply"], &AWS_ENV);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(f.node.report()["rollout"]["rolled_back"], true, "{:#}", f.node.report());
    assert_eq!(rollout_status(&f, &bad)["holders"], serde_json::json!([f.id]));
    assert_eq!(f.moto.asg_health(&f.id), "Healthy", "marked while holding a rollout slot: {}", r.all());
    assert!(f.proxy.ok_calls("SetInstanceHealth").is_empty());
    assert_eq!(health()["not_marked"], "holds a rollout slot", "{}", health());

    // etcd unreachable, the run failing: a canary node cannot know whether it holds a slot.
    etcd.kill(0);
    assert!(f.node.sh("touch /var/tmp/break && echo ok").stdout.contains("ok"));
    let r = f.node.agent_env(&["apply"], &AWS_ENV);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(f.node.report()["bundle"]["sha256"], v1.as_str());
    assert_eq!(f.moto.asg_health(&f.id), "Healthy", "marked without knowing its rollout slots: {}", r.all());
    assert!(health()["not_marked"].as_str().unwrap().contains("etcd"), "{}", health());

    // The bad bundle aborted: its slot no longer counts, and the failing node is marked.
    etcd.restart(0);
    let r = f.node.agent(&["rollout", "abort", &bad]);
    assert_eq!(r.code, 0, "{}", r.all());
    let r = f.node.agent_env(&["apply"], &AWS_ENV);
    assert_eq!(r.code, 1, "{}", r.all());
    assert_eq!(f.moto.asg_health(&f.id), "Unhealthy", "{}\n{}", r.all(), health());
    assert_eq!(only(f.proxy.ok_calls("SetInstanceHealth")).params["InstanceId"], f.id);
}

/// A fleet of one node whose units (the watcher and the firstboot unit that `init` installs)
/// run with `[asg] enabled`, a 1 s watch interval and this test's instance-role credentials.
fn warm_fleet() -> Fleet {
    let f = fleet("schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/warm\"\ncontent = \"ready\\n\"\n", "");
    f.node.write_config(&format!(
        "{}enabled = true\nwatch_interval = \"1s\"\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    // The units init installs get this test's instance-role credentials.
    let env: String = AWS_ENV.iter().map(|(k, v)| format!("Environment={k}={v}\n")).collect();
    for unit in ["bootstrap-watch.service", "bootstrap-firstboot.service"] {
        let dropin = f.node.merged.join(format!("etc/systemd/system/{unit}.d"));
        std::fs::create_dir_all(&dropin).unwrap();
        std::fs::write(dropin.join("aws.conf"), format!("[Service]\n{env}")).unwrap();
    }
    f
}

/// An instance launched into a warm pool (`autoscaling/target-lifecycle-state` is
/// `Warmed:Running`): `init` converges it and completes that launch action with CONTINUE but
/// writes no `firstboot.done`; when the running warm instance goes into service (IMDS says
/// `InService`), the watcher `init` started starts the firstboot unit, whose `init` holds and
/// completes the new launch action and only then writes the marker. A third `init` completes
/// nothing.
#[test]
fn a_warm_pool_instance_completes_its_launch_again_when_it_goes_into_service() {
    let f = warm_fleet();
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Warmed:Running"));
    let r = f.node.agent_env(&["init", "--json"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    let shown: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(shown["lifecycle"]["result"], "CONTINUE", "{shown}");
    assert_eq!(shown["lifecycle"]["target_state"], "Warmed:Running", "{shown}");
    assert_eq!(only(f.proxy.ok_calls("CompleteLifecycleAction")).params["LifecycleActionResult"], "CONTINUE");
    let marker = f.node.merged.join("var/lib/bootstrap/firstboot.done");
    assert!(!marker.exists(), "a warm pool instance is not done: its launch into service is still to come");
    assert_eq!(f.node.sh("systemctl is-active bootstrap-watch.service").stdout.trim(), "active");

    // Scale-out takes the instance from the pool: AWS starts a new launch action for it.
    f.proxy.start_action(&f.id, "launch");
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("InService"));
    let start = Instant::now();
    while f.proxy.ok_calls("CompleteLifecycleAction").len() < 2 || !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "the launch into service was not completed: {:?}\n{}",
            f.proxy.ok_calls("CompleteLifecycleAction"),
            f.node
                .sh("journalctl -u bootstrap-watch.service -u bootstrap-firstboot.service -o cat --no-pager")
                .stdout
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let calls = f.proxy.ok_calls("CompleteLifecycleAction");
    assert_eq!(calls[1].params["LifecycleActionResult"], "CONTINUE");
    assert_eq!(calls[1].params["LifecycleHookName"], "launch");
    let rep = f.node.report();
    assert_eq!(rep["command"], "init", "{rep}");
    assert_eq!(rep["lifecycle"]["target_state"], "InService", "{rep}");
    assert_eq!(rep["summary"]["changed"], 0, "converged in the warm pool already: {rep}");

    // Once in service, init again completes nothing.
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f.proxy.ok_calls("CompleteLifecycleAction").len(), 2);
}

/// A warm pool with ReuseOnScaleIn (pool state Running): an instance in service that the group
/// scales in back into its pool (its target state goes from `InService` to `Warmed:Running`;
/// AWS holds the terminating hook's action at Warmed:Pending:Wait) is drained by the running
/// watcher as for a termination, and made a warm instance again (no `firstboot.done`). The
/// watcher goes on: when the instance goes into service again it starts `init`, which holds and
/// completes the new launch action and ends the drain; a later termination is drained again.
/// A drain into the pool whose completion the API did not take is completed by the next
/// watcher, and an instance still being prepared in the pool is never drained.
#[test]
fn an_instance_scaled_in_back_into_its_warm_pool_is_drained_and_launches_again() {
    let f = warm_fleet();
    let target = "autoscaling/target-lifecycle-state";
    let marker = f.node.merged.join("var/lib/bootstrap/firstboot.done");
    let record = f.node.merged.join("var/lib/bootstrap/asg-terminate.json");
    let completions = || -> Vec<(String, String)> {
        f.proxy
            .ok_calls("CompleteLifecycleAction")
            .iter()
            .map(|c| (c.params["LifecycleHookName"].clone(), c.params["LifecycleActionResult"].clone()))
            .collect()
    };
    let pair = |h: &str, r: &str| (h.to_string(), r.to_string());
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{what}: {:?}\n{}",
                completions(),
                f.node
                    .sh("journalctl -u bootstrap-watch.service -u bootstrap-firstboot.service -o cat --no-pager")
                    .stdout
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    f.imds.set_meta(target, Some("InService"));
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(marker.exists());
    assert_eq!(completions(), [pair("launch", "CONTINUE")]);
    assert_eq!(f.node.sh("systemctl is-active bootstrap-watch.service").stdout.trim(), "active");

    // Scaled in back into the pool: the watcher drains and keeps watching.
    f.proxy.start_action(&f.id, "drain");
    f.imds.set_meta(target, Some("Warmed:Running"));
    wait_for("the drain into the pool", &|| completions().len() == 2 && !marker.exists());
    assert_eq!(completions()[1], pair("drain", "CONTINUE"));
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(rec["into_warm_pool"], "Warmed:Running", "{rec}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.node.sh("systemctl is-active bootstrap-watch.service").stdout.trim(), "active");
    assert_eq!(completions().len(), 2, "a warm instance in the pool is not drained again");

    // Into service again: the watcher starts init, which completes the new launch action.
    f.proxy.start_action(&f.id, "launch");
    f.imds.set_meta(target, Some("InService"));
    // (init writes its report with the launch outcome last.)
    let reported = || {
        std::fs::read(f.node.merged.join("var/lib/bootstrap/last-run.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|r| r["command"] == "init" && r["lifecycle"]["target_state"] == "InService" && r["lifecycle"]["hook"] == "launch")
    };
    wait_for("the launch into service", &|| completions().len() == 3 && marker.exists() && reported());
    assert_eq!(completions()[2], pair("launch", "CONTINUE"));
    assert!(!record.exists(), "the drain of the return into the pool is over");

    // Terminated later: drained again.
    f.proxy.start_action(&f.id, "drain");
    f.imds.set_meta(target, Some("Terminated"));
    wait_for("the termination's drain", &|| completions().len() == 4);
    assert_eq!(completions()[3], pair("drain", "CONTINUE"));

    // A drain into the pool whose completion the API did not take (the watcher exited 1): the
    // next watcher completes it, though firstboot.done is gone already.
    assert_eq!(f.node.sh("systemctl stop bootstrap-watch.service && echo ok").stdout.trim(), "ok");
    f.proxy.start_action(&f.id, "drain");
    std::fs::write(
        &record,
        serde_json::json!({"at": "2026-12-01T00:00:00Z", "instance_id": f.id, "released_reboot_slot": false,
            "lifecycle_hook": "drain", "completed": false, "into_warm_pool": "Warmed:Running"})
        .to_string(),
    )
    .unwrap();
    let _ = std::fs::remove_file(&marker);
    f.imds.set_meta(target, Some("Warmed:Running"));
    let w = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(w.code, 0, "{}", w.all());
    assert_eq!(completions().len(), 5, "{:?}\n{}", completions(), w.all());
    assert_eq!(completions()[4], pair("drain", "CONTINUE"));
    // Done: looking again does nothing.
    let w = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(w.code, 0, "{}", w.all());
    assert_eq!(completions().len(), 5, "{}", w.all());
}

/// A node drained while etcd did not answer still holds its rollout slot (the drain could not
/// give it back). A timer run before the instance goes away finds the slot held
/// (`Gate::Held`): it applies nothing new either, and gives the slot back now that etcd
/// answers.
#[test]
fn a_drained_node_that_still_holds_a_rollout_slot_applies_nothing_new() {
    let mut etcd = Etcd::start(1);
    let (f, src, v1) = rollout_fleet(&etcd, "reboot.etcd", "");
    let v2 = publish_version(&f, src.path(), "v2");
    let r = bootstrap::rollout::etcd::Rollouts::from_lock(etcd.lock("production-web"));
    assert_eq!(
        r.wait_slot(&v2, &f.id, 1, Instant::now() + Duration::from_secs(30)).unwrap(),
        bootstrap::reboot::etcd::Waited::Acquired
    );
    etcd.kill(0);
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Terminated"));
    let w = f.node.agent_env(&["watch", "--once"], &AWS_ENV);
    assert_eq!(w.code, 0, "{}", w.all());
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(f.node.merged.join("var/lib/bootstrap/asg-terminate.json")).unwrap()).unwrap();
    assert!(rec.get("released_rollout_slots").is_none(), "{rec}");
    etcd.restart(0);
    assert_eq!(rollout_status(&f, &v2)["holders"], serde_json::json!([f.id]));
    let run = f.node.agent_env(&["apply"], &AWS_ENV);
    assert_eq!(run.code, 0, "{}", run.all());
    assert_eq!(web_conf(&f), "v1\n", "the drained node applied the new bundle");
    let rep = f.node.report();
    assert_eq!(rep["bundle"]["sha256"], v1.as_str(), "{rep:#}");
    assert_eq!(rep["rollout"]["state"], "drained", "{rep:#}");
    let st = rollout_status(&f, &v2);
    assert_eq!((&st["holders"], &st["applied"]), (&serde_json::json!([]), &serde_json::json!([])), "{st:#}");
}

/// A warm pool instance whose `init` into service cannot read its target lifecycle state
/// (IMDS does not answer the item) still holds and completes the new launch action: a
/// completion recorded in the warm pool never stands for the launch into service, and an
/// action that is not there only costs a logged error.
#[test]
fn a_warm_instance_that_cannot_read_its_state_still_completes_its_launch_into_service() {
    let f = fleet("schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/warm\"\ncontent = \"ready\\n\"\n", "");
    f.node.write_config(&format!(
        "{}enabled = true\n",
        std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml")).unwrap()
    ));
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Warmed:Stopped"));
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f.proxy.ok_calls("CompleteLifecycleAction").len(), 1);
    let marker = f.node.merged.join("var/lib/bootstrap/firstboot.done");
    assert!(!marker.exists());

    // Into service; the item is not answered this time.
    f.proxy.start_action(&f.id, "launch");
    f.imds.set_meta("autoscaling/target-lifecycle-state", None);
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    let calls = f.proxy.ok_calls("CompleteLifecycleAction");
    assert_eq!(calls.len(), 2, "the launch into service was not completed: {}", r.all());
    assert_eq!(calls[1].params["LifecycleActionResult"], "CONTINUE");
    assert!(marker.exists());
}

/// A warm pool instance going into service while a rollout is under way is not in service
/// yet (its launch action holds it out of the load balancer): like a new instance it takes the
/// group's current bundle without queueing for a rollout slot, rather than waiting for a slot
/// while holding the launch action and going into service on the bundle it had in the pool.
#[test]
fn a_warm_instance_going_into_service_takes_the_current_bundle_without_queueing() {
    use bootstrap::rollout::etcd::Rollouts;
    let etcd = Etcd::start(1);
    let f = fleet("schema = 1\n", "");
    let src = tempfile::tempdir().unwrap();
    crate::rollouts::web_bundle(src.path(), "v1");
    let v1 = crate::rollouts::publish_web(src.path(), f._bundle.path());
    let cfg = std::fs::read_to_string(f.node.merged.join("etc/bootstrap/config.toml"))
        .unwrap()
        .replace("source = \"/srv/bundle\"", "source = \"/srv/bundle/web.tar.gz\"");
    f.node.write_config(&format!(
        "{cfg}enabled = true\n[rollout]\nstrategy = \"canary\"\nwait = \"20s\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoints()[0]
    ));
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("Warmed:Stopped"));
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(std::fs::read_to_string(f.node.merged.join("etc/web.conf")).unwrap(), "v1\n");

    // v2 is rolling out; its one slot is taken by another node.
    crate::rollouts::web_bundle(src.path(), "v2");
    let v2 = crate::rollouts::publish_web(src.path(), f._bundle.path());
    let rollouts = Rollouts::from_lock(etcd.lock("production-web"));
    let soon = Instant::now() + Duration::from_secs(30);
    assert_eq!(rollouts.wait_slot(&v2, "other", 1, soon).unwrap(), bootstrap::reboot::etcd::Waited::Acquired);

    f.proxy.start_action(&f.id, "launch");
    f.imds.set_meta("autoscaling/target-lifecycle-state", Some("InService"));
    let r = f.node.agent_env(&["init"], &AWS_ENV);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = f.node.report();
    assert_eq!(rep["bundle"]["sha256"], v2.as_str(), "went into service on the pool's bundle: {rep:#}");
    assert_eq!(std::fs::read_to_string(f.node.merged.join("etc/web.conf")).unwrap(), "v2\n");
    let calls = f.proxy.ok_calls("CompleteLifecycleAction");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].params["LifecycleActionResult"], "CONTINUE");
    assert!(f.node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    // The pool's bundle is kept as the good one before v2 (`rollout abort` of v2 goes back to it).
    let local = std::fs::read_to_string(f.node.merged.join("var/lib/bootstrap/rollout.json")).unwrap();
    assert!(local.contains(&v1), "{local}");
    assert!(f.node.merged.join("var/lib/bootstrap/bundles/previous-good").exists());
    // In service now: a later run is gated as any node's (nothing new here: no change).
    let r = f.node.agent(&["apply"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(f.node.report()["summary"]["changed"], 0);
}
