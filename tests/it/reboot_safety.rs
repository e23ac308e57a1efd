//! Issue 14's reboot findings, on booted nodes with a real etcd or the FleetLock test server:
//! a reboot need outlives the run that could not reboot (3); reboot slots neither leak nor
//! vanish and corrupt state files are never read as "nothing owed" (4); `bootstrap reboot`
//! waits for the run lock and releases only after a converge in this boot (8); config errors
//! exit 78 before any step (10); an empty or uninitialized machine id is refused (12).

use crate::harness::etcd::Etcd;
use crate::harness::node::Node;
use crate::harness::support::*;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

const GROUP: &str = "production-web";
const NAME: [&str; 2] = ["--name", GROUP];

fn holders(etcd: &Etcd) -> Vec<String> {
    etcd.holders(GROUP)
}

/// `[reboot]` with the etcd strategy: `keys` go under `[reboot]`, `tables` at the end.
fn etcd_config(etcd: &Etcd, keys: &str, tables: &str) -> String {
    format!(
        "[reboot]\nstrategy = \"etcd\"\n{keys}[reboot.etcd]\nendpoints = [\"{}\"]\nslots = 1\n{tables}",
        etcd.endpoints()[0]
    )
}

fn apply(n: &Node) -> Run {
    n.run_role("apply", "web", &NAME)
}

fn state_path(n: &Node) -> std::path::PathBuf {
    n.merged.join("var/lib/bootstrap/reboot.json")
}

fn reboot_flag(n: &Node) {
    assert!(n.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
}

/// A window that is closed now (it opens twelve hours from now).
fn closed_window() -> String {
    let hour = (time::OffsetDateTime::now_utc().hour() + 12) % 24;
    format!("window_start = \"{hour:02}:00\"\nwindow_length = \"1h\"\n")
}

/// Finding 3: a `reboot_required` step changed while the window was closed. The next run finds
/// the step in sync, and still reboots (the need was recorded); after the reboot the record is
/// gone and nothing more happens.
#[test]
fn a_reboot_required_change_is_remembered_until_a_reboot() {
    let etcd = Etcd::start(1);
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nid = \"kernel-args\"\nkind = \"file\"\npath = \"/etc/kernel-args.conf\"\ncontent = \"quiet\\n\"\nreboot_required = true\n",
    )]);
    let mut node = Node::boot_host_net(b.path());
    let id = node.machine_id();
    node.write_config(&etcd_config(&etcd, &closed_window(), ""));
    let r = apply(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["steps"][0]["status"], "changed", "{rep:#}");
    assert_eq!(rep["reboot"]["action"], "pending", "{rep:#}");
    let check = node.agent(&["reboot", "--check", "--name", GROUP]).stdout;
    assert!(check.contains("reboot needed") && check.contains("kernel-args"), "{check}");

    // The window opens: the step is in sync now, and the node still reboots.
    node.write_config(&etcd_config(&etcd, "", ""));
    let _ = apply(&node);
    let rep = node.report();
    assert_eq!(rep["steps"][0]["status"], "in_sync", "{rep:#}");
    assert_eq!(rep["reboot"]["action"], "rebooting", "the change made before is not forgotten: {rep:#}");
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133);
    assert_eq!(holders(&etcd), std::slice::from_ref(&id));

    node.boot_again();
    let r = apply(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["reboot"]["action"], "released", "{:#}", node.report());
    assert!(holders(&etcd).is_empty());
    assert_eq!(node.agent(&["reboot", "--check", "--name", GROUP]).stdout.trim(), "no reboot needed");
    let boot_id = node.boot_id();
    let r = apply(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["reboot"]["action"], "none");
    assert!(node.still_up(&boot_id));
}

