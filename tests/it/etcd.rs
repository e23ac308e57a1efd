//! Real etcd (Debian etcd-server) on free loopback ports, one member or a three-member
//! cluster, stopped by PID; and the reboot semaphore's tests against it.

use bootstrap::reboot::etcd::{Acquire, EtcdLock, LockError, Semaphore};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Member {
    child: Option<Child>,
    client_url: String,
    /// How it was started, to start it again on its data dir.
    args: Vec<String>,
}

pub struct Etcd {
    members: Vec<Member>,
    _dir: tempfile::TempDir,
}

impl Etcd {
    pub fn start(n: usize) -> Etcd {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists(),
            "etcd not found: run scripts/setup (apt etcd-server)"
        );
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, pp))| format!("m{i}=http://127.0.0.1:{pp}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{cp}");
            let peer = format!("http://127.0.0.1:{pp}");
            let args: Vec<String> = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &dir.path().join(format!("m{i}")).display().to_string(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &cluster,
                "--initial-cluster-state",
                "new",
                "--log-level",
                "error",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let child = spawn(&args);
            members.push(Member {
                child: Some(child),
                client_url,
                args,
            });
        }
        let etcd = Etcd { members, _dir: dir };
        // Ready when a write goes through.
        let lock = etcd.lock("ready");
        let start = Instant::now();
        while lock.set_slots(1).is_err() {
            assert!(start.elapsed() < Duration::from_secs(30), "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        etcd
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    pub fn lock(&self, group: &str) -> EtcdLock {
        EtcdLock::new(&self.endpoints(), "com.coreos.airlock", group).unwrap()
    }

    /// Start a killed member again on its data dir.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.members[i].child = Some(spawn(&self.members[i].args));
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[String]) -> Child {
    Command::new("etcd").args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap()
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

#[test]
fn semaphore_acquire_release_idempotent_and_full() {
    let etcd = Etcd::start(1);
    let lock = etcd.lock("production-haproxy");
    assert_eq!(lock.key(), "com.coreos.airlock/groups/production-haproxy/v1/semaphore");
    assert!(lock.get().unwrap().is_none());
    assert_eq!(lock.acquire("i-a", 1).unwrap(), Acquire::Acquired);
    assert_eq!(
        lock.get().unwrap().unwrap().0,
        Semaphore {
            total_slots: 1,
            holders: vec!["i-a".into()]
        }
    );
    assert_eq!(lock.acquire("i-a", 1).unwrap(), Acquire::AlreadyHeld, "recursive acquire keeps the one slot");
    assert_eq!(lock.acquire("i-b", 1).unwrap(), Acquire::Full);
    assert!(lock.release("i-a", 1).unwrap());
    assert!(!lock.release("i-a", 1).unwrap(), "release is idempotent");
    assert_eq!(lock.acquire("i-b", 1).unwrap(), Acquire::Acquired);
    lock.set_slots(2).unwrap();
    assert_eq!(lock.acquire("i-c", 1).unwrap(), Acquire::Acquired);
    assert_eq!(
        lock.get().unwrap().unwrap().0,
        Semaphore {
            total_slots: 2,
            holders: vec!["i-b".into(), "i-c".into()]
        }
    );
    // The raw value, as airlock and operators read it.
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoints()[0], "get", "--print-value-only", lock.key()])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), r#"{"total_slots":2,"holders":["i-b","i-c"]}"#);
}

#[test]
fn concurrent_acquires_never_exceed_the_slots() {
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let eps = eps.clone();
            std::thread::spawn(move || EtcdLock::new(&eps, "com.coreos.airlock", "g").unwrap().acquire(&format!("i-{i}"), 3).unwrap())
        })
        .collect();
    let results: Vec<Acquire> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| **r == Acquire::Acquired).count(), 3, "{results:?}");
    let sem = etcd.lock("g").get().unwrap().unwrap().0;
    assert_eq!(sem.holders.len(), 3);
}

#[test]
fn lost_quorum_and_dead_etcd_are_unavailable() {
    let mut etcd = Etcd::start(3);
    let lock = etcd.lock("q");
    assert_eq!(lock.acquire("i-a", 1).unwrap(), Acquire::Acquired);
    etcd.kill(1);
    etcd.kill(2);
    let err = lock.acquire("i-b", 1).unwrap_err();
    assert!(matches!(err, LockError::Unavailable(_)) && err.is_transient(), "{err}");
    etcd.kill(0);
    let err = lock.release("i-a", 1).unwrap_err();
    assert!(matches!(err, LockError::Unavailable(_)), "{err}");
}
