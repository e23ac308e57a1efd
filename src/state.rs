//! The node's state: every file the agent keeps between runs, in one place.
//!
//! `/var/lib/bootstrap` (mode 0700; its files 0600, since they can name steps and reasons):
//! `last-run.json`, `pending-notify.json`, `reboot.json`, `reboot-needed.json`,
//! `reboot-requested`, `firstboot.done` and the bundle cache `bundles/`. The run lock lives
//! in `/run/bootstrap/lock` (gone at boot, as a lock should be). Files are read and written
//! through [`crate::fsutil::Root`], so under `--root` nothing resolves outside the root.

use crate::fsutil::Root;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// The state directory, relative to the root.
pub const DIR: &str = "var/lib/bootstrap";

/// The last run's report (`--json` shape).
pub const REPORT: &str = "last-run.json";
/// Notify targets of changed steps whose handler has not run yet (a failed or killed run
/// keeps them here, so the next successful run still restarts what it should).
pub const PENDING_NOTIFY: &str = "pending-notify.json";
/// The reboot slot this node holds, by its own records.
pub const REBOOT: &str = "reboot.json";
/// A reboot a changed `reboot_required` step asked for and that has not happened yet.
pub const REBOOT_NEEDED: &str = "reboot-needed.json";
/// Written by `bootstrap reboot --request`; removed after the reboot it asked for.
pub const REBOOT_REQUESTED: &str = "reboot-requested";
/// Written by `init` only after everything of the first boot succeeded.
pub const FIRSTBOOT_DONE: &str = "firstboot.done";
/// Fetched bundles: one directory per sha256, `current` and `last-good` symlinks.
pub const BUNDLES: &str = "bundles";
/// The run lock (relative to the root), shared by the timer, `init` and manual runs.
pub const RUN_LOCK: &str = "run/bootstrap/lock";

/// The state directory of one root (`/` on the live system, `--root DIR` for an image).
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> StateDir {
        StateDir { root: root.to_path_buf() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `name` (a file of the state directory) as a host path, for messages and the few
    /// callers that hand a path on (the bundle cache).
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(DIR).join(name)
    }

    /// `name` as the node sees it (`/var/lib/bootstrap/NAME`): what `Root` resolves.
    fn node_path(name: &str) -> String {
        format!("/{DIR}/{name}")
    }

    /// The bundle cache directory (a host path).
    pub fn bundles(&self) -> PathBuf {
        self.path(BUNDLES)
    }

    /// The run lock file (a host path).
    pub fn run_lock(&self) -> PathBuf {
        self.root.join(RUN_LOCK)
    }

    /// Create `<root>/var/lib/bootstrap` mode 0700, or tighten an existing one that others can
    /// read (an older agent made it 0755), through the root like every host path (a link on
    /// the way is resolved inside the root, and one in a directory not root's is refused).
    /// Returns its path.
    pub fn ensure(&self) -> Result<PathBuf> {
        let dir = self.root.join(DIR);
        let fs = Root::open(&self.root)?;
        let node_dir = format!("/{DIR}");
        let fd = match fs.open_dir(&node_dir, false)? {
            Some(fd) => fd,
            None => {
                let at = fs.parent(&node_dir, true)?.with_context(|| format!("no directory for {}", dir.display()))?;
                if at.lstat()?.is_some() {
                    anyhow::bail!("{} is a symlink to a directory that does not exist (resolved inside the root)", dir.display());
                }
                at.mkdir(0o700, None)?;
                fs.open_dir(&node_dir, false)?.with_context(|| format!("{} vanished", dir.display()))?
            }
        };
        let st = rustix::fs::fstat(&fd).with_context(|| format!("reading {}", dir.display()))?;
        if st.st_mode & 0o7777 != 0o700 {
            rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700)).with_context(|| format!("chmod 0700 {}", dir.display()))?;
        }
        Ok(dir)
    }

    /// Write a state file atomically, mode 0600 in the 0700 state directory.
    pub fn write(&self, name: &str, content: &[u8]) -> Result<()> {
        self.write_mode(name, content, 0o600)
    }

    /// Write a state file atomically with another mode (the `firstboot.done` and
    /// `reboot-requested` markers hold only a time: 0644, as they always were).
    pub fn write_mode(&self, name: &str, content: &[u8], mode: u32) -> Result<()> {
        self.ensure()?;
        Root::open(&self.root)?.write(&Self::node_path(name), content, mode, None)
    }

    /// A state file's content; None when it does not exist.
    pub fn read(&self, name: &str) -> Result<Option<Vec<u8>>> {
        Root::open(&self.root)?
            .read(&Self::node_path(name))
            .with_context(|| format!("reading {}", self.path(name).display()))
    }

    pub fn exists(&self, name: &str) -> bool {
        Root::open(&self.root).and_then(|r| r.exists(&Self::node_path(name))).unwrap_or(false)
    }

    /// Remove a state file; an absent one is no error.
    pub fn remove(&self, name: &str) -> Result<()> {
        let root = Root::open(&self.root)?;
        let Some(p) = root.parent(&Self::node_path(name), false)? else {
            return Ok(());
        };
        if p.lstat()?.is_none() {
            return Ok(());
        }
        p.remove_file().with_context(|| format!("removing {}", self.path(name).display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    /// State files are root's alone: 0600 in a 0700 directory, made so or tightened from an
    /// older agent's 0755; under --root a symlinked state directory is refused, not followed.
    #[test]
    fn state_files_are_private() {
        let root = tempfile::tempdir().unwrap();
        StateDir::new(root.path()).write(REPORT, b"{}\n").unwrap();
        assert_eq!(mode(&root.path().join(DIR)), 0o700);
        assert_eq!(mode(&StateDir::new(root.path()).path(REPORT)), 0o600);

        let old = tempfile::tempdir().unwrap();
        let dir = old.path().join(DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        StateDir::new(old.path()).write(PENDING_NOTIFY, b"[]").unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&StateDir::new(old.path()).path(PENDING_NOTIFY)), 0o600);

        let linked = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::set_permissions(elsewhere.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(linked.path().join("var/lib")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), linked.path().join(DIR)).unwrap();
        let err = StateDir::new(linked.path()).write(REPORT, b"{}").unwrap_err().to_string();
        // The link resolves inside the root (chroot-style), where its target does not exist.
        assert!(err.contains("is a symlink to a directory that does not exist"), "{err}");
        assert_eq!(mode(elsewhere.path()), 0o755, "nothing outside the root was changed");
    }

    #[test]
    fn read_and_remove() {
        let root = tempfile::tempdir().unwrap();
        let s = StateDir::new(root.path());
        assert_eq!(s.read(REBOOT).unwrap(), None);
        s.remove(REBOOT).unwrap();
        s.write(REBOOT, b"{}").unwrap();
        assert!(s.exists(REBOOT));
        assert_eq!(s.read(REBOOT).unwrap().as_deref(), Some(&b"{}"[..]));
        s.remove(REBOOT).unwrap();
        assert!(!s.exists(REBOOT));
    }
}
