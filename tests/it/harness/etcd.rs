//! Real etcd (Debian etcd-server) on free loopback ports, one member or a three-member
//! cluster (or one member over TLS with client certificates), stopped by PID.

#![allow(dead_code)]

use bootstrap::reboot::etcd::{EtcdLock, Tls};
use std::path::{Path, PathBuf};
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
    tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl.
pub struct TlsFiles {
    pub dir: PathBuf,
}

impl TlsFiles {
    pub fn make(dir: &Path) -> TlsFiles {
        let sh = |script: &str| {
            let out = Command::new("bash").arg("-ec").arg(script).current_dir(dir).output().expect("bash");
            assert!(
                out.status.success(),
                "openssl (apt-get install openssl): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
        sh(&format!(
            "openssl req -x509 {key} -keyout ca.key -out ca.crt -days 2 -subj /CN=test-ca 2>/dev/null"
        ));
        // etcd's gateway dials etcd itself with the server pair, so that one is a client too.
        for (name, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth")] {
            sh(&format!(
                "openssl req {key} -keyout {name}.key -out {name}.csr -subj /CN={name} 2>/dev/null
                 printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n' > {name}.ext
                 openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile {name}.ext -out {name}.crt 2>/dev/null"
            ));
        }
        TlsFiles { dir: dir.to_path_buf() }
    }

    pub fn path(&self, f: &str) -> String {
        self.dir.join(f).display().to_string()
    }

    /// What the agent gets from `[reboot.etcd]` ca_file, cert_file, key_file.
    pub fn client(&self, with_cert: bool) -> Tls {
        let read = |f: &str| std::fs::read(self.dir.join(f)).unwrap();
        Tls {
            ca_pem: Some(read("ca.crt")),
            identity_pem: with_cert.then(|| [read("client.crt"), read("client.key")].concat()),
        }
    }
}

impl Etcd {
    pub fn start(n: usize) -> Etcd {
        Etcd::start_with(n, false, None)
    }

    /// One member serving clients over TLS and requiring client certificates.
    pub fn start_tls() -> Etcd {
        Etcd::start_with(1, true, None)
    }

    /// `data` puts the members' data under that directory (tmpfs for the fleet simulation).
    pub fn start_with(n: usize, tls: bool, data: Option<&Path>) -> Etcd {
        assert!(
            std::path::Path::new("/usr/bin/etcd").exists(),
            "etcd not found: run scripts/setup (apt etcd-server)"
        );
        let dir = match data {
            Some(d) => tempfile::TempDir::new_in(d).unwrap(),
            None => tempfile::tempdir().unwrap(),
        };
        let tls = tls.then(|| {
            std::fs::create_dir(dir.path().join("tls")).unwrap();
            TlsFiles::make(&dir.path().join("tls"))
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, pp))| format!("m{i}=http://127.0.0.1:{pp}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (cp, pp)) in ports.iter().enumerate() {
            let client_url = format!("{scheme}://127.0.0.1:{cp}");
            let peer = format!("http://127.0.0.1:{pp}");
            let mut args: Vec<String> = [
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
            if let Some(t) = &tls {
                args.extend([
                    "--cert-file".into(),
                    t.path("server.crt"),
                    "--key-file".into(),
                    t.path("server.key"),
                    "--trusted-ca-file".into(),
                    t.path("ca.crt"),
                    "--client-cert-auth".into(),
                ]);
            }
            let child = spawn(&args);
            members.push(Member {
                child: Some(child),
                client_url,
                args,
            });
        }
        let etcd = Etcd { members, tls, _dir: dir };
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
        let tls = self.tls.as_ref().map(|t| t.client(true)).unwrap_or_default();
        EtcdLock::with_tls(&self.endpoints(), "com.coreos.airlock", group, &tls).unwrap()
    }

    /// The holders of `group`'s semaphore (none when it does not exist yet).
    pub fn holders(&self, group: &str) -> Vec<String> {
        self.lock(group).get().unwrap().map(|(s, _)| s.holders).unwrap_or_default()
    }

    /// `etcdctl` (API v3) against every member; its standard output.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.endpoints().join(","))
            .args(args)
            .output()
            .expect("etcdctl (apt etcd-client)");
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
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
