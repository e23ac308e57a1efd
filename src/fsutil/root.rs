//! Paths under the root, resolved the way a chroot would resolve them, one directory file
//! descriptor at a time.
//!
//! A role names paths as they are on the node (`/var/run/x.conf`). Under `--root DIR` an image
//! root holds absolute symlinks (`/var/run -> /run` on every Debian image): joining the path to
//! DIR as text and letting the kernel follow the links would write to the *host's* `/run`. So
//! nothing here opens a path by its text: every component is opened with `O_NOFOLLOW` relative
//! to the directory before it; a symlink met on the way is read and resolved by hand, an
//! absolute target from the root again and `..` never above it (the semantics of
//! `openat2(RESOLVE_IN_ROOT)`, written out so that the rule below can be checked at each
//! transition). The last component is never followed: callers operate on it through the
//! parent's file descriptor (`*at` calls), and change an existing file's owner and mode through
//! a descriptor opened with `O_NOFOLLOW`, never by path after a check.
//!
//! Unsafe transitions are refused, as systemd-tmpfiles does: a symlink found in a directory
//! that is not owned by root is not followed (its owner could point it at `/etc`), on the live
//! system and in an image root alike.

use anyhow::{bail, Context, Result};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Symlinks followed while resolving one path before giving up (Linux's own limit).
const MAX_SYMLINKS: usize = 40;

/// Mode of the directories created on the way to a path (root-owned, like `mkdir -p`).
const PARENT_DIR_MODE: u32 = 0o755;

/// What `lstat` saw of a path (the last component not followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub kind: Kind,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Other,
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::File => "a regular file",
            Kind::Dir => "a directory",
            Kind::Symlink => "a symlink",
            Kind::Other => "a special file",
        }
    }
}

impl From<&rustix::fs::Stat> for Stat {
    fn from(s: &rustix::fs::Stat) -> Stat {
        let kind = match FileType::from_raw_mode(s.st_mode) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        };
        Stat {
            kind,
            mode: s.st_mode & 0o7777,
            uid: s.st_uid,
            gid: s.st_gid,
            // u64 on x86_64, u32 on aarch64.
            #[allow(clippy::useless_conversion)]
            nlink: u64::from(s.st_nlink),
        }
    }
}

/// The root every host path of a run lives under: `/` on the live system, `--root DIR` for an
/// image. Holds an open directory descriptor; paths are resolved relative to it.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
    /// Writes under it make themselves durable (fsync of the file and its directory). Off
    /// only for [`Root::deferring_syncs`].
    sync: bool,
}

/// The directory that holds a path's last component, opened, and that component's name.
pub struct Parent {
    pub dir: OwnedFd,
    /// Owner and mode of that directory.
    pub dir_stat: Stat,
    pub name: OsString,
    /// The path as the role names it, for messages.
    pub shown: String,
    /// Writes fsync (see [`Root::deferring_syncs`]).
    sync: bool,
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC
}

/// Split a role path into its components; relative paths and `..` are refused.
fn components(path: &str) -> Result<Vec<OsString>> {
    let p = Path::new(path);
    if !p.is_absolute() {
        bail!("path {path:?} is not absolute");
    }
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n.to_os_string()),
            Component::ParentDir | Component::Prefix(_) => bail!("path {path:?} contains `..`"),
        }
    }
    Ok(out)
}

