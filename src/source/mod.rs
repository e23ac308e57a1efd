//! Where a bundle comes from, and the cache of fetched bundles under
//! `/var/lib/bootstrap/bundles/`: one directory per sha256, `current` (last applied) and
//! `last-good` (last fully successful) symlinks.

pub mod bundle;
pub use crate::fetch::{http, s3};

use crate::error::ConfigError;
use anyhow::{bail, Context, Result};
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

/// What a verified signature's trusted comment says about the bundle (see [`bundle::sign`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Signed {
    /// `name:` in the trusted comment; None for a signature of an older `bundle build`.
    pub name: Option<String>,
    /// `built:` (unix seconds) in the trusted comment.
    pub built: Option<u64>,
}

/// The bundle name a source stands for: its file name without `.tar.gz` / `.tgz`
/// (`s3://b/roles-production.tar.gz` → `roles-production`), what `bundle build -o` signs.
pub fn expected_name(label: &str) -> String {
    let last = label.rsplit('/').next().unwrap_or(label);
    let last = last.split(['?', '#']).next().unwrap_or(last);
    last.strip_suffix(".tar.gz").or_else(|| last.strip_suffix(".tgz")).unwrap_or(last).to_string()
}

/// Check `bytes` against the pinned sha256 and the public key (with the detached signature
/// `sig`); a signature must name `name` (when its trusted comment names a bundle at all).
fn check(bytes: &[u8], sig: Option<&str>, sig_name: &str, name: &str, v: &Verify) -> Result<(String, Option<Signed>), BundleError> {
    let sha = bundle::sha256_hex(bytes);
    if let Some(want) = &v.sha256 {
        if !want.eq_ignore_ascii_case(&sha) {
            return Err(BundleError::Sha256Mismatch {
                expected: want.clone(),
                actual: sha,
            });
        }
    }
    let mut signed = None;
    if let Some(pk) = &v.public_key {
        let sig = sig.ok_or_else(|| BundleError::MissingSignature(sig_name.to_string()))?;
        let comment = bundle::verify_signature(bytes, sig, pk)?;
        let s = bundle::parse_trusted_comment(&comment, &sha)?;
        if let Some(n) = &s.name {
            if n != name {
                return Err(BundleError::WrongBundle {
                    expected: name.to_string(),
                    signed: n.clone(),
                });
            }
        }
        signed = Some(s);
    }
    Ok((sha, signed))
}

/// Rollback protection: the newest build time applied per bundle name, in the cache.
const APPLIED: &str = ".applied.json";

