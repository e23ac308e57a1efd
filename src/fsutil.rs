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
