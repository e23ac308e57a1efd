//! Bundle tarballs: reproducible builds, verification (sha256, minisign), and a safe unpack
//! that refuses anything able to write outside the bundle.

use crate::error::ConfigError;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

/// Unpack limits: a bundle is roles and templates, not data.
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
pub enum BundleError {
    #[error("bundle entry {entry:?} rejected: {why}")]
    Entry { entry: String, why: String },
    #[error("bundle is larger than the limit of {limit} bytes unpacked")]
    TooLarge { limit: u64 },
    #[error("bundle has more than {limit} entries")]
    TooManyEntries { limit: usize },
    #[error("bundle sha256 is {actual}, but {expected} is pinned")]
    Sha256Mismatch { expected: String, actual: String },
    #[error("bundle signature does not verify: {0}")]
    BadSignature(String),
    #[error("a minisign public key is configured but the bundle has no signature ({0})")]
    MissingSignature(String),
    #[error("the signature is for bundle {signed:?}, not {expected:?} (a bundle of another environment?)")]
    WrongBundle { expected: String, signed: String },
    #[error("rollback refused: the signature says bundle {name:?} was built at {built}, older than the build of {newest} applied here before")]
    Rollback { name: String, built: u64, newest: u64 },
    #[error("the signature of bundle {name:?} names no build time, but a signed build of {newest} was applied here before (rollback protection; rebuild with this agent's `bundle build --sign`)")]
    Unbound { name: String, newest: u64 },
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Every file and directory under `dir/roles`, sorted, as paths relative to `dir`.
fn collect(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::from("roles")];
    while let Some(rel) = stack.pop() {
        let md = fs::symlink_metadata(dir.join(&rel)).with_context(|| format!("reading {}", dir.join(&rel).display()))?;
        if md.file_type().is_symlink() {
            bail!("{}: bundles hold regular files and directories only, not symlinks", dir.join(&rel).display());
        }
        if md.is_dir() {
            for e in fs::read_dir(dir.join(&rel))? {
                stack.push(rel.join(e?.file_name()));
            }
        } else if !md.is_file() {
            bail!("{}: not a regular file", dir.join(&rel).display());
        }
        out.push(rel);
    }
    out.sort();
    Ok(out)
}

/// Build a reproducible `.tar.gz` of `dir/roles`: sorted entries, mtime 0, owner 0:0, modes
/// 0644/0755, gzip without name or time. Same input, same bytes.
pub fn build(dir: &Path) -> Result<Vec<u8>> {
    crate::role::validate_bundle(dir)?;
    let gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for rel in collect(dir)? {
        let full = dir.join(&rel);
        let md = fs::metadata(&full)?;
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        if md.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            tar.append_data(&mut h, &rel, std::io::empty())?;
        } else {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_mode(if md.permissions().mode() & 0o111 != 0 { 0o755 } else { 0o644 });
            h.set_size(md.len());
            tar.append_data(&mut h, &rel, fs::File::open(&full)?)?;
        }
    }
    Ok(tar.into_inner()?.finish()?)
}

/// Sign with a minisign secret key file (unencrypted, or with the password in
/// `BOOTSTRAP_SIGN_PASSWORD`). The trusted comment (covered by the signature) binds the sha256,
/// the bundle's name (`roles-production`, what the agent expects from its source's file name)
/// and the build time in unix seconds, for rollback protection:
/// `bundle sha256:<hex> name:<name> built:<secs>`.
pub fn sign(bytes: &[u8], secret_key: &Path, name: &str, built: u64) -> Result<String> {
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c == ':') {
        bail!("bundle name {name:?}: no spaces or colons");
    }
    let password = std::env::var("BOOTSTRAP_SIGN_PASSWORD").ok();
    let text = fs::read_to_string(secret_key).with_context(|| format!("reading secret key {}", secret_key.display()))?;
    let sk_box = minisign::SecretKeyBox::from_string(&text).map_err(|e| anyhow::anyhow!("{}: {e}", secret_key.display()))?;
    let sk = match password {
        Some(p) => sk_box.into_secret_key(Some(p)),
        None => sk_box.into_unencrypted_secret_key(),
    }
    .map_err(|e| anyhow::anyhow!("{}: {e} (an encrypted key needs BOOTSTRAP_SIGN_PASSWORD)", secret_key.display()))?;
    let comment = format!("bundle sha256:{} name:{name} built:{built}", sha256_hex(bytes));
    let sig = minisign::sign(None, &sk, bytes, Some(&comment), Some("signature from bootstrap bundle build")).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
    Ok(sig.to_string())
}

