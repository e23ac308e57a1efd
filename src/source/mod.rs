//! Where a bundle comes from, and the cache of fetched bundles under
//! `/var/lib/bootstrap/bundles/`: one directory per sha256, `current` (last applied) and
//! `last-good` (last fully successful) symlinks.

pub mod bundle;

use crate::error::ConfigError;
use anyhow::{Context, Result};
use bundle::{BundleError, Limits};
use std::path::{Path, PathBuf};

pub const CACHE_DIR: &str = "var/lib/bootstrap/bundles";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bundle root: a directory holding roles/.
    Dir(PathBuf),
    /// A bundle tarball on the local filesystem.
    Tarball(PathBuf),
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, ConfigError> {
        let path = match s.split_once("://") {
            Some(("file", p)) => PathBuf::from(p),
            Some((scheme, _)) => {
                return Err(ConfigError::msg(format!("source {s}: `{scheme}://` sources are not supported by this version yet; use a directory or a file:// tarball")))
            }
            None => PathBuf::from(s),
        };
        if path.is_dir() {
            if !path.join("roles").is_dir() {
                return Err(ConfigError::msg(format!("source {s}: {} is not a bundle root (no roles/ directory in it)", path.display())));
            }
            return Ok(Source::Dir(path));
        }
        Ok(Source::Tarball(path))
    }
}

/// Integrity settings from the agent config.
#[derive(Debug, Clone, Default)]
pub struct Verify {
    pub sha256: Option<String>,
    pub public_key: Option<String>,
    pub limits: Limits,
}

/// A bundle ready to load roles from.
pub struct Fetched {
    pub root: PathBuf,
    pub sha256: Option<String>,
    /// `directory`, `source` (fetched now), or `cache` (unchanged, already unpacked).
    pub origin: &'static str,
    _temp: Option<tempfile::TempDir>,
}

/// A bundle root for `validate`: a directory, or a tarball unpacked into a temp dir.
pub fn resolve_local(source: &str) -> Result<Fetched> {
    fetch(&Source::parse(source)?, Path::new("/"), &Verify::default(), false)
}

fn check(bytes: &[u8], sig: Option<&str>, sig_name: &str, v: &Verify) -> Result<String, BundleError> {
    let sha = bundle::sha256_hex(bytes);
    if let Some(want) = &v.sha256 {
        if !want.eq_ignore_ascii_case(&sha) {
            return Err(BundleError::Sha256Mismatch { expected: want.clone(), actual: sha });
        }
    }
    if let Some(pk) = &v.public_key {
        let sig = sig.ok_or_else(|| BundleError::MissingSignature(sig_name.to_string()))?;
        bundle::verify_signature(bytes, sig, pk)?;
    }
    Ok(sha)
}

/// Fetch, verify and unpack. With `persist` (apply) the bundle goes into the cache under
/// `host_root` and becomes `current`; otherwise (plan, validate) into a temp dir.
/// Nothing in the cache changes unless the new bundle verified and unpacked completely.
pub fn fetch(src: &Source, host_root: &Path, v: &Verify, persist: bool) -> Result<Fetched> {
    let path = match src {
        Source::Dir(d) => return Ok(Fetched { root: d.clone(), sha256: None, origin: "directory", _temp: None }),
        Source::Tarball(p) => p,
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading bundle {}", path.display()))?;
    let sig_path = PathBuf::from(format!("{}.minisig", path.display()));
    let sig = std::fs::read_to_string(&sig_path).ok();
    let sha = check(&bytes, sig.as_deref(), &sig_path.display().to_string(), v).with_context(|| format!("bundle {}", path.display()))?;
    if !persist {
        let t = tempfile::tempdir()?;
        let dest = t.path().join("bundle");
        bundle::unpack(&bytes, &dest, v.limits).with_context(|| format!("unpacking bundle {}", path.display()))?;
        return Ok(Fetched { root: dest, sha256: Some(sha), origin: "source", _temp: Some(t) });
    }
    let cache = host_root.join(CACHE_DIR);
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let dest = cache.join(&sha);
    let origin = if dest.join("roles").is_dir() {
        "cache"
    } else {
        let staging = cache.join(format!(".staging-{sha}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        bundle::unpack(&bytes, &staging, v.limits).with_context(|| format!("unpacking bundle {}", path.display()))?;
        std::fs::rename(&staging, &dest).with_context(|| format!("moving bundle into {}", dest.display()))?;
        crate::fsutil::fsync_dir(&cache)?;
        "source"
    };
    point(&cache, "current", &sha)?;
    Ok(Fetched { root: dest, sha256: Some(sha), origin, _temp: None })
}

/// Point `cache/name` at `sha` atomically.
fn point(cache: &Path, name: &str, sha: &str) -> Result<()> {
    let tmp = cache.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(sha, &tmp)?;
    std::fs::rename(&tmp, cache.join(name)).with_context(|| format!("updating {}", cache.join(name).display()))?;
    crate::fsutil::fsync_dir(cache)
}

/// After a fully successful apply: `last-good` → this bundle.
pub fn mark_good(host_root: &Path, sha: &str) -> Result<()> {
    point(&host_root.join(CACHE_DIR), "last-good", sha)
}

/// What `current` points at.
pub fn current(host_root: &Path) -> Option<String> {
    std::fs::read_link(host_root.join(CACHE_DIR).join("current")).ok().map(|p| p.to_string_lossy().into_owned())
}
