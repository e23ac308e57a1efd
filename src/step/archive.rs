//! `archive`: download a file (`https://`, `http://`, `s3://`, `file://`), check its pinned
//! sha256, and unpack it into a directory (`.tar.gz`/`.tgz`, through the same safe unpack as
//! bundles, with `strip_components`; also `.tar.xz` and `.zip`) or install it as a single file with a mode.
//!
//! In sync when `dest` exists and the sha256 recorded for it matches the pinned one. The record
//! is a state file of its own, `/var/lib/bootstrap/archive-<h>.sha256` (`h`: the first 16 hex
//! digits of the sha256 of the `dest` path), holding `SHA256  DEST`: the unpacked tree is the
//! archive's alone, with nothing of the agent in it. A node in sync never downloads.
//!
//! Apply downloads to a temp file next to `dest`, checks the sha256 before unpacking anything,
//! unpacks into a temp directory next to `dest`, then replaces `dest` in one rename (an
//! exchange with the old tree, which is removed after). `.tar.xz` (pure-Rust `lzma-rs`) is
//! decompressed into a temp file and `.zip` (the `zip` crate, deflate only) rewritten as a tar
//! stream first, so every archive goes through the one safe unpack.

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::fsutil::Mode;
use crate::fetch::{sha256_hex, unpack::Limits};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub url: Spanned<String>,
    pub sha256: Spanned<String>,
    pub dest: Spanned<String>,
    pub extract: Option<Spanned<String>>,
    #[serde(default)]
    pub strip_components: usize,
    pub mode: Option<Spanned<String>>,
    pub owner: Option<Spanned<String>>,
    pub group: Option<Spanned<String>>,
}

/// How long a whole download may take (connecting: `fetch::http::CONNECT_TIMEOUT`).
pub const DOWNLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1800);
/// The largest download.
pub const MAX_DOWNLOAD: u64 = 4 * 1024 * 1024 * 1024;
/// Unpack limits of an archive (binaries, not roles).
const LIMITS: Limits = Limits {
    max_bytes: 8 * 1024 * 1024 * 1024,
    max_entries: 200_000,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extract {
    TarGz,
    TarXz,
    Zip,
    /// A single file.
    None,
}

fn extract_of(name: &str) -> std::result::Result<Extract, String> {
    match name {
        "tar.gz" | "tgz" => Ok(Extract::TarGz),
        "tar.xz" | "txz" => Ok(Extract::TarXz),
        "zip" => Ok(Extract::Zip),
        "none" => Ok(Extract::None),
        _ => Err(format!("invalid extract {name:?}: expected \"tar.gz\", \"tgz\", \"tar.xz\", \"zip\" or \"none\"")),
    }
}

/// The default by the URL's suffix: `.tar.gz`/`.tgz` unpack, anything else is a single file.
fn extract_by_suffix(url: &str) -> std::result::Result<Extract, String> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    for (suffix, name) in [(".tar.gz", "tar.gz"), (".tgz", "tgz"), (".tar.xz", "tar.xz"), (".txz", "txz"), (".zip", "zip")] {
        if path.ends_with(suffix) {
            return extract_of(name);
        }
    }
    Ok(Extract::None)
}

impl super::KindSpec for Spec {
    type Step = ArchiveStep;

