//! A booted systemd node for tests: a Debian bookworm rootfs (scripts/rootfs) on a per-test
//! overlay, booted with systemd-nspawn in its own network namespace, the agent binary and a
//! bundle bind-mounted in, commands run inside with nsenter, stopped by PID on drop.

#![allow(dead_code)]

use super::support::{bin, write_config, Run};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BOOT_DEADLINE: Duration = Duration::from_secs(60);

pub fn rootfs() -> PathBuf {
    let p = PathBuf::from(std::env::var("ROOTFS").unwrap_or_else(|_| "/var/tmp/bootstrap-rootfs".into()));
    assert!(
        p.join(".complete-2").exists(),
        "no node rootfs at {}: run `scripts/rootfs` (scripts/setup does)",
        p.display()
    );
    p
}

pub fn aptrepo() -> PathBuf {
    let p = PathBuf::from(std::env::var("APTREPO").unwrap_or_else(|_| "/var/tmp/bootstrap-aptrepo".into()));
    assert!(
        p.join(".complete-3").exists(),
        "no test apt repository at {} (or an old one, without containerd): run `scripts/rootfs`",
        p.display()
    );
    p
}

/// The signed stand-in Kubernetes apt repository (scripts/rootfs): kubelet and kubeadm, an
/// InRelease signed by the key in `key.asc`. Not bound into nodes by default.
pub fn kuberepo() -> PathBuf {
    let p = PathBuf::from(std::env::var("KUBEREPO").unwrap_or_else(|_| "/var/tmp/bootstrap-kuberepo".into()));
    assert!(
        p.join(".complete-1").exists(),
        "no test Kubernetes apt repository at {}: run `scripts/rootfs`",
        p.display()
    );
    p
}

/// The RHEL-family node rootfs (scripts/rootfs-rhel): the Debian rootfs with Debian's dnf and
/// rpm and a Rocky Linux 9 os-release.
pub fn rootfs_rhel() -> PathBuf {
    let p = PathBuf::from(std::env::var("ROOTFS_RHEL").unwrap_or_else(|_| "/var/tmp/bootstrap-rootfs-rhel".into()));
    assert!(
        p.join(".complete-2").exists(),
        "no RHEL-family node rootfs at {}: run `scripts/rootfs-rhel` (scripts/setup does)",
        p.display()
    );
    p
}

/// The test rpm repository (scripts/rootfs-rhel), seen by dnf in a RHEL-family node at
/// /srv/rpmrepo through /etc/yum.repos.d/test.repo.
pub fn rpmrepo() -> PathBuf {
    let p = PathBuf::from(std::env::var("RPMREPO").unwrap_or_else(|_| "/var/tmp/bootstrap-rpmrepo".into()));
    assert!(
        p.join(".complete-1").exists(),
        "no test rpm repository at {}: run `scripts/rootfs-rhel`",
        p.display()
    );
    p
}

pub struct Node {
    pub dir: tempfile::TempDir,
    pub merged: PathBuf,
    nspawn: Option<Child>,
    /// The node's PID 1, as the host sees it.
    pub leader: i32,
    bundle: PathBuf,
    /// Extra read-only binds: host path → path in the node.
    binds: Vec<(PathBuf, String)>,
    /// Share the host's network namespace (several nodes reaching one etcd on loopback).
    host_network: bool,
    /// Block devices bound in read-write at the same path (`--bind=/dev/loop3`).
    devices: Vec<PathBuf>,
}

impl Node {
    /// Boot a node with `bundle` (a directory holding roles/) at /srv/bundle.
    pub fn boot(bundle: &Path) -> Node {
        Node::boot_with(bundle, &[])
    }

    /// Boot with extra read-only bind mounts (host path, path in the node).
    pub fn boot_with(bundle: &Path, binds: &[(&Path, &str)]) -> Node {
        Node::boot_opts(bundle, binds, false)
    }

    /// Boot with block devices of the host (loop devices) bound in read-write at the same
    /// path, as TESTING.md's recipe for filesystem and mount tests does.
    pub fn boot_with_devices(bundle: &Path, devices: &[&Path]) -> Node {
        Node::boot_full(&rootfs(), bundle, &[], false, devices)
    }

