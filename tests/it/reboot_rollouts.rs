//! Coordinated reboots on two booted nodes sharing one real etcd (slots = 1).

use crate::harness::etcd::Etcd;
use crate::harness::node::Node;
use crate::harness::support::*;
use std::time::Duration;

fn holders(etcd: &Etcd) -> Vec<String> {
    etcd.holders("production-web")
}

/// Two nodes, one slot: one reboots while the other waits; a node unhealthy after its reboot
/// halts the rollout; after a healthy boot the slot goes to the other. `holders` reads the lock
/// service's state.
fn one_slot_rollout(config: &str, holders: &dyn Fn() -> Vec<String>) -> (Vec<Node>, String, String, tempfile::TempDir) {
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"x\\n\"\n",
    )]);
    let mut nodes: Vec<Node> = (0..2).map(|_| Node::boot_host_net(b.path())).collect();
    for n in &nodes {
        n.write_config(config);
        assert!(n.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    }
    let id = |n: &Node| n.machine_id();
    let (a_id, b_id) = (id(&nodes[0]), id(&nodes[1]));

    // Node A takes the slot and reboots (nspawn exits 133).
    let _ = nodes[0].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(nodes[0].wait_exit(Duration::from_secs(60)), 133, "node A did not reboot");
    assert_eq!(holders(), std::slice::from_ref(&a_id));
    // Node B finds no free slot: reboot pending, success, no reboot.
    let r = nodes[1].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = nodes[1].report();
    assert_eq!(rep["reboot_pending"], true, "{rep:#}");
    assert_eq!(rep["reboot"]["action"], "pending");
    assert_eq!(holders(), std::slice::from_ref(&a_id));

    // A comes back but its run fails (a broken role): it keeps the slot, the rollout halts,
    // and B (whose own runs succeed) still may not reboot.
    nodes[0].boot_again();
    let role = b.path().join("roles/web/role.toml");
    let good_role = std::fs::read_to_string(&role).unwrap();
    std::fs::write(
        &role,
        format!("{good_role}[[step]]\nkind = \"exec\"\ncommand = [\"false\"]\ncreates = \"/nonexistent\"\n"),
    )
    .unwrap();
    let r = nodes[0].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let rep = nodes[0].report();
    assert_eq!(rep["reboot"]["action"], "halted", "{rep:#}");
    assert!(rep["reboot"]["detail"].as_str().unwrap().contains("unhealthy after reboot"));
    assert_eq!(holders(), std::slice::from_ref(&a_id));
    std::fs::write(&role, good_role).unwrap();
    let r = nodes[1].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[1].report()["reboot"]["action"], "pending", "B waits while the halted A holds the slot");

    // Fixed: A converges and is healthy, so it releases its slot.
    let r = nodes[0].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[0].report()["reboot"]["action"], "released");
    assert!(holders().is_empty());
    assert!(!nodes[0].merged.join("var/lib/bootstrap/reboot.json").exists());

    // B's next run takes the slot and reboots.
    let _ = nodes[1].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(nodes[1].wait_exit(Duration::from_secs(60)), 133, "node B did not reboot");
    assert_eq!(holders(), std::slice::from_ref(&b_id));

    (nodes, a_id, b_id, b)
}