    fn identity(&self) -> Option<String> {
        Some(self.dest.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        let u = self.url.get_ref();
        if !["https://", "http://", "s3://", "file:///"].iter().any(|p| u.starts_with(p)) || u.chars().any(char::is_whitespace) {
            return Err(cx.err(&self.url, format!("invalid archive url {u:?}: expected https://, http://, s3:// or file:///")));
        }
        let sha = self.sha256.get_ref();
        if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(cx.err(&self.sha256, "sha256 must be 64 hex digits"));
        }
        super::check_abs_path(cx, &self.dest)?;
        if self.dest.get_ref().trim_end_matches('/').is_empty() {
            return Err(cx.err(&self.dest, "dest cannot be /"));
        }
        let extract = match &self.extract {
            Some(e) => extract_of(e.get_ref()).map_err(|m| cx.err(e, m))?,
            None => extract_by_suffix(u).map_err(|m| cx.err(&self.url, format!("{m}; set `extract`")))?,
        };
        if extract == Extract::None && self.strip_components > 0 {
            return Err(cx.err(&self.dest, "strip_components needs an archive to unpack"));
        }
        super::parse_mode(cx, &self.mode)?;
        for name in [&self.owner, &self.group].into_iter().flatten() {
            crate::step::check_account_name(name.get_ref()).map_err(|e| cx.err(name, e))?;
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<ArchiveStep, ConfigError> {
        let extract = match &self.extract {
            Some(e) => extract_of(e.get_ref()).map_err(|m| cx.load.err(e, m))?,
            None => extract_by_suffix(self.url.get_ref()).map_err(|m| cx.load.err(&self.url, m))?,
        };
        Ok(ArchiveStep {
            url: self.url.get_ref().clone(),
            sha256: self.sha256.get_ref().to_ascii_lowercase(),
            dest: self.dest.get_ref().trim_end_matches('/').to_string(),
            extract,
            strip_components: self.strip_components,
            mode: super::parse_mode(&cx.load, &self.mode)?,
            owner: self.owner.as_ref().map(|o| o.get_ref().clone()),
            group: self.group.as_ref().map(|g| g.get_ref().clone()),
        })
    }
}

#[derive(Debug, Clone)]
pub struct ArchiveStep {
    pub url: String,
    pub sha256: String,
    pub dest: String,
    pub extract: Extract,
    pub strip_components: usize,
    pub mode: Option<Mode>,
    pub owner: Option<String>,
    pub group: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The sha256 recorded for `dest`.
    pub recorded: Option<String>,
    pub dest_exists: bool,
}

/// The state file that records what was unpacked at `dest`.
pub fn record_name(dest: &str) -> String {
    format!("archive-{}.sha256", &sha256_hex(dest.as_bytes())[..16])
}

/// Stream `url` into `out` (at most `max` bytes), returning the sha256 of what was written.
fn fetch_into(url: &str, max: u64, out: &mut dyn Write) -> Result<String> {
    let mut h = Sha256::new();
    let mut sink = |r: &mut dyn Read| -> Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = r.read(&mut buf).with_context(|| format!("{url}: reading"))?;
            if n == 0 {
                return Ok(());
            }
            total += n as u64;
            if total > max {
                bail!("{url}: larger than {max} bytes");
            }
            h.update(&buf[..n]);
            out.write_all(&buf[..n])?;
        }
    };
    if let Some(path) = url.strip_prefix("file://") {
        let mut f = std::fs::File::open(path).with_context(|| format!("opening {path}"))?;
        sink(&mut f)?;
    } else if url.starts_with("s3://") {
        let (bucket, key) = crate::fetch::s3::parse_url(url)?;
        let o = crate::fetch::s3::S3Options {
            max_bytes: max,
            ..Default::default()
        };
        match crate::fetch::s3::get(&o, &bucket, &key, None).map_err(|e| anyhow::anyhow!("{e}"))? {
            crate::fetch::s3::Got::Body { bytes, .. } => sink(&mut bytes.as_slice())?,
            crate::fetch::s3::Got::NotModified => bail!("{url}: unexpected 304"),
        }
    } else {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(crate::fetch::http::CONNECT_TIMEOUT)
            .timeout(DOWNLOAD_TIMEOUT)
            .build()
            .context("building the HTTP client")?;
        let mut resp = client.get(url).send().with_context(|| format!("GET {url}"))?;
        if !resp.status().is_success() {
            bail!("{url}: HTTP {}", resp.status());
        }
        sink(&mut resp)?;
    }
    Ok(hex::encode(h.finalize()))
}

/// A small download (a repository key) in memory.
pub fn fetch_bytes(url: &str, max: u64) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    fetch_into(url, max, &mut out)?;
    Ok(out)
}

/// A temp path next to `p`: `.NAME.bootstrap-tmp.PID.WHAT`.
fn sibling(p: &Path, what: &str) -> PathBuf {
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    p.with_file_name(format!(".{name}{}{}.{what}", crate::fsutil::TMP_MARK, std::process::id()))
}

fn chown_tree(p: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    let Some((u, g)) = owner else { return Ok(()) };
    std::os::unix::fs::lchown(p, Some(u), Some(g)).with_context(|| format!("chown {}", p.display()))?;
    let md = std::fs::symlink_metadata(p)?;
    if md.is_dir() {
        for e in std::fs::read_dir(p)? {
            chown_tree(&e?.path(), owner)?;
        }
    }
    Ok(())
}

