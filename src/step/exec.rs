//! `exec`: run a command (argv, no shell unless the role writes one) when its guard says so.
//! One of `creates`, `unless`, `onlyif` is required, so a converged node runs nothing.

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::runner::{self, Cmd};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub command: Spanned<Vec<String>>,
    pub creates: Option<Spanned<String>>,
    pub unless: Option<Spanned<Vec<String>>>,
    pub onlyif: Option<Spanned<Vec<String>>>,
    /// A duration such as "30s" or "5m".
    pub timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub cwd: Option<Spanned<String>>,
}

impl super::KindSpec for Spec {
    type Step = ExecStep;

    fn identity(&self) -> Option<String> {
        Some(self.command.get_ref().join(" "))
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        if self.command.get_ref().is_empty() || self.command.get_ref()[0].is_empty() {
            return Err(cx.err(
                &self.command,
                "`command` must be a non-empty argv list, like [\"/usr/bin/systemctl\", \"daemon-reload\"]",
            ));
        }
        for g in [&self.unless, &self.onlyif].into_iter().flatten() {
            if g.get_ref().is_empty() {
                return Err(cx.err(g, "a guard command must be a non-empty argv list"));
            }
        }
        if self.creates.is_none() && self.unless.is_none() && self.onlyif.is_none() {
            return Err(cx.err(
                &self.command,
                "an exec step needs a guard: one of `creates`, `unless` or `onlyif` (otherwise it would run on every apply)",
            ));
        }
        if let Some(c) = &self.creates {
            super::check_abs_path(cx, c)?;
        }
        if let Some(c) = &self.cwd {
            super::check_abs_path(cx, c)?;
        }
        self.parse_timeout(cx).map(|_| ())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<ExecStep, ConfigError> {
        let l = &cx.load;
        let cmd = |argv: &[String]| Cmd {
            argv: argv.to_vec(),
            env: self.env.clone(),
            cwd: Some(self.cwd.as_ref().map(|c| PathBuf::from(c.get_ref())).unwrap_or_else(|| PathBuf::from("/"))),
            timeout: None,
            root: None,
        };
        let timeout = self.parse_timeout(l)?;
        let mut command = cmd(self.command.get_ref());
        command.timeout = timeout;
        // The command sees the node (or, under --root, the image chrooted) as `/`; kept for roles
        // that name paths as "$BOOTSTRAP_ROOT/etc/...".
        command.env.insert("BOOTSTRAP_ROOT".into(), "/".into());
        Ok(ExecStep {
            command,
            creates: self.creates.as_ref().map(|c| c.get_ref().clone()),
            unless: self.unless.as_ref().map(|u| cmd(u.get_ref())),
            onlyif: self.onlyif.as_ref().map(|o| cmd(o.get_ref())),
            sensitive: false,
        })
    }
}

impl Spec {
    fn parse_timeout(&self, cx: &LoadCtx<'_>) -> Result<Option<Duration>, ConfigError> {
        self.timeout
            .as_ref()
            .map(|t| {
                humantime::parse_duration(t.get_ref()).map_err(|e| cx.err(t, format!("invalid timeout {:?}: {e} (use e.g. \"30s\", \"5m\")", t.get_ref())))
            })
            .transpose()
    }
}

#[derive(Debug, Clone)]
pub struct ExecStep {
    pub command: Cmd,
    /// A path on the node (resolved under the root by `Host::fs`).
    pub creates: Option<String>,
    pub unless: Option<Cmd>,
    pub onlyif: Option<Cmd>,
    /// Set for `sensitive` steps: argv and output stay out of errors.
    pub sensitive: bool,
}

/// What the guards found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guards {
    pub created: bool,
    /// Exit success of `unless`, when there is one.
    pub unless_ok: Option<bool>,
    pub onlyif_ok: Option<bool>,
}

impl ExecStep {
    /// Run `c` on the node: under `--root`, chrooted into the image root (its program, `cwd`
    /// and every path it names are the image's, never the host's).
    fn run(&self, c: &Cmd, host: &Host) -> Result<runner::Output> {
        if host.is_live() {
            return runner::run(c);
        }
        let mut c = c.clone();
        c.root = Some(host.root.clone());
        runner::run(&c).with_context(|| {
            format!(
                "under --root the command runs chrooted into {}: its program must exist inside that root",
                host.root.display()
            )
        })
    }

    fn guard(&self, c: &Cmd, which: &str, host: &Host) -> Result<bool> {
        let out = self.run(c, host)?;
        if out.timed_out {
            bail!("`{which}` guard {} timed out", self.show(c));
        }
        Ok(out.success())
    }

    fn show(&self, c: &Cmd) -> String {
        if self.sensitive {
            Change::REDACTED.to_string()
        } else {
            format!("{:?}", c.argv)
        }
    }
}

impl Kind for ExecStep {
    type Observed = Guards;

    fn mark_sensitive(&mut self) {
        self.sensitive = true;
    }

    fn check(&self, host: &Host) -> Result<Guards> {
        let created = match &self.creates {
            Some(p) => host.fs()?.exists(p)?,
            None => false,
        };
        // Guards are skipped once the outcome is known: `creates` is cheapest.
        let unless_ok = match (&self.unless, created) {
            (Some(u), false) => Some(self.guard(u, "unless", host)?),
            _ => None,
        };
        let onlyif_ok = match (&self.onlyif, created || unless_ok == Some(true)) {
            (Some(o), false) => Some(self.guard(o, "onlyif", host)?),
            _ => None,
        };
        Ok(Guards { created, unless_ok, onlyif_ok })
    }

    fn plan(&self, g: &Guards) -> Vec<Change> {
        let run = !g.created && g.unless_ok != Some(true) && g.onlyif_ok != Some(false);
        if run {
            vec![Change::new(
                "command",
                None::<&str>,
                Some(if self.sensitive {
                    Change::REDACTED.to_string()
                } else {
                    self.command.argv.join(" ")
                }),
            )]
        } else {
            vec![]
        }
    }

    fn apply(&self, host: &Host, _g: &Guards, _changes: &[Change]) -> Result<()> {
        let out = self.run(&self.command, host)?;
        if !out.success() {
            if self.sensitive {
                bail!("command {} {}", Change::REDACTED, out.describe());
            }
            bail!("command {} {}:\n{}", self.show(&self.command), out.describe(), out.tail(20));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = ExecStep {
            command: Cmd {
                argv: vec!["true".into()],
                ..Default::default()
            },
            creates: None,
            unless: None,
            onlyif: None,
            sensitive: false,
        };
        let g = |created, unless_ok, onlyif_ok| Guards { created, unless_ok, onlyif_ok };
        assert_eq!(s.plan(&g(false, None, None)).len(), 1);
        assert!(s.plan(&g(true, None, None)).is_empty());
        assert!(s.plan(&g(false, Some(true), None)).is_empty());
        assert_eq!(s.plan(&g(false, Some(false), Some(true))).len(), 1);
        assert!(s.plan(&g(false, Some(false), Some(false))).is_empty());
    }
}