    /// Boot a RHEL-family node: the rootfs of scripts/rootfs-rhel (dnf, rpm, a Rocky 9
    /// os-release) with the test rpm repository at /srv/rpmrepo, plus extra read-only binds.
    pub fn boot_rhel(bundle: &Path, binds: &[(&Path, &str)]) -> Node {
        let repo = rpmrepo();
        let mut all: Vec<(&Path, &str)> = vec![(repo.as_path(), "/srv/rpmrepo")];
        all.extend_from_slice(binds);
        Node::boot_full(&rootfs_rhel(), bundle, &all, false, &[])
    }

    /// A node on the host's network (no --private-network), with a machine id of its own.
    pub fn boot_host_net(bundle: &Path) -> Node {
        Node::boot_opts(bundle, &[], true)
    }

    fn boot_opts(bundle: &Path, binds: &[(&Path, &str)], host_network: bool) -> Node {
        Node::boot_full(&rootfs(), bundle, binds, host_network, &[])
    }

    fn boot_full(lower: &Path, bundle: &Path, binds: &[(&Path, &str)], host_network: bool, devices: &[&Path]) -> Node {
        let dir = tempfile::Builder::new().prefix("node.").tempdir_in("/var/tmp").unwrap();
        let merged = dir.path().join("merged");
        for d in ["upper", "work", "merged", "dbus"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            dir.path().join("upper").display(),
            dir.path().join("work").display()
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged)
            .status()
            .unwrap();
        assert!(st.success(), "mounting the node overlay failed");
        let binds = binds.iter().map(|(h, n)| (h.to_path_buf(), n.to_string())).collect();
        // Every node its own machine id (the rootfs has one, shared by all overlays).
        let id: String = (0..32).map(|_| format!("{:x}", rand::random::<u8>() % 16)).collect();
        std::fs::write(merged.join("etc/machine-id"), format!("{id}\n")).unwrap();
        let mut node = Node {
            dir,
            merged,
            nspawn: None,
            leader: 0,
            bundle: bundle.to_path_buf(),
            binds,
            host_network,
            devices: devices.iter().map(|d| d.to_path_buf()).collect(),
        };
        node.start();
        node
    }

    fn start(&mut self) {
        let d = self.dir.path();
        let console = std::fs::File::create(d.join("console.log")).unwrap();
        let child = Command::new("systemd-nspawn")
            .args(["-b", "--register=no", "--keep-unit", "--console=read-only", "-M", "node"])
            .args(if self.host_network { &[][..] } else { &["--private-network"][..] })
            .arg("-D")
            .arg(&self.merged)
            .arg(format!("--bind={}:/run/dbus", d.join("dbus").display()))
            .arg(format!("--bind-ro={}:/srv/aptrepo", aptrepo().display()))
            .arg(format!("--bind-ro={}:/srv/bundle", self.bundle.display()))
            .arg(format!("--bind-ro={}:/usr/local/bin/bootstrap", bin()))
            .args(self.binds.iter().map(|(h, n)| format!("--bind-ro={}:{n}", h.display())))
            .args(self.devices.iter().map(|d| format!("--bind={}", d.display())))
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("systemd-nspawn (apt-get install systemd-container)");
        let pid = child.id();
        self.nspawn = Some(child);
        let start = Instant::now();
        loop {
            let out = Command::new("ps").args(["-o", "pid=", "--ppid", &pid.to_string()]).output().unwrap();
            if let Some(p) = String::from_utf8_lossy(&out.stdout).split_whitespace().next() {
                self.leader = p.parse().unwrap();
                let state = self.sh("systemctl is-system-running 2>/dev/null || true").stdout;
                if state.contains("running") || state.contains("degraded") {
                    return;
                }
            }
            assert!(start.elapsed() < BOOT_DEADLINE, "node did not boot; console:\n{}", self.console());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    fn nsenter(&self, argv: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.leader.to_string(),
            "-a",
            "env",
            "-i",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG=C.UTF-8",
        ]);
        c.args(argv);
        c
    }

