//! `unit`: a systemd unit's file and drop-ins, and its enabled / active / masked state, over
//! D-Bus. A changed unit file, drop-in, enablement or mask owes a daemon-reload, done once for
//! all of them before the next start/stop/restart job, before a step that may use systemd's
//! view of the units ([`super::Step::settles_reload_first`]) or at the end of the run (see
//! `crate::systemd`). Under `--root` only the files are managed (there is no service manager
//! to ask).

use super::content_diff;
use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::fsutil;
use crate::systemd::UnitState;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    pub content: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    #[serde(default)]
    pub template: bool,
    /// Drop-in file name (`10-limits.conf`) → content.
    #[serde(default)]
    pub dropins: BTreeMap<String, Spanned<String>>,
    pub enabled: Option<bool>,
    /// true: running, false: stopped.
    pub active: Option<bool>,
    pub masked: Option<bool>,
}

/// Where unit files written by roles live.
const UNIT_DIR: &str = "/etc/systemd/system";

pub fn check_unit_name(name: &str) -> std::result::Result<(), String> {
    const SUFFIXES: &[&str] = &[".service", ".socket", ".timer", ".target", ".mount", ".path", ".slice", ".automount", ".swap"];
    let ok = SUFFIXES.iter().any(|s| name.ends_with(s) && name.len() > s.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid unit name {name:?}: expected a name like haproxy.service"))
    }
}

impl super::KindSpec for Spec {
    type Step = UnitStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_unit_name(self.name.get_ref()).map_err(|e| cx.err(&self.name, e))?;
        if let (Some(_), Some(s)) = (&self.content, &self.source) {
            return Err(cx.err(s, "a unit step takes `content` or `source`, not both"));
        }
        if self.masked == Some(true) && (self.enabled == Some(true) || self.active == Some(true)) {
            return Err(cx.err(&self.name, "a masked unit cannot be enabled or active"));
        }
        if self.masked == Some(true) && (self.content.is_some() || self.source.is_some()) {
            return Err(cx.err(&self.name, "masking replaces the unit file with a link to /dev/null: drop `content`/`source`"));
        }
        for (file, body) in &self.dropins {
            if !file.ends_with(".conf") || file.contains('/') {
                return Err(cx.err(body, format!("drop-in name {file:?} must be a file name ending in .conf")));
            }
        }
        for body in self.dropins.values() {
            super::validate_body(cx, &Some(body.clone()), &None, self.template)?;
        }
        super::validate_body(cx, &self.content, &self.source, self.template)
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<UnitStep, ConfigError> {
        let name = self.name.get_ref().clone();
        let content = super::render_body(cx, &self.content, &self.source, self.template)?;
        let mut files = Vec::new();
        if let Some(c) = content {
            files.push(UnitFile {
                display: format!("{UNIT_DIR}/{name}"),
                content: c,
                field: "content".into(),
            });
        }
        for (file, body) in &self.dropins {
            files.push(UnitFile {
                display: format!("{UNIT_DIR}/{name}.d/{file}"),
                content: super::render_body(cx, &Some(body.clone()), &None, self.template)?.unwrap_or_default(),
                field: format!("dropin:{file}"),
            });
        }
        Ok(UnitStep {
            name,
            files,
            enabled: self.enabled,
            active: self.active,
            masked: self.masked,
            sensitive: false,
        })
    }
}

#[derive(Debug, Clone)]
pub struct UnitFile {
    /// The path on the node (resolved under the root by `Host::fs`).
    pub display: String,
    pub content: Vec<u8>,
    /// The change field: `content` or `dropin:NAME`.
    pub field: String,
}

#[derive(Debug, Clone)]
pub struct UnitStep {
    pub name: String,
    pub files: Vec<UnitFile>,
    pub enabled: Option<bool>,
    pub active: Option<bool>,
    pub masked: Option<bool>,
    /// Its files hold a secret: changes are summarised, never diffed, and the files are 0600.
    pub sensitive: bool,
}

impl UnitStep {
    /// Mode of the unit files and drop-ins written.
    fn file_mode(&self) -> u32 {
        if self.sensitive {
            0o600
        } else {
            0o644
        }
    }
}

