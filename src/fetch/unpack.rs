//! The safe unpack of a tar stream, shared by bundles and `archive` steps: it refuses anything
//! able to write outside the destination (absolute paths, `..`, links that leave it, paths
//! through links, device files) and oversize trees.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Unpack limits (a bundle's defaults: roles and templates, not data).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bytes: 64 * 1024 * 1024,
            max_entries: 20_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("entry {entry:?} rejected: {why}")]
    Entry { entry: String, why: String },
    #[error("larger than the limit of {limit} bytes unpacked")]
    TooLarge { limit: u64 },
    #[error("more than {limit} entries")]
    TooManyEntries { limit: usize },
}

/// An entry's path made relative, refused when absolute, with `..`, or empty.
pub fn entry_path(raw: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path".into()),
            Component::ParentDir => return Err("`..` in path".into()),
        }
    }
    if out.as_os_str().is_empty() {
        return Err("empty path".into());
    }
    Ok(out)
}

/// Where a link target (relative to the link's directory) lands, resolved the way the kernel
/// will: refused when it leaves the bundle, or when any component of it is itself a symlink of
/// the bundle (`s -> .` would make `s/../x` point one level higher than it reads), so a
/// textual resolution is the physical one.
fn resolve_inside(link: &Path, target: &Path, links: &BTreeMap<PathBuf, PathBuf>) -> Result<PathBuf, String> {
    if target.is_absolute() {
        return Err(format!("symlink to {} leaves the bundle", target.display()));
    }
    let mut parts: Vec<_> = link.parent().map(|p| p.components().collect()).unwrap_or_default();
    for c in target.components() {
        match c {
            Component::Normal(_) => {
                parts.push(c);
                let so_far: PathBuf = parts.iter().collect();
                if links.contains_key(&so_far) {
                    return Err(format!("symlink to {} goes through another symlink ({})", target.display(), so_far.display()));
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(format!("symlink to {} leaves the bundle", target.display()));
                }
            }
            _ => return Err(format!("symlink to {} leaves the bundle", target.display())),
        }
    }
    Ok(parts.iter().collect())
}

/// fsync every directory under `dir` (not following links), deepest first, then `dir`.
fn sync_tree(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        }
    }
    crate::fsutil::fsync_dir(dir)
}

/// The safe unpack of a (decompressed) tar stream into `dest` (which must not exist), shared by
/// bundles and `archive` steps: the same refusals as [`unpack`], with the first
/// `strip_components` parts of every entry's path dropped (entries with no part left are
/// skipped). On error `dest` is removed.
pub fn unpack_tar<R: Read>(tar: R, dest: &Path, limits: Limits, strip_components: usize) -> Result<()> {
    fs::create_dir(dest).with_context(|| format!("creating {}", dest.display()))?;
    let r = unpack_inner(tar, dest, limits, strip_components);
    if r.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    r
}

/// `rel` without its first `n` parts (None when nothing is left).
fn strip(rel: PathBuf, n: usize) -> Option<PathBuf> {
    let out: PathBuf = rel.components().skip(n).collect();
    (!out.as_os_str().is_empty()).then_some(out)
}

fn unpack_inner<R: Read>(tar: R, dest: &Path, limits: Limits, strip_components: usize) -> Result<()> {
    // The decompressed stream is capped too, whatever the headers claim.
    let stream = tar.take(limits.max_bytes.saturating_mul(2) + 1024 * 1024);
    let mut archive = tar::Archive::new(stream);
    let mut total: u64 = 0;
    let mut links: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    let mut files: BTreeSet<PathBuf> = BTreeSet::new();
    for (n, entry) in archive.entries().context("reading the tarball")?.enumerate() {
        if n >= limits.max_entries {
            return Err(UnpackError::TooManyEntries { limit: limits.max_entries }.into());
        }
        let mut entry = entry.context("reading the tarball")?;
        let raw = entry.path().context("entry path")?.into_owned();
        let reject = |why: &str| UnpackError::Entry {
            entry: raw.display().to_string(),
            why: why.to_string(),
        };
        let rel = entry_path(&raw).map_err(|w| reject(&w))?;
        let Some(rel) = strip(rel, strip_components) else {
            continue;
        };
        if rel.ancestors().skip(1).any(|a| links.contains_key(a)) {
            return Err(reject("path goes through a symlink").into());
        }
        let out = dest.join(&rel);
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&out)?;
                fs::set_permissions(&out, fs::Permissions::from_mode(0o755))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.header().size()?;
                total = total.saturating_add(size);
                if total > limits.max_bytes {
                    return Err(UnpackError::TooLarge { limit: limits.max_bytes }.into());
                }
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p)?;
                }
                let mode = if entry.header().mode()? & 0o111 != 0 { 0o755 } else { 0o644 };
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&out)
                    .map_err(|e| reject(&format!("cannot create: {e}")))?;
                let copied = std::io::copy(&mut (&mut entry).take(size), &mut f)?;
                if copied != size {
                    return Err(reject("truncated").into());
                }
                f.set_permissions(fs::Permissions::from_mode(mode))?;
                f.flush()?;
                // On disk before the rename publishes the bundle: a power cut must not leave
                // a truncated file in a bundle that looks complete.
                f.sync_all().with_context(|| format!("fsync {}", out.display()))?;
                files.insert(rel);
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.context("symlink without target")?.into_owned();
                resolve_inside(&rel, &target, &links).map_err(|w| reject(&w))?;
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p)?;
                }
                std::os::unix::fs::symlink(&target, &out)?;
                links.insert(rel, target);
            }
            tar::EntryType::Link => {
                let target = entry.link_name()?.context("hard link without target")?.into_owned();
                let target = entry_path(&target).map_err(|w| reject(&format!("hard link target: {w}")))?;
                let target = strip(target, strip_components).ok_or_else(|| reject("hard link to a stripped path"))?;
                if !files.contains(&target) {
                    return Err(reject(&format!("hard link to {} which is not a file of this bundle", target.display())).into());
                }
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p)?;
                }
                fs::hard_link(dest.join(&target), &out)?;
                files.insert(rel);
            }
            other => {
                return Err(reject(&format!(
                    "entry type {other:?} is not allowed (only files, directories and links inside the bundle)"
                ))
                .into())
            }
        }
    }
    // Links checked again with every link of the bundle known: one unpacked later can
    // change where an earlier one points.
    for (rel, target) in &links {
        resolve_inside(rel, target, &links).map_err(|why| UnpackError::Entry {
            entry: rel.display().to_string(),
            why,
        })?;
    }
    sync_tree(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_targets() {
        let none = BTreeMap::new();
        assert_eq!(resolve_inside(Path::new("roles/a/l"), Path::new("f"), &none), Ok(PathBuf::from("roles/a/f")));
        assert_eq!(
            resolve_inside(Path::new("roles/a/l"), Path::new("../b/f"), &none),
            Ok(PathBuf::from("roles/b/f"))
        );
        assert!(resolve_inside(Path::new("roles/l"), Path::new("../../x"), &none).is_err());
        assert!(resolve_inside(Path::new("roles/l"), Path::new("/etc"), &none).is_err());
        assert!(entry_path(Path::new("/etc/passwd")).is_err());
        assert!(entry_path(Path::new("roles/../../etc")).is_err());
        assert_eq!(entry_path(Path::new("./roles/x")).unwrap(), PathBuf::from("roles/x"));
    }
}
