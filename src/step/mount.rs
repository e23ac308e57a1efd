//! `mount`: a filesystem mounted at `path` by its UUID through a systemd mount unit, persisted
//! (enabled, `WantedBy=local-fs.target`) and mounted now, with `options`.
//!
//! The unit is `/etc/systemd/system/NAME.mount`, NAME being systemd's escaping of the path
//! (`systemd-escape -p --suffix=mount /srv/data` → `srv-data.mount`); it mounts
//! `What=/dev/disk/by-uuid/UUID`, the UUID read with `blkid` from the device the role names
//! (a path, `/dev/disk/by-id/…`, `ebs:vol-…`, `LABEL=…`) or given as `UUID=…`. What is
//! mounted now is read from `/proc/self/mountinfo` through the root. Needs the running system.

use super::filesystem::{check_device, device_path, probe, render_field, validate_field, BLKID_TIMEOUT};
use super::{content_diff, Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::runner::{self, Cmd};
use crate::systemd::UnitState;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::time::{Duration, Instant};
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub path: Spanned<String>,
    /// A path, `/dev/disk/by-id/…`, `ebs:vol-…`, `UUID=…` or `LABEL=…` (a template).
    /// Required with `mounted`.
    pub device: Option<Spanned<String>>,
    /// Required with `mounted`.
    pub fstype: Option<Spanned<String>>,
    /// Comma-separated, as in fstab (`noatime,nodev`).
    pub options: Option<Spanned<String>>,
    #[serde(default)]
    pub state: MountState,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MountState {
    #[default]
    Mounted,
    Absent,
}

const UNIT_DIR: &str = "/etc/systemd/system";
const UNIT_MODE: u32 = 0o644;
const MOUNTINFO: &str = "/proc/self/mountinfo";
/// How long to wait for udev's `/dev/disk/by-uuid/UUID` link after a device was formatted.
pub const UDEV_LINK_TIMEOUT: Duration = Duration::from_secs(30);
const LINK_POLL: Duration = Duration::from_millis(100);

/// Options that only mount(8) or systemd read: never shown in mountinfo.
fn userspace_option(o: &str) -> bool {
    matches!(o, "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "nouser" | "users" | "owner" | "group")
        || o.starts_with("x-")
        || o.starts_with("comment=")
}

/// A mount path systemd accepts as `Where=`: absolute, normalised, not `/`.
pub fn check_mount_path(p: &str) -> std::result::Result<(), String> {
    let ok = p.starts_with('/')
        && p.len() > 1
        && p.len() <= 4096
        && !p.ends_with('/')
        && p.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..")
        && !p.contains(|c: char| c.is_whitespace() || c.is_control() || c == '\\');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid mount path {p:?}: expected an absolute, normalised path other than / (no `.`, `..`, `//`, trailing `/`, spaces or backslashes)"
        ))
    }
}

/// `systemd-escape -p --suffix=mount PATH`: `/srv/my-data` → `srv-my\x2ddata.mount`.
pub fn unit_name(path: &str) -> String {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return "-.mount".into();
    }
    let mut out = String::new();
    for (i, b) in trimmed.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b if b.is_ascii_alphanumeric() || b == b':' || b == b'_' || b == b'.' => out.push(b as char),
            b => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out.push_str(".mount");
    out
}

fn check_options(o: &str) -> std::result::Result<(), String> {
    if o.is_empty() || o.split(',').any(|p| p.is_empty()) || o.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(format!("invalid mount options {o:?}: expected comma-separated options like \"noatime,nodev\""));
    }
    Ok(())
}

/// The device a mount names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Device {
    Uuid(String),
    Label(String),
    /// As the role names it, and its path.
    Path { shown: String, path: String },
}

pub fn parse_device(d: &str) -> std::result::Result<Device, String> {
    if let Some(u) = d.strip_prefix("UUID=") {
        if u.is_empty() || !u.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(format!("invalid UUID in {d:?}: expected hex digits and dashes"));
        }
        return Ok(Device::Uuid(u.to_ascii_lowercase()));
    }
    if let Some(l) = d.strip_prefix("LABEL=") {
        if l.is_empty() || !l.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(format!("invalid label in {d:?}: expected letters, digits, '-', '_' or '.'"));
        }
        return Ok(Device::Label(l.to_string()));
    }
    device_path(d)
        .map(|path| Device::Path { shown: d.to_string(), path })
        .map_err(|e| format!("{e}, UUID=… or LABEL=…"))
}