impl Root {
    pub fn open(path: &Path) -> Result<Root> {
        let fd = rustix::fs::open(path, dir_flags(), Mode::empty()).with_context(|| format!("opening the root directory {}", path.display()))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
            sync: true,
        })
    }

    /// With `defer`, writes, links, directories and removals through this root skip their
    /// fsyncs (still a temp file renamed over the target, so no reader sees a partial file, but
    /// a crash of the machine before the data reaches the disk can leave the file empty or
    /// old); whoever asks for it makes them durable later with one sync of the filesystems and must redo them
    /// after a crash before it. For the first boot's
    /// steps that own a path's whole content (`Host::owned_fs`).
    pub fn deferring_syncs(mut self, defer: bool) -> Root {
        self.sync = !defer;
        self
    }

    /// The root as a host path (for messages, `useradd --root` and chroot).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Resolve the directory holding `path`'s last component. With `create`, missing
    /// directories on the way are made (0755, root-owned); without, a missing one is `None`.
    pub fn parent(&self, path: &str, create: bool) -> Result<Option<Parent>> {
        let mut comps = components(path)?;
        let Some(name) = comps.pop() else {
            bail!("path {path:?} names the root itself")
        };
        let Some(dir) = self.walk(path, comps, create)? else { return Ok(None) };
        let dir_stat = Stat::from(&rustix::fs::fstat(&dir).with_context(|| format!("fstat of the directory holding {path}"))?);
        Ok(Some(Parent {
            dir,
            dir_stat,
            name,
            shown: path.to_string(),
            sync: self.sync,
        }))
    }

    /// Open the directory `path` itself (following symlinks on the way, chroot-style).
    pub fn open_dir(&self, path: &str, create: bool) -> Result<Option<OwnedFd>> {
        let comps = components(path)?;
        self.walk(path, comps, create)
    }

    /// Walk `todo` from the root, one `openat(O_NOFOLLOW)` per component.
    fn walk(&self, shown: &str, todo: Vec<OsString>, create: bool) -> Result<Option<OwnedFd>> {
        // The directories entered so far (the root first), with the owner and mode of each
        // (read from the opened descriptor, so they are the directory's that was entered).
        let root_fd = self.fd.try_clone().context("duplicating the root descriptor")?;
        let root_st = Stat::from(&rustix::fs::fstat(&root_fd).context("fstat of the root")?);
        let mut stack: Vec<(OwnedFd, Stat)> = vec![(root_fd, root_st)];
        let mut todo: std::collections::VecDeque<OsString> = todo.into();
        let mut links = 0;
        while let Some(c) = todo.pop_front() {
            if c.is_empty() || c == "." {
                continue;
            }
            if c == ".." {
                // Never above the root, as in a chroot.
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let (top, top_st) = stack.last().map(|(f, st)| (f, *st)).context("empty directory stack")?;
            let st = match rustix::fs::statat(top, c.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Stat::from(&st),
                Err(Errno::NOENT) if create => {
                    match rustix::fs::mkdirat(top, c.as_os_str(), Mode::from_raw_mode(PARENT_DIR_MODE)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e).with_context(|| format!("creating directory {} for {shown}", lossy(&c))),
                    }
                    let fd = rustix::fs::openat(top, c.as_os_str(), dir_flags(), Mode::empty())
                        .with_context(|| format!("opening directory {} for {shown}", lossy(&c)))?;
                    if self.sync {
                        rustix::fs::fsync(top).with_context(|| format!("fsync of the directory holding {}", lossy(&c)))?;
                    }
                    let st = Stat::from(&rustix::fs::fstat(&fd).context("fstat")?);
                    stack.push((fd, st));
                    continue;
                }
                Err(Errno::NOENT) => return Ok(None),
                Err(e) => return Err(e).with_context(|| format!("reading {} on the way to {shown}", lossy(&c))),
            };
            match st.kind {
                Kind::Dir => {
                    let fd = match rustix::fs::openat(top, c.as_os_str(), dir_flags(), Mode::empty()) {
                        Ok(fd) => fd,
                        // Replaced by something else between the look and the open.
                        Err(Errno::LOOP | Errno::NOTDIR) => bail!("{shown}: {} changed while it was being resolved", lossy(&c)),
                        Err(e) => return Err(e).with_context(|| format!("opening directory {} on the way to {shown}", lossy(&c))),
                    };
                    let st = Stat::from(&rustix::fs::fstat(&fd).context("fstat")?);
                    stack.push((fd, st));
                }
                Kind::Symlink => {
                    // The link itself, opened: its owner and its target are read from one
                    // descriptor, so a link swapped in between cannot pass the check.
                    let link = match rustix::fs::openat(top, c.as_os_str(), OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(e) => return Err(e).with_context(|| format!("opening link {} on the way to {shown}", lossy(&c))),
                    };
                    let link_st = Stat::from(&rustix::fs::fstat(&link).context("fstat")?);
                    if link_st.kind != Kind::Symlink {
                        bail!("{shown}: {} changed while it was being resolved", lossy(&c));
                    }
                    if let Some(why) = unsafe_link(&top_st, &link_st) {
                        bail!("unsafe path transition in {shown}: {} is {why}; refusing to follow it", lossy(&c));
                    }
                    links += 1;
                    if links > MAX_SYMLINKS {
                        bail!("{shown}: too many levels of symbolic links");
                    }
                    let target = rustix::fs::readlinkat(&link, "", Vec::new()).with_context(|| format!("reading link {} on the way to {shown}", lossy(&c)))?;
                    let target = OsStr::from_bytes(target.as_bytes());
                    let t = Path::new(target);
                    if t.is_absolute() {
                        stack.truncate(1);
                    }
                    let mut parts: Vec<OsString> = t
                        .components()
                        .filter_map(|p| match p {
                            Component::Normal(n) => Some(n.to_os_string()),
                            Component::ParentDir => Some(OsString::from("..")),
                            _ => None,
                        })
                        .collect();
                    parts.extend(todo.drain(..));
                    todo = parts.into();
                }
                Kind::File | Kind::Other => bail!("{shown}: {} is {}, not a directory", lossy(&c), st.kind.describe()),
            }
        }
        Ok(stack.pop().map(|(fd, _)| fd))
    }

    /// What is at `path` (not following a last-component symlink); None when it does not exist.
    pub fn lstat(&self, path: &str) -> Result<Option<Stat>> {
        let Some(p) = self.parent(path, false)? else { return Ok(None) };
        p.lstat()
    }

    pub fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.lstat(path)?.is_some())
    }

    /// The content of the regular file at `path`; None when it does not exist. A symlink or
    /// another kind of file is an error.
    pub fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let Some(p) = self.parent(path, false)? else { return Ok(None) };
        p.read()
    }

    /// The target of the symlink at `path`; None when nothing is there.
    pub fn read_link(&self, path: &str) -> Result<Option<String>> {
        let Some(p) = self.parent(path, false)? else { return Ok(None) };
        match rustix::fs::readlinkat(&p.dir, p.name.as_os_str(), Vec::new()) {
            Ok(t) => Ok(Some(String::from_utf8_lossy(t.as_bytes()).into_owned())),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading link {path}")),
        }
    }

    /// Replace the file at `path` atomically (see [`Parent::write`]), creating missing parents.
    pub fn write(&self, path: &str, content: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
        let p = self.parent(path, true)?.context("parent directory missing")?;
        p.write(content, mode, owner)
    }
}

