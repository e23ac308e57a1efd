//! kubeadm_join on a booted node (kubeadm is a stand-in .deb from the test Kubernetes repository
//! that records its argv), the join token from SSM (moto), and secrets never leaking.

use crate::harness::node::Node;
use crate::harness::support::*;
use crate::kube_worker::{KubeNode, TOKEN};

const FILE_SECRET: &str = "db-password-7Hq2";

/// Ahead of the package's kubeadm on PATH: records the JoinConfiguration kubeadm is given (its
/// mode, owner and content, while kubeadm runs), then runs the real one (the shim).
const CONFIG_RECORDER: &str = r#"#!/bin/sh
prev=
for a in "$@"; do
  if [ "$prev" = --config ]; then
    { echo "config: $a"; stat -c 'mode: %a %U' "$a"; cat "$a"; } >> /var/log/kubeadm-config.log
  fi
  prev=$a
done
exec /usr/bin/kubeadm "$@"
"#;

fn record_join_config(node: &Node) {
    use std::os::unix::fs::PermissionsExt;
    let p = node.merged.join("usr/local/bin/kubeadm");
    std::fs::write(&p, CONFIG_RECORDER).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn apply(k: &KubeNode, verb: &str, extra: &[&str]) -> Run {
    k.run(verb, extra)
}

/// Show 3 and 4: the kube-worker role joins once with the token from SSM (argv golden); the
/// second apply does not call kubeadm; a failing join shows kubeadm's output with the token
/// redacted; the token is nowhere in the agent's output, plan, report or the node's journal.
/// Issue 14 (finding 13): nor in kubeadm's argv (which `ps` shows to every local user while
/// the join runs): kubeadm reads it from a 0600 JoinConfiguration, removed after the join.
#[test]
fn kube_worker_joins_once_with_the_token_from_ssm_and_never_shows_it() {
    let k = KubeNode::boot();
    let node = &k.node;
    record_join_config(node);
    let mut seen = String::new();

    let plan = apply(&k, "plan", &[]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(plan.stdout.contains("kubeadm_join"), "{}", plan.all());
    seen += &plan.all();

    let r = apply(&k, "apply", &["-vv"]);
    assert_eq!(r.code, 0, "{}", r.all());
    seen += &r.all();
    let shim = std::fs::read_to_string(node.merged.join("var/log/kubeadm-shim.log")).unwrap();
    let argv: Vec<&str> = shim.lines().filter(|l| l.starts_with("argv:")).collect();
    golden("kubeadm-join-argv.txt", &format!("{}\n", argv.join("\n")));
    assert!(!shim.contains(TOKEN), "the token is in kubeadm's argv or environment:\n{shim}");
    // kubeadm got the token from SSM in its JoinConfiguration, a 0600 file of root's.
    let config = std::fs::read_to_string(node.merged.join("var/log/kubeadm-config.log")).unwrap();
    assert!(config.starts_with("config: /run/bootstrap/kubeadm-join.yaml\nmode: 600 root\n"), "{config}");
    assert!(config.contains(&format!("    token: \"{TOKEN}\"\n")), "{config}");
    assert!(config.contains("    apiServerEndpoint: \"10.0.0.10:6443\"\n"), "{config}");
    assert!(
        config.contains("    caCertHashes:\n      - \"sha256:0000000000000000000000000000000000000000000000000000000000000000\"\n"),
        "{config}"
    );
    assert!(
        node.sh("test -e /run/bootstrap/kubeadm-join.yaml || echo removed").stdout.contains("removed"),
        "the JoinConfiguration is removed after the join"
    );
    assert!(node.merged.join("etc/kubernetes/kubelet.conf").exists());
    seen += &std::fs::read_to_string(node.merged.join("var/lib/bootstrap/last-run.json")).unwrap();

    // Joined: never again.
    let r = apply(&k, "apply", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    seen += &r.all();
    let shim = std::fs::read_to_string(node.merged.join("var/log/kubeadm-shim.log")).unwrap();
    assert_eq!(shim.lines().filter(|l| l.starts_with("argv:")).count(), 1, "kubeadm ran once");

    // A failing join: the agent shows kubeadm's argv (no token in it) and output.
    std::fs::remove_file(node.merged.join("etc/kubernetes/kubelet.conf")).unwrap();
    std::fs::create_dir_all(node.merged.join("etc/kubeadm-shim")).unwrap();
    std::fs::write(node.merged.join("etc/kubeadm-shim/fail"), "").unwrap();
    let r = apply(&k, "apply", &["-vv", "--json"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(
        r.all().contains("`kubeadm join --config /run/bootstrap/kubeadm-join.yaml --node-name node`"),
        "the failure shows the argv: {}",
        r.all()
    );
    assert!(
        r.all().contains("couldn't validate the identity of the API Server"),
        "kubeadm's output is shown: {}",
        r.all()
    );
    seen += &r.all();
    seen += &std::fs::read_to_string(node.merged.join("var/lib/bootstrap/last-run.json")).unwrap();
    let plan = apply(&k, "plan", &["-vv"]);
    seen += &plan.all();
    seen += &node.sh("journalctl --no-pager -o cat").stdout;
    // The test can see the secret: the recorded JoinConfiguration holds it, so a leak would be
    // found; kubeadm's argv and environment never did.
    assert!(std::fs::read_to_string(node.merged.join("var/log/kubeadm-config.log")).unwrap().contains(TOKEN));
    assert!(!std::fs::read_to_string(node.merged.join("var/log/kubeadm-shim.log")).unwrap().contains(TOKEN));
    assert!(node.sh("test -e /run/bootstrap/kubeadm-join.yaml || echo removed").stdout.contains("removed"));
    assert!(seen.len() > 1000, "collected the outputs");
    assert!(!seen.contains(TOKEN), "the SSM token leaked:\n{seen}");
    assert!(!seen.contains("0123456789abcdef"), "part of the token leaked");
}

/// Show 5: a file whose content comes from a secret is created with its final, private mode
/// before any byte is written: under strace, the file's temp is opened O_CREAT with 0600, never
/// given group or other bits, and only then written.
#[test]
fn a_secret_file_is_private_from_its_first_byte() {
    let b = bundle(&[(
        "roles/app/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/app/db.conf\"\ncontent = \"password={{ secret('file:/etc/app-secret') }}\\n\"\ntemplate = true\n",
    )]);
    let node = Node::boot(b.path());
    assert!(node
        .sh(&format!("printf '%s\\n' {FILE_SECRET} > /etc/app-secret && mkdir -p /etc/app && echo ok"))
        .stdout
        .contains("ok"));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let r = node.agent_traced(
        &["apply", "--source", "/srv/bundle", "--role", "app", "--name", "production-app"],
        &[],
        &["openat", "fchmod", "chmod", "fchmodat", "write", "rename", "renameat", "renameat2"],
        &log,
    );
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(!r.all().contains(FILE_SECRET));
    let trace = std::fs::read_to_string(&log).unwrap();
    // The temp file: `.db.conf.bootstrap-tmp…`, opened with O_CREAT (relative to the descriptor
    // of /etc/app: paths under the root are opened one directory at a time).
    let lines: Vec<&str> = trace.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains("openat(") && l.contains(".db.conf.bootstrap-tmp") && l.contains("O_CREAT"))
        .unwrap_or_else(|| panic!("no O_CREAT open of the temp file in the trace:\n{trace}"));
    let open = lines[at];
    assert_eq!(octal_mode(open), Some(0o600), "created 0600: {open}");
    let (pid, fd) = (open.split_whitespace().next().unwrap(), open.rsplit("= ").next().unwrap().trim());
    // From that open until the temp is renamed into place (the fd's life), every mode change
    // keeps group and others out.
    let mut wrote = false;
    let life = lines[at + 1..]
        .iter()
        .take_while(|l| !(l.contains("rename") && l.contains(".db.conf.bootstrap-tmp")));
    for l in life.filter(|l| l.starts_with(pid)) {
        let on_fd = l.contains(&format!("({fd},")) || l.contains(".db.conf.bootstrap-tmp") || l.contains("/etc/app/db.conf");
        if !on_fd {
            continue;
        }
        if l.contains("chmod") {
            assert!(!wrote, "no mode change after the content: {l}");
            let m = octal_mode(l).unwrap_or_else(|| panic!("no mode in {l}"));
            assert_eq!(m & 0o077, 0, "never readable by group or others: {l}");
        }
        if l.contains(&format!("write({fd},")) && l.contains("password=") {
            wrote = true;
        }
    }
    assert!(wrote, "the content write was traced:\n{trace}");
    let mode = node.sh("stat -c %a /etc/app/db.conf").stdout;
    assert_eq!(mode.trim(), "600", "a secret file without a mode is 0600");
    // And the report does not hold the secret either.
    assert!(!std::fs::read_to_string(node.merged.join("var/lib/bootstrap/last-run.json"))
        .unwrap()
        .contains(FILE_SECRET));
}

/// The octal mode argument of a traced call: `…, 0600)`.
fn octal_mode(line: &str) -> Option<u32> {
    let args = &line[..line.rfind(')')?];
    let last = args.rsplit(", ").next()?;
    u32::from_str_radix(last.trim(), 8).ok().filter(|_| last.trim().starts_with('0'))
}
