//! Host paths under `--root`, atomic writes, and owner lookups in the root's account files.

use anyhow::{bail, Context, Result};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

mod root;
pub use root::{Kind as FileKind, Parent, Root, Stat};

/// Suffix of the temporary files an atomic write leaves behind if it is killed.
pub const TMP_MARK: &str = ".bootstrap-tmp.";

/// Map an absolute path as a role names it (`/etc/motd`) to the host path under `root`.
/// Rejects relative paths and `..`.
pub fn host_path(root: &Path, path: &str) -> Result<PathBuf> {
    let p = Path::new(path);
    if !p.is_absolute() {
        bail!("path {path:?} is not absolute");
    }
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => bail!("path {path:?} contains `..`"),
        }
    }
    Ok(out)
}

/// File mode given as an octal string (`"0644"`, `"755"`, `"01777"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl Mode {
    pub fn parse(s: &str) -> std::result::Result<Mode, String> {
        let ok = (3..=4).contains(&s.len()) && s.chars().all(|c| ('0'..='7').contains(&c));
        if !ok {
            return Err(format!("invalid mode {s:?}: expected 3 or 4 octal digits as a string, like \"0644\""));
        }
        Ok(Mode(u32::from_str_radix(s, 8).expect("checked octal")))
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// Look a user up by name in `<root>/etc/passwd` (names that are all digits are uids).
pub fn lookup_uid(root: &Path, name: &str) -> Result<Option<u32>> {
    if let Ok(n) = name.parse() {
        return Ok(Some(n));
    }
    Ok(read_db(root, "etc/passwd")?
        .into_iter()
        .find(|f| f[0] == name)
        .and_then(|f| f.get(2)?.parse().ok()))
}

pub fn lookup_gid(root: &Path, name: &str) -> Result<Option<u32>> {
    if let Ok(n) = name.parse() {
        return Ok(Some(n));
    }
    Ok(read_db(root, "etc/group")?
        .into_iter()
        .find(|f| f[0] == name)
        .and_then(|f| f.get(2)?.parse().ok()))
}

pub fn uid_name(root: &Path, uid: u32) -> String {
    read_db(root, "etc/passwd")
        .ok()
        .and_then(|rows| rows.into_iter().find(|f| f.get(2).map(|s| s.as_str()) == Some(&uid.to_string())))
        .map(|f| f[0].clone())
        .unwrap_or_else(|| uid.to_string())
}

pub fn gid_name(root: &Path, gid: u32) -> String {
    read_db(root, "etc/group")
        .ok()
        .and_then(|rows| rows.into_iter().find(|f| f.get(2).map(|s| s.as_str()) == Some(&gid.to_string())))
        .map(|f| f[0].clone())
        .unwrap_or_else(|| gid.to_string())
}

/// Rows of a colon-separated account file. A missing file is an empty database, except that
/// `root` (0) always exists so that a fresh image root can hold root-owned files.
/// Read through the root like every other host path (an image's `/etc` may be a link).
pub fn read_db(root: &Path, rel: &str) -> Result<Vec<Vec<String>>> {
    let bytes = Root::open(root)?.read(&format!("/{rel}"))?;
    let Some(bytes) = bytes else {
        return Ok(vec![vec!["root".into(), "x".into(), "0".into(), "0".into()]]);
    };
    let text = String::from_utf8_lossy(&bytes);
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect())
}

/// Resolve an owner name to a uid, with an error naming the user when it does not exist.
pub fn require_uid(root: &Path, name: &str) -> Result<u32> {
    lookup_uid(root, name)?.with_context(|| format!("user {name:?} does not exist in {}", root.join("etc/passwd").display()))
}

pub fn require_gid(root: &Path, name: &str) -> Result<u32> {
    lookup_gid(root, name)?.with_context(|| format!("group {name:?} does not exist in {}", root.join("etc/group").display()))
}

/// Write `content` to `path` atomically: a temp file in the same directory is created with
/// mode 0600, given its final owner and mode *before* any byte is written, filled, fsynced,
/// renamed over the target, and the directory is fsynced. A crash leaves either the old or the
/// new file, never a partial one (at most a stray temp file, removed by the next write).
pub fn atomic_write(path: &Path, content: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    let name = path.file_name().context("path has no file name")?.to_string_lossy().to_string();
    remove_stale_temps(dir, &name);
    let tmp = dir.join(format!(".{name}{TMP_MARK}{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let result = (|| -> Result<()> {
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).with_context(|| format!("chown {}", tmp.display()))?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", tmp.display()))?;
        f.write_all(content).with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("fsync {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    fsync_dir(dir)
}

pub fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("fsync {}", dir.display()))
}