impl Parent {
    pub fn lstat(&self) -> Result<Option<Stat>> {
        match rustix::fs::statat(&self.dir, self.name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(Stat::from(&st))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.shown)),
        }
    }

    /// Open the last component itself, never following it (a symlink is an error).
    pub fn open(&self, flags: OFlags) -> Result<Option<std::fs::File>> {
        match rustix::fs::openat(
            &self.dir,
            self.name.as_os_str(),
            flags | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(fd) => Ok(Some(std::fs::File::from(fd))),
            Err(Errno::NOENT) => Ok(None),
            Err(Errno::LOOP) => bail!("{} is a symlink; refusing to follow it", self.shown),
            Err(e) => Err(e).with_context(|| format!("opening {}", self.shown)),
        }
    }

    /// A regular file with more than one name, in a directory someone other than root
    /// controls, may be another file's hard link planted there (`/etc/shadow` linked into a
    /// user's directory): it is neither read nor changed, as systemd-tmpfiles refuses it.
    fn check_links(&self, st: &Stat) -> Result<()> {
        let shared = self.dir_stat.uid != 0 || self.dir_stat.mode & 0o022 != 0;
        if st.kind == Kind::File && st.nlink > 1 && shared {
            bail!(
                "{} has {} hard links in a directory that is not root's alone (owner uid {}, mode {:04o}); refusing to use it",
                self.shown,
                st.nlink,
                self.dir_stat.uid,
                self.dir_stat.mode
            );
        }
        Ok(())
    }

    /// Open the last component read-write, creating it with `mode` when it is missing (never
    /// following a symlink there).
    pub fn open_or_create(&self, mode: u32) -> Result<std::fs::File> {
        let fd = rustix::fs::openat(
            &self.dir,
            self.name.as_os_str(),
            OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(mode),
        )
        .with_context(|| format!("opening {}", self.shown))?;
        Ok(std::fs::File::from(fd))
    }

    pub fn read(&self) -> Result<Option<Vec<u8>>> {
        let Some(mut f) = self.open(OFlags::RDONLY)? else { return Ok(None) };
        let st = Stat::from(&rustix::fs::fstat(&f).with_context(|| format!("fstat {}", self.shown))?);
        if st.kind != Kind::File {
            bail!("{} is {}, not a regular file", self.shown, st.kind.describe());
        }
        self.check_links(&st)?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf).with_context(|| format!("reading {}", self.shown))?;
        Ok(Some(buf))
    }

    /// Change owner and mode of the existing file or directory through a descriptor opened
    /// without following links (so a swapped-in symlink cannot redirect the change).
    pub fn set_meta(&self, mode: Option<u32>, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        let f = self.open(OFlags::RDONLY)?.with_context(|| format!("{} vanished", self.shown))?;
        self.check_links(&Stat::from(&rustix::fs::fstat(&f).with_context(|| format!("fstat {}", self.shown))?))?;
        if uid.is_some() || gid.is_some() {
            rustix::fs::fchown(&f, uid.map(rustix::fs::Uid::from_raw), gid.map(rustix::fs::Gid::from_raw)).with_context(|| format!("chown {}", self.shown))?;
        }
        if let Some(m) = mode {
            rustix::fs::fchmod(&f, Mode::from_raw_mode(m)).with_context(|| format!("chmod {}", self.shown))?;
        }
        Ok(())
    }

    /// Owner of a symlink itself (`lchown`).
    pub fn chown_link(&self, uid: Option<u32>, gid: Option<u32>) -> Result<()> {
        rustix::fs::chownat(
            &self.dir,
            self.name.as_os_str(),
            uid.map(rustix::fs::Uid::from_raw),
            gid.map(rustix::fs::Gid::from_raw),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .with_context(|| format!("chown {}", self.shown))
    }

    /// `.NAME.bootstrap-tmp.` (NAME shortened to a hash when a temp name would pass the
    /// 255-byte limit of a file name).
    fn tmp_prefix(&self) -> OsString {
        let mut t = OsString::from(".");
        if self.name.len() > 200 {
            use sha2::Digest;
            t.push(&hex::encode(sha2::Sha256::digest(self.name.as_bytes()))[..32]);
        } else {
            t.push(&self.name);
        }
        t.push(super::TMP_MARK);
        t
    }

    fn tmp_name(&self) -> OsString {
        let mut t = self.tmp_prefix();
        t.push(std::process::id().to_string());
        t
    }

    /// Write `content` atomically: a temp file beside the target, created 0600 with
    /// `O_EXCL|O_NOFOLLOW`, given its owner and mode before any byte lands, filled, fsynced,
    /// renamed over the target, and the directory fsynced. A crash leaves the old file or the
    /// new one, never a partial one. Under [`Root::deferring_syncs`] the fsyncs are left out and
    /// a crash of the machine may leave the file empty or old (its caller redoes it).
    pub fn write(&self, content: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
        self.remove_stale_temps();
        let tmp = self.tmp_name();
        let _ = rustix::fs::unlinkat(&self.dir, tmp.as_os_str(), AtFlags::empty());
        let fd = rustix::fs::openat(
            &self.dir,
            tmp.as_os_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .with_context(|| format!("creating a temporary file beside {}", self.shown))?;
        let mut f = std::fs::File::from(fd);
        let result = (|| -> Result<()> {
            if let Some((uid, gid)) = owner {
                rustix::fs::fchown(&f, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
                    .with_context(|| format!("chown of the temporary file for {}", self.shown))?;
            }
            rustix::fs::fchmod(&f, Mode::from_raw_mode(mode)).with_context(|| format!("chmod of the temporary file for {}", self.shown))?;
            f.write_all(content).with_context(|| format!("writing {}", self.shown))?;
            if self.sync {
                f.sync_all().with_context(|| format!("fsync {}", self.shown))?;
            }
            rustix::fs::renameat(&self.dir, tmp.as_os_str(), &self.dir, self.name.as_os_str()).with_context(|| format!("renaming into {}", self.shown))?;
            Ok(())
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&self.dir, tmp.as_os_str(), AtFlags::empty());
        }
        result?;
        self.sync_dir()
    }

    /// Create the directory (0700 first, then owner and mode through its descriptor, so it is
    /// never more open than wanted, not even for a moment).
    pub fn mkdir(&self, mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
        rustix::fs::mkdirat(&self.dir, self.name.as_os_str(), Mode::from_raw_mode(0o700)).with_context(|| format!("creating {}", self.shown))?;
        let d = self
            .open(OFlags::RDONLY | OFlags::DIRECTORY)?
            .with_context(|| format!("{} vanished", self.shown))?;
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(&d, Some(rustix::fs::Uid::from_raw(uid)), Some(rustix::fs::Gid::from_raw(gid)))
                .with_context(|| format!("chown {}", self.shown))?;
        }
        rustix::fs::fchmod(&d, Mode::from_raw_mode(mode)).with_context(|| format!("chmod {}", self.shown))?;
        self.sync_dir()
    }

    /// Point a symlink at `target`, replacing an existing link atomically.
    pub fn symlink(&self, target: &str) -> Result<()> {
        let tmp = self.tmp_name();
        let _ = rustix::fs::unlinkat(&self.dir, tmp.as_os_str(), AtFlags::empty());
        rustix::fs::symlinkat(target, &self.dir, tmp.as_os_str()).with_context(|| format!("creating link {}", self.shown))?;
        if let Err(e) = rustix::fs::renameat(&self.dir, tmp.as_os_str(), &self.dir, self.name.as_os_str()) {
            let _ = rustix::fs::unlinkat(&self.dir, tmp.as_os_str(), AtFlags::empty());
            return Err(e).with_context(|| format!("renaming link into {}", self.shown));
        }
        self.sync_dir()
    }

    pub fn remove_file(&self) -> Result<()> {
        rustix::fs::unlinkat(&self.dir, self.name.as_os_str(), AtFlags::empty()).with_context(|| format!("removing {}", self.shown))?;
        self.sync_dir()
    }

    pub fn remove_dir(&self) -> Result<()> {
        rustix::fs::unlinkat(&self.dir, self.name.as_os_str(), AtFlags::REMOVEDIR)
            .with_context(|| format!("removing directory {} (only an empty directory is removed)", self.shown))?;
        self.sync_dir()
    }

    pub fn sync_dir(&self) -> Result<()> {
        if !self.sync {
            return Ok(());
        }
        rustix::fs::fsync(&self.dir).with_context(|| format!("fsync of the directory holding {}", self.shown))
    }

    /// Remove temp files that an earlier, killed write of this name left beside it.
    fn remove_stale_temps(&self) {
        let prefix = self.tmp_prefix().as_bytes().to_vec();
        let Ok(dup) = self.dir.try_clone() else { return };
        let Ok(dir) = rustix::fs::Dir::read_from(dup.as_fd()) else { return };
        for e in dir.flatten() {
            let fname = e.file_name().to_bytes();
            let Some(pid) = fname.strip_prefix(prefix.as_slice()) else { continue };
            // A writer that is still alive (another process) keeps its temp file.
            let alive = std::str::from_utf8(pid)
                .ok()
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let _ = rustix::fs::unlinkat(&self.dir, OsStr::from_bytes(fname), AtFlags::empty());
            }
        }
    }
}

