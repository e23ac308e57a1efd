//! A real dockerd (Debian docker.io) per test, in a network namespace of its own (its bridge,
//! published ports and containers never touch the host's network), with its own data root and
//! socket; stopped by PID. Images come from `docker import` of the test rootfs (no registry is
//! reachable).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Dockerd {
    child: Option<Child>,
    pub netns: String,
    pub socket: PathBuf,
    dir: tempfile::TempDir,
}

impl Dockerd {
    pub fn start() -> Dockerd {
        assert!(Path::new("/usr/sbin/dockerd").exists(), "dockerd not found: run scripts/setup (apt docker.io)");
        // Short paths: a unix socket path must fit in 108 bytes.
        let dir = tempfile::Builder::new().prefix("bt-dk").tempdir_in("/tmp").unwrap();
        let netns = format!(
            "bt-dk-{}-{}",
            std::process::id(),
            dir.path().file_name().unwrap().to_string_lossy().trim_start_matches("bt-dk")
        );
        let ok = Command::new("ip").args(["netns", "add", &netns]).status().unwrap().success();
        assert!(ok, "ip netns add {netns}");
        let _ = Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]).status();
        let socket = dir.path().join("docker.sock");
        let d = |s: &str| dir.path().join(s).display().to_string();
        let log = std::fs::File::create(dir.path().join("dockerd.log")).unwrap();
        // nsenter, not `ip netns exec`: that one remounts /sys, which hides the cgroup mounts.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("/usr/sbin/dockerd")
            .arg(format!("--host=unix://{}", socket.display()))
            .args(["--data-root", &d("data"), "--exec-root", &d("exec"), "--pidfile", &d("dockerd.pid")])
            .args(["--iptables=false", "--ip6tables=false", "--shutdown-timeout=2"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let me = Dockerd {
            child: Some(child),
            netns,
            socket,
            dir,
        };
        let start = Instant::now();
        while !me.docker(&["version"]).status.success() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "dockerd did not start: {}",
                std::fs::read_to_string(me.dir.path().join("dockerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        me
    }

    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn out(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `docker import` of the test rootfs as `name`.
    pub fn import_rootfs(&self, name: &str) {
        let mut tar = Command::new("tar")
            .args(["-C", super::node::rootfs().to_str().unwrap(), "-c", "."])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let st = Command::new("docker")
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .args(["import", "-", name])
            .stdin(tar.stdout.take().unwrap())
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(tar.wait().unwrap().success(), "tar of the test rootfs");
        assert!(st.success(), "docker import");
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while c.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).status();
        // Overlay mounts under the data root go with the daemon; the tree may hold read-only bits.
        let _ = Command::new("rm").args(["-rf", &self.dir.path().display().to_string()]).status();
    }
}
