//! `kernel_module`: a module loaded at every boot (`/etc/modules-load.d/NAME.conf`), with its
//! options (`/etc/modprobe.d/NAME.conf`), and loaded now (`modprobe NAME`, on the running
//! system only: under `--root` only the files are managed). A module built into the kernel
//! (listed in `/lib/modules/RELEASE/modules.builtin`) is always loaded, though only one with
//! parameters shows in `/sys/module`.

use super::{content_diff, Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::runner::{self, Cmd};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    /// `options NAME …` in /etc/modprobe.d/NAME.conf (e.g. `"max_loop=64"`).
    pub options: Option<Spanned<String>>,
    #[serde(default)]
    pub state: State,
}

/// How long `modprobe` may take.
pub const MODPROBE_TIMEOUT: Duration = Duration::from_secs(60);
const FILE_MODE: u32 = 0o644;

/// Module names: letters, digits, `_` and `-` (the kernel treats `-` and `_` alike).
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty() && name.len() <= 55 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid kernel module name {name:?}: expected letters, digits, '_' and '-', like br_netfilter"
        ))
    }
}

fn check_options(o: &str) -> std::result::Result<(), String> {
    if o.trim().is_empty() || o.contains(['\n', '\r']) {
        return Err(format!("invalid module options {o:?}: expected one non-empty line like \"max_loop=64\""));
    }
    Ok(())
}