/// Why following a symlink found in directory `dir` would be unsafe (None: safe). Only root
/// may have put the link there: the directory is root's and writable by no one else, or the
/// link is root's own (the kernel's `protected_symlinks` rule for a sticky shared directory,
/// with root following). A link in a directory another user owns, or another user's link in a
/// shared directory such as `/tmp`, could point anywhere that user likes.
fn unsafe_link(dir: &Stat, link: &Stat) -> Option<String> {
    if dir.uid != 0 {
        return Some(format!("a symlink in a directory owned by uid {}, not root", dir.uid));
    }
    if dir.mode & 0o022 != 0 && link.uid != 0 {
        return Some(format!(
            "a symlink owned by uid {} in a directory others can write to (mode {:04o})",
            link.uid, dir.mode
        ));
    }
    None
}

fn lossy(s: &OsStr) -> std::borrow::Cow<'_, str> {
    s.to_string_lossy()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let host = tempfile::tempdir().unwrap();
        let image = tempfile::tempdir().unwrap();
        // The image's /var/run points at "/run": the image's, not the host's.
        std::fs::create_dir_all(image.path().join("var")).unwrap();
        std::fs::create_dir_all(image.path().join("run")).unwrap();
        symlink("/run", image.path().join("var/run")).unwrap();
        // A link that climbs with `..` stops at the root.
        symlink("../../../../..", image.path().join("up")).unwrap();
        // A link pointing at the host directory by its host path stays inside too.
        symlink(host.path(), image.path().join("hostdir")).unwrap();
        let r = Root::open(image.path()).unwrap();
        r.write("/var/run/x.conf", b"x\n", 0o644, None).unwrap();
        assert_eq!(std::fs::read(image.path().join("run/x.conf")).unwrap(), b"x\n");
        r.write("/up/etc/y", b"y", 0o600, None).unwrap();
        assert_eq!(std::fs::read(image.path().join("etc/y")).unwrap(), b"y");
        r.write("/hostdir/z", b"z", 0o600, None).unwrap();
        assert!(!host.path().join("z").exists(), "wrote through a link to the host");
        assert!(image.path().join(host.path().strip_prefix("/").unwrap()).join("z").exists());
        assert_eq!(r.read("/var/run/x.conf").unwrap().unwrap(), b"x\n");
        assert_eq!(r.read("/var/run/none").unwrap(), None);
        assert_eq!(r.lstat("/var/run").unwrap().unwrap().kind, Kind::Symlink);
        assert_eq!(r.read_link("/var/run").unwrap().as_deref(), Some("/run"));
        // the last component is never followed
        assert!(r.read("/var/run/../var/run").is_err(), "`..` in a role path is refused");
        symlink("/etc/y", image.path().join("etc/ylink")).unwrap();
        let err = r.read("/etc/ylink").unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
    }

    #[test]
    fn symlink_loops_and_files_on_the_way_are_errors() {
        let image = tempfile::tempdir().unwrap();
        symlink("/a", image.path().join("b")).unwrap();
        symlink("/b", image.path().join("a")).unwrap();
        std::fs::write(image.path().join("f"), b"").unwrap();
        let r = Root::open(image.path()).unwrap();
        let err = format!("{:#}", r.write("/a/x", b"", 0o644, None).unwrap_err());
        assert!(err.contains("too many levels"), "{err}");
        let err = format!("{:#}", r.write("/f/x", b"", 0o644, None).unwrap_err());
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn a_symlink_in_a_directory_not_owned_by_root_is_not_followed() {
        let image = tempfile::tempdir().unwrap();
        let user = image.path().join("srv/app");
        std::fs::create_dir_all(&user).unwrap();
        std::fs::create_dir_all(image.path().join("etc")).unwrap();
        symlink("/etc", user.join("conf")).unwrap();
        std::os::unix::fs::lchown(&user, Some(1000), Some(1000)).unwrap();
        let r = Root::open(image.path()).unwrap();
        let err = format!("{:#}", r.write("/srv/app/conf/evil", b"x", 0o644, None).unwrap_err());
        assert!(err.contains("unsafe path transition") && err.contains("uid 1000"), "{err}");
        assert!(!image.path().join("etc/evil").exists());
        // a plain directory of that user is fine
        r.write("/srv/app/plain", b"x", 0o644, None).unwrap();
    }

    #[test]
    fn a_user_link_in_a_shared_root_owned_directory_is_not_followed() {
        use std::os::unix::fs::PermissionsExt;
        let image = tempfile::tempdir().unwrap();
        // /tmp: root-owned, world-writable and sticky; alice's link points at /etc/cron.d.
        let tmp = image.path().join("tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::create_dir_all(image.path().join("etc/cron.d")).unwrap();
        symlink("/etc/cron.d", tmp.join("app")).unwrap();
        std::os::unix::fs::lchown(tmp.join("app"), Some(1000), Some(1000)).unwrap();
        let r = Root::open(image.path()).unwrap();
        let err = format!("{:#}", r.write("/tmp/app/x", b"x", 0o644, None).unwrap_err());
        assert!(err.contains("unsafe path transition") && err.contains("uid 1000"), "{err}");
        assert!(!image.path().join("etc/cron.d/x").exists());
        // The same link owned by root is root's own doing: followed.
        std::os::unix::fs::lchown(tmp.join("app"), Some(0), Some(0)).unwrap();
        r.write("/tmp/app/x", b"x", 0o644, None).unwrap();
        assert!(image.path().join("etc/cron.d/x").exists());
        // A group-writable root-owned directory (root:mail 2775): a member's link is refused too.
        let mail = image.path().join("var/mail");
        std::fs::create_dir_all(&mail).unwrap();
        std::fs::set_permissions(&mail, std::fs::Permissions::from_mode(0o2775)).unwrap();
        symlink("/etc", mail.join("box")).unwrap();
        std::os::unix::fs::lchown(mail.join("box"), Some(1000), Some(8)).unwrap();
        assert!(r.write("/var/mail/box/evil", b"x", 0o644, None).is_err());
        assert!(!image.path().join("etc/evil").exists());
    }

    #[test]
    fn a_hard_link_in_a_user_directory_is_not_read_or_changed() {
        let image = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(image.path().join("etc")).unwrap();
        std::fs::create_dir_all(image.path().join("home/alice")).unwrap();
        std::fs::write(image.path().join("etc/shadow"), b"root:secret-hash:1::::::\n").unwrap();
        std::fs::hard_link(image.path().join("etc/shadow"), image.path().join("home/alice/app.conf")).unwrap();
        std::os::unix::fs::lchown(image.path().join("home/alice"), Some(1000), Some(1000)).unwrap();
        let r = Root::open(image.path()).unwrap();
        let err = format!("{:#}", r.read("/home/alice/app.conf").unwrap_err());
        assert!(err.contains("hard links"), "{err}");
        let p = r.parent("/home/alice/app.conf", false).unwrap().unwrap();
        assert!(p.set_meta(Some(0o644), Some(1000), None).is_err());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(image.path().join("etc/shadow")).unwrap().uid(), 0);
        // In root's own directories a file with several names is fine (/usr/bin has them).
        assert!(r.read("/etc/shadow").unwrap().is_some());
    }

    #[test]
    fn a_name_of_255_bytes_can_be_written() {
        let image = tempfile::tempdir().unwrap();
        let r = Root::open(image.path()).unwrap();
        let name = format!("/{}", "n".repeat(255));
        r.write(&name, b"1", 0o644, None).unwrap();
        r.write(&name, b"2", 0o644, None).unwrap();
        assert_eq!(r.read(&name).unwrap().unwrap(), b"2");
        assert_eq!(std::fs::read_dir(image.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn write_mkdir_meta() {
        let image = tempfile::tempdir().unwrap();
        let r = Root::open(image.path()).unwrap();
        r.write("/a/b/c", b"1", 0o640, Some((0, 4))).unwrap();
        let md = std::fs::metadata(image.path().join("a/b/c")).unwrap();
        assert_eq!((md.permissions().mode() & 0o7777, md.gid()), (0o640, 4));
        assert_eq!(std::fs::metadata(image.path().join("a/b")).unwrap().permissions().mode() & 0o7777, 0o755);
        let p = r.parent("/a/d", true).unwrap().unwrap();
        p.mkdir(0o750, None).unwrap();
        assert_eq!(std::fs::metadata(image.path().join("a/d")).unwrap().permissions().mode() & 0o7777, 0o750);
        let p = r.parent("/a/b/c", false).unwrap().unwrap();
        p.set_meta(Some(0o600), None, Some(0)).unwrap();
        assert_eq!(r.lstat("/a/b/c").unwrap().unwrap().mode, 0o600);
        let l = r.parent("/a/l", false).unwrap().unwrap();
        l.symlink("/a/b/c").unwrap();
        l.symlink("/elsewhere").unwrap();
        assert_eq!(r.read_link("/a/l").unwrap().as_deref(), Some("/elsewhere"));
        // set_meta on a symlink refuses to follow it
        assert!(l.set_meta(Some(0o777), None, None).is_err());
        l.remove_file().unwrap();
        assert!(r.parent("/missing/x", false).unwrap().is_none());
        let names: Vec<_> = std::fs::read_dir(image.path().join("a/b")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![OsString::from("c")], "no temp files left");
    }
}
