//! `hostname`: the node's hostname from a template (`{{ facts.name }}-{{ facts.instance_id }}`),
//! set through systemd-hostnamed over D-Bus (static: hostnamed writes /etc/hostname; and
//! transient: the kernel's). Under `--root` only `/etc/hostname` is managed.

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::systemd::Hostnames;
use anyhow::Result;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// A template.
    pub name: Spanned<String>,
}

pub const ETC_HOSTNAME: &str = "/etc/hostname";
/// The kernel's limit (HOST_NAME_MAX).
const MAX_LEN: usize = 64;

/// A hostname hostnamed and DNS both accept: dot-separated labels of letters, digits and `-`,
/// no label starting or ending with `-`, at most 64 characters.
pub fn check_hostname(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_LEN
        && name
            .split('.')
            .all(|l| !l.is_empty() && l.len() <= 63 && !l.starts_with('-') && !l.ends_with('-') && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid hostname {name:?}: expected at most {MAX_LEN} characters of dot-separated labels of letters, digits and '-' (not at a label's start or end)"
        ))
    }
}

impl super::KindSpec for Spec {
    type Step = HostnameStep;

    fn identity(&self) -> Option<String> {
        None
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        use crate::template::{check_syntax, Origin};
        let n = self.name.get_ref();
        check_syntax(cx.env, &Origin::Inline(cx.pos(&self.name)), n)?;
        // A literal name can be checked now; a template once it is rendered.
        if !n.contains("{{") && !n.contains("{%") {
            check_hostname(n).map_err(|e| cx.err(&self.name, e))?;
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<HostnameStep, ConfigError> {
        let l = &cx.load;
        let name = crate::template::render(l.env, &crate::template::Origin::Inline(l.pos(&self.name)), self.name.get_ref(), cx.vars)?;
        let name = name.trim().to_string();
        check_hostname(&name).map_err(|e| l.err(&self.name, e))?;
        Ok(HostnameStep { name })
    }
}

#[derive(Debug, Clone)]
pub struct HostnameStep {
    /// Rendered and checked.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    /// On the running system, from hostnamed.
    Live(Hostnames),
    /// Under `--root`: the first line of the image's /etc/hostname (None: no file).
    File(Option<String>),
}

impl Kind for HostnameStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        if host.is_live() {
            return Ok(Observed::Live(host.systemd.hostnames()?));
        }
        let content = host.fs()?.read(ETC_HOSTNAME)?;
        Ok(Observed::File(
            content.map(|b| String::from_utf8_lossy(&b).lines().next().unwrap_or_default().trim().to_string()),
        ))
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        match o {
            Observed::Live(h) => {
                if h.static_name != self.name {
                    c.push(Change::new("static", Some(&h.static_name), Some(&self.name)));
                }
                if h.transient != self.name {
                    c.push(Change::new("transient", Some(&h.transient), Some(&self.name)));
                }
            }
            Observed::File(have) => {
                if have.as_deref() != Some(self.name.as_str()) {
                    c.push(Change::new("static", have.as_ref(), Some(&self.name)));
                }
            }
        }
        c
    }

    fn apply(&self, host: &Host, o: &Observed, _changes: &[Change]) -> Result<()> {
        match o {
            Observed::Live(_) => host.systemd.set_hostname(&self.name),
            Observed::File(_) => host.fs()?.write(ETC_HOSTNAME, format!("{}\n", self.name).as_bytes(), 0o644, Some((0, 0))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = HostnameStep {
            name: "production-web-i-0abc".into(),
        };
        let live = |st: &str, tr: &str| {
            Observed::Live(Hostnames {
                static_name: st.into(),
                transient: tr.into(),
            })
        };
        let fields = |o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        assert!(fields(&live("production-web-i-0abc", "production-web-i-0abc")).is_empty());
        assert_eq!(fields(&live("", "localhost")), ["static", "transient"]);
        assert_eq!(fields(&live("production-web-i-0abc", "ip-10-0-0-1")), ["transient"]);
        let p = s.plan(&live("old", "production-web-i-0abc"));
        assert_eq!(
            (p[0].field.as_str(), p[0].from.as_deref(), p[0].to.as_deref()),
            ("static", Some("old"), Some("production-web-i-0abc"))
        );
        assert!(fields(&Observed::File(Some("production-web-i-0abc".into()))).is_empty());
        assert_eq!(fields(&Observed::File(None)), ["static"]);
    }

    #[test]
    fn hostnames() {
        for ok in ["a", "web-1", "production-web-i-0abc", "node.example.com", "a".repeat(63).as_str()] {
            assert!(check_hostname(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", "ä", "a".repeat(65).as_str(), ".a"] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }
}