fn applied(cache: &Path) -> Result<std::collections::BTreeMap<String, u64>> {
    let p = cache.join(APPLIED);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is corrupt (remove it to accept any build time)", p.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Default::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Refuse a signed bundle older than the newest one of that name applied here, and a bundle
/// whose signature names no build time once one that did was applied.
fn check_rollback(cache: &Path, name: &str, signed: Option<&Signed>) -> Result<()> {
    let Some(s) = signed else { return Ok(()) };
    let Some(&newest) = applied(cache)?.get(name) else { return Ok(()) };
    match s.built {
        Some(b) if b >= newest => Ok(()),
        Some(b) => Err(BundleError::Rollback {
            name: name.to_string(),
            built: b,
            newest,
        }
        .into()),
        None => Err(BundleError::Unbound {
            name: name.to_string(),
            newest,
        }
        .into()),
    }
}

fn record_applied(cache: &Path, name: &str, signed: Option<&Signed>) -> Result<()> {
    let Some(built) = signed.and_then(|s| s.built) else { return Ok(()) };
    let mut all = applied(cache)?;
    if all.get(name).is_some_and(|&n| n >= built) {
        return Ok(());
    }
    all.insert(name.to_string(), built);
    crate::fsutil::atomic_write(&cache.join(APPLIED), &serde_json::to_vec_pretty(&all)?, 0o644, None)
}

/// The verified tarball and signature kept beside an unpacked bundle, so that a cached bundle
/// (304, last-good) is checked against the pin and key configured now.
fn kept_tarball(cache: &Path, sha: &str) -> PathBuf {
    cache.join(format!("{sha}.tar.gz"))
}
fn kept_sig(cache: &Path, sha: &str) -> PathBuf {
    cache.join(format!("{sha}.tar.gz.minisig"))
}

/// Check a cached bundle `sha` against the current pin and key, as if it had just been
/// downloaded. `fetch_sig` brings the source's signature when the kept one is missing or does
/// not verify (a key rotated since); None when the source is down.
fn check_cached(
    cache: &Path,
    sha: &str,
    label: &str,
    name: &str,
    v: &Verify,
    fetch_sig: Option<&dyn Fn() -> Result<Option<String>>>,
) -> Result<Option<Signed>> {
    if let Some(want) = &v.sha256 {
        if !want.eq_ignore_ascii_case(sha) {
            return Err(BundleError::Sha256Mismatch {
                expected: want.clone(),
                actual: sha.to_string(),
            })
            .with_context(|| format!("cached bundle {sha} of {label}"));
        }
    }
    if v.public_key.is_none() {
        return Ok(None);
    }
    let tarball = kept_tarball(cache, sha);
    let bytes = std::fs::read(&tarball).with_context(|| {
        format!(
            "cached bundle {sha} of {label}: a minisign key is configured but the verified tarball {} is missing, so the cached bundle cannot be checked",
            tarball.display()
        )
    })?;
    if bundle::sha256_hex(&bytes) != sha {
        bail!("cached bundle {sha} of {label}: {} does not match its sha256", tarball.display());
    }
    let sig_path = kept_sig(cache, sha);
    let kept = std::fs::read_to_string(&sig_path).ok();
    let first = check(&bytes, kept.as_deref(), &sig_path.display().to_string(), name, v);
    let (_, signed) = match (first, fetch_sig) {
        (Ok(ok), _) => ok,
        (Err(e), None) => return Err(e).with_context(|| format!("cached bundle {sha} of {label}")),
        (Err(_), Some(f)) => {
            let sig = f()?;
            let ok = check(&bytes, sig.as_deref(), &format!("{label}.minisig"), name, v).with_context(|| format!("bundle {label}"))?;
            if let Some(s) = &sig {
                crate::fsutil::atomic_write(&sig_path, s.as_bytes(), 0o644, None)?;
            }
            ok
        }
    };
    Ok(signed)
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
/// Whatever is applied, fresh, unchanged (304) or last-good, is checked against the pin and
/// key configured now; a fresh or unchanged (304) one also against rollback to an older
/// signed build (last-good is older than a failed newer build by design).
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
        Source::S3 { bucket, key } => match remote(src, &cache, v, persist, &format!("s3://{bucket}/{key}"))? {
            Remote::Fresh(l, d) => (l, d),
            Remote::Ready(f) => return Ok(f),
        },
        Source::Http(u) => match remote(src, &cache, v, persist, u)? {
            Remote::Fresh(l, d) => (l, d),
            Remote::Ready(f) => return Ok(f),
        },
    };
    let name = expected_name(&label);
    let Download { bytes, sig, sig_name, etag } = download;
    let (sha, signed) = check(&bytes, sig.as_deref(), &sig_name, &name, v).with_context(|| format!("bundle {label}"))?;
    check_rollback(&cache, &name, signed.as_ref()).with_context(|| format!("bundle {label}"))?;
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
    // Kept so that a later 304 or last-good fallback can be checked against a new pin or key.
    crate::fsutil::atomic_write(&kept_tarball(&cache, &sha), &bytes, 0o644, None)?;
    if let Some(s) = &sig {
        crate::fsutil::atomic_write(&kept_sig(&cache, &sha), s.as_bytes(), 0o644, None)?;
    }
    if let Some(etag) = etag {
        let seen = serde_json::to_vec(&Seen { etag, sha256: sha.clone() })?;
        crate::fsutil::atomic_write(&seen_path(&cache, &label), &seen, 0o644, None)?;
    }
    make_current(&cache, &sha, &name, signed.as_ref())?;
    Ok(Fetched {
        root: dest,
        sha256: Some(sha),
        origin,
        _temp: None,
    })
}

