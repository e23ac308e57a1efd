//! End to end on a booted systemd node: packages from the test apt repo, units over D-Bus,
//! notify restarts, failures, plan on drift, a held dpkg lock.

use crate::harness::node::Node;
use crate::harness::support::*;
use std::time::{Duration, Instant};

#[test]
fn haproxy_on_a_booted_node_then_nothing_to_do() {
    let node = Node::boot(&repo());
    let r = node.run_role("apply", "haproxy", &["--env", "production", "--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(node.sh("systemctl is-active haproxy").stdout.trim(), "active");
    assert_eq!(node.sh("systemctl is-enabled haproxy").stdout.trim(), "enabled");
    assert!(node.sh("dpkg-query -W haproxy").stdout.starts_with("haproxy\t2.6"));
    assert!(std::fs::read_to_string(node.merged.join("etc/haproxy/haproxy.cfg"))
        .unwrap()
        .contains("maxconn 8000"));
    let notify = &node.report()["notify"];
    assert_eq!(notify[0]["target"], "restart:haproxy.service");
    assert_eq!(notify[0]["status"], "done");
    let pid = node.main_pid("haproxy.service");
    assert_ne!(pid, "0");

    let r = node.run_role("apply", "haproxy", &["--env", "production", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "second apply changes nothing\n{}", r.all());
    let rep = node.report();
    assert_eq!(rep["summary"]["changed"], 0, "{rep:#}");
    assert_eq!(rep["notify"].as_array().unwrap().len(), 0, "no handler on a run without changes");
    assert_eq!(node.main_pid("haproxy.service"), pid, "haproxy was restarted by a no-op run");
}

#[test]
fn changed_template_restarts_once_even_with_two_notifiers() {
    let b = bundle_copy();
    let node = Node::boot(b.path());
    assert_eq!(node.run_role("apply", "haproxy", &[]).code, 0);
    let pid = node.main_pid("haproxy.service");

    // A second step that notifies the same unit, and a changed variable.
    let role = b.path().join("roles/haproxy/role.toml");
    let text = std::fs::read_to_string(&role).unwrap().replace("maxconn = 4096", "maxconn = 5000")
        + "\n[[step]]\nkind = \"file\"\npath = \"/etc/haproxy/errors.lst\"\ncontent = \"503\\n\"\nnotify = [\"restart:haproxy.service\"]\n";
    std::fs::write(&role, text).unwrap();
    let cursor = node.journal_cursor();
    let r = node.run_role("apply", "haproxy", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let new_pid = node.main_pid("haproxy.service");
    assert_ne!(new_pid, pid, "haproxy was not restarted");
    let journal = node.journal_since(&cursor, "haproxy.service");
    assert_eq!(journal.matches("Stopping haproxy.service").count(), 1, "restarted more than once:\n{journal}");
    assert_eq!(journal.matches("Started haproxy.service").count(), 1, "{journal}");
    let notify = node.report()["notify"].clone();
    assert_eq!(notify.as_array().unwrap().len(), 1, "{notify:#}");
    assert_eq!(node.run_role("apply", "haproxy", &["--detailed-exitcodes"]).code, 0);
    assert_eq!(node.main_pid("haproxy.service"), new_pid);
}

#[test]
fn failing_unit_and_missing_package_fail_the_run_and_stop_it() {
    let b = bundle(&[
        (
            "roles/broken/role.toml",
            "schema = 1\n[[step]]\nkind = \"unit\"\nname = \"broken.service\"\ncontent = \"[Service]\\nType=oneshot\\nExecStart=/bin/sh -c 'echo boom-marker-7; exit 3'\\n[Install]\\nWantedBy=multi-user.target\\n\"\nenabled = true\nactive = true\n[[step]]\nkind = \"file\"\npath = \"/after\"\ncontent = \"x\"\n",
        ),
        ("roles/nopkg/role.toml", "schema = 1\n[[step]]\nkind = \"package\"\nnames = [\"hello\", \"no-such-package-x\"]\n[[step]]\nkind = \"file\"\npath = \"/after\"\ncontent = \"x\"\n"),
    ]);
    let node = Node::boot(b.path());
    let r = node.run_role("apply", "broken", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("broken.service is failed"), "{}", r.all());
    assert!(r.all().contains("boom-marker-7"), "journal lines expected:\n{}", r.all());
    let rep = node.report();
    assert_eq!(rep["steps"][0]["status"], "failed");
    assert_eq!(rep["steps"][0]["id"], "unit:broken.service");
    assert_eq!(rep["steps"][1]["status"], "not_run");
    assert!(!node.merged.join("after").exists());

    let r = node.run_role("apply", "nopkg", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.all().contains("Unable to locate package no-such-package-x"),
        "apt's message expected:\n{}",
        r.all()
    );
    let rep = node.report();
    assert_eq!(rep["steps"][0]["status"], "failed");
    assert_eq!(rep["steps"][1]["status"], "not_run");
    assert!(!node.merged.join("after").exists());
}

#[test]
fn plan_on_a_drifted_node_lists_exactly_the_drift() {
    let b = bundle_copy();
    std::fs::create_dir_all(b.path().join("roles/edge")).unwrap();
    std::fs::write(
        b.path().join("roles/edge/role.toml"),
        "schema = 1\ninclude = [\"haproxy\"]\n[[step]]\nkind = \"package\"\nnames = [\"hello\"]\n",
    )
    .unwrap();
    let node = Node::boot(b.path());
    assert_eq!(node.run_role("apply", "edge", &[]).code, 0);
    let r = node.sh("systemctl stop haproxy && apt-get remove -y -q hello >/dev/null 2>&1 && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let before = snapshot_node(&node);
    let r = node.run_role("plan", "edge", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let plan: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let drift = changed_ids(&plan);
    assert_eq!(drift, ["unit:haproxy.service", "package:hello"]);
    assert_eq!(snapshot_node(&node), before, "plan changed the node");
    assert_eq!(node.sh("systemctl is-active haproxy").stdout.trim(), "inactive");
    assert_eq!(node.run_role("apply", "edge", &["--detailed-exitcodes"]).code, 2);
    assert_eq!(node.run_role("plan", "edge", &["--detailed-exitcodes"]).code, 0);
}

fn snapshot_node(node: &Node) -> String {
    node.sh("dpkg-query -W; systemctl is-active haproxy; md5sum /etc/haproxy/haproxy.cfg").stdout
}

#[test]
fn held_dpkg_lock_is_waited_for() {
    let b = bundle(&[("roles/hello/role.toml", "schema = 1\n[[step]]\nkind = \"package\"\nnames = [\"hello\"]\n")]);
    let node = Node::boot(b.path());
    // Hold dpkg's frontend lock (an fcntl lock, as apt takes it) from the host for a while.
    let lock = node.merged.join("var/lib/dpkg/lock-frontend");
    let mut holder = std::process::Command::new("python3")
        .args([
            "-c",
            "import fcntl,sys,time; f=open(sys.argv[1],'a'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(float(sys.argv[2]))",
        ])
        .arg(&lock)
        .arg("4")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(holder.stdout.as_mut().unwrap()), &mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let start = Instant::now();
    let r = node.run_role("apply", "hello", &[]);
    let waited = start.elapsed();
    let held = holder.wait().unwrap();
    assert!(held.success());
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(node.sh("dpkg-query -W hello").stdout.starts_with("hello\t"));
    // Not a timing goal: proof the run met the lock rather than missing it.
    assert!(waited > Duration::from_secs(1), "the run did not wait for the lock ({waited:?})");
}

/// Build a tiny .deb with `dpkg-deb --build` into `repo`.
fn build_deb(repo: &std::path::Path, name: &str, version: &str) {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("pkg");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/bootstrap-test")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        format!("Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: bootstrap tests <tests@localhost>\nDescription: test package\n"),
    )
    .unwrap();
    std::fs::write(root.join(format!("usr/share/bootstrap-test/{name}")), format!("{version}\n")).unwrap();
    let st = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(repo.join(format!("{name}_{version}_all.deb")))
        .output()
        .unwrap();
    assert!(st.status.success(), "dpkg-deb: {}", String::from_utf8_lossy(&st.stderr));
}

fn index_repo(repo: &std::path::Path) {
    let out = std::process::Command::new("dpkg-scanpackages")
        .args(["--multiversion", ".", "/dev/null"])
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(repo.join("Packages"), out.stdout).unwrap();
}

#[test]
fn package_versions_latest_absent_and_unit_states_with_built_debs() {
    let repo = tempfile::tempdir().unwrap();
    build_deb(repo.path(), "bootstrap-probe", "1.0");
    build_deb(repo.path(), "bootstrap-probe", "2.0");
    index_repo(repo.path());
    let role = |pkg: &str, unit: &str| {
        // A masked unit has no file of its own (masking links it to /dev/null).
        let content = if unit.contains("masked") {
            ""
        } else {
            "content = \"[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n\""
        };
        format!(
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/apt/sources.list.d/probe.list\"\ncontent = \"deb [trusted=yes] file:/srv/proberepo ./\\n\"\n[[step]]\nkind = \"package\"\n{pkg}\n[[step]]\nkind = \"unit\"\nname = \"probe.service\"\n{content}\n{unit}\n"
        )
    };
    let b = tempfile::tempdir().unwrap();
    let write = |r: String| {
        std::fs::create_dir_all(b.path().join("roles/probe")).unwrap();
        std::fs::write(b.path().join("roles/probe/role.toml"), r).unwrap();
    };
    let node = Node::boot_with(b.path(), &[(repo.path(), "/srv/proberepo")]);
    let version = || node.sh("dpkg-query -W -f '${Version}' bootstrap-probe 2>/dev/null").stdout;
    let twice = |what: &str| {
        let r = node.run_role("apply", "probe", &["--detailed-exitcodes"]);
        assert_eq!(r.code, 2, "{what}: first run changes\n{}", r.all());
        let r = node.run_role("apply", "probe", &["--detailed-exitcodes"]);
        assert_eq!(r.code, 0, "{what}: second run changes nothing\n{}", r.all());
    };

    write(role("names = [\"bootstrap-probe=1.0\"]", "enabled = true\nactive = true"));
    twice("pinned 1.0, unit enabled+active");
    assert_eq!(version(), "1.0");
    assert_eq!(node.sh("systemctl is-enabled probe; systemctl is-active probe").stdout, "enabled\nactive\n");

    write(role("names = [\"bootstrap-probe\"]\nstate = \"latest\"", "enabled = false\nactive = false"));
    twice("latest, unit disabled+stopped");
    assert_eq!(version(), "2.0");
    assert_eq!(node.sh("systemctl is-enabled probe; systemctl is-active probe").stdout, "disabled\ninactive\n");

    write(role("names = [\"bootstrap-probe\"]\nstate = \"absent\"", "masked = true"));
    twice("absent, unit masked");
    assert_eq!(version(), "");
    assert_eq!(node.sh("systemctl is-enabled probe").stdout.trim(), "masked");
}

#[test]
fn harness_sees_a_reboot_and_boots_the_node_again() {
    let b = bundle(&[(
        "roles/r/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/kept\"\ncontent = \"x\"\n",
    )]);
    let mut node = Node::boot(b.path());
    assert_eq!(node.run_role("apply", "r", &[]).code, 0);
    let boot_id = node.sh("cat /proc/sys/kernel/random/boot_id").stdout;
    node.sh("systemctl reboot");
    assert_eq!(node.wait_exit(Duration::from_secs(60)), 133, "a reboot makes nspawn exit 133");
    node.boot_again();
    assert_ne!(node.sh("cat /proc/sys/kernel/random/boot_id").stdout, boot_id);
    assert_eq!(node.run_role("apply", "r", &["--detailed-exitcodes"]).code, 0, "state survives the reboot");
}
