//! `sysctl`: a kernel parameter, persisted in its own file under `/etc/sysctl.d/` and set now.
//!
//! The file of `net.ipv4.ip_forward` is `/etc/sysctl.d/90-bootstrap-net.ipv4.ip_forward.conf`
//! (one file per parameter, so a step owns its file whole; `90-` sorts after the
//! distribution's files, so the role's value wins at boot). The live value is read from and
//! written to `/proc/sys/net/ipv4/ip_forward`, on the running system only: under `--root` only
//! the file is managed.

use super::{content_diff, Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    pub value: Option<Spanned<Value>>,
    #[serde(default)]
    pub state: State,
}

/// A value as the role writes it: `value = 1` or `value = "4096 87380 6291456"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Int(i64),
    Text(String),
}

impl Value {
    fn text(&self) -> String {
        match self {
            Value::Int(i) => i.to_string(),
            Value::Text(s) => s.clone(),
        }
    }
}

/// Where the parameters are persisted.
pub const DIR: &str = "/etc/sysctl.d";
/// Mode of the persisted file.
const FILE_MODE: u32 = 0o644;

/// `net.ipv4.ip_forward`: dot-separated parts of letters, digits, `_` and `-`.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid sysctl name {name:?}: expected dot-separated parts of letters, digits, '_' and '-', like net.ipv4.ip_forward"
        ))
    }
}

/// A value fits on one `name = value` line.
fn check_value(v: &str) -> std::result::Result<(), String> {
    if v.trim().is_empty() || v.contains(['\n', '\r']) {
        return Err(format!("invalid sysctl value {v:?}: expected one non-empty line"));
    }
    Ok(())
}

/// The file a parameter is persisted in.
pub fn file_for(name: &str) -> String {
    format!("{DIR}/90-bootstrap-{name}.conf")
}

/// The parameter's live file (`net.ipv4.ip_forward` → `/proc/sys/net/ipv4/ip_forward`).
pub fn proc_path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

