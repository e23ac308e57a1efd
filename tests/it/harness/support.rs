//! Shared helpers: run the built binary, snapshot trees, compare golden files.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_bootstrap")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Run the agent with these arguments (no terminal, no journal).
pub fn agent(args: &[&str]) -> Run {
    cmd(args).output().expect("run bootstrap").into()
}

pub fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).env_remove("JOURNAL_STREAM").env_remove("BOOTSTRAP_LOG");
    c
}

/// `apply`/`plan` of a role from a bundle into a root.
pub fn run_role(verb: &str, root: &Path, source: &Path, role: &str, extra: &[&str]) -> Run {
    let (r, s) = (root.to_str().unwrap(), source.to_str().unwrap());
    let mut args = vec![verb, "--root", r, "--source", s, "--role", role];
    args.extend_from_slice(extra);
    agent(&args)
}

/// Write the agent config of the system under `root` (`etc/bootstrap/config.toml`), replacing
/// any there.
pub fn write_config(root: &Path, toml: &str) {
    let path = root.join("etc/bootstrap/config.toml");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, toml).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

pub fn report(root: &Path) -> serde_json::Value {
    let p = root.join("var/lib/bootstrap/last-run.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))).unwrap()
}

/// Every path under `root` with its type, mode, owner, and content or link target.
pub fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, true);
    out
}

/// Like `snapshot`, without contents (for golden listings).
pub fn listing(root: &Path) -> String {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out, false);
    out.into_iter().map(|(k, v)| format!("{k} {v}\n")).collect()
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>, content: bool) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        let md = std::fs::symlink_metadata(&p).unwrap();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
        let meta = format!("{:04o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
        let v = if md.file_type().is_symlink() {
            format!("link -> {}", std::fs::read_link(&p).unwrap().display())
        } else if md.is_dir() {
            walk(root, &p, out, content);
            format!("dir {meta}")
        } else if content {
            format!("file {meta} {:?}", String::from_utf8_lossy(&std::fs::read(&p).unwrap()))
        } else {
            format!("file {meta}")
        };
        out.insert(rel, v);
    }
}

/// Compare with `tests/golden/NAME`; on mismatch show both sides in full.
/// `UPDATE_GOLDEN=1` rewrites the file instead.
pub fn golden(name: &str, actual: &str) {
    let path = repo().join("tests/golden").join(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading golden {}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    if want != actual {
        panic!("golden {} differs\n--- want ---\n{want}\n--- got ---\n{actual}\n--- end ---", path.display());
    }
}

/// A copy of this repository's roles/ in a temp dir, to be changed by a test.
pub fn bundle_copy() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("roles"), &d.path().join("roles"));
    d
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A bundle holding exactly these files (path relative to the bundle root → content).
pub fn bundle(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (p, c) in files {
        let path = d.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
    d
}

/// An image root holding a shell and a few tools with their libraries (copied from the host by
/// `ldd`), for `exec` steps, which run chrooted into the root under `--root`.
pub fn shell_root() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let bin = d.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["sh", "true", "false", "test", "sleep", "cat", "touch"] {
        let host = Path::new("/bin").join(tool);
        let real = std::fs::canonicalize(&host).unwrap_or_else(|e| panic!("{}: {e}", host.display()));
        std::fs::copy(&real, bin.join(tool)).unwrap();
        let ldd = Command::new("ldd").arg(&real).output().expect("ldd (libc-bin)");
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" or "/lib64/ld-linux-x86-64.so.2 (0x…)"
            let lib = line.split("=>").last().unwrap().trim().split(' ').next().unwrap();
            if lib.starts_with('/') {
                let dst = d.path().join(lib.trim_start_matches('/'));
                std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
                std::fs::copy(lib, &dst).unwrap();
            }
        }
    }
    d
}

/// A new minisign key pair in `dir` for signing bundles: (the secret key file, the public key
/// line as `[bundle] public_key` takes it).
pub fn signing_key(dir: &Path, name: &str) -> (PathBuf, String) {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let sk = dir.join(name);
    std::fs::write(&sk, kp.sk.to_box(None).unwrap().to_string()).unwrap();
    let pk = kp.pk.to_box().unwrap().to_string().lines().last().unwrap().to_string();
    (sk, pk)
}

/// `bootstrap bundle build DIR -o OUT --sign SK` with `SOURCE_DATE_EPOCH=epoch` (the build time
/// the signature binds); OUT.minisig is beside OUT.
pub fn build_signed(dir: &Path, out: &Path, sk: &Path, epoch: &str) {
    let r: Run = cmd(&[
        "bundle",
        "build",
        dir.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--sign",
        sk.to_str().unwrap(),
    ])
    .env("SOURCE_DATE_EPOCH", epoch)
    .output()
    .unwrap()
    .into();
    assert_eq!(r.code, 0, "{}", r.all());
}

/// The ids of the steps a report (or `plan --json`) lists as changed, in order.
pub fn changed_ids(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "changed")
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}