impl super::KindSpec for Spec {
    type Step = ModuleStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_name(self.name.get_ref()).map_err(|e| cx.err(&self.name, e))?;
        match (&self.options, self.state) {
            (Some(o), State::Absent) => Err(cx.err(o, "`options` makes no sense with state = \"absent\"")),
            (Some(o), State::Present) => check_options(o.get_ref()).map_err(|e| cx.err(o, e)),
            (None, _) => Ok(()),
        }
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<ModuleStep, ConfigError> {
        let name = self.name.get_ref().clone();
        Ok(ModuleStep {
            load_file: format!("/etc/modules-load.d/{name}.conf"),
            options_file: format!("/etc/modprobe.d/{name}.conf"),
            options: self.options.as_ref().map(|o| o.get_ref().trim().to_string()),
            name,
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct ModuleStep {
    pub name: String,
    pub options: Option<String>,
    /// `/etc/modules-load.d/NAME.conf`
    pub load_file: String,
    /// `/etc/modprobe.d/NAME.conf` (managed only when the step has `options`, or is `absent`)
    pub options_file: String,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub load_file: Option<Vec<u8>>,
    pub options_file: Option<Vec<u8>>,
    /// `/sys/module/NAME` exists or the module is built in; None under `--root` (not looked at).
    pub loaded: Option<bool>,
}

impl ModuleStep {
    fn load_content(&self) -> Vec<u8> {
        format!("# managed by bootstrap (step kernel_module:{})\n{}\n", self.name, self.name).into_bytes()
    }

    fn options_content(&self) -> Option<Vec<u8>> {
        self.options
            .as_ref()
            .map(|o| format!("# managed by bootstrap (step kernel_module:{})\noptions {} {o}\n", self.name, self.name).into_bytes())
    }

    /// The kernel shows `br-netfilter` as `/sys/module/br_netfilter`.
    fn sys_path(&self) -> String {
        format!("/sys/module/{}", self.name.replace('-', "_"))
    }

    /// Loaded now: in `/sys/module`, or built into the running kernel.
    fn loaded(&self, fs: &crate::fsutil::Root) -> Result<bool> {
        Ok(fs.exists(&self.sys_path())? || self.built_in(fs)?)
    }

    /// Listed in the running kernel's `/lib/modules/RELEASE/modules.builtin` (as `modprobe`
    /// itself reads it): a built-in module without parameters has no `/sys/module/NAME`.
    fn built_in(&self, fs: &crate::fsutil::Root) -> Result<bool> {
        let Some(release) = fs.read("/proc/sys/kernel/osrelease")? else {
            return Ok(false);
        };
        let release = String::from_utf8_lossy(&release).trim().to_string();
        if release.is_empty() || release.contains('/') || release.starts_with('.') {
            return Ok(false);
        }
        let Some(list) = fs.read(&format!("/lib/modules/{release}/modules.builtin"))? else {
            return Ok(false);
        };
        Ok(listed_built_in(&String::from_utf8_lossy(&list), &self.name))
    }
}

/// `name` is in a `modules.builtin` list (`kernel/net/bridge/br_netfilter.ko` per line; `-`
/// and `_` alike).
fn listed_built_in(list: &str, name: &str) -> bool {
    let want = name.replace('-', "_");
    list.lines()
        .filter_map(|l| l.trim().rsplit('/').next()?.strip_suffix(".ko"))
        .any(|m| m.replace('-', "_") == want)
}

fn file_change(field: &str, path: &str, have: Option<&[u8]>, want: &[u8]) -> Option<Change> {
    (have != Some(want)).then(|| Change {
        diff: Some(content_diff(path, have.unwrap_or_default(), want)),
        ..Change::new::<&str, &str>(field, None, None)
    })
}

impl Kind for ModuleStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        let fs = host.fs()?;
        let loaded = if host.is_live() && self.state == State::Present {
            Some(self.loaded(&fs)?)
        } else {
            None
        };
        Ok(Observed {
            load_file: fs.read(&self.load_file)?,
            options_file: fs.read(&self.options_file)?,
            loaded,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        match self.state {
            State::Absent => {
                if o.load_file.is_some() {
                    c.push(Change::new("load_file", Some(&self.load_file), None::<&str>));
                }
                if o.options_file.is_some() {
                    c.push(Change::new("options_file", Some(&self.options_file), None::<&str>));
                }
            }
            State::Present => {
                c.extend(file_change("load_file", &self.load_file, o.load_file.as_deref(), &self.load_content()));
                if let Some(want) = self.options_content() {
                    c.extend(file_change("options_file", &self.options_file, o.options_file.as_deref(), &want));
                }
                if o.loaded == Some(false) {
                    c.push(Change::new("loaded", Some(false), Some(true)));
                }
            }
        }
        c
    }

    fn apply(&self, host: &Host, _o: &Observed, changes: &[Change]) -> Result<()> {
        let fs = host.fs()?;
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        if self.state == State::Absent {
            // The module stays loaded until the next boot: unloading one in use is not safe.
            for (field, path) in [("load_file", &self.load_file), ("options_file", &self.options_file)] {
                if has(field) {
                    fs.parent(path, false)?.with_context(|| format!("{path} vanished"))?.remove_file()?;
                }
            }
            return Ok(());
        }
        // Options first, so that loading the module now uses them.
        if let (true, Some(opts)) = (has("options_file"), self.options_content()) {
            fs.write(&self.options_file, &opts, FILE_MODE, Some((0, 0)))?;
        }
        if has("load_file") {
            fs.write(&self.load_file, &self.load_content(), FILE_MODE, Some((0, 0)))?;
        }
        if has("loaded") {
            let argv = vec!["modprobe".to_string(), self.name.clone()];
            let out = runner::run(&Cmd {
                argv: argv.clone(),
                timeout: Some(MODPROBE_TIMEOUT),
                ..Default::default()
            })
            .with_context(|| format!("loading kernel module {}: running `{}`", self.name, argv.join(" ")))?;
            if !out.success() {
                bail!("loading kernel module {}: `{}` {}: {}", self.name, argv.join(" "), out.describe(), out.tail(5));
            }
            if !self.loaded(&fs)? {
                bail!("loading kernel module {}: modprobe succeeded but {} does not exist", self.name, self.sys_path());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(options: Option<&str>) -> ModuleStep {
        ModuleStep {
            name: "br_netfilter".into(),
            options: options.map(str::to_string),
            load_file: "/etc/modules-load.d/br_netfilter.conf".into(),
            options_file: "/etc/modprobe.d/br_netfilter.conf".into(),
            state: State::Present,
        }
    }

    #[test]
    fn plan_table() {
        let fields = |s: &ModuleStep, o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        let s = step(None);
        let o = |l: Option<Vec<u8>>, op: Option<Vec<u8>>, loaded: Option<bool>| Observed {
            load_file: l,
            options_file: op,
            loaded,
        };
        let lf = Some(s.load_content());
        assert!(fields(&s, &o(lf.clone(), None, Some(true))).is_empty());
        assert!(fields(&s, &o(lf.clone(), None, None)).is_empty(), "under --root the files alone decide");
        assert_eq!(fields(&s, &o(lf.clone(), None, Some(false))), ["loaded"]);
        assert_eq!(fields(&s, &o(None, None, Some(false))), ["load_file", "loaded"]);
        // without options an options file of the same name is left alone
        assert!(fields(&s, &o(lf.clone(), Some(b"x".to_vec()), Some(true))).is_empty());
        let with = step(Some("max=1"));
        assert_eq!(fields(&with, &o(lf.clone(), None, Some(true))), ["options_file"]);
        assert!(fields(&with, &o(lf.clone(), with.options_content(), Some(true))).is_empty());
        let p = with.plan(&o(lf.clone(), Some(b"options br_netfilter max=2\n".to_vec()), Some(true)));
        assert!(p[0].diff.as_deref().unwrap().contains("+options br_netfilter max=1"), "{p:?}");
        let mut a = step(None);
        a.state = State::Absent;
        assert!(fields(&a, &o(None, None, None)).is_empty());
        assert_eq!(fields(&a, &o(lf, Some(vec![]), None)), ["load_file", "options_file"]);
        assert!(check_name("br_netfilter").is_ok() && check_name("br-netfilter").is_ok());
        assert!(check_name("../x").is_err() && check_name("").is_err() && check_name("a b").is_err());
        assert_eq!(step(None).sys_path(), "/sys/module/br_netfilter");
    }

    #[test]
    fn built_in_modules_by_the_kernel_list() {
        let list = "kernel/fs/overlayfs/overlay.ko\nkernel/net/bridge/br_netfilter.ko\nkernel/drivers/md/dm-mod.ko\n";
        assert!(listed_built_in(list, "br_netfilter") && listed_built_in(list, "br-netfilter"));
        assert!(listed_built_in(list, "overlay") && listed_built_in(list, "dm_mod"));
        assert!(!listed_built_in(list, "bridge") && !listed_built_in(list, "netfilter") && !listed_built_in("", "overlay"));
    }
}