    /// Run a shell script inside the node.
    pub fn sh(&self, script: &str) -> Run {
        self.nsenter(&["sh", "-c", script]).output().unwrap().into()
    }

    /// Run the agent inside the node.
    pub fn agent(&self, args: &[&str]) -> Run {
        let mut argv = vec!["/usr/local/bin/bootstrap"];
        argv.extend_from_slice(args);
        self.nsenter(&argv).output().unwrap().into()
    }

    /// Run the agent inside the node under strace (from the host), with extra environment
    /// variables; the traced system calls go to `log`.
    pub fn agent_traced(&self, args: &[&str], env: &[(&str, &str)], trace: &[&str], log: &Path) -> Run {
        let mut argv: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        argv.push("/usr/local/bin/bootstrap".into());
        argv.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        let inner = self.nsenter(&refs);
        let mut c = Command::new("strace");
        c.args(["-f", "-qq", "-e", &format!("trace={}", trace.join(",")), "-o"])
            .arg(log)
            .arg(inner.get_program())
            .args(inner.get_args());
        c.output().unwrap().into()
    }

    /// Run the agent inside the node with extra environment variables.
    pub fn agent_env(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut argv: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        argv.push("/usr/local/bin/bootstrap".into());
        argv.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.nsenter(&refs).output().unwrap().into()
    }

    /// `apply`/`plan` of a role from /srv/bundle.
    pub fn run_role(&self, verb: &str, role: &str, extra: &[&str]) -> Run {
        let mut args = vec![verb, "--source", "/srv/bundle", "--role", role];
        args.extend_from_slice(extra);
        self.agent(&args)
    }

    /// Write the node's agent config (`/etc/bootstrap/config.toml`), replacing any there.
    pub fn write_config(&self, toml: &str) {
        write_config(&self.merged, toml);
    }

    pub fn report(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.merged.join("var/lib/bootstrap/last-run.json")).unwrap()).unwrap()
    }

    /// The node's machine id (every node has its own).
    pub fn machine_id(&self) -> String {
        std::fs::read_to_string(self.merged.join("etc/machine-id")).unwrap().trim().to_string()
    }

    pub fn main_pid(&self, unit: &str) -> String {
        self.sh(&format!("systemctl show -p MainPID --value {unit}")).stdout.trim().to_string()
    }

    /// A journal cursor, to read only what comes after it.
    pub fn journal_cursor(&self) -> String {
        let out = self.sh("journalctl -n 0 --show-cursor --no-pager").stdout;
        out.lines().find_map(|l| l.strip_prefix("-- cursor: ")).unwrap_or_default().to_string()
    }

    pub fn journal_since(&self, cursor: &str, unit: &str) -> String {
        self.sh(&format!("journalctl --no-pager -o cat --after-cursor='{cursor}' -u {unit}")).stdout
    }

    pub fn boot_id(&self) -> String {
        self.sh("cat /proc/sys/kernel/random/boot_id").stdout.trim().to_string()
    }

    /// True while the node has neither rebooted nor powered off since `boot_id` was read:
    /// nspawn has not exited and the kernel boot id is the same. (Not `is-system-running`,
    /// which says "degraded" when any unrelated unit failed during boot.)
    pub fn still_up(&mut self, boot_id: &str) -> bool {
        let child = self.nspawn.as_mut().expect("node running");
        child.try_wait().unwrap().is_none() && self.boot_id() == boot_id
    }

    /// Wait for nspawn to exit (a poweroff or reboot from inside); returns its exit code
    /// (133 means the node asked for a reboot).
    pub fn wait_exit(&mut self, deadline: Duration) -> i32 {
        let child = self.nspawn.as_mut().expect("node running");
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.nspawn = None;
                return st.code().unwrap_or(-1);
            }
            assert!(start.elapsed() < deadline, "node did not exit");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Boot the same overlay again (after a reboot).
    pub fn boot_again(&mut self) {
        assert!(self.nspawn.is_none(), "node still running");
        self.start();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.nspawn.take() {
            // SIGTERM to nspawn powers the node off cleanly; SIGKILL if it hangs.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("umount").arg(&self.merged).status();
    }
}