/// Remove temp files that an earlier, killed write of `name` left in `dir`.
fn remove_stale_temps(dir: &Path, name: &str) {
    let prefix = format!(".{name}{TMP_MARK}");
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let fname = e.file_name().to_string_lossy().to_string();
        let Some(pid) = fname.strip_prefix(&prefix) else { continue };
        // A writer that is still alive (another process) keeps its temp file.
        let alive = pid
            .parse::<u32>()
            .ok()
            .is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Create `dir` and its missing parents (parents 0755, owned by the current user).
pub fn create_parents(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(Mode::parse("0644"), Ok(Mode(0o644)));
        assert_eq!(Mode::parse("755"), Ok(Mode(0o755)));
        assert_eq!(Mode::parse("1777"), Ok(Mode(0o1777)));
        for bad in ["", "644x", "0o644", "0999", "12", "00644", "rw-r--r--"] {
            assert!(Mode::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(Mode(0o644).to_string(), "0644");
    }

    #[test]
    fn host_paths() {
        let r = Path::new("/tmp/r");
        assert_eq!(host_path(r, "/etc/motd").unwrap(), PathBuf::from("/tmp/r/etc/motd"));
        assert_eq!(host_path(Path::new("/"), "/etc/motd").unwrap(), PathBuf::from("/etc/motd"));
        assert!(host_path(r, "etc/motd").is_err());
        assert!(host_path(r, "/etc/../../x").is_err());
    }

    #[test]
    fn atomic_write_sets_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        atomic_write(&p, b"one", 0o640, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o640);
        // a stale temp from a dead writer is cleaned up by the next write
        fs::write(d.path().join(format!(".f{TMP_MARK}999999999")), b"partial").unwrap();
        atomic_write(&p, b"two", 0o600, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("f")]);
    }
}

/// Filesystem types that `sync_local_filesystems` leaves alone: network and FUSE filesystems
/// (a server that does not answer would hold the call; their clients write back on close
/// anyway), automount points (opening one mounts it) and kernel pseudo-filesystems.
const NOT_SYNCED: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smb3",
    "smbfs",
    "ceph",
    "glusterfs",
    "9p",
    "lustre",
    "afs",
    "autofs",
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "mqueue",
    "debugfs",
    "tracefs",
    "securityfs",
    "pstore",
    "bpf",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "hugetlbfs",
    "efivarfs",
    "rpc_pipefs",
    "nsfs",
];

/// The mount points of `/proc/self/mountinfo` to sync, in mount order, without the types in
/// [`NOT_SYNCED`] and FUSE (`fuse`, `fuse.*`). Several may be one filesystem (bind mounts).
fn local_mounts(mountinfo: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let Some(point) = left.split(' ').nth(4) else { continue };
        let Some(fstype) = right.split(' ').next() else { continue };
        if NOT_SYNCED.contains(&fstype) || fstype == "fuse" || fstype.starts_with("fuse.") || fstype.starts_with("fuseblk") {
            continue;
        }
        out.push(unescape_mount(point));
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Make what was written without fsyncs durable: `syncfs` on every local filesystem (one per
/// device), not `sync()`, which would also wait for network filesystems (an NFS or EFS server
/// that does not answer would hold a first boot for good). Failures are logged: the data is
/// written back by the kernel anyway, and this only shortens the window.
pub fn sync_local_filesystems() {
    let mountinfo = match std::fs::read_to_string("/proc/self/mountinfo") {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("reading /proc/self/mountinfo: {e}; syncing everything");
            nix::unistd::sync();
            return;
        }
    };
    let mut synced = std::collections::BTreeSet::new();
    for point in local_mounts(&mountinfo) {
        // Directories only (a file bind-mounted over another is not opened: it could be a
        // device), each filesystem once.
        let fd = match rustix::fs::open(
            point.as_str(),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC | rustix::fs::OFlags::NONBLOCK,
            rustix::fs::Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOTDIR | rustix::io::Errno::NOENT | rustix::io::Errno::ACCESS) => continue,
            Err(e) => {
                tracing::warn!("syncfs {point}: {e}");
                continue;
            }
        };
        if !rustix::fs::fstat(&fd).is_ok_and(|st| synced.insert(st.st_dev)) {
            continue;
        }
        if let Err(e) = rustix::fs::syncfs(&fd) {
            tracing::warn!("syncfs {point}: {e}");
        }
    }
}

#[cfg(test)]
mod sync_tests {
    #[test]
    fn local_mounts_skip_network_fuse_and_pseudo_filesystems() {
        let info = "22 27 0:21 / /proc rw,relatime - proc proc rw\n\
                    27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n\
                    30 27 254:1 / /boot rw - vfat /dev/vda1 rw\n\
                    31 27 0:50 / /mnt/efs rw - nfs4 fs-1.efs:/ rw\n\
                    32 27 0:51 / /mnt/s3 rw - fuse.s3fs s3fs rw\n\
                    33 27 254:0 /srv /srv rw - ext4 /dev/vda rw\n\
                    34 27 0:52 / /var/lib/with\\040space rw - xfs /dev/vdb rw\n\
                    35 27 0:53 / /run rw - tmpfs tmpfs rw\n";
        assert_eq!(super::local_mounts(info), ["/", "/boot", "/srv", "/var/lib/with space", "/run"]);
    }
}