/// The change field of a managed file's mode (`content:mode`, `dropin:NAME:mode`).
fn mode_field(f: &UnitFile) -> String {
    format!("{}:mode", f.field)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Current content of each managed file (None: missing), in `files` order.
    pub files: Vec<Option<Vec<u8>>>,
    /// Mode of each managed file that exists, in `files` order (checked for sensitive units).
    pub modes: Vec<Option<u32>>,
    /// None under `--root`.
    pub state: Option<UnitState>,
}

impl Kind for UnitStep {
    type Observed = Observed;

    fn mark_sensitive(&mut self) {
        self.sensitive = true;
    }

    fn check(&self, host: &Host) -> Result<Observed> {
        let fs = host.fs()?;
        let (mut files, mut modes) = (Vec::new(), Vec::new());
        for f in &self.files {
            files.push(fs.read(&f.display)?);
            modes.push(fs.lstat(&f.display)?.map(|st| st.mode));
        }
        let wants_state = self.enabled.is_some() || self.active.is_some() || self.masked.is_some();
        let state = if host.is_live() && wants_state {
            Some(host.systemd.unit_state(&self.name)?)
        } else {
            None
        };
        Ok(Observed { files, modes, state })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        for (i, (f, have)) in self.files.iter().zip(&o.files).enumerate() {
            // A sensitive unit's existing file that others may read is made private even when
            // its content is unchanged (one written before the unit held a secret).
            let mode = o.modes.get(i).copied().flatten();
            if let (true, Some(m)) = (self.sensitive && have.as_deref() == Some(f.content.as_slice()), mode) {
                if m != self.file_mode() {
                    c.push(Change::new(&mode_field(f), Some(crate::fsutil::Mode(m)), Some(crate::fsutil::Mode(self.file_mode()))));
                }
            }
            if have.as_deref() != Some(f.content.as_slice()) {
                c.push(if self.sensitive {
                    Change::content_summary(&f.field, have.as_deref(), &f.content)
                } else {
                    Change {
                        diff: Some(content_diff(&f.display, have.as_deref().unwrap_or_default(), &f.content)),
                        ..Change::new::<&str, &str>(&f.field, None, None)
                    }
                });
            }
        }
        if let Some(s) = &o.state {
            if let Some(m) = self.masked.filter(|m| *m != s.is_masked()) {
                c.push(Change::new("masked", Some(!m), Some(m)));
            }
            if let Some(e) = self.enabled.filter(|e| *e != s.is_enabled()) {
                c.push(Change::new("enabled", Some(&s.file_state), Some(if e { "enabled" } else { "disabled" })));
            }
            if let Some(a) = self.active.filter(|a| *a != s.is_active()) {
                c.push(Change::new("active", Some(&s.active_state), Some(if a { "active" } else { "inactive" })));
            }
        }
        c
    }

    fn apply(&self, host: &Host, _o: &Observed, changes: &[Change]) -> Result<()> {
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        let fs = host.owned_fs()?;
        let mut files_changed = false;
        for f in &self.files {
            if has(&f.field) {
                fs.write(&f.display, &f.content, self.file_mode(), None)?;
                files_changed = true;
            } else if has(&mode_field(f)) {
                let at = fs.parent(&f.display, false)?.with_context(|| format!("{} vanished", f.display))?;
                at.set_meta(Some(self.file_mode()), None, None)?;
            }
        }
        if !host.is_live() {
            return Ok(());
        }
        let sd = &host.systemd;
        // Unit files, enable and mask all change things on disk: they owe one daemon-reload,
        // done once for this and the other unit steps' changes before the next job (each reload
        // costs about 100 ms), so a start or stop below sees the files as written.
        let mut reload = files_changed;
        if let (Some(m), true) = (self.masked, has("masked")) {
            reload = true;
            if !m {
                sd.mask(&self.name, false)?;
            } else {
                // Stop before masking, as `systemctl mask --now` does. systemd refuses to mask
                // over a unit file in /etc/systemd/system, so a local file gives way to the mask.
                sd.stop(&self.name)?;
                let local = format!("{UNIT_DIR}/{}", self.name);
                if let Some(at) = fs.parent(&local, false)? {
                    if at.lstat()?.is_some_and(|st| st.kind == fsutil::FileKind::File) {
                        at.remove_file().with_context(|| format!("removing {local} to mask it"))?;
                    }
                }
                sd.mask(&self.name, true)?;
            }
        }
        if let (Some(e), true) = (self.enabled, has("enabled")) {
            sd.enable(&self.name, e)?;
            reload = true;
        }
        if reload {
            sd.owe_reload()?;
        }
        match (self.active, has("active")) {
            (Some(true), true) => sd.start(&self.name)?,
            (Some(false), true) => sd.stop(&self.name)?,
            _ => {}
        }
        Ok(())
    }
}