impl super::KindSpec for Spec {
    type Step = MountStep;

    fn identity(&self) -> Option<String> {
        Some(self.path.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_mount_path(self.path.get_ref()).map_err(|e| cx.err(&self.path, e))?;
        let (device, fstype) = match (self.state, &self.device, &self.fstype) {
            (MountState::Mounted, Some(d), Some(t)) => (d, t),
            (MountState::Mounted, _, _) => return Err(cx.err(&self.path, "a mount step with state = \"mounted\" needs `device` and `fstype`")),
            (MountState::Absent, _, _) => {
                if let Some(x) = self.device.as_ref().or(self.fstype.as_ref()).or(self.options.as_ref()) {
                    return Err(cx.err(x, "`device`, `fstype` and `options` make no sense with state = \"absent\""));
                }
                return Ok(());
            }
        };
        validate_field(cx, device, |d| parse_device(d).map(|_| String::new()))?;
        let t = fstype.get_ref();
        if t.is_empty() || !t.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_') {
            return Err(cx.err(fstype, format!("invalid fstype {t:?}: expected a filesystem type like ext4 or xfs")));
        }
        if let Some(o) = &self.options {
            check_options(o.get_ref()).map_err(|e| cx.err(o, e))?;
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<MountStep, ConfigError> {
        let (device, device_shown) = match &self.device {
            Some(dev) => {
                let d = render_field(cx, dev)?;
                (Some(parse_device(&d).map_err(|e| cx.load.err(dev, e))?), d)
            }
            None => (None, String::new()),
        };
        let path = self.path.get_ref().clone();
        Ok(MountStep {
            unit: unit_name(&path),
            device_shown,
            device,
            fstype: self.fstype.as_ref().map(|t| t.get_ref().clone()).unwrap_or_default(),
            options: self.options.as_ref().map(|o| o.get_ref().clone()),
            state: self.state,
            path,
        })
    }
}

#[derive(Debug, Clone)]
pub struct MountStep {
    pub path: String,
    /// `srv-data.mount`
    pub unit: String,
    /// None with `absent`.
    pub device: Option<Device>,
    pub device_shown: String,
    /// Empty with `absent`.
    pub fstype: String,
    pub options: Option<String>,
    pub state: MountState,
}

/// The topmost mount at a path, from mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    pub source: String,
    pub fstype: String,
    /// Per-mount and superblock options together.
    pub options: Vec<String>,
    /// The UUID of the mounted device (blkid), when it has one.
    pub uuid: Option<String>,
}

impl Mounted {
    fn describe(&self) -> String {
        let by = self.uuid.as_ref().map(|u| format!(" UUID={u}")).unwrap_or_default();
        format!("{}{by} {} ({})", self.source, self.fstype, self.options.join(","))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub unit_file: Option<Vec<u8>>,
    /// The device's filesystem UUID; None when it holds no filesystem (yet).
    pub uuid: Option<String>,
    pub state: UnitState,
    pub mounted: Option<Mounted>,
}

/// `\040` and friends in mountinfo fields.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') as u32 * 64 + (b[i + 2] - b'0') as u32 * 8 + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The topmost mount at `path` in mountinfo text: (source, fstype, options).
pub fn find_mount(mountinfo: &str, path: &str) -> Option<(String, String, Vec<String>)> {
    let mut found = None;
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else { continue };
        if f.len() < 6 || sep < 6 || f.len() < sep + 4 || unescape(f[4]) != path {
            continue;
        }
        let mut opts: Vec<String> = f[5].split(',').map(String::from).collect();
        opts.extend(f[sep + 3].split(',').map(String::from));
        found = Some((unescape(f[sep + 2]), f[sep + 1].to_string(), opts));
    }
    found
}

impl MountStep {
    fn what(uuid: &str) -> String {
        format!("/dev/disk/by-uuid/{uuid}")
    }

    fn unit_path(&self) -> String {
        format!("{UNIT_DIR}/{}", self.unit)
    }

    pub fn unit_content(&self, uuid: &str) -> Vec<u8> {
        let mut s = format!(
            "# managed by bootstrap (step mount:{})\n[Unit]\nDescription=Mount {} ({})\n\n[Mount]\nWhat={}\nWhere={}\nType={}\n",
            self.path,
            self.path,
            self.device_shown,
            Self::what(uuid),
            self.path,
            self.fstype
        );
        if let Some(o) = &self.options {
            s.push_str(&format!("Options={o}\n"));
        }
        s.push_str("\n[Install]\nWantedBy=local-fs.target\n");
        s.into_bytes()
    }