/// Point `current` at `sha`, record its build time, and prune the cache.
fn make_current(cache: &Path, sha: &str, name: &str, signed: Option<&Signed>) -> Result<()> {
    record_applied(cache, name, signed)?;
    point(cache, "current", sha)?;
    // Newest first in the pruning order: the bundle just used.
    if let Ok(d) = std::fs::File::open(cache.join(sha)) {
        let _ = d.set_modified(std::time::SystemTime::now());
    }
    prune(cache, KEEP_OLDER);
    Ok(())
}

/// Bundles kept in the cache besides `current`, `last-good` and `previous-good` (the most
/// recently used).
pub const KEEP_OLDER: usize = 3;

/// The cache's links whose bundles pruning never removes. `previous-good`: the good bundle
/// before last-good, which a rollout falls back to when last-good is aborted.
const PINNED: [&str; 3] = ["current", "last-good", "previous-good"];

/// Remove cached bundles other than the [`PINNED`] ones and the `keep` most recently used
/// others (with their kept tarballs and signatures), and staging directories and temp links
/// whose process is gone. Best effort: a failure here never fails a run.
pub fn prune(cache: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    let pinned: Vec<String> = PINNED
        .iter()
        .filter_map(|l| std::fs::read_link(cache.join(l)).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut bundles = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name
            .strip_prefix(".staging-")
            .or_else(|| name.strip_prefix(".current."))
            .or_else(|| name.strip_prefix(".last-good."))
            .or_else(|| name.strip_prefix(".previous-good."))
        {
            // `.staging-<sha>-<pid>`, `.current.<pid>`: a live writer keeps its own.
            let pid = rest.rsplit(['-', '.']).next().and_then(|p| p.parse::<u32>().ok());
            let alive = pid.is_some_and(|p| p != std::process::id() && Path::new(&format!("/proc/{p}")).exists());
            if !alive {
                let p = e.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
            continue;
        }
        if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) && !pinned.contains(&name) {
            let mtime = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            bundles.push((mtime, name));
        }
    }
    bundles.sort_by(|a, b| b.cmp(a));
    for (_, sha) in bundles.into_iter().skip(keep) {
        tracing::debug!("removing cached bundle {sha}");
        let _ = std::fs::remove_dir_all(cache.join(&sha));
        let _ = std::fs::remove_file(kept_tarball(cache, &sha));
        let _ = std::fs::remove_file(kept_sig(cache, &sha));
    }
}

/// A fresh download (with the URL it came from), or a cached bundle ready to use.
enum Remote {
    Fresh(String, Download),
    Ready(Fetched),
}

