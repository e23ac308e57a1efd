//! `roles/kube-worker` end to end on a booted node: kernel modules, sysctls, swap off, the
//! Kubernetes apt repository (a signed stand-in of pkgs.k8s.io, its key fetched from a pinned
//! URL), Debian's real containerd with the systemd cgroup driver, kubelet enabled, and the join
//! (kubeadm is the stand-in that records its argv) with the token from SSM (moto).
//!
//! What a container can and cannot show: the node has its own network namespace, so the
//! `net.*` sysctls it sets are its own (`net.bridge.*` exist there only because the host kernel
//! has `br_netfilter`); it cannot load a kernel module (no CAP_SYS_MODULE, no kmod), so the
//! modules must already be there on the host, loaded (`/sys/module`, bound in) or built in
//! (`/lib/modules/RELEASE/modules.builtin`, which the node is given as the kernel's package
//! would give it). The host has no swap, so `swapoff` is never needed here.

use crate::harness::http::{bind_in_netns, HttpServer, Response};
use crate::harness::moto::{Moto, AWS_ENV};
use crate::harness::node::{kuberepo, Node};
use crate::harness::support::*;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub const TOKEN: &str = "abcdef.0123456789abcdef";
const MOTO_PORT: u16 = 4566;
const KEY_ADDR: &str = "127.0.0.1:8088";

/// A booted node for `roles/kube-worker`: the test apt repository (Debian's packages, real
/// containerd among them) as its distribution mirror, the Kubernetes stand-in repository at
/// /srv/kuberepo (named in the role by an env overlay, as a fleet with a mirror would), its
/// key served over HTTP inside the node's network namespace, and moto there holding the join
/// token.
pub struct KubeNode {
    pub node: Node,
    _moto: Moto,
    /// GETs of the repository key.
    pub key_fetches: Arc<AtomicUsize>,
    _key_server: HttpServer,
    _bundle: tempfile::TempDir,
}

/// The modules the role loads, as the host kernel has them: (name, in /sys/module, built in).
fn host_modules() -> Vec<(&'static str, bool, bool)> {
    let config = kernel_config();
    ["overlay", "br_netfilter"]
        .into_iter()
        .map(|m| {
            let sys = Path::new("/sys/module").join(m).exists();
            (m, sys, builtin_entry(m, &config).is_some())
        })
        .collect()
}

/// The host kernel's build configuration (`/proc/config.gz`), when it exposes one.
fn kernel_config() -> String {
    let Ok(gz) = std::fs::read("/proc/config.gz") else { return String::new() };
    let mut s = String::new();
    let _ = std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut s);
    s
}

fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim().to_string()
}

/// The `modules.builtin` line of a module the host kernel has built in: from the host's own
/// list when it has one, else from the kernel's configuration (`=y`).
fn builtin_entry(module: &str, config: &str) -> Option<String> {
    let (symbol, path) = match module {
        "overlay" => ("CONFIG_OVERLAY_FS", "kernel/fs/overlayfs/overlay.ko"),
        "br_netfilter" => ("CONFIG_BRIDGE_NETFILTER", "kernel/net/bridge/br_netfilter.ko"),
        _ => return None,
    };
    let host_list = Path::new("/lib/modules").join(release()).join("modules.builtin");
    if let Ok(list) = std::fs::read_to_string(&host_list) {
        return list.lines().find(|l| l.ends_with(&format!("/{module}.ko"))).map(str::to_string);
    }
    config.lines().any(|l| l == format!("{symbol}=y")).then(|| path.to_string())
}

