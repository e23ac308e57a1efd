//! `filesystem`: a block device holding a filesystem of `fstype`, made with `mkfs` only when
//! `blkid` finds nothing on the device. Never a reformat: a device that holds another
//! filesystem (or another fstype, or a partition table) fails the step, and nothing is written.
//!
//! A device is a path (`/dev/nvme1n1`), a `/dev/disk/by-id/...` link, or `ebs:vol-0123…`: the
//! EBS volume as it appears on a Nitro instance, an NVMe device whose serial is the volume id
//! without its dash (`/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123…`).
//! Needs the running system (blkid and mkfs probe the real device).

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::runner::{self, Cmd};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// A path, `/dev/disk/by-id/…`, or `ebs:vol-…` (a template).
    pub device: Spanned<String>,
    pub fstype: Spanned<String>,
    pub label: Option<Spanned<String>>,
    /// Extra arguments for `mkfs.FSTYPE`, one argv element each.
    #[serde(default)]
    pub mkfs_options: Vec<Spanned<String>>,
}

/// How long `blkid` may take.
pub const BLKID_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `mkfs` may take (a large volume with lazy init off takes minutes).
pub const MKFS_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Where an EBS volume on a Nitro instance appears.
pub const EBS_BY_ID: &str = "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_";

/// The filesystems this kind makes, and the longest label each takes.
const FSTYPES: &[(&str, usize)] = &[("ext4", 16), ("xfs", 12)];

/// The device path a role's `device` names: `ebs:vol-0abc` → the by-id link of its NVMe serial.
pub fn device_path(device: &str) -> std::result::Result<String, String> {
    if let Some(vol) = device.strip_prefix("ebs:") {
        let id = vol.strip_prefix("vol-").unwrap_or_default();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!("invalid EBS volume {device:?}: expected ebs:vol- and hex digits, like ebs:vol-0123456789abcdef0"));
        }
        return Ok(format!("{EBS_BY_ID}vol{id}"));
    }
    let ok = device.starts_with("/dev/")
        && !device.ends_with('/')
        && device.split('/').skip(1).all(|p| !p.is_empty() && p != "." && p != "..")
        && !device.contains(|c: char| c.is_whitespace() || c.is_control());
    if ok {
        Ok(device.to_string())
    } else {
        Err(format!(
            "invalid device {device:?}: expected a path under /dev (like /dev/nvme1n1 or /dev/disk/by-id/…) or ebs:vol-…"
        ))
    }
}

pub fn check_fstype(fstype: &str) -> std::result::Result<usize, String> {
    FSTYPES.iter().find(|(t, _)| *t == fstype).map(|(_, l)| *l).ok_or_else(|| {
        let names: Vec<&str> = FSTYPES.iter().map(|(t, _)| *t).collect();
        format!("unsupported fstype {fstype:?}: expected one of {}", names.join(", "))
    })
}

fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%")
}

/// Render a field that may be a template (a role's var holds the device).
pub fn render_field(cx: &PrepCtx<'_>, f: &Spanned<String>) -> Result<String, ConfigError> {
    let l = &cx.load;
    if !is_template(f.get_ref()) {
        return Ok(f.get_ref().clone());
    }
    Ok(crate::template::render(l.env, &crate::template::Origin::Inline(l.pos(f)), f.get_ref(), cx.vars)?.trim().to_string())
}

/// Check a field that may be a template: its syntax now, `check` on a literal.
pub fn validate_field(cx: &LoadCtx<'_>, f: &Spanned<String>, check: impl Fn(&str) -> std::result::Result<String, String>) -> Result<(), ConfigError> {
    if is_template(f.get_ref()) {
        crate::template::check_syntax(cx.env, &crate::template::Origin::Inline(cx.pos(f)), f.get_ref())
    } else {
        check(f.get_ref()).map(|_| ()).map_err(|e| cx.err(f, e))
    }
}

impl super::KindSpec for Spec {
    type Step = FilesystemStep;

