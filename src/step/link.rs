//! `link`: a symbolic link, replaced atomically when its target differs.

use super::{check_abs_path, Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub path: Spanned<String>,
    pub target: Option<Spanned<String>>,
    #[serde(default)]
    pub state: State,
}

impl super::KindSpec for Spec {
    type Step = LinkStep;

    fn identity(&self) -> Option<String> {
        Some(self.path.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_abs_path(cx, &self.path)?;
        match (&self.target, self.state) {
            (None, State::Present) => Err(cx.err(&self.path, "a link step needs `target`")),
            (Some(t), _) if t.get_ref().is_empty() => Err(cx.err(t, "`target` is empty")),
            _ => Ok(()),
        }
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<LinkStep, ConfigError> {
        Ok(LinkStep {
            display: self.path.get_ref().clone(),
            target: self.target.as_ref().map(|t| t.get_ref().clone()),
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LinkStep {
    /// The path as the role names it.
    pub display: String,
    /// Written into the link as is (a relative target stays relative).
    pub target: Option<String>,
    pub state: State,
}

impl Kind for LinkStep {
    /// The current link target, when a link exists.
    type Observed = Option<String>;

    fn check(&self, host: &Host) -> Result<Option<String>> {
        let fs = host.fs()?;
        match fs.lstat(&self.display)? {
            Some(st) if st.kind == fsutil::FileKind::Symlink => fs.read_link(&self.display),
            Some(st) => bail!("{} exists and is {}, not a symlink; refusing to replace it", self.display, st.kind.describe()),
            None => Ok(None),
        }
    }

    fn plan(&self, observed: &Option<String>) -> Vec<Change> {
        match (self.state, observed) {
            (State::Absent, None) => vec![],
            (State::Absent, Some(t)) => vec![Change::new("target", Some(t), None::<&str>)],
            (State::Present, have) if have.as_deref() == self.target.as_deref() => vec![],
            (State::Present, have) => vec![Change::new("target", have.as_ref(), self.target.as_ref())],
        }
    }

    fn apply(&self, host: &Host, _observed: &Option<String>, _changes: &[Change]) -> Result<()> {
        let at = host
            .owned_fs()?
            .parent(&self.display, self.state == State::Present)?
            .with_context(|| format!("{} vanished", self.display))?;
        match (&self.target, self.state) {
            (_, State::Absent) => at.remove_file(),
            (Some(target), State::Present) => at.symlink(target),
            (None, State::Present) => bail!("link {} has no target", self.display),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = LinkStep {
            display: "/l".into(),
            target: Some("/t".into()),
            state: State::Present,
        };
        assert!(s.plan(&Some("/t".into())).is_empty());
        assert_eq!(s.plan(&Some("/u".into()))[0].from.as_deref(), Some("/u"));
        assert_eq!(s.plan(&None).len(), 1);
    }
}