/// Values compare by their words: the kernel separates the numbers of a vector value with
/// tabs (`4096\t87380\t6291456`), a role with spaces.
fn normalize(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

impl super::KindSpec for Spec {
    type Step = SysctlStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_name(self.name.get_ref()).map_err(|e| cx.err(&self.name, e))?;
        match (&self.value, self.state) {
            (None, State::Present) => Err(cx.err(&self.name, "a sysctl step with state = \"present\" needs `value`")),
            (Some(v), State::Absent) => Err(cx.err(v, "`value` makes no sense with state = \"absent\"")),
            (Some(v), State::Present) => check_value(&v.get_ref().text()).map_err(|e| cx.err(v, e)),
            (None, State::Absent) => Ok(()),
        }
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<SysctlStep, ConfigError> {
        let name = self.name.get_ref().clone();
        Ok(SysctlStep {
            file: file_for(&name),
            value: self.value.as_ref().map(|v| normalize(&v.get_ref().text())),
            name,
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct SysctlStep {
    pub name: String,
    /// Normalized (words separated by one space); None with `absent`.
    pub value: Option<String>,
    /// The persisted file's path.
    pub file: String,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// The persisted file's content, when it exists.
    pub file: Option<Vec<u8>>,
    pub live: Live,
}

/// The live value, read on the running system only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// Under `--root`, or with `absent`.
    NotRead,
    /// No such parameter now (its module is not loaded yet, say): apply fails unless an
    /// earlier step of the run makes it appear.
    Missing,
    /// Normalized.
    Value(String),
}

impl SysctlStep {
    fn content(&self) -> Vec<u8> {
        format!(
            "# managed by bootstrap (step sysctl:{})\n{} = {}\n",
            self.name,
            self.name,
            self.value.as_deref().unwrap_or_default()
        )
        .into_bytes()
    }
}

impl Kind for SysctlStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        let fs = host.fs()?;
        let file = fs.read(&self.file)?;
        let live = if host.is_live() && self.state == State::Present {
            match fs.read(&proc_path(&self.name))? {
                Some(v) => Live::Value(normalize(&String::from_utf8_lossy(&v))),
                None => Live::Missing,
            }
        } else {
            Live::NotRead
        };
        Ok(Observed { file, live })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        match self.state {
            State::Absent => {
                if o.file.is_some() {
                    c.push(Change::new("file", Some(&self.file), None::<&str>));
                }
            }
            State::Present => {
                let want = self.content();
                if o.file.as_deref() != Some(want.as_slice()) {
                    c.push(Change {
                        diff: Some(content_diff(&self.file, o.file.as_deref().unwrap_or_default(), &want)),
                        ..Change::new::<&str, &str>("content", None, None)
                    });
                }
                match &o.live {
                    Live::NotRead => {}
                    Live::Missing => c.push(Change::new("value", Some("(no such parameter)"), self.value.as_ref())),
                    Live::Value(live) if Some(live) != self.value.as_ref() => c.push(Change::new("value", Some(live), self.value.as_ref())),
                    Live::Value(_) => {}
                }
            }
        }
        c
    }

    fn apply(&self, host: &Host, _o: &Observed, changes: &[Change]) -> Result<()> {
        let fs = host.fs()?;
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        if self.state == State::Absent {
            // The live value stays as it is until the next boot (the kernel's default then).
            return fs.parent(&self.file, false)?.with_context(|| format!("{} vanished", self.file))?.remove_file();
        }
        if has("value") {
            let p = proc_path(&self.name);
            let missing = || {
                format!(
                    "no such kernel parameter {} ({p} does not exist; is the module that provides it loaded?)",
                    self.name
                )
            };
            let at = fs.parent(&p, false)?.with_context(missing)?;
            let mut f = at.open(rustix::fs::OFlags::WRONLY)?.with_context(missing)?;
            let v = self.value.as_deref().unwrap_or_default();
            std::io::Write::write_all(&mut f, format!("{v}\n").as_bytes()).with_context(|| format!("setting {} = {v} (writing {p})", self.name))?;
            drop(f);
            let now = fs.read(&p)?.map(|b| normalize(&String::from_utf8_lossy(&b)));
            if now.as_deref() != Some(v) {
                bail!("setting {} = {v}: the kernel kept {}", self.name, now.unwrap_or_default());
            }
        }
        // The file last: a value the kernel refuses is not persisted for the next boot.
        if has("content") {
            fs.write(&self.file, &self.content(), FILE_MODE, Some((0, 0)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(v: &str) -> SysctlStep {
        SysctlStep {
            name: "net.ipv4.ip_forward".into(),
            value: Some(v.into()),
            file: file_for("net.ipv4.ip_forward"),
            state: State::Present,
        }
    }

    #[test]
    fn names_values_and_paths() {
        assert!(check_name("net.ipv4.ip_forward").is_ok());
        assert!(check_name("net.ipv4.conf.all-x.rp_filter").is_ok());
        for bad in ["", "net..x", "net/ipv4", ".x", "a b", "../etc"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(check_value("").is_err() && check_value("1\n2").is_err() && check_value("1 2").is_ok());
        assert_eq!(proc_path("net.ipv4.ip_forward"), "/proc/sys/net/ipv4/ip_forward");
        assert_eq!(file_for("vm.swappiness"), "/etc/sysctl.d/90-bootstrap-vm.swappiness.conf");
        assert_eq!(normalize("4096\t87380  6291456\n"), "4096 87380 6291456");
    }

    #[test]
    fn plan_table() {
        let s = step("1");
        let fields = |s: &SysctlStep, o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        let file = Some(s.content());
        let o = |file: Option<Vec<u8>>, live: Option<&str>| Observed {
            file,
            live: live.map(|l| Live::Value(l.to_string())).unwrap_or(Live::NotRead),
        };
        // in sync: the file and the live value
        assert!(fields(&s, &o(file.clone(), Some("1"))).is_empty());
        // under --root there is no live value: the file alone decides
        assert!(fields(&s, &o(file.clone(), None)).is_empty());
        assert_eq!(fields(&s, &o(file.clone(), Some("0"))), ["value"]);
        assert_eq!(fields(&s, &o(None, Some("1"))), ["content"]);
        assert_eq!(fields(&s, &o(Some(b"net.ipv4.ip_forward = 0\n".to_vec()), Some("0"))), ["content", "value"]);
        let p = s.plan(&o(None, Some("0")));
        assert_eq!((p[1].from.as_deref(), p[1].to.as_deref()), (Some("0"), Some("1")));
        assert!(p[0].diff.as_deref().unwrap().contains("+net.ipv4.ip_forward = 1"), "{:?}", p[0].diff);
        // a parameter that appears only once its module is loaded (apply fails if it has not)
        let missing = Observed {
            file: file.clone(),
            live: Live::Missing,
        };
        assert_eq!(s.plan(&missing)[0].from.as_deref(), Some("(no such parameter)"));
        // a vector value compares by its words
        let v = step("4096 87380 6291456");
        assert!(fields(&v, &o(Some(v.content()), Some("4096 87380 6291456"))).is_empty());
        // absent: only the file
        let mut a = step("1");
        a.state = State::Absent;
        a.value = None;
        assert!(fields(&a, &o(None, None)).is_empty());
        assert_eq!(fields(&a, &o(file, None)), ["file"]);
    }
}