    /// The mount options that show in mountinfo.
    fn kernel_options(&self) -> Vec<&str> {
        self.options.as_deref().map(|o| o.split(',').filter(|o| !userspace_option(o)).collect()).unwrap_or_default()
    }

    /// What `mounted` should be, for plans.
    fn wanted(&self, uuid: Option<&str>) -> String {
        let o = self.options.as_deref().map(|o| format!(" ({o})")).unwrap_or_default();
        format!("UUID={} {}{o}", uuid.unwrap_or("?"), self.fstype)
    }

    fn mount_ok(&self, m: &Mounted, uuid: &str) -> bool {
        m.uuid.as_deref() == Some(uuid) && m.fstype == self.fstype && self.kernel_options().iter().all(|o| m.options.iter().any(|h| h == o))
    }

    /// The device's UUID now (None: no filesystem on it yet). A device holding another
    /// fstype is an error.
    fn resolve_uuid(&self, host: &Host) -> Result<Option<String>> {
        let Some(device) = &self.device else { return Ok(None) };
        let path = match device {
            Device::Uuid(u) => return Ok(Some(u.clone())),
            Device::Label(l) => {
                let argv: Vec<String> = ["blkid", "-c", "/dev/null", "-l", "-o", "device", "-t"].map(String::from).into_iter().chain([format!("LABEL={l}")]).collect();
                let out = runner::run(&Cmd {
                    argv: argv.clone(),
                    timeout: Some(BLKID_TIMEOUT),
                    ..Default::default()
                })
                .with_context(|| format!("finding LABEL={l}: running `{}`", argv.join(" ")))?;
                match out.code {
                    Some(0) if !out.timed_out => out.stdout.trim().to_string(),
                    Some(2) if !out.timed_out => return Ok(None),
                    _ => bail!("finding LABEL={l}: `{}` {}: {}", argv.join(" "), out.describe(), out.tail(5)),
                }
            }
            Device::Path { shown, path } => {
                check_device(host, shown, path)?;
                path.clone()
            }
        };
        let p = probe(&path)?;
        match &p.fstype {
            None if p.pttype.is_none() => Ok(None),
            Some(t) if *t == self.fstype => Ok(p.uuid),
            _ => bail!("device {} ({path}) holds {}, not {}: not mounting it at {}", self.device_shown, p.describe(), self.fstype, self.path),
        }
    }

    fn read_mount(&self, host: &Host) -> Result<Option<Mounted>> {
        let info = host.fs()?.read(MOUNTINFO)?.with_context(|| format!("{MOUNTINFO} missing (is /proc mounted?)"))?;
        let Some((source, fstype, options)) = find_mount(&String::from_utf8_lossy(&info), &self.path) else { return Ok(None) };
        let uuid = if source.starts_with("/dev/") { probe(&source).ok().and_then(|p| p.uuid) } else { None };
        Ok(Some(Mounted { source, fstype, options, uuid }))
    }

    fn wait_for_link(&self, host: &Host, uuid: &str) -> Result<()> {
        let link = Self::what(uuid);
        let start = Instant::now();
        while !host.fs()?.exists(&link)? {
            if start.elapsed() > UDEV_LINK_TIMEOUT {
                bail!(
                    "mounting {}: {link} did not appear within {}s (is udev running?)",
                    self.path,
                    UDEV_LINK_TIMEOUT.as_secs()
                );
            }
            std::thread::sleep(LINK_POLL);
        }
        Ok(())
    }
}

impl Kind for MountStep {
    type Observed = Observed;

    fn needs_live_system(&self) -> bool {
        true
    }

