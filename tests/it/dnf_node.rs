//! The package step's dnf path for real, on a booted RHEL-family node: the rootfs of
//! scripts/rootfs-rhel (Debian's dnf 4.14 and rpm, a Rocky Linux 9 os-release, so the facts
//! say os.family = rhel) and the test rpm repository (rpmbuild -bb, createrepo_c) at
//! /srv/rpmrepo through /etc/yum.repos.d/test.repo: bootstrap-probe 1.0-1 and 2.0-1,
//! bootstrap-other 1.0-1. And the `repository` step's dnf form (a `.repo` with `gpgkey`) with a
//! repository signed here.

use crate::harness::node::{rpmrepo, Node};
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

fn sh_ok(script: &str) {
    let o = std::process::Command::new("sh").arg("-c").arg(script).output().unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A copy of the test rpm repository's bootstrap-other, signed (`rpmsign`) with an RSA key made
/// here and indexed with createrepo_c; returns (the repository, the armored public key).
fn signed_rpm_repo(tmp: &std::path::Path) -> (std::path::PathBuf, String) {
    let (repo, gnupg) = (tmp.join("repo"), tmp.join("gnupg"));
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    std::fs::copy(
        rpmrepo().join("bootstrap-other-1.0-1.noarch.rpm"),
        repo.join("bootstrap-other-1.0-1.noarch.rpm"),
    )
    .unwrap();
    let g = format!("gpg --batch --homedir {}", gnupg.display());
    sh_ok(&format!(
        "{g} --passphrase '' --quick-gen-key 'bootstrap rpm test <rpm@example.com>' rsa2048 sign never 2>/dev/null"
    ));
    sh_ok(&format!(
        "rpmsign --addsign --define '_gpg_name bootstrap rpm test' --define '_gpg_path {}' --define '__gpg /usr/bin/gpg' {}/*.rpm",
        gnupg.display(),
        repo.display()
    ));
    sh_ok(&format!("createrepo_c -q {}", repo.display()));
    let key = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{g} --armor --export"))
        .output()
        .unwrap();
    let _ = std::process::Command::new("gpgconf")
        .args(["--homedir"])
        .arg(&gnupg)
        .args(["--kill", "all"])
        .status();
    (repo, String::from_utf8(key.stdout).unwrap())
}

/// Ahead of dnf on PATH: records each argv, then runs the real dnf.
const DNF_RECORDER: &str = "#!/bin/sh\necho \"dnf $*\" >> /var/log/dnf-argv.log\nexec /usr/bin/dnf \"$@\"\n";

/// Show 5 (repository, dnf form): a `.repo` with `gpgcheck=1` and its `gpgkey` on the real dnf
/// node. The first apply writes both, and the package step after it runs dnf with `--refresh`,
/// once; dnf checks the package's signature with that key (imported into rpm's database). The
/// second apply changes nothing and runs no dnf; a hand edit shows in `plan` as a diff (and
/// plan leaves it); a bad input exits 78 with nothing touched.
#[test]
fn dnf_repository_with_gpgkey_then_a_signed_package_on_a_rhel_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, key) = signed_rpm_repo(tmp.path());
    assert!(key.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"), "{key}");
    let b = tempfile::tempdir().unwrap();
    let repo_step = "[[step]]\nkind = \"repository\"\nname = \"signed\"\nurl = \"file:///srv/signedrpms\"\nkey = \"signed.asc\"\n";
    write_role(b.path(), "repo", &format!("{repo_step}{}", pkg("\"bootstrap-other\"", "present")));
    write_role(b.path(), "typo", &format!("{repo_step}gpgcheck = false\n"));
    write_role(b.path(), "badname", &repo_step.replace("name = \"signed\"", "name = \"../signed\""));
    for r in ["repo", "typo", "badname"] {
        std::fs::create_dir_all(b.path().join(format!("roles/{r}/files"))).unwrap();
        std::fs::write(b.path().join(format!("roles/{r}/files/signed.asc")), &key).unwrap();
    }
    let (_, other_key) = signed_rpm_repo(&tmp.path().join("other"));
    write_role(b.path(), "wrongkey", &format!("{repo_step}{}", pkg("\"bootstrap-other\"", "present")));
    std::fs::create_dir_all(b.path().join("roles/wrongkey/files")).unwrap();
    std::fs::write(b.path().join("roles/wrongkey/files/signed.asc"), &other_key).unwrap();
    let node = Node::boot_rhel(b.path(), &[(&repo, "/srv/signedrpms")]);
    // Only the signed repository: the node's unsigned test repository goes.
    let r = node.sh("rm /etc/yum.repos.d/test.repo && ! rpm -q gpg-pubkey && echo ok");
    assert!(r.stdout.ends_with("ok\n"), "{}", r.all());
    let recorder = node.merged.join("usr/local/bin/dnf");
    std::fs::write(&recorder, DNF_RECORDER).unwrap();
    std::fs::set_permissions(&recorder, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dnf_calls = || std::fs::read_to_string(node.merged.join("var/log/dnf-argv.log")).unwrap_or_default();

    // Bad inputs: exit 78 naming the position, nothing written.
    let probe = "ls /etc/yum.repos.d /etc/pki 2>&1";
    let before = node.sh(probe).all();
    for (role, want) in [
        ("typo", "roles/typo/role.toml:7:1: unknown field `gpgcheck`"),
        ("badname", "roles/badname/role.toml:4:8: invalid repository name \"../signed\""),
    ] {
        let r = node.run_role("apply", role, &[]);
        assert_eq!(r.code, 78, "{role}: {}", r.all());
        assert!(r.stderr.contains(want), "{role}: want {want:?} in\n{}", r.stderr);
    }
    assert_eq!(node.sh(probe).all(), before, "a refused role touched the node");
    assert_eq!(dnf_calls(), "", "a refused role ran dnf");

    let first = node.run_role("apply", "repo", &["--detailed-exitcodes"]);
    assert_eq!(first.code, 2, "{}", first.all());
    assert_eq!(changed_ids(&node.report()), ["repository:signed", "package:bootstrap-other"]);
    let repo_file = std::fs::read_to_string(node.merged.join("etc/yum.repos.d/signed.repo")).unwrap();
    assert!(
        repo_file.contains("[signed]\n")
            && repo_file.contains("baseurl=file:///srv/signedrpms\n")
            && repo_file.contains("gpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-signed\n"),
        "{repo_file}"
    );
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/pki/rpm-gpg/RPM-GPG-KEY-signed")).unwrap(), key);
    assert_eq!(rpm_q(&node, "bootstrap-other"), "1.0-1");
    // dnf checked the signature: it imported the repository's key into rpm's database.
    let keys = node.sh("rpm -q gpg-pubkey --qf '%{SUMMARY}\\n'").stdout;
    assert!(keys.contains("bootstrap rpm test"), "{keys}");
    let calls = dnf_calls();
    let refreshes: Vec<&str> = calls.lines().filter(|l| l.contains("--refresh")).collect();
    assert_eq!(refreshes.len(), 1, "one refresh, by the package step: {calls}");
    assert!(refreshes[0].contains("install") && refreshes[0].contains("bootstrap-other"), "{calls}");

    let second = node.run_role("apply", "repo", &["--detailed-exitcodes"]);
    assert_eq!(second.code, 0, "{}", second.all());
    assert_eq!(dnf_calls(), calls, "the second apply ran dnf");

    // A hand edit: plan shows the diff and leaves the file as it is.
    node.sh("sed -i 's/^enabled=1/enabled=0/' /etc/yum.repos.d/signed.repo");
    let p = node.run_role("plan", "repo", &["--json"]);
    assert_eq!(p.code, 0, "{}", p.all());
    let doc: serde_json::Value = serde_json::from_str(&p.stdout).unwrap_or_else(|e| panic!("{e}\n{}", p.all()));
    assert_eq!(changed_ids(&doc), ["repository:signed"], "{doc:#}");
    let step = doc["steps"].as_array().unwrap().iter().find(|s| s["id"] == "repository:signed").unwrap();
    let c = &step["changes"][0];
    assert_eq!(c["field"], "content", "{step:#}");
    let diff = c["diff"].as_str().unwrap();
    assert!(diff.contains("-enabled=0") && diff.contains("+enabled=1"), "{diff}");
    assert!(
        node.sh("cat /etc/yum.repos.d/signed.repo").stdout.contains("enabled=0\n"),
        "plan changed the file"
    );
    let r = node.run_role("apply", "repo", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(node.run_role("apply", "repo", &["--detailed-exitcodes"]).code, 0);

    // The check is real: with another key (and the right one gone from rpm's database) dnf
    // refuses the package.
    let r = node.sh("rpm -e bootstrap-other $(rpm -q gpg-pubkey) && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let r = node.run_role("apply", "wrongkey", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.all().contains("Public key for bootstrap-other-1.0-1.noarch.rpm is not installed") && r.all().contains("GPG check FAILED"),
        "{}",
        r.all()
    );
    assert_eq!(rpm_q(&node, "bootstrap-other"), "", "installed with the wrong key");
}