#[test]
fn two_nodes_one_slot_reboot_one_at_a_time() {
    let etcd = Etcd::start(1);
    let config = format!(
        "[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\nslots = 1\n",
        etcd.endpoints()[0]
    );
    let (nodes, _a_id, b_id, _bundle) = one_slot_rollout(&config, &|| holders(&etcd));
    // Operator tools, from a node with the config.
    let r = nodes[0].agent(&["lock", "status", "--group", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("1/1 slots held") && r.stdout.contains(&b_id), "{}", r.stdout);
    let r = nodes[0].agent(&["lock", "release", &b_id, "--group", "production-web"]);
    assert!(r.stdout.contains("released"), "{}", r.all());
    assert!(holders(&etcd).is_empty());
    assert_eq!(nodes[0].agent(&["lock", "set-slots", "3", "--group", "production-web"]).code, 0);
    assert_eq!(etcd.lock("production-web").get().unwrap().unwrap().0.total_slots, 3);
}

#[test]
fn two_nodes_one_slot_with_fleetlock() {
    let srv = crate::harness::fleetlock::FleetLockServer::start(1);
    let config = format!("[reboot]\nstrategy = \"fleet_lock\"\n[reboot.fleet_lock]\nurl = \"{}\"\n", srv.url);
    let (_nodes, _a, b_id, _bundle) = one_slot_rollout(&config, &|| srv.holders("production-web"));
    assert_eq!(srv.holders("production-web"), [b_id]);
}

/// A run killed right after it acquired (reboot.json written, slot held, no reboot yet): the
/// next run reboots with the same slot and does not take a second one.
#[test]
fn killed_after_acquire_the_next_run_reboots_with_its_slot() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    node.write_config(&format!(
        "[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\nslots = 1\n",
        etcd.endpoints()[0]
    ));
    let id = node.machine_id();
    let boot_id = node.boot_id();
    // What the killed run left behind.
    assert_eq!(etcd.lock("production-web").acquire(&id, 1).unwrap(), bootstrap::reboot::etcd::Acquire::Acquired);
    std::fs::create_dir_all(node.merged.join("var/lib/bootstrap")).unwrap();
    std::fs::write(
        node.merged.join("var/lib/bootstrap/reboot.json"),
        format!(r#"{{"group":"production-web","holder":"{id}","boot_id":"{boot_id}","acquired_at":"t","reason":"/run/reboot-required exists"}}"#),
    )
    .unwrap();
    let _ = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133, "the node did not reboot with its slot");
    assert_eq!(holders(&etcd), [id]);
}

/// A failing pre-reboot hook releases the slot and cancels the reboot; health checks gate the
/// release after the reboot; `reboot --request` / `--check`.
#[test]
fn hooks_and_health_checks_gate_the_reboot() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let boot_id = node.boot_id();
    let write = |node: &Node, extra: &str| {
        node.write_config(&format!(
            "[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n{extra}",
            etcd.endpoints()[0]
        ))
    };
    write(&node, "[[reboot.pre_hook]]\ncommand = [\"sh\", \"-c\", \"echo draining failed; exit 4\"]\n");
    assert_eq!(node.agent(&["reboot", "--check", "--name", "production-web"]).stdout.trim(), "no reboot needed");
    assert_eq!(node.agent(&["reboot", "--request"]).code, 0);
    assert!(node
        .agent(&["reboot", "--check", "--name", "production-web"])
        .stdout
        .contains("reboot needed: requested"));

    let r = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["reboot"]["action"], "hook_failed", "{rep:#}");
    assert!(rep["reboot"]["detail"].as_str().unwrap().contains("exited with status 4"));
    assert!(holders(&etcd).is_empty(), "the slot goes back after a failed hook");
    assert!(node.still_up(&boot_id), "no reboot after a failed hook");

    write(
        &node,
        "[[reboot.pre_hook]]\ncommand = [\"touch\", \"/var/lib/drained\"]\n[[reboot.health]]\nunit = \"ghost.service\"\n",
    );
    let _ = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133);
    assert!(node.merged.join("var/lib/drained").exists(), "the hook ran before the reboot");
    node.boot_again();
    let r = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["reboot"]["action"], "halted");
    assert!(rep["reboot"]["detail"].as_str().unwrap().contains("unit ghost.service is inactive"), "{rep:#}");
    assert_eq!(holders(&etcd).len(), 1, "an unhealthy node keeps its slot");
    // The operator sees who holds the slot and why, from any node with the config.
    let r = node.agent(&["lock", "status", "--group", "production-web"]);
    let id = node.machine_id();
    assert!(
        r.stdout
            .contains(&format!("{id}  halted: unhealthy after reboot: unit ghost.service is inactive")),
        "{}",
        r.all()
    );

    write(
        &node,
        "[[reboot.health]]\ncommand = [\"true\"]\n[[reboot.health]]\nunit = \"systemd-journald.service\"\n",
    );
    let r = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["reboot"]["action"], "released");
    assert!(holders(&etcd).is_empty());
    assert!(etcd.lock("production-web").statuses().unwrap().is_empty(), "the halt note goes with the slot");
    assert!(!node.merged.join("var/lib/bootstrap/reboot-requested").exists(), "the request is done");
    assert_eq!(node.agent(&["reboot", "--check", "--name", "production-web"]).stdout.trim(), "no reboot needed");
}