impl super::Step {
    /// The step may use systemd's view of the units (it runs commands, installs packages whose
    /// scripts start services, talks to a daemon, or starts units itself): a daemon-reload
    /// owed for unit files written by earlier steps is done before it runs. Steps that only
    /// write files or use tools that do not ask systemd run without it. A new kind settles
    /// first unless it is listed here.
    pub fn settles_reload_first(&self) -> bool {
        use super::Step as S;
        !matches!(
            self,
            S::File(_)
                | S::Directory(_)
                | S::Link(_)
                | S::User(_)
                | S::Group(_)
                | S::Unit(_)
                | S::Line(_)
                | S::AuthorizedKeys(_)
                | S::Sysctl(_)
                | S::KernelModule(_)
                | S::Filesystem(_)
                | S::Repository(_)
                | S::Archive(_)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = UnitStep {
            name: "x.service".into(),
            files: vec![],
            enabled: Some(true),
            active: Some(true),
            masked: None,
            sensitive: false,
        };
        let st = |f: &str, a: &str| Observed {
            files: vec![],
            modes: vec![],
            state: Some(UnitState {
                file_state: f.into(),
                active_state: a.into(),
            }),
        };
        assert!(s.plan(&st("enabled", "active")).is_empty());
        assert!(s.plan(&st("static", "activating")).is_empty());
        let fields = |o| s.plan(&o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        assert_eq!(fields(st("disabled", "inactive")), ["enabled", "active"]);
        assert_eq!(fields(st("enabled", "failed")), ["active"]);
        // under --root there is no state to compare
        assert!(s
            .plan(&Observed {
                files: vec![],
                modes: vec![],
                state: None
            })
            .is_empty());
        assert!(check_unit_name("haproxy.service").is_ok() && check_unit_name("getty@tty1.service").is_ok());
        assert!(check_unit_name("haproxy").is_err() && check_unit_name(".service").is_err() && check_unit_name("a/b.service").is_err());
    }

    /// A unit step whose rendering used a secret: its files' changes are summaries, and the
    /// files are written 0600.
    #[test]
    fn a_sensitive_unit_plans_without_its_content() {
        let mut s = UnitStep {
            name: "x.service".into(),
            files: vec![UnitFile {
                display: "/etc/systemd/system/x.service.d/10-env.conf".into(),
                content: b"[Service]\nEnvironment=KEY=new-secret-value\n".to_vec(),
                field: "dropin:10-env.conf".into(),
            }],
            enabled: None,
            active: None,
            masked: None,
            sensitive: false,
        };
        let have = Observed {
            files: vec![Some(b"[Service]\nEnvironment=KEY=old-secret-value\n".to_vec())],
            modes: vec![Some(0o644)],
            state: None,
        };
        assert!(s.plan(&have)[0].diff.as_deref().unwrap().contains("+Environment=KEY=new-secret-value"));
        assert_eq!(s.file_mode(), 0o644);
        s.sensitive = true;
        let plan = s.plan(&have);
        assert_eq!(plan[0].field, "dropin:10-env.conf");
        let d = plan[0].diff.as_deref().unwrap();
        assert!(d.starts_with("content changed, sha256 ") && !d.contains("secret-value"), "{d}");
        assert_eq!(s.file_mode(), 0o600);
        // Same content, written 0644 before it held a secret: made private.
        let same = Observed {
            files: vec![Some(s.files[0].content.clone())],
            modes: vec![Some(0o644)],
            state: None,
        };
        let plan = s.plan(&same);
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert_eq!((plan[0].field.as_str(), plan[0].to.as_deref()), ("dropin:10-env.conf:mode", Some("0600")));
        assert!(s.plan(&Observed { modes: vec![Some(0o600)], ..same }).is_empty());
    }
}
