//! Bundle tarballs: reproducible builds, verification (sha256, minisign), and the safe unpack
//! of `fetch::unpack` (it refuses anything able to write outside the bundle).

use crate::error::ConfigError;
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
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

pub use crate::fetch::sha256_hex;
pub use crate::fetch::unpack::{unpack_tar, Limits};

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