/// A writer that fails past `max` bytes (a decompression bomb stops there).
struct Capped<W> {
    inner: W,
    left: u64,
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.len() as u64 > self.left {
            return Err(std::io::Error::other(format!("larger than the limit of {} bytes unpacked", LIMITS.max_bytes)));
        }
        let n = self.inner.write(buf)?;
        self.left -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The most a decompressed tar stream may hold (contents plus headers).
fn stream_cap() -> u64 {
    LIMITS.max_bytes.saturating_mul(2) + 1024 * 1024
}

/// Unpack the downloaded `file` into `new` through the safe unpack of bundles: a `.tar.xz` is
/// decompressed into a temp file first, a `.zip` rewritten as a tar stream (its entry names
/// checked as a tar's are), both in `dir`.
fn unpack(extract: Extract, file: &Path, dir: &Path, new: &Path, strip: usize) -> Result<()> {
    use crate::fetch::unpack::{entry_path, unpack_tar, UnpackError};
    let open = || std::fs::File::open(file).map(std::io::BufReader::new);
    match extract {
        Extract::TarGz => unpack_tar(flate2::read::GzDecoder::new(open()?), new, LIMITS, strip),
        Extract::TarXz => {
            let mut tar = tempfile::tempfile_in(dir)?;
            let mut out = Capped {
                inner: std::io::BufWriter::new(&mut tar),
                left: stream_cap(),
            };
            lzma_rs::xz_decompress(&mut open()?, &mut out).map_err(|e| anyhow::anyhow!("xz: {e}"))?;
            out.flush()?;
            drop(out);
            std::io::Seek::rewind(&mut tar)?;
            unpack_tar(std::io::BufReader::new(tar), new, LIMITS, strip)
        }
        Extract::Zip => {
            let mut zip = zip::ZipArchive::new(open()?).context("reading the zip")?;
            if zip.len() > LIMITS.max_entries {
                return Err(UnpackError::TooManyEntries { limit: LIMITS.max_entries }.into());
            }
            let mut tar = tar::Builder::new(tempfile::tempfile_in(dir)?);
            let mut total = 0u64;
            for i in 0..zip.len() {
                let mut e = zip.by_index(i).context("reading the zip")?;
                let name = e.name().context("zip entry name")?.into_owned();
                let rel = entry_path(Path::new(&name)).map_err(|why| UnpackError::Entry { entry: name.clone(), why })?;
                let mut h = tar::Header::new_gnu();
                h.set_mtime(0);
                if e.is_dir() {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    tar.append_data(&mut h, &rel, std::io::empty())?;
                } else if e.is_symlink() {
                    let mut target = String::new();
                    (&mut e).take(4096).read_to_string(&mut target).context("zip symlink target")?;
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    tar.append_link(&mut h, &rel, &target)?;
                } else {
                    let size = e.size();
                    total = total.saturating_add(size);
                    if total > LIMITS.max_bytes {
                        return Err(UnpackError::TooLarge { limit: LIMITS.max_bytes }.into());
                    }
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(if e.unix_mode().unwrap_or(0o644) & 0o111 != 0 { 0o755 } else { 0o644 });
                    h.set_size(size);
                    tar.append_data(&mut h, &rel, (&mut e).take(size)).with_context(|| format!("zip entry {name}"))?;
                }
            }
            let mut f = tar.into_inner()?;
            std::io::Seek::rewind(&mut f)?;
            unpack_tar(std::io::BufReader::new(f), new, LIMITS, strip)
        }
        Extract::None => bail!("not an archive"),
    }
}

impl Kind for ArchiveStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        let state = crate::state::StateDir::new(&host.root);
        let recorded = state.read(&record_name(&self.dest))?.map(|b| {
            String::from_utf8_lossy(&b).split_whitespace().next().unwrap_or_default().to_string()
        });
        Ok(Observed {
            recorded,
            dest_exists: host.fs()?.exists(&self.dest)?,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let from = match (&o.recorded, o.dest_exists) {
            (_, false) => "(none)".to_string(),
            (Some(r), true) if *r == self.sha256 => return Vec::new(),
            (Some(r), true) => r.clone(),
            (None, true) => "(not recorded)".to_string(),
        };
        vec![Change::new("sha256", Some(format!("{} {from}", self.dest)), Some(&self.sha256))]
    }

    fn apply(&self, host: &Host, _o: &Observed, _changes: &[Change]) -> Result<()> {
        // `dest`'s directory resolved through the root like every host path (chroot-style, one
        // descriptor at a time, missing directories made); everything below works in that
        // directory through the descriptor's /proc/self/fd path, so no link on the way to it is
        // followed by text.
        let at = host.fs()?.parent(&self.dest, true)?.with_context(|| format!("no directory for {}", self.dest))?;
        let parent_path = std::path::PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&at.dir)));
        let parent = parent_path.as_path();
        let dest = parent.join(&at.name);
        let owner = match (&self.owner, &self.group) {
            (None, None) => None,
            (u, g) => Some((
                u.as_deref().map(|u| crate::fsutil::require_uid(&host.root, u)).transpose()?.unwrap_or(0),
                g.as_deref().map(|g| crate::fsutil::require_gid(&host.root, g)).transpose()?.unwrap_or(0),
            )),
        };
        // Download next to dest, checked before anything is unpacked.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}", crate::fsutil::TMP_MARK))
            .tempfile_in(parent)
            .with_context(|| format!("creating a temp file beside {}", self.dest))?;
        let got = fetch_into(&self.url, MAX_DOWNLOAD, tmp.as_file_mut()).with_context(|| format!("downloading {}", self.url))?;
        if got != self.sha256 {
            bail!("archive {}: sha256 is {got}, but {} is pinned; nothing unpacked", self.url, self.sha256);
        }
        tmp.as_file().sync_all()?;
        match self.extract {
            Extract::None => {
                let mode = self.mode.map(|m| m.0).unwrap_or(0o644);
                tmp.as_file().set_permissions(std::fs::Permissions::from_mode(mode))?;
                chown_tree(tmp.path(), owner)?;
                tmp.persist(&dest).with_context(|| format!("replacing {}", self.dest))?;
            }
            Extract::TarGz | Extract::TarXz | Extract::Zip => {
                let new = sibling(&dest, "new");
                let _ = std::fs::remove_dir_all(&new);
                unpack(self.extract, tmp.path(), parent, &new, self.strip_components).with_context(|| format!("unpacking {} into {}", self.url, self.dest))?;
                let mode = self.mode.map(|m| m.0).unwrap_or(0o755);
                std::fs::set_permissions(&new, std::fs::Permissions::from_mode(mode))?;
                if let Err(e) = chown_tree(&new, owner) {
                    let _ = std::fs::remove_dir_all(&new);
                    return Err(e);
                }
                if std::fs::symlink_metadata(&dest).is_ok() {
                    // One rename swaps the trees; the old one is removed after.
                    rustix::fs::renameat_with(rustix::fs::CWD, &new, rustix::fs::CWD, &dest, rustix::fs::RenameFlags::EXCHANGE)
                        .with_context(|| format!("replacing {}", self.dest))?;
                    let old = &new;
                    if std::fs::symlink_metadata(old)?.is_dir() {
                        std::fs::remove_dir_all(old)?;
                    } else {
                        std::fs::remove_file(old)?;
                    }
                } else {
                    std::fs::rename(&new, &dest).with_context(|| format!("creating {}", self.dest))?;
                }
            }
        }
        crate::fsutil::fsync_dir(parent)?;
        crate::state::StateDir::new(&host.root).write_mode(&record_name(&self.dest), format!("{}  {}\n", self.sha256, self.dest).as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> ArchiveStep {
        ArchiveStep {
            url: "https://example.com/x.tar.gz".into(),
            sha256: "a".repeat(64),
            dest: "/opt/x".into(),
            extract: Extract::TarGz,
            strip_components: 1,
            mode: None,
            owner: None,
            group: None,
        }
    }

    #[test]
    fn plan_and_suffixes() {
        let s = step();
        let o = |r: Option<&str>, e| Observed {
            recorded: r.map(str::to_string),
            dest_exists: e,
        };
        assert!(s.plan(&o(Some(&"a".repeat(64)), true)).is_empty());
        assert_eq!(s.plan(&o(Some(&"a".repeat(64)), false)).len(), 1);
        assert_eq!(s.plan(&o(Some(&"b".repeat(64)), true))[0].from.as_deref(), Some(&*format!("/opt/x {}", "b".repeat(64))));
        assert_eq!(s.plan(&o(None, true)).len(), 1);
        assert_eq!(extract_by_suffix("https://e/x-1.2.tar.gz?v=1"), Ok(Extract::TarGz));
        assert_eq!(extract_by_suffix("file:///x.tgz"), Ok(Extract::TarGz));
        assert_eq!(extract_by_suffix("https://e/kubectl"), Ok(Extract::None));
        assert_eq!(extract_by_suffix("https://e/x.zip"), Ok(Extract::Zip));
        assert_eq!(extract_by_suffix("https://e/x.tar.xz"), Ok(Extract::TarXz));
        assert_ne!(record_name("/opt/x"), record_name("/opt/y"));
    }

    #[test]
    fn a_download_is_hashed_and_capped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, b"hello").unwrap();
        let url = format!("file://{}", p.display());
        let mut out = Vec::new();
        assert_eq!(fetch_into(&url, 100, &mut out).unwrap(), sha256_hex(b"hello"));
        assert_eq!(out, b"hello");
        assert!(fetch_into(&url, 3, &mut Vec::new()).unwrap_err().to_string().contains("larger than 3"));
    }
}