/// Check a detached minisign signature against a public key (the key's base64 line or the
/// whole `minisign.pub` text); returns the (verified) trusted comment.
pub fn verify_signature(bytes: &[u8], signature: &str, public_key: &str) -> Result<String, BundleError> {
    let pk = public_key
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
        .unwrap_or_default();
    let pk = minisign_verify::PublicKey::from_base64(pk).map_err(|e| BundleError::BadSignature(format!("public key: {e}")))?;
    let sig = minisign_verify::Signature::decode(signature).map_err(|e| BundleError::BadSignature(format!("signature: {e}")))?;
    pk.verify(bytes, &sig, false).map_err(|e| BundleError::BadSignature(e.to_string()))?;
    Ok(sig.trusted_comment().to_string())
}

/// Read a verified trusted comment. `bundle sha256:<hex>` alone is what older agents signed:
/// accepted (no name, no build time) until a bound signature of that bundle was applied. A
/// comment of another form (a plain `minisign -S` one) is accepted the same way; a `sha256:`
/// that is not this bundle's is refused.
pub fn parse_trusted_comment(comment: &str, sha: &str) -> Result<crate::source::Signed, BundleError> {
    let mut out = crate::source::Signed::default();
    for word in comment.split_whitespace() {
        match word.split_once(':') {
            Some(("sha256", v)) if !v.eq_ignore_ascii_case(sha) => {
                return Err(BundleError::BadSignature(format!(
                    "the trusted comment names sha256 {v}, not this bundle's {sha}"
                )))
            }
            Some(("name", v)) => out.name = Some(v.to_string()),
            Some(("built", v)) => {
                out.built = Some(
                    v.parse()
                        .map_err(|_| BundleError::BadSignature(format!("trusted comment: bad build time {v:?}")))?,
                )
            }
            _ => {}
        }
    }
    Ok(out)
}

fn entry_path(raw: &Path) -> Result<PathBuf, String> {
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

/// Unpack a `.tar.gz` into `dest` (which must not exist), refusing absolute paths, `..`,
/// links that leave the bundle, paths through links, device files and oversize bundles.
/// On error `dest` is removed.
pub fn unpack(bytes: &[u8], dest: &Path, limits: Limits) -> Result<()> {
    unpack_tar(flate2::read::GzDecoder::new(bytes), dest, limits, 0)?;
    if !dest.join("roles").is_dir() {
        let _ = fs::remove_dir_all(dest);
        bail!("bundle has no roles/ directory");
    }
    Ok(())
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
    for (n, entry) in archive.entries().context("reading bundle tarball")?.enumerate() {
        if n >= limits.max_entries {
            return Err(BundleError::TooManyEntries { limit: limits.max_entries }.into());
        }
        let mut entry = entry.context("reading bundle tarball")?;
        let raw = entry.path().context("bundle entry path")?.into_owned();
        let reject = |why: &str| BundleError::Entry {
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
                    return Err(BundleError::TooLarge { limit: limits.max_bytes }.into());
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
        resolve_inside(rel, target, &links).map_err(|why| BundleError::Entry {
            entry: rel.display().to_string(),
            why,
        })?;
    }
    sync_tree(dest)
}

/// `validate` and `plan` on a tarball: unpack into a temp dir that lives as long as the value.
pub fn unpack_temp(path: &Path) -> Result<(tempfile::TempDir, PathBuf)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let t = tempfile::tempdir()?;
    let dest = t.path().join("bundle");
    unpack(&bytes, &dest, Limits::default()).with_context(|| format!("unpacking {}", path.display()))?;
    Ok((t, dest))
}

/// Map config-like failures of a build to exit 78.
pub fn build_to_files(dir: &Path, out: &Path, secret_key: Option<&Path>) -> Result<String> {
    if !dir.join("roles").is_dir() {
        return Err(ConfigError::msg(format!("{}: not a bundle root (no roles/ directory)", dir.display())).into());
    }
    let bytes = build(dir)?;
    let sha = sha256_hex(&bytes);
    let name = out.file_name().context("output has no file name")?.to_string_lossy().into_owned();
    let dir_out = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::fsutil::atomic_write(&dir_out.join(&name), &bytes, 0o644, None)?;
    crate::fsutil::atomic_write(&dir_out.join(format!("{name}.sha256")), format!("{sha}  {name}\n").as_bytes(), 0o644, None)?;
    if let Some(sk) = secret_key {
        // The name the agent expects from its source (`roles-production.tar.gz`), and the
        // build time: SOURCE_DATE_EPOCH for a reproducible signature, else now.
        let bundle_name = crate::source::expected_name(&name);
        let built = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(t) => t.trim().parse().with_context(|| format!("SOURCE_DATE_EPOCH={t:?} is not unix seconds"))?,
            Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
        };
        let sig = sign(&bytes, sk, &bundle_name, built)?;
        crate::fsutil::atomic_write(&dir_out.join(format!("{name}.minisig")), sig.as_bytes(), 0o644, None)?;
    }
    Ok(sha)
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