#[test]
fn outside_the_window_no_slot_is_taken() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let node = Node::boot_host_net(b.path());
    let hour = (time::OffsetDateTime::now_utc().hour() + 12) % 24;
    node.write_config(&format!(
        "[reboot]\nstrategy = \"etcd\"\nwindow_start = \"{hour:02}:00\"\nwindow_length = \"1h\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoints()[0]
    ));
    assert!(node.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    let r = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = node.report();
    assert_eq!(
        (rep["reboot"]["action"].as_str(), rep["reboot"]["detail"].as_str()),
        (Some("pending"), Some("outside the reboot window"))
    );
    assert!(etcd.lock("production-web").get().unwrap().is_none(), "no acquire outside the window");
}

/// `lock reap` drops holders whose instance is terminated or unknown (moto) and keeps the rest.
/// An instance the operator's region does not know may live in another region (the operator's
/// AWS_REGION is not the fleet's): it is looked for in every region before its slot is taken.
#[test]
fn lock_reap_removes_dead_holders_only() {
    let etcd = Etcd::start(1);
    let moto = crate::harness::moto::Moto::start();
    let live = moto.run_instance(&[("Name", "production-web")]);
    let dead = moto.run_instance(&[("Name", "production-web")]);
    moto.terminate(&dead);
    let elsewhere = moto.run_instance_in("eu-west-1", &[("Name", "production-web")]);
    let lock = etcd.lock("production-web");
    for h in [live.as_str(), dead.as_str(), "i-0000000000000dead", "machine-abc", elsewhere.as_str()] {
        assert_eq!(lock.acquire(h, 5).unwrap(), bootstrap::reboot::etcd::Acquire::Acquired);
    }
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let node = Node::boot_host_net(b.path());
    node.write_config(&format!(
        "[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n[aws]\nec2_endpoint = \"{}\"\n",
        etcd.endpoints()[0],
        moto.url
    ));
    let r = node.sh("AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true bootstrap lock reap --group production-web");
    assert!(
        r.stdout.contains(&format!("removed {dead}")) && r.stdout.contains("removed i-0000000000000dead"),
        "{}",
        r.all()
    );
    assert!(
        r.stdout.contains(&format!("kept {live}: instance exists")) && r.stdout.contains("kept machine-abc"),
        "{}",
        r.all()
    );
    assert!(r.stdout.contains(&format!("kept {elsewhere}: instance exists in eu-west-1")), "{}", r.all());
    assert_eq!(holders(&etcd), [live, "machine-abc".to_string(), elsewhere]);
}

/// etcd loses quorum (2 of 3 members down): no reboot, the run reports the lock service as
/// unavailable and succeeds; once quorum is back, the next run takes the slot and reboots.
#[test]
fn lost_quorum_means_no_reboot_until_it_returns() {
    let mut etcd = Etcd::start(3);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let boot_id = node.boot_id();
    let eps = etcd.endpoints().iter().map(|e| format!("\"{e}\"")).collect::<Vec<_>>().join(", ");
    node.write_config(&format!("[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [{eps}]\n"));
    assert!(node.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    etcd.kill(1);
    etcd.kill(2);
    let r = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["reboot_pending"], true);
    assert!(
        rep["reboot"]["detail"].as_str().unwrap().contains("reboot lock unavailable, not rebooting"),
        "{rep:#}"
    );
    assert!(
        node.still_up(&boot_id),
        "no reboot without the lock: {}",
        node.sh("systemctl is-system-running; systemctl --failed").all()
    );
    etcd.restart(1);
    etcd.restart(2);
    let start = std::time::Instant::now();
    while etcd.lock("ready").set_slots(1).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "quorum did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = node.run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133, "rebooted once the lock was back");
}