fn wait_for(node: &Node, script: &str, what: &str) {
    let start = Instant::now();
    while !node.sh(script).stdout.contains("yes") {
        assert!(start.elapsed() < Duration::from_secs(30), "{what} never happened");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Finding 4: a run killed during its pre-reboot hook holds a slot in etcd; reboot.json says
/// so (written before the hook, 0600), so the next run reboots with that same slot and the
/// run after the reboot releases it.
#[test]
fn killed_during_a_pre_reboot_hook_the_slot_is_on_record() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let id = node.machine_id();
    let hook = |cmd: &str| format!("[[reboot.pre_hook]]\ncommand = {cmd}\n");
    node.write_config(&etcd_config(&etcd, "", &hook(r#"["sh", "-c", "touch /run/hook-started; sleep 120"]"#)));
    reboot_flag(&node);
    let r = node.sh("systemd-run --unit=applier /usr/local/bin/bootstrap apply --source /srv/bundle --role web --name production-web");
    assert_eq!(r.code, 0, "{}", r.all());
    wait_for(&node, "test -e /run/hook-started && echo yes", "the hook");
    assert!(node.sh("systemctl kill -s KILL applier && echo ok").stdout.contains("ok"));
    wait_for(&node, "systemctl is-active applier || echo yes", "the kill");
    assert_eq!(holders(&etcd), std::slice::from_ref(&id), "the killed run holds the slot");
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state_path(&node)).expect("reboot.json must record the slot before the hook runs")).unwrap();
    assert_eq!((st["holder"].as_str(), st["group"].as_str()), (Some(id.as_str()), Some(GROUP)), "{st:#}");
    assert_eq!(std::fs::metadata(state_path(&node)).unwrap().permissions().mode() & 0o777, 0o600);

    node.write_config(&etcd_config(&etcd, "", &hook(r#"["true"]"#)));
    let _ = apply(&node);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133, "the next run reboots with its slot");
    assert_eq!(holders(&etcd), std::slice::from_ref(&id), "one slot, not two");
    node.boot_again();
    let r = apply(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["reboot"]["action"], "released");
    assert!(holders(&etcd).is_empty());
    assert!(!state_path(&node).exists());
}

/// What a run killed right after it acquired leaves behind: the slot in etcd and reboot.json
/// of this boot.
fn killed_after_acquire(etcd: &Etcd, node: &Node) -> String {
    let id = node.machine_id();
    assert_eq!(etcd.lock(GROUP).acquire(&id, 1).unwrap(), bootstrap::reboot::etcd::Acquire::Acquired);
    std::fs::create_dir_all(node.merged.join("var/lib/bootstrap")).unwrap();
    std::fs::write(
        state_path(node),
        format!(
            r#"{{"group":"{GROUP}","holder":"{id}","boot_id":"{}","acquired_at":"t","reason":"/run/reboot-required exists"}}"#,
            node.boot_id()
        ),
    )
    .unwrap();
    id
}

/// Finding 4: etcd is down while a node holds a slot from this boot. The run keeps
/// reboot.json (it cannot know whether the slot is still held); when etcd is back the node
/// reboots with that slot.
#[test]
fn a_lock_outage_never_drops_the_slot_record() {
    let mut etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    node.write_config(&etcd_config(&etcd, "", ""));
    let id = killed_after_acquire(&etcd, &node);
    let boot_id = node.boot_id();
    etcd.kill(0);
    let r = apply(&node);
    let rep = node.report();
    assert!(
        rep["reboot"]["detail"].as_str().unwrap_or_default().contains("unavailable"),
        "{}\n{rep:#}",
        r.all()
    );
    assert!(state_path(&node).exists(), "reboot.json dropped while etcd was unreachable: {rep:#}");
    assert!(node.still_up(&boot_id));
    etcd.restart(0);
    let start = Instant::now();
    while etcd.lock("ready").set_slots(1).is_err() {
        assert!(start.elapsed() < Duration::from_secs(30), "etcd did not come back");
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = apply(&node);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133, "rebooted with the slot once etcd was back");
    assert_eq!(holders(&etcd), [id]);
}

/// Finding 4: a FleetLock server that answers the release with 429, 408, 503 or 400 did not
/// release anything: reboot.json stays, the run says why, and a later 200 releases.
#[test]
fn fleetlock_release_needs_a_real_success() {
    let srv = crate::harness::fleetlock::FleetLockServer::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let id = node.machine_id();
    node.write_config(&format!("[reboot]\nstrategy = \"fleet_lock\"\n[reboot.fleet_lock]\nurl = \"{}\"\n", srv.url));
    reboot_flag(&node);
    let _ = apply(&node);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133);
    assert_eq!(srv.holders(GROUP), std::slice::from_ref(&id));
    node.boot_again();
    for code in [429, 408, 503, 400] {
        srv.force("/v1/steady-state", Some(code));
        let r = apply(&node);
        let rep = node.report();
        assert_ne!(rep["reboot"]["action"], "released", "HTTP {code} is no release: {}\n{rep:#}", r.all());
        assert_eq!(r.code, 1, "{}", r.all());
        assert!(rep["error"].as_str().unwrap_or_default().contains(&code.to_string()), "{rep:#}");
        assert!(state_path(&node).exists(), "reboot.json dropped on HTTP {code}");
    }
    srv.force("/v1/steady-state", None);
    let r = apply(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["reboot"]["action"], "released");
    assert!(srv.holders(GROUP).is_empty());
    assert!(!state_path(&node).exists());
}

/// Finding 4: a corrupt reboot.json is a clear error (the run fails and names the file), and
/// the file stays for the operator; it is never read as "no slot held".
#[test]
fn a_corrupt_reboot_state_is_an_error_not_silence() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let node = Node::boot_host_net(b.path());
    node.write_config(&etcd_config(&etcd, "", ""));
    let id = killed_after_acquire(&etcd, &node);
    std::fs::write(state_path(&node), r#"{"group":"production-web","hol"#).unwrap();
    let r = apply(&node);
    assert_eq!(r.code, 1, "{}", r.all());
    let err = node.report()["error"].as_str().unwrap_or_default().to_string();
    assert!(err.contains("/var/lib/bootstrap/reboot.json"), "{err}\n{}", r.all());
    assert_eq!(std::fs::read_to_string(state_path(&node)).unwrap(), r#"{"group":"production-web","hol"#);
    assert_eq!(holders(&etcd), [id]);
}

/// Finding 4: a corrupt pending-notify.json does not read as "nothing owed": the run restarts
/// every handler the role names (the owed ones are among them), then the file is clean.
#[test]
fn a_corrupt_pending_notify_runs_the_handlers() {
    let b = bundle(&[(
        "roles/web/role.toml",
        r#"schema = 1
[[step]]
kind = "unit"
name = "counter.service"
content = """
[Service]
ExecStart=/bin/sh -c 'echo started >> /var/lib/counter.log; exec sleep infinity'
"""
active = true
[[step]]
kind = "file"
path = "/etc/counter.conf"
content = "v1\n"
notify = ["restart:counter.service"]
"#,
    )]);
    let node = Node::boot(b.path());
    let r = node.run_role("apply", "web", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let starts = || {
        std::fs::read_to_string(node.merged.join("var/lib/counter.log"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let before = starts();
    assert!(before >= 1);
    let pending = node.merged.join("var/lib/bootstrap/pending-notify.json");
    assert!(!pending.exists());
    // A run killed after it changed the file and recorded the restart, the record then torn.
    std::fs::write(&pending, "[{\"action\":\"restart\",\"un").unwrap();
    let r = node.run_role("apply", "web", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["summary"]["changed"], 0, "{rep:#}");
    assert_eq!(starts(), before + 1, "the owed restart was not run: {rep:#}");
    assert!(!pending.exists(), "the record is clean after the handlers ran");
}

/// Finding 8: `bootstrap reboot` waits for the run lock: it never reboots in the middle of a
/// run that holds it.
#[test]
fn reboot_command_waits_for_the_run_lock() {
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    node.write_config("[reboot]\nstrategy = \"immediate\"\n");
    reboot_flag(&node);
    let r = node.sh("mkdir -p /run/bootstrap && systemd-run --unit=holder flock /run/bootstrap/lock sh -c 'sleep 3; touch /var/lib/holder-done'");
    assert_eq!(r.code, 0, "{}", r.all());
    wait_for(&node, "flock -n /run/bootstrap/lock true || echo yes", "the holder's lock");
    let _ = node.agent(&["reboot", "--name", GROUP]);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133);
    assert!(node.merged.join("var/lib/holder-done").exists(), "rebooted while another run held the run lock");
}

/// Finding 8: after the reboot, `bootstrap reboot` does not release the slot on the strength of
/// the report from before the reboot; a successful apply in this boot does (its report names
/// the boot).
#[test]
fn reboot_command_releases_only_after_a_converge_in_this_boot() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let id = node.machine_id();
    node.write_config(&etcd_config(&etcd, "", ""));
    reboot_flag(&node);
    let _ = apply(&node);
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133);
    assert_eq!(node.report()["status"], "ok");
    node.boot_again();
    let r = node.agent(&["reboot", "--name", GROUP]);
    assert_eq!(r.code, 0, "{}", r.all());
    let o: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_ne!(o["action"], "released", "released on the report of the previous boot: {}", r.all());
    assert_eq!(o["action"], "holding", "{}", r.all());
    assert_eq!(holders(&etcd), std::slice::from_ref(&id));
    assert!(state_path(&node).exists());

    let r = apply(&node);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = node.report();
    assert_eq!(rep["boot_id"], node.boot_id(), "{rep:#}");
    assert_eq!(rep["reboot"]["action"], "released");
    assert!(holders(&etcd).is_empty());
}

/// Finding 10: every `[reboot]` config error exits 78 before any step runs, and names the key.
#[test]
fn reboot_config_errors_exit_78_before_any_step() {
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"x\\n\"\n",
    )]);
    let node = Node::boot(b.path());
    let cases = [
        ("window_start = \"Mon 25:00\"\nwindow_length = \"1h\"\n", "", "out of range"),
        ("window_start = \"Mon 02:00\"\n", "", "window_start and window_length go together"),
        ("window_splay = \"soon\"\n", "", "window_splay"),
        ("group = \"${home}-web\"\n", "", "${home}"),
        ("", "[[reboot.pre_hook]]\ncommand = [\"true\"]\ntimeout = \"5 parsecs\"\n", "5 parsecs"),
        ("", "[[reboot.pre_hook]]\ncommand = []\n", "pre_hook"),
        (
            "",
            "[[reboot.health]]\nunit = \"a.service\"\nurl = \"http://127.0.0.1/\"\n",
            "exactly one of unit, url, command",
        ),
        ("", "[[reboot.health]]\nurl = \"not a url\"\n", "not a url"),
        ("", "[[reboot.health]]\ncommand = [\"true\"]\ntimeout = \"never\"\n", "never"),
    ];
    for (keys, tables, want) in cases {
        node.write_config(&format!("[reboot]\nstrategy = \"immediate\"\n{keys}{tables}"));
        let r = node.run_role("apply", "web", &NAME);
        assert_eq!(r.code, 78, "{keys}{tables}: {}", r.all());
        assert!(r.stderr.contains(want), "{keys}{tables}: wanted {want:?} in: {}", r.stderr);
        assert!(!node.merged.join("etc/web.conf").exists(), "{keys}{tables}: a step ran");
    }
    for (cfg, want) in [
        ("[reboot]\nstrategy = \"etcd\"\n", "no etcd endpoints"),
        ("[reboot]\nstrategy = \"fleet_lock\"\n", "needs [reboot.fleet_lock] url"),
    ] {
        node.write_config(cfg);
        let r = node.run_role("apply", "web", &NAME);
        assert_eq!(r.code, 78, "{cfg}: {}", r.all());
        assert!(r.stderr.contains(want), "{cfg}: {}", r.stderr);
        assert!(!node.merged.join("etc/web.conf").exists(), "{cfg}: a step ran");
    }
    // A coordinated strategy with no group and no name to make one from.
    node.write_config("[reboot]\nstrategy = \"fleet_lock\"\n[reboot.fleet_lock]\nurl = \"http://127.0.0.1:1/\"\n");
    let r = node.run_role("apply", "web", &[]);
    assert_eq!(r.code, 78, "{}", r.all());
    assert!(r.stderr.contains("no reboot group"), "{}", r.stderr);
    assert!(!node.merged.join("etc/web.conf").exists());
    // The same role with a good config changes the host.
    node.write_config("[reboot]\nstrategy = \"immediate\"\nwindow_start = \"Mon 02:00\"\nwindow_length = \"1h\"\n");
    let r = node.run_role("apply", "web", &NAME);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(node.merged.join("etc/web.conf").exists());
}

/// Finding 12: an empty or `uninitialized` machine id (no instance id off EC2) is no holder id:
/// the run is refused before any step, no slot is taken, no reboot.
#[test]
fn an_empty_or_uninitialized_machine_id_is_refused_for_coordination() {
    let etcd = Etcd::start(1);
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"x\\n\"\n",
    )]);
    let mut node = Node::boot_host_net(b.path());
    let boot_id = node.boot_id();
    node.write_config(&etcd_config(&etcd, "", ""));
    reboot_flag(&node);
    for id in ["", "uninitialized\n"] {
        std::fs::write(node.merged.join("etc/machine-id"), id).unwrap();
        let r = apply(&node);
        assert_eq!(r.code, 78, "machine id {id:?}: {}", r.all());
        assert!(r.stderr.contains("/etc/machine-id"), "{}", r.stderr);
        assert!(node.still_up(&boot_id), "machine id {id:?}: rebooted");
        assert!(holders(&etcd).is_empty(), "machine id {id:?}: took a slot");
        assert!(!node.merged.join("etc/web.conf").exists());
    }
}

/// Finding 4: the slot cannot be put on record (no inode left for /var/lib/bootstrap): it is
/// given back at once instead of being held with no record of it; no reboot.
#[test]
fn a_slot_that_cannot_be_recorded_is_given_back() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let boot_id = node.boot_id();
    node.write_config(&etcd_config(&etcd, "", ""));
    reboot_flag(&node);
    let r = node.sh("mkdir -p /var/lib/bootstrap && mount -t tmpfs -o nr_inodes=1 full /var/lib/bootstrap && echo ok");
    assert!(r.stdout.contains("ok"), "{}", r.all());
    let r = apply(&node);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("No space left on device"), "{}", r.stderr);
    assert!(holders(&etcd).is_empty(), "an unrecorded slot leaked: {}", r.all());
    assert!(node.still_up(&boot_id));
}
