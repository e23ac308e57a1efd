//! The package step's dnf path for real, on a booted RHEL-family node: the rootfs of
//! scripts/rootfs-rhel (Debian's dnf 4.14 and rpm, a Rocky Linux 9 os-release, so the facts
//! say os.family = rhel) and the test rpm repository (rpmbuild -bb, createrepo_c) at
//! /srv/rpmrepo through /etc/yum.repos.d/test.repo: bootstrap-probe 1.0-1 and 2.0-1,
//! bootstrap-other 1.0-1.

use crate::harness::node::Node;
use crate::harness::support::changed_ids;

fn write_role(b: &std::path::Path, name: &str, steps: &str) {
    std::fs::create_dir_all(b.join(format!("roles/{name}"))).unwrap();
    std::fs::write(b.join(format!("roles/{name}/role.toml")), format!("schema = 1\n{steps}")).unwrap();
}

fn pkg(names: &str, state: &str) -> String {
    format!("[[step]]\nkind = \"package\"\nnames = [{names}]\nstate = \"{state}\"\n")
}

/// `VERSION-RELEASE` from rpm, or "" when not installed.
fn rpm_q(node: &Node, name: &str) -> String {
    node.sh(&format!(
        "if rpm -q {name} >/dev/null 2>&1; then rpm -q --qf '%{{VERSION}}-%{{RELEASE}}' {name}; fi"
    ))
    .stdout
}

fn twice(node: &Node, role: &str, what: &str) {
    let r = node.run_role("apply", role, &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{what}: the first run changes\n{}", r.all());
    let r = node.run_role("apply", role, &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{what}: the second run changes nothing\n{}", r.all());
}

#[test]
fn dnf_pin_latest_downgrade_absent_each_twice_on_a_rhel_node() {
    let b = tempfile::tempdir().unwrap();
    let node = Node::boot_rhel(b.path(), &[]);
    let os = node
        .sh(". /etc/os-release; echo $ID; rpm -q bootstrap-probe >/dev/null || echo not-installed")
        .stdout;
    assert_eq!(os, "rocky\nnot-installed\n");
    let f: serde_json::Value = serde_json::from_str(&node.agent(&["facts", "--format", "json"]).stdout).unwrap();
    assert_eq!((f["os"]["family"].as_str(), f["os"]["id"].as_str()), (Some("rhel"), Some("rocky")), "{f:#}");

    write_role(b.path(), "probe", &pkg("\"bootstrap-probe=1.0\"", "present"));
    twice(&node, "probe", "a version pin (1.0)");
    assert_eq!(rpm_q(&node, "bootstrap-probe"), "1.0-1");

    write_role(b.path(), "probe", &pkg("\"bootstrap-probe\"", "latest"));
    let r = node.run_role("plan", "probe", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("2.0-1"), "latest's plan names the candidate:\n{}", r.stdout);
    twice(&node, "probe", "latest (2.0)");
    assert_eq!(rpm_q(&node, "bootstrap-probe"), "2.0-1");

    write_role(b.path(), "probe", &pkg("\"bootstrap-probe=1.0-1\"", "present"));
    twice(&node, "probe", "a pin (1.0-1) below the installed 2.0-1: a downgrade");
    assert_eq!(rpm_q(&node, "bootstrap-probe"), "1.0-1");

    write_role(b.path(), "probe", &pkg("\"bootstrap-probe\"", "absent"));
    twice(&node, "probe", "absent");
    assert_eq!(rpm_q(&node, "bootstrap-probe"), "");
}

#[test]
fn dnf_present_twice_plan_shows_a_drift_by_rpm_e_and_a_missing_package_fails() {
    let b = tempfile::tempdir().unwrap();
    write_role(b.path(), "other", &pkg("\"bootstrap-other\"", "present"));
    write_role(
        b.path(),
        "nopkg",
        &format!(
            "{}[[step]]\nkind = \"file\"\npath = \"/after\"\ncontent = \"x\"\n",
            pkg("\"bootstrap-other\", \"no-such-package-x\"", "present")
        ),
    );
    let node = Node::boot_rhel(b.path(), &[]);

    twice(&node, "other", "present");
    assert_eq!(rpm_q(&node, "bootstrap-other"), "1.0-1");
    assert_eq!(node.sh("cat /usr/share/bootstrap-test/bootstrap-other").stdout, "1.0\n");

    // A drift made by hand: plan shows it and changes nothing; apply repairs it.
    let r = node.sh("rpm -e bootstrap-other && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let r = node.run_role("plan", "other", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let plan: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let drift = changed_ids(&plan);
    assert_eq!(drift, ["package:bootstrap-other"], "{plan:#}");
    assert_eq!(rpm_q(&node, "bootstrap-other"), "", "plan changed the node");
    assert_eq!(node.run_role("plan", "other", &["--detailed-exitcodes"]).code, 2);
    twice(&node, "other", "present after rpm -e");

    // A package no repository has: the run fails naming it, and stops there.
    let r = node.run_role("apply", "nopkg", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.all().contains("Unable to find a match: no-such-package-x"),
        "dnf's message expected:\n{}",
        r.all()
    );
    let rep = node.report();
    assert_eq!(rep["steps"][0]["status"], "failed", "{rep:#}");
    assert_eq!(rep["steps"][1]["status"], "not_run", "{rep:#}");
    assert!(!node.merged.join("after").exists());
}

/// `latest` as the first dnf action on a fresh node (no dnf metadata cache yet): a package not
/// installed and one installed by hand at 1.0 (`rpm -i`) both end at the repository's newest.
#[test]
fn dnf_latest_on_a_fresh_node_installs_and_upgrades_without_a_cache() {
    let b = tempfile::tempdir().unwrap();
    write_role(b.path(), "latest", &pkg("\"bootstrap-probe\", \"bootstrap-other\"", "latest"));
    let node = Node::boot_rhel(b.path(), &[]);
    let r = node.sh("rpm -i /srv/rpmrepo/bootstrap-probe-1.0-1.noarch.rpm && ls /var/cache/dnf | grep -c solv || echo ok");
    assert!(r.stdout.ends_with("ok\n"), "{}", r.all());
    let r = node.run_role("plan", "latest", &[]);
    assert!(r.all().contains("1.0-1 -> 2.0-1"), "the plan names the candidate:\n{}", r.all());
    twice(&node, "latest", "latest of one installed by hand and one not installed");
    assert_eq!(rpm_q(&node, "bootstrap-probe"), "2.0-1");
    assert_eq!(rpm_q(&node, "bootstrap-other"), "1.0-1");
}