impl KubeNode {
    pub fn boot() -> KubeNode {
        let modules = host_modules();
        for (m, sys, builtin) in &modules {
            assert!(
                *sys || *builtin,
                "{m} is neither loaded nor built into this host's kernel: a node container cannot load it \
                 (run `modprobe {m}` on the host; the tests do not load host modules)"
            );
        }
        let repo = kuberepo();
        let key = std::fs::read(repo.join("key.asc")).unwrap();
        let b = bundle_copy();
        std::fs::create_dir_all(b.path().join("roles/kube-worker/env")).unwrap();
        std::fs::write(
            b.path().join("roles/kube-worker/env/production.toml"),
            format!(
                "[vars.kubernetes_apt.kubernetes]\nurl = \"file:/srv/kuberepo\"\nkey_url = \"http://{KEY_ADDR}/kubernetes.asc\"\nkey_sha256 = \"{}\"\n",
                sha256_hex(&key)
            ),
        )
        .unwrap();
        let sys_module = Path::new("/sys/module");
        let node = Node::boot_with(b.path(), &[(repo.as_path(), "/srv/kuberepo"), (sys_module, "/sys/module")]);
        // The kernel's list of built-in modules, as its package installs it.
        let lines: Vec<String> = modules
            .iter()
            .filter(|(_, _, b)| *b)
            .filter_map(|(m, _, _)| builtin_entry(m, &kernel_config()))
            .collect();
        if !lines.is_empty() {
            let dir = node.merged.join("lib/modules").join(release());
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("modules.builtin"), lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
        }
        let fetches = Arc::new(AtomicUsize::new(0));
        let f = fetches.clone();
        let key_server = HttpServer::serve(
            bind_in_netns(&format!("/proc/{}/ns/net", node.leader), KEY_ADDR),
            format!("http://{KEY_ADDR}"),
            move |req| {
                (req.path == "/kubernetes.asc").then(|| {
                    f.fetch_add(1, Ordering::SeqCst);
                    Response::new(200, key.clone())
                })
            },
        );
        let moto = Moto::start_in_netns(node.leader, MOTO_PORT);
        put_parameter_in_netns(&moto, node.leader, "/kube/production/join-token", TOKEN);
        node.write_config(&format!("[aws]\nssm_endpoint = \"{}\"\n", moto.url));
        KubeNode {
            node,
            _moto: moto,
            key_fetches: fetches,
            _key_server: key_server,
            _bundle: b,
        }
    }

    /// `apply`/`plan` of the kube-worker role as production-kube-worker, with moto's credentials.
    pub fn run(&self, verb: &str, extra: &[&str]) -> Run {
        let mut args = vec![verb, "--source", "/srv/bundle", "--role", "kube-worker", "--name", "production-kube-worker"];
        args.extend_from_slice(extra);
        self.node.agent_env(&args, &AWS_ENV)
    }
}

fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// An SSM SecureString in moto inside the node's network namespace (curl through nsenter).
fn put_parameter_in_netns(moto: &Moto, pid: i32, name: &str, value: &str) {
    let body = serde_json::json!({ "Name": name, "Value": value, "Type": "SecureString" }).to_string();
    let out = std::process::Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n", "curl", "-sf", "-X", "POST"])
        .args(["-H", "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ssm/aws4_request"])
        .args(["-H", "X-Amz-Target: AmazonSSM.PutParameter", "-H", "Content-Type: application/x-amz-json-1.1"])
        .args(["--data-binary", &body, &moto.url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "PutParameter {name} in the node: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Show 4: the kube-worker role on a fresh node. The first apply loads (finds) the modules,
/// sets the sysctls, turns swap off, adds the Kubernetes repository with its pinned key,
/// installs Debian's containerd already configured with `SystemdCgroup = true` and running,
/// enables the kubelet and joins (argv golden); the second apply changes nothing and fetches
/// nothing; a hand-made drift of containerd's config shows in `plan` and is put back, with
/// containerd restarted.
#[test]
fn kube_worker_role_end_to_end() {
    let k = KubeNode::boot();
    let node = &k.node;
    assert_eq!(
        node.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(),
        "0",
        "a fresh netns forwards nothing"
    );
    assert!(node.sh("command -v containerd kubelet kubeadm || echo none").stdout.contains("none"));

    // Drift a fresh node could have: bridged traffic bypassing iptables, a swap line in fstab.
    let r = node.sh("sysctl -w net.bridge.bridge-nf-call-iptables=0 && echo '/swapfile none swap sw 0 0' >> /etc/fstab");
    assert_eq!(r.code, 0, "{}", r.all());

    let plan = k.run("plan", &["--detailed-exitcodes"]);
    assert_eq!(plan.code, 2, "{}", plan.all());

    let first = k.run("apply", &["--detailed-exitcodes"]);
    assert_eq!(first.code, 2, "{}", first.all());
    let changed = changed_ids(&node.report());
    for id in [
        "kernel_module:overlay",
        "kernel_module:br_netfilter",
        "sysctl:net.ipv4.ip_forward",
        "sysctl:net.bridge.bridge-nf-call-iptables",
        "line:/etc/fstab:^\\s*[^#\\s]\\S*\\s+\\S+\\s+swap\\s",
        "unit:swap.target",
        "file:/etc/containerd/config.toml",
        "repository:kubernetes",
        "package:containerd,kubelet,kubeadm",
        "unit:kubelet.service",
        "kubeadm_join",
    ] {
        assert!(
            changed.iter().any(|c| c == id),
            "{id} did not change in the first apply: {changed:?}\n{}",
            first.all()
        );
    }

    // Modules: persisted for every boot; loaded (here: by the host kernel).
    for m in ["overlay", "br_netfilter"] {
        let f = std::fs::read_to_string(node.merged.join(format!("etc/modules-load.d/{m}.conf"))).unwrap();
        assert!(f.ends_with(&format!("\n{m}\n")), "{f}");
    }
    // Sysctls: live in the node's network namespace and persisted.
    for p in [
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
        "net.ipv4.ip_forward",
    ] {
        assert_eq!(node.sh(&format!("sysctl -n {p}")).stdout.trim(), "1", "{p}");
        let f = std::fs::read_to_string(node.merged.join(format!("etc/sysctl.d/90-bootstrap-{p}.conf"))).unwrap();
        assert!(f.ends_with(&format!("\n{p} = 1\n")), "{f}");
    }
    // Swap: none at the next boot (no fstab line, swap.target masked); none now, so
    // `swapoff -a` had nothing to do (this host has no swap).
    assert_eq!(node.sh("systemctl is-enabled swap.target").stdout.trim(), "masked");
    let fstab = std::fs::read_to_string(node.merged.join("etc/fstab")).unwrap();
    assert!(!fstab.contains("swap"), "{fstab}");
    assert_eq!(node.sh("tail -n +2 /proc/swaps | wc -l").stdout.trim(), "0");
    let swapoff = node.report()["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "exec:swapoff")
        .cloned()
        .unwrap();
    assert_eq!(swapoff["status"], "in_sync", "{swapoff:#}");

    // The repository: deb822 with Signed-By, its key fetched once and checked; apt verified the
    // InRelease with it, and kubelet/kubeadm came from there.
    let sources = std::fs::read_to_string(node.merged.join("etc/apt/sources.list.d/kubernetes.sources")).unwrap();
    assert!(
        sources.contains("URIs: file:/srv/kuberepo\n") && sources.contains("Signed-By: /etc/apt/keyrings/kubernetes.asc\n"),
        "{sources}"
    );
    assert_eq!(
        std::fs::read(node.merged.join("etc/apt/keyrings/kubernetes.asc")).unwrap(),
        std::fs::read(kuberepo().join("key.asc")).unwrap()
    );
    assert_eq!(k.key_fetches.load(Ordering::SeqCst), 1);
    let lists = node.sh("ls /var/lib/apt/lists").stdout;
    assert!(lists.contains("_srv_kuberepo_InRelease"), "{lists}");
    let policy = node.sh("apt-cache policy kubeadm").stdout;
    assert!(
        policy.contains("*** 1.30.0-test") && policy.contains("500 file:/srv/kuberepo  Packages"),
        "{policy}"
    );

    // containerd: Debian's package, running, with the systemd cgroup driver in the config it
    // loads (`containerd config dump` merges the file over its defaults); the role's file was
    // there first, so dpkg kept it and set the package's aside.
    let v = node.sh("dpkg-query -W -f '${Version} ${Maintainer}' containerd").stdout;
    assert!(v.starts_with("1.6.20~ds1") && v.contains("debian.org"), "not Debian's containerd: {v}");
    assert_eq!(
        node.sh("systemctl is-active containerd").stdout.trim(),
        "active",
        "{}",
        node.sh("systemctl status containerd; journalctl -u containerd --no-pager | tail -30").all()
    );
    let dump = node.sh("containerd config dump");
    assert_eq!(dump.code, 0, "{}", dump.all());
    let runc = dump
        .stdout
        .split("\n\n")
        .find(|s| s.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]"))
        .unwrap_or_else(|| panic!("no runc options in\n{}", dump.stdout));
    assert!(runc.contains("SystemdCgroup = true"), "{runc}");
    eprintln!("PLUGINS {}", node.sh("ctr plugins ls").all());
    let ctr = node.sh("ctr version");
    assert!(
        ctr.code == 0 && ctr.stdout.contains("Server:"),
        "containerd does not answer on its socket: {}",
        ctr.all()
    );
    assert!(
        node.merged.join("etc/containerd/config.toml.dpkg-dist").exists(),
        "dpkg did not keep the role's config"
    );

    // kubelet enabled, started by the join; the join's argv is golden.
    assert_eq!(node.sh("systemctl is-enabled kubelet").stdout.trim(), "enabled");
    assert_eq!(
        node.sh("systemctl is-active kubelet").stdout.trim(),
        "active",
        "{}",
        node.sh("systemctl status kubelet").all()
    );
    let shim = std::fs::read_to_string(node.merged.join("var/log/kubeadm-shim.log")).unwrap();
    let argv: Vec<&str> = shim.lines().filter(|l| l.starts_with("argv:")).collect();
    golden("kubeadm-join-argv.txt", &format!("{}\n", argv.join("\n")));
    assert!(!shim.contains(TOKEN));

    // Converged: nothing changes, nothing is fetched, kubeadm does not run again.
    let containerd_pid = node.main_pid("containerd");
    let second = k.run("apply", &["--detailed-exitcodes"]);
    assert_eq!(second.code, 0, "{}", second.all());
    assert_eq!(node.report()["summary"]["changed"], 0);
    assert_eq!(k.key_fetches.load(Ordering::SeqCst), 1, "a node in sync fetched the key");
    let shim = std::fs::read_to_string(node.merged.join("var/log/kubeadm-shim.log")).unwrap();
    assert_eq!(shim.lines().filter(|l| l.starts_with("argv:")).count(), 1, "kubeadm ran once");
    assert_eq!(node.main_pid("containerd"), containerd_pid, "containerd restarted without a change");

    // A drift by hand: the cgroup driver turned off. plan shows the diff and changes nothing;
    // apply puts it back and restarts containerd.
    node.sh("sed -i 's/SystemdCgroup = true/SystemdCgroup = false/' /etc/containerd/config.toml");
    let p = k.run("plan", &["--json"]);
    assert_eq!(p.code, 0, "{}", p.all());
    let doc: serde_json::Value = serde_json::from_str(&p.stdout).unwrap_or_else(|e| panic!("{e}\n{}", p.all()));
    assert_eq!(changed_ids(&doc), ["file:/etc/containerd/config.toml"], "{doc:#}");
    let step = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "file:/etc/containerd/config.toml")
        .unwrap();
    let diff = step["changes"][0]["diff"].as_str().unwrap_or_default();
    assert!(
        diff.contains("-        SystemdCgroup = false") && diff.contains("+        SystemdCgroup = true"),
        "{step:#}"
    );
    let r = k.run("apply", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(node.sh("containerd config dump").stdout.contains("SystemdCgroup = true"));
    assert_ne!(node.main_pid("containerd"), containerd_pid, "containerd was not restarted");
    assert_eq!(node.sh("systemctl is-active containerd").stdout.trim(), "active");
    assert_eq!(k.run("apply", &["--detailed-exitcodes"]).code, 0);
}