/// S3 and HTTP(S): a conditional GET when this URL's bundle is cached; 304 and "source
/// unavailable" reuse the cache after checking it against the pin and key configured now.
fn remote(src: &Source, cache: &Path, v: &Verify, persist: bool, url: &str) -> Result<Remote> {
    let name = expected_name(url);
    let seen: Option<Seen> = if persist {
        std::fs::read(seen_path(cache, url)).ok().and_then(|b| serde_json::from_slice(&b).ok())
    } else {
        None
    };
    // A conditional GET only for a bundle that can be checked again: with a key configured,
    // one whose verified tarball is kept (an older agent's cache has none: download it anew).
    let seen = seen.filter(|s| cache.join(&s.sha256).join("roles").is_dir() && (v.public_key.is_none() || kept_tarball(cache, &s.sha256).is_file()));
    let mut opts = v.s3.clone();
    opts.max_bytes = v.limits.max_bytes;
    let get_sig = || -> Result<Option<String>> {
        let r = match src {
            Source::S3 { bucket, key } => s3::get_optional(&opts, bucket, &format!("{key}.minisig")),
            _ => http::get_optional(&format!("{url}.minisig")),
        };
        let sig = r.map_err(|e| anyhow::anyhow!("fetching the bundle signature: {e}"))?;
        Ok(sig.map(|b| String::from_utf8_lossy(&b).into_owned()))
    };
    let etag = seen.as_ref().map(|s| s.etag.as_str());
    let got = match src {
        Source::S3 { bucket, key } => s3::get(&opts, bucket, key, etag),
        _ => http::get(url, etag, v.limits.max_bytes),
    };
    let cached = |sha: String, origin: &'static str, fetch_sig: Option<&dyn Fn() -> Result<Option<String>>>| -> Result<Remote> {
        let signed = check_cached(cache, &sha, url, &name, v, fetch_sig)?;
        // last-good is older than a newer bundle that failed, by design: no rollback check.
        if origin != "last-good" {
            check_rollback(cache, &name, signed.as_ref()).with_context(|| format!("bundle {url}"))?;
        }
        make_current(cache, &sha, &name, signed.as_ref())?;
        Ok(Remote::Ready(Fetched {
            root: cache.join(&sha),
            sha256: Some(sha),
            origin,
            _temp: None,
        }))
    };
    match got {
        Ok(s3::Got::NotModified) => {
            let Some(seen) = seen else {
                bail!("fetching bundle: {url} answered 304 Not Modified to a request without If-None-Match: there is no bundle to apply");
            };
            cached(seen.sha256, "cache", Some(&get_sig))
        }
        Ok(s3::Got::Body { bytes, etag }) => {
            let sig = if v.public_key.is_some() { get_sig()? } else { None };
            Ok(Remote::Fresh(
                url.to_string(),
                Download {
                    bytes,
                    sig,
                    sig_name: format!("{url}.minisig"),
                    etag,
                },
            ))
        }
        Err(e) if e.is_transient() && persist => {
            let Some(sha) = last_good_in(cache) else {
                bail!("bundle source unavailable and no last-good bundle cached: {e}");
            };
            tracing::warn!("bundle source unavailable, applying the last good bundle {sha}: {e}");
            cached(sha, "last-good", None)
        }
        Err(e) => Err(anyhow::anyhow!("fetching bundle: {e}")),
    }
}

/// A bundle already in the cache (the rollout gate's fallback: last-good, or the good one
/// before it), checked against the pin and key configured now like a last-good fallback, and
/// made `current`. `label` is the source it came from (for the bundle name and messages).
pub fn from_cache(host_root: &Path, sha: &str, label: &str, v: &Verify, origin: &'static str) -> Result<Fetched> {
    let cache = crate::state::StateDir::new(host_root).bundles();
    if !cache.join(sha).join("roles").is_dir() {
        bail!("bundle {sha} is not in the cache {}", cache.display());
    }
    let name = expected_name(label);
    let signed = check_cached(&cache, sha, label, &name, v, None)?;
    make_current(&cache, sha, &name, signed.as_ref())?;
    Ok(Fetched {
        root: cache.join(sha),
        sha256: Some(sha.to_string()),
        origin,
        _temp: None,
    })
}

/// What `last-good` points at, when its bundle is still in the cache.
pub fn last_good(host_root: &Path) -> Option<String> {
    last_good_in(&crate::state::StateDir::new(host_root).bundles())
}

fn last_good_in(cache: &Path) -> Option<String> {
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
    let cache = crate::state::StateDir::new(host_root).bundles();
    point(&cache, "last-good", sha)?;
    prune(&cache, KEEP_OLDER);
    Ok(())
}

/// `previous-good` → `sha` (the good bundle before last-good, kept in the cache for a rollout
/// to fall back to), or no such link (None).
pub fn pin_previous(host_root: &Path, sha: Option<&str>) -> Result<()> {
    let cache = crate::state::StateDir::new(host_root).bundles();
    match sha {
        Some(sha) => point(&cache, "previous-good", sha),
        None => match std::fs::remove_file(cache.join("previous-good")) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(anyhow::Error::new(e).context(format!("removing {}", cache.join("previous-good").display())))
            }
            _ => Ok(()),
        },
    }
}

/// What `current` points at.
pub fn current(host_root: &Path) -> Option<String> {
    std::fs::read_link(crate::state::StateDir::new(host_root).bundles().join("current"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}