fn etcd_node(etcd: &Etcd, extra: &str) -> (Node, tempfile::TempDir) {
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let node = Node::boot_host_net(b.path());
    write_reboot_config(&node, etcd, extra);
    assert!(node.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    (node, b)
}

fn write_reboot_config(node: &Node, etcd: &Etcd, extra: &str) {
    node.write_config(&format!(
        "[reboot]\nstrategy = \"etcd\"\n{extra}[reboot.etcd]\nendpoints = [\"{}\"]\nslots = 1\n",
        etcd.endpoints()[0]
    ));
}

fn queued(etcd: &Etcd) -> String {
    etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/production-web/v1/queue/"])
        .trim()
        .to_string()
}

/// `bootstrap reboot --wait` queues while another node holds the slot, and reboots as soon as
/// that slot is released.
#[test]
fn reboot_wait_takes_the_slot_when_it_frees() {
    let etcd = Etcd::start(1);
    assert_eq!(
        etcd.lock("production-web").acquire("other", 1).unwrap(),
        bootstrap::reboot::etcd::Acquire::Acquired
    );
    let (mut node, _b) = etcd_node(&etcd, "");
    let boot_id = node.boot_id();
    let id = node.machine_id();
    let r = node.sh("systemd-run --unit=waiter /usr/local/bin/bootstrap reboot --wait --name production-web");
    assert_eq!(r.code, 0, "{}", r.all());
    let start = std::time::Instant::now();
    while !queued(&etcd).contains(&id) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the node never queued: {}",
            node.sh("journalctl -u waiter").stdout
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = node.agent(&["lock", "status", "--group", "production-web"]);
    assert!(
        r.stdout.contains(&format!("1 waiting for a slot (reboot --wait), in queue order:\n  {id}\n")),
        "{}",
        r.all()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(node.still_up(&boot_id), "no reboot while the slot is taken");
    assert_eq!(holders(&etcd), ["other"]);
    assert!(etcd.lock("production-web").release("other", 1).unwrap());
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133, "rebooted once the slot was free");
    assert_eq!(holders(&etcd), [id]);
    assert_eq!(queued(&etcd), "", "out of the queue");
}

/// The window closes while `reboot --wait` waits for a slot: no reboot, no slot, no queue entry.
#[test]
fn reboot_wait_gives_up_when_the_window_closes() {
    let etcd = Etcd::start(1);
    assert_eq!(
        etcd.lock("production-web").acquire("other", 1).unwrap(),
        bootstrap::reboot::etcd::Acquire::Acquired
    );
    let (mut node, _b) = etcd_node(&etcd, "");
    // A window that opened at the start of this minute and closes 10 s from now, measured
    // after the node booted (a boot under load took most of a shorter window before the agent
    // ran). Whether it waited is read from what the agent says, never from a clock here.
    let now = time::OffsetDateTime::now_utc();
    let length = now.second() as u64 + 10;
    write_reboot_config(
        &node,
        &etcd,
        &format!(
            "window_start = \"{:02}:{:02}\"\nwindow_length = \"{length}s\"\nwindow_splay = \"0s\"\n",
            now.hour(),
            now.minute()
        ),
    );
    let boot_id = node.boot_id();
    let r = node.agent(&["reboot", "--wait", "--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let o: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(o["action"], "pending", "{o:#}");
    assert_eq!(o["detail"], "outside the reboot window: waited for a slot until the window closed", "{o:#}");
    assert!(node.still_up(&boot_id));
    assert_eq!(holders(&etcd), ["other"]);
    assert_eq!(queued(&etcd), "");
}

/// RHEL-family detection: `needs-restarting -r` (dnf-utils) exits 1 when a reboot is needed and
/// 0 when not. No RHEL image can be built here, so a booted Debian node is given a Rocky
/// `/etc/os-release` and a `needs-restarting` that keeps that protocol; on the unchanged Debian
/// node the same tool is never asked.
#[test]
fn needs_restarting_decides_on_a_rhel_family_node() {
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let node = Node::boot_host_net(b.path());
    let tool = "#!/bin/sh\n[ \"$1\" = -r ] || { echo \"usage: needs-restarting -r\" >&2; exit 2; }\n\
                if [ -e /var/tmp/kernel-updated ]; then echo 'Reboot is required to fully utilize these updates.'; exit 1; fi\n\
                echo 'No core libraries or services have been updated since boot-up.'\n";
    let bin = node.merged.join("usr/local/sbin/needs-restarting");
    std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
    std::fs::write(&bin, tool).unwrap();
    assert!(node
        .sh("chmod 755 /usr/local/sbin/needs-restarting && touch /var/tmp/kernel-updated && echo ok")
        .stdout
        .contains("ok"));
    let check = || node.agent(&["reboot", "--check", "--name", "production-web"]).stdout.trim().to_string();
    assert_eq!(check(), "no reboot needed", "a Debian node does not ask needs-restarting");

    let os_release = node.merged.join("etc/os-release");
    let _ = std::fs::remove_file(&os_release);
    std::fs::write(
        &os_release,
        "NAME=\"Rocky Linux\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\nVERSION_ID=\"9.4\"\n",
    )
    .unwrap();
    assert_eq!(check(), "reboot needed: needs-restarting -r says so");
    assert!(node.sh("rm /var/tmp/kernel-updated && echo ok").stdout.contains("ok"));
    assert_eq!(check(), "no reboot needed");
}