    fn identity(&self) -> Option<String> {
        Some(self.device.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        validate_field(cx, &self.device, device_path)?;
        let max = check_fstype(self.fstype.get_ref()).map_err(|e| cx.err(&self.fstype, e))?;
        if let Some(l) = &self.label {
            let v = l.get_ref();
            if v.is_empty() || v.len() > max || !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(cx.err(
                    l,
                    format!("invalid label {v:?}: expected 1 to {max} letters, digits, '-', '_' or '.' for {}", self.fstype.get_ref()),
                ));
            }
        }
        for o in &self.mkfs_options {
            if o.get_ref().is_empty() || o.get_ref().contains(['\n', '\r', '\0']) {
                return Err(cx.err(o, format!("invalid mkfs option {:?}", o.get_ref())));
            }
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<FilesystemStep, ConfigError> {
        let shown = render_field(cx, &self.device)?;
        let path = device_path(&shown).map_err(|e| cx.load.err(&self.device, e))?;
        Ok(FilesystemStep {
            shown,
            path,
            fstype: self.fstype.get_ref().clone(),
            label: self.label.as_ref().map(|l| l.get_ref().clone()),
            mkfs_options: self.mkfs_options.iter().map(|o| o.get_ref().clone()).collect(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct FilesystemStep {
    /// The device as the role names it (`ebs:vol-…`).
    pub shown: String,
    /// Its path on the node.
    pub path: String,
    pub fstype: String,
    pub label: Option<String>,
    pub mkfs_options: Vec<String>,
}

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probe {
    /// `TYPE`: a filesystem (or swap, LVM, RAID member…).
    pub fstype: Option<String>,
    pub uuid: Option<String>,
    pub label: Option<String>,
    /// `PTTYPE`: a partition table.
    pub pttype: Option<String>,
}

impl Probe {
    pub fn is_empty(&self) -> bool {
        self.fstype.is_none() && self.pttype.is_none()
    }

    /// For messages: `a filesystem of type ext2 (UUID …)`, `a gpt partition table`.
    pub fn describe(&self) -> String {
        match (&self.fstype, &self.pttype) {
            (Some(t), _) => match &self.uuid {
                Some(u) => format!("a filesystem of type {t} (UUID {u})"),
                None => format!("a filesystem of type {t}"),
            },
            (None, Some(p)) => format!("a {p} partition table"),
            (None, None) => "nothing".into(),
        }
    }
}

/// Parse `blkid -o export` output.
pub fn parse_export(out: &str) -> Probe {
    let mut p = Probe::default();
    for line in out.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let v = Some(v.to_string());
        match k {
            "TYPE" => p.fstype = v,
            "UUID" => p.uuid = v,
            "LABEL" => p.label = v,
            "PTTYPE" => p.pttype = v,
            _ => {}
        }
    }
    p
}

/// Probe a device with `blkid -p` (low level, no cache): exit 2 means nothing found.
pub fn probe(path: &str) -> Result<Probe> {
    let argv: Vec<String> = ["blkid", "-p", "-o", "export", path].map(String::from).to_vec();
    let out = runner::run(&Cmd {
        argv: argv.clone(),
        timeout: Some(BLKID_TIMEOUT),
        ..Default::default()
    })
    .with_context(|| format!("probing {path}: running `{}`", argv.join(" ")))?;
    match out.code {
        Some(0) if !out.timed_out => Ok(parse_export(&out.stdout)),
        Some(2) if !out.timed_out => Ok(Probe::default()),
        _ => bail!("probing {path}: `{}` {}: {}", argv.join(" "), out.describe(), out.tail(5)),
    }
}

/// The device exists on the node (a by-id link followed, chroot-style, through the root).
pub fn check_device(host: &Host, shown: &str, path: &str) -> Result<()> {
    let fs = host.fs()?;
    let found = match fs.lstat(path)? {
        None => false,
        Some(st) if st.kind == crate::fsutil::FileKind::Symlink => resolves(&fs, path)?,
        Some(_) => true,
    };
    if !found {
        bail!("device {shown} does not exist on this node ({path} not found)");
    }
    Ok(())
}

/// A symlink (`/dev/disk/by-id/…`) whose target exists.
fn resolves(fs: &crate::fsutil::Root, path: &str) -> Result<bool> {
    let Some(target) = fs.read_link(path)? else { return Ok(false) };
    let base = std::path::Path::new(path).parent().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    let abs = if target.starts_with('/') { target } else { format!("{base}/{target}") };
    // Normalise `..` (the by-id links are `../../nvme1n1`).
    let mut parts: Vec<&str> = Vec::new();
    for c in abs.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    fs.exists(&format!("/{}", parts.join("/")))
}

impl FilesystemStep {
    /// `ebs:vol-… (/dev/disk/by-id/…)`, or the path alone.
    fn named(&self) -> String {
        if self.shown == self.path {
            self.shown.clone()
        } else {
            format!("{} ({})", self.shown, self.path)
        }
    }
}

impl Kind for FilesystemStep {
    type Observed = Probe;

    fn needs_live_system(&self) -> bool {
        true
    }

    /// Reads only. A device holding anything but a filesystem of `fstype` is an error here,
    /// so that neither plan nor apply goes on.
    fn check(&self, host: &Host) -> Result<Probe> {
        check_device(host, &self.shown, &self.path)?;
        let p = probe(&self.path)?;
        if !p.is_empty() && p.fstype.as_deref() != Some(self.fstype.as_str()) {
            bail!(
                "device {} holds {}, not {}: refusing to format it (bootstrap never reformats a device; wipe it by hand if it is really to be reused)",
                self.named(),
                p.describe(),
                self.fstype
            );
        }
        Ok(p)
    }

    fn plan(&self, o: &Probe) -> Vec<Change> {
        if o.is_empty() {
            let to = match &self.label {
                Some(l) => format!("{} (label {l})", self.fstype),
                None => self.fstype.clone(),
            };
            vec![Change::new("filesystem", Some("(none)"), Some(to))]
        } else {
            Vec::new()
        }
    }

    fn apply(&self, _host: &Host, _o: &Probe, _changes: &[Change]) -> Result<()> {
        // Probe again just before: only a device with nothing on it is ever formatted.
        let now = probe(&self.path)?;
        if !now.is_empty() {
            bail!("device {} now holds {}: not formatting it", self.named(), now.describe());
        }
        let mut argv = vec![format!("mkfs.{}", self.fstype)];
        if let Some(l) = &self.label {
            argv.extend(["-L".to_string(), l.clone()]);
        }
        argv.extend(self.mkfs_options.iter().cloned());
        argv.push(self.path.clone());
        let out = runner::run(&Cmd {
            argv: argv.clone(),
            timeout: Some(MKFS_TIMEOUT),
            ..Default::default()
        })
        .with_context(|| format!("formatting {}: running `{}`", self.shown, argv.join(" ")))?;
        if !out.success() {
            bail!("formatting {}: `{}` {}: {}", self.shown, argv.join(" "), out.describe(), out.tail(5));
        }
        let after = probe(&self.path)?;
        if after.fstype.as_deref() != Some(self.fstype.as_str()) {
            bail!("formatting {}: mkfs succeeded but blkid finds {}", self.shown, after.describe());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> FilesystemStep {
        FilesystemStep {
            shown: "/dev/loop0".into(),
            path: "/dev/loop0".into(),
            fstype: "ext4".into(),
            label: Some("data".into()),
            mkfs_options: vec![],
        }
    }

    #[test]
    fn devices() {
        assert_eq!(
            device_path("ebs:vol-0123456789abcdef0").unwrap(),
            "/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
        );
        assert_eq!(device_path("/dev/disk/by-id/nvme-x").unwrap(), "/dev/disk/by-id/nvme-x");
        assert_eq!(device_path("/dev/nvme1n1").unwrap(), "/dev/nvme1n1");
        for bad in ["ebs:vol-", "ebs:0123", "ebs:vol-xyz", "/etc/passwd", "dev/sda", "/dev/../etc/x", "/dev/", "/dev/a b", "UUID=x"] {
            assert!(device_path(bad).is_err(), "{bad}");
        }
        assert_eq!(check_fstype("xfs"), Ok(12));
        assert!(check_fstype("ntfs").is_err());
    }

    #[test]
    fn blkid_export() {
        let p = parse_export("DEVNAME=/dev/loop0\nUUID=8b8b1eeb-b913\nBLOCK_SIZE=1024\nTYPE=ext2\nUSAGE=filesystem\n");
        assert_eq!((p.fstype.as_deref(), p.uuid.as_deref()), (Some("ext2"), Some("8b8b1eeb-b913")));
        assert_eq!(p.describe(), "a filesystem of type ext2 (UUID 8b8b1eeb-b913)");
        let t = parse_export("DEVNAME=/dev/loop0\nPTUUID=x\nPTTYPE=gpt\n");
        assert!(!t.is_empty());
        assert_eq!(t.describe(), "a gpt partition table");
        assert!(parse_export("").is_empty());
    }

    #[test]
    fn plan_table() {
        let s = step();
        let p = s.plan(&Probe::default());
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].field.as_str(), p[0].from.as_deref(), p[0].to.as_deref()), ("filesystem", Some("(none)"), Some("ext4 (label data)")));
        let have = Probe {
            fstype: Some("ext4".into()),
            uuid: Some("u".into()),
            label: Some("other".into()),
            pttype: None,
        };
        assert!(s.plan(&have).is_empty(), "a filesystem of the fstype is in sync, whatever its label");
    }
}