    fn check(&self, host: &Host) -> Result<Observed> {
        let uuid = match self.state {
            MountState::Mounted => self.resolve_uuid(host)?,
            MountState::Absent => None,
        };
        Ok(Observed {
            unit_file: host.fs()?.read(&self.unit_path())?,
            uuid,
            state: host.systemd.unit_state(&self.unit)?,
            mounted: self.read_mount(host)?,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        if self.state == MountState::Absent {
            if let Some(m) = &o.mounted {
                c.push(Change::new("mounted", Some(m.describe()), Some("(not mounted)")));
            }
            if o.state.is_enabled() && o.unit_file.is_some() {
                c.push(Change::new("enabled", Some(&o.state.file_state), Some("disabled")));
            }
            if o.unit_file.is_some() {
                c.push(Change::new("unit", Some(self.unit_path()), None::<&str>));
            }
            return c;
        }
        match &o.uuid {
            None => c.push(Change::new("device", Some("(no filesystem)"), Some(&self.device_shown))),
            Some(u) => {
                let want = self.unit_content(u);
                if o.unit_file.as_deref() != Some(want.as_slice()) {
                    c.push(Change {
                        diff: Some(content_diff(&self.unit_path(), o.unit_file.as_deref().unwrap_or_default(), &want)),
                        ..Change::new::<&str, &str>("unit", None, None)
                    });
                }
            }
        }
        if !o.state.is_enabled() {
            c.push(Change::new("enabled", Some(&o.state.file_state), Some("enabled")));
        }
        let ok = match (&o.mounted, &o.uuid) {
            (Some(m), Some(u)) => self.mount_ok(m, u),
            _ => false,
        };
        if !ok {
            let from = o.mounted.as_ref().map(Mounted::describe).unwrap_or_else(|| "(not mounted)".into());
            c.push(Change::new("mounted", Some(from), Some(self.wanted(o.uuid.as_deref()))));
        }
        c
    }

    fn apply(&self, host: &Host, o: &Observed, changes: &[Change]) -> Result<()> {
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        let sd = &host.systemd;
        let fs = host.fs()?;
        if self.state == MountState::Absent {
            if has("mounted") {
                sd.stop(&self.unit).with_context(|| format!("unmounting {}", self.path))?;
            }
            if has("enabled") {
                sd.enable(&self.unit, false)?;
            }
            if has("unit") {
                fs.parent(&self.unit_path(), false)?.with_context(|| format!("{} vanished", self.unit_path()))?.remove_file()?;
            }
            sd.daemon_reload()?;
            return Ok(());
        }
        // An earlier step of this run (a `filesystem` step) may have just made the filesystem.
        let uuid = match &o.uuid {
            Some(u) => u.clone(),
            None => self.resolve_uuid(host)?.with_context(|| format!("mounting {}: device {} holds no filesystem", self.path, self.device_shown))?,
        };
        let want = self.unit_content(&uuid);
        let written = fs.read(&self.unit_path())?.as_deref() != Some(want.as_slice());
        if written {
            fs.write(&self.unit_path(), &want, UNIT_MODE, Some((0, 0)))?;
        }
        if written || has("enabled") {
            sd.enable(&self.unit, true)?;
        }
        sd.daemon_reload()?;
        let mounted_now = self.read_mount(host)?;
        if !mounted_now.as_ref().is_some_and(|m| self.mount_ok(m, &uuid)) {
            self.wait_for_link(host, &uuid)?;
            if mounted_now.is_some() {
                // Another device, or other options: unmount and mount again.
                sd.restart(&self.unit).with_context(|| format!("mounting {} again", self.path))?;
            } else {
                sd.start(&self.unit).with_context(|| format!("mounting {}", self.path))?;
            }
            let after = self.read_mount(host)?;
            match after {
                Some(m) if self.mount_ok(&m, &uuid) => {}
                Some(m) => bail!("mounting {}: {} is mounted there now, not {}", self.path, m.describe(), self.wanted(Some(&uuid))),
                None => bail!("mounting {}: {} started but nothing is mounted there", self.path, self.unit),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> MountStep {
        MountStep {
            path: "/srv/data".into(),
            unit: unit_name("/srv/data"),
            device: Some(Device::Path {
                shown: "/dev/loop0".into(),
                path: "/dev/loop0".into(),
            }),
            device_shown: "/dev/loop0".into(),
            fstype: "ext4".into(),
            options: Some("noatime,nofail".into()),
            state: MountState::Mounted,
        }
    }

    #[test]
    fn escaping_as_systemd_escape() {
        // `systemd-escape -p --suffix=mount …`
        for (p, want) in [
            ("/srv/data", "srv-data.mount"),
            ("/srv/my-data", "srv-my\\x2ddata.mount"),
            ("/var/lib/docker", "var-lib-docker.mount"),
            ("/.hidden/x", "\\x2ehidden-x.mount"),
            ("/a.b/c.d", "a.b-c.d.mount"),
            ("/data_1:x", "data_1:x.mount"),
            ("/", "-.mount"),
            ("/données", "donn\\xc3\\xa9es.mount"),
            ("/a+b", "a\\x2bb.mount"),
        ] {
            assert_eq!(unit_name(p), want, "{p}");
        }
        assert!(check_mount_path("/srv/data").is_ok());
        for bad in ["/", "srv", "/srv/", "/srv//x", "/srv/../x", "/a b", "/a\\b"] {
            assert!(check_mount_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_and_options() {
        assert_eq!(parse_device("UUID=AB-12"), Ok(Device::Uuid("ab-12".into())));
        assert_eq!(parse_device("LABEL=data"), Ok(Device::Label("data".into())));
        assert!(matches!(parse_device("ebs:vol-0a1"), Ok(Device::Path { path, .. }) if path.ends_with("Block_Store_vol0a1")));
        for bad in ["UUID=", "UUID=zz", "LABEL=a b", "data", "/etc/x"] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
        assert!(check_options("noatime,nodev").is_ok());
        for bad in ["", "a,,b", "a b", "a\nb"] {
            assert!(check_options(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn mountinfo() {
        let info = "22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/x\n\
                    90 22 7:0 / /srv/data rw,noatime - ext4 /dev/loop0 rw\n\
                    91 22 7:1 / /srv/my\\040data rw,relatime shared:5 - ext2 /dev/loop1 rw,errors=continue\n\
                    92 90 0:50 / /srv/data rw,nosuid - tmpfs tmpfs rw,size=10k\n";
        let (src, t, o) = find_mount(info, "/srv/data").unwrap();
        assert_eq!((src.as_str(), t.as_str()), ("tmpfs", "tmpfs"), "the topmost mount");
        assert!(o.contains(&"nosuid".to_string()) && o.contains(&"size=10k".to_string()));
        let (src, t, o) = find_mount(info, "/srv/my data").unwrap();
        assert_eq!((src.as_str(), t.as_str()), ("/dev/loop1", "ext2"));
        assert!(o.contains(&"errors=continue".to_string()));
        assert!(find_mount(info, "/srv").is_none());
    }

    #[test]
    fn plan_table() {
        let s = step();
        let fields = |o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        let mounted = |uuid: &str, opts: &str| Mounted {
            source: "/dev/loop0".into(),
            fstype: "ext4".into(),
            options: opts.split(',').map(String::from).collect(),
            uuid: Some(uuid.into()),
        };
        let st = |f: &str| UnitState {
            file_state: f.into(),
            active_state: "active".into(),
        };
        let sync = Observed {
            unit_file: Some(s.unit_content("u1")),
            uuid: Some("u1".into()),
            state: st("enabled"),
            mounted: Some(mounted("u1", "rw,noatime")),
        };
        assert!(fields(&sync).is_empty(), "{:?}", s.plan(&sync));
        // unmounted by hand
        assert_eq!(fields(&Observed { mounted: None, ..sync.clone() }), ["mounted"]);
        // mounted without the option, or another filesystem
        assert_eq!(fields(&Observed { mounted: Some(mounted("u1", "rw,relatime")), ..sync.clone() }), ["mounted"]);
        assert_eq!(fields(&Observed { mounted: Some(mounted("u2", "rw,noatime")), ..sync.clone() }), ["mounted"]);
        // fresh node
        let fresh = Observed {
            unit_file: None,
            uuid: Some("u1".into()),
            state: st("not-found"),
            mounted: None,
        };
        assert_eq!(fields(&fresh), ["unit", "enabled", "mounted"]);
        let p = s.plan(&fresh);
        let d = p[0].diff.as_deref().unwrap();
        assert!(d.contains("+What=/dev/disk/by-uuid/u1") && d.contains("+Options=noatime,nofail") && d.contains("+WantedBy=local-fs.target"), "{d}");
        assert_eq!(p[2].to.as_deref(), Some("UUID=u1 ext4 (noatime,nofail)"));
        // not formatted yet (the filesystem step comes first in the same run)
        assert_eq!(fields(&Observed { uuid: None, ..fresh.clone() }), ["device", "enabled", "mounted"]);
        // absent
        let mut a = step();
        a.state = MountState::Absent;
        assert_eq!(a.plan(&sync).into_iter().map(|c| c.field).collect::<Vec<_>>(), ["mounted", "enabled", "unit"]);
        assert!(a
            .plan(&Observed {
                unit_file: None,
                uuid: None,
                state: st("not-found"),
                mounted: None
            })
            .is_empty());
    }
}
