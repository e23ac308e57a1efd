//! Where a bundle comes from, and the cache of fetched bundles under
//! `/var/lib/bootstrap/bundles/`: one directory per sha256, `current` (last applied) and
//! `last-good` (last fully successful) symlinks.

pub mod bundle;
pub mod http;
pub mod s3;

use crate::error::ConfigError;
use anyhow::{Context, Result};
use bundle::{BundleError, Limits};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A bundle root: a directory holding roles/.
    Dir(PathBuf),
    /// A bundle tarball on the local filesystem.
    Tarball(PathBuf),
    /// A bundle tarball in S3.
    S3 { bucket: String, key: String },
    /// A bundle tarball over HTTPS (or HTTP).
    Http(String),
}

impl Source {
    pub fn parse(s: &str) -> Result<Source, ConfigError> {
        let path = match s.split_once("://") {
            Some(("s3", _)) => {
                let (bucket, key) = s3::parse_url(s).map_err(|e| ConfigError::msg(format!("source {e}")))?;
                return Ok(Source::S3 { bucket, key });
            }
            Some(("file", p)) => PathBuf::from(p),
            Some(("https" | "http", _)) => return Ok(Source::Http(s.to_string())),
            Some((scheme, _)) => {
                return Err(ConfigError::msg(format!(
                    "source {s}: unknown scheme `{scheme}://` (use s3://, https://, file:// or a directory)"
                )))
            }
            None => PathBuf::from(s),
        };
        if path.is_dir() {
            if !path.join("roles").is_dir() {
                return Err(ConfigError::msg(format!(
                    "source {s}: {} is not a bundle root (no roles/ directory in it)",
                    path.display()
                )));
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
    /// S3 endpoint and region overrides.
    pub s3: s3::S3Options,
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
            return Err(BundleError::Sha256Mismatch {
                expected: want.clone(),
                actual: sha,
            });
        }
    }
    if let Some(pk) = &v.public_key {
        let sig = sig.ok_or_else(|| BundleError::MissingSignature(sig_name.to_string()))?;
        bundle::verify_signature(bytes, sig, pk)?;
    }
    Ok(sha)
}

/// What a source handed over.
struct Download {
    bytes: Vec<u8>,
    sig: Option<String>,
    sig_name: String,
    etag: Option<String>,
}

/// The ETag and sha256 of what a URL served last time (for conditional GETs).
#[derive(serde::Serialize, serde::Deserialize)]
struct Seen {
    etag: String,
    sha256: String,
}

fn seen_path(cache: &Path, url: &str) -> PathBuf {
    cache.join(format!(".seen-{}.json", &bundle::sha256_hex(url.as_bytes())[..16]))
}

/// Fetch, verify and unpack. With `persist` (apply) the bundle goes into the cache under
/// `host_root` and becomes `current`; otherwise (plan, validate) into a temp dir.
/// Nothing in the cache changes unless the new bundle verified and unpacked completely.
/// When an S3 source is unavailable (network, 5xx), `last-good` is used (origin `last-good`).
pub fn fetch(src: &Source, host_root: &Path, v: &Verify, persist: bool) -> Result<Fetched> {
    let cache = crate::state::StateDir::new(host_root).bundles();
    let (label, download) = match src {
        Source::Dir(d) => {
            return Ok(Fetched {
                root: d.clone(),
                sha256: None,
                origin: "directory",
                _temp: None,
            })
        }
        Source::Tarball(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading bundle {}", path.display()))?;
            let sig_path = format!("{}.minisig", path.display());
            let sig = std::fs::read_to_string(&sig_path).ok();
            (
                path.display().to_string(),
                Download {
                    bytes,
                    sig,
                    sig_name: sig_path,
                    etag: None,
                },
            )
        }
        Source::S3 { .. } | Source::Http(_) => {
            let url = match src {
                Source::S3 { bucket, key } => format!("s3://{bucket}/{key}"),
                Source::Http(u) => u.clone(),
                _ => unreachable!(),
            };
            let seen: Option<Seen> = if persist {
                std::fs::read(seen_path(&cache, &url)).ok().and_then(|b| serde_json::from_slice(&b).ok())
            } else {
                None
            };
            let seen = seen.filter(|s| cache.join(&s.sha256).join("roles").is_dir());
            let mut opts = v.s3.clone();
            opts.max_bytes = v.limits.max_bytes;
            let etag = seen.as_ref().map(|s| s.etag.as_str());
            let got = match src {
                Source::S3 { bucket, key } => s3::get(&opts, bucket, key, etag),
                _ => http::get(&url, etag, v.limits.max_bytes),
            };
            match got {
                Ok(s3::Got::NotModified) => {
                    let sha = seen.expect("conditional GET only with a cached bundle").sha256;
                    point(&cache, "current", &sha)?;
                    return Ok(Fetched {
                        root: cache.join(&sha),
                        sha256: Some(sha),
                        origin: "cache",
                        _temp: None,
                    });
                }
                Ok(s3::Got::Body { bytes, etag }) => {
                    let sig = if v.public_key.is_some() {
                        let r = match src {
                            Source::S3 { bucket, key } => s3::get_optional(&opts, bucket, &format!("{key}.minisig")),
                            _ => http::get_optional(&format!("{url}.minisig")),
                        };
                        r.map_err(|e| anyhow::anyhow!("fetching the bundle signature: {e}"))?
                    } else {
                        None
                    };
                    let sig = sig.map(|b| String::from_utf8_lossy(&b).into_owned());
                    (
                        url.clone(),
                        Download {
                            bytes,
                            sig,
                            sig_name: format!("{url}.minisig"),
                            etag,
                        },
                    )
                }
                Err(e) if e.is_transient() && persist => {
                    let Some(sha) = last_good(host_root) else {
                        return Err(anyhow::anyhow!("bundle source unavailable and no last-good bundle cached: {e}"));
                    };
                    tracing::warn!("bundle source unavailable, applying the last good bundle {sha}: {e}");
                    point(&cache, "current", &sha)?;
                    return Ok(Fetched {
                        root: cache.join(&sha),
                        sha256: Some(sha),
                        origin: "last-good",
                        _temp: None,
                    });
                }
                Err(e) => return Err(anyhow::anyhow!("fetching bundle: {e}")),
            }
        }
    };
    let Download { bytes, sig, sig_name, etag } = download;
    let sha = check(&bytes, sig.as_deref(), &sig_name, v).with_context(|| format!("bundle {label}"))?;
    if !persist {
        let t = tempfile::tempdir()?;
        let dest = t.path().join("bundle");
        bundle::unpack(&bytes, &dest, v.limits).with_context(|| format!("unpacking bundle {label}"))?;
        return Ok(Fetched {
            root: dest,
            sha256: Some(sha),
            origin: "source",
            _temp: Some(t),
        });
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let dest = cache.join(&sha);
    let origin = if dest.join("roles").is_dir() {
        "cache"
    } else {
        let staging = cache.join(format!(".staging-{sha}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        bundle::unpack(&bytes, &staging, v.limits).with_context(|| format!("unpacking bundle {label}"))?;
        std::fs::rename(&staging, &dest).with_context(|| format!("moving bundle into {}", dest.display()))?;
        crate::fsutil::fsync_dir(&cache)?;
        "source"
    };
    if let Some(etag) = etag {
        let seen = serde_json::to_vec(&Seen { etag, sha256: sha.clone() })?;
        crate::fsutil::atomic_write(&seen_path(&cache, &label), &seen, 0o644, None)?;
    }
    point(&cache, "current", &sha)?;
    Ok(Fetched {
        root: dest,
        sha256: Some(sha),
        origin,
        _temp: None,
    })
}

/// What `last-good` points at, when its bundle is still in the cache.
pub fn last_good(host_root: &Path) -> Option<String> {
    let cache = crate::state::StateDir::new(host_root).bundles();
    let sha = std::fs::read_link(cache.join("last-good")).ok()?.to_string_lossy().into_owned();
    cache.join(&sha).join("roles").is_dir().then_some(sha)
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
    point(&crate::state::StateDir::new(host_root).bundles(), "last-good", sha)
}

/// What `current` points at.
pub fn current(host_root: &Path) -> Option<String> {
    std::fs::read_link(crate::state::StateDir::new(host_root).bundles().join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}
