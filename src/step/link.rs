//! `link`: a symbolic link, replaced atomically when its target differs.

use super::file::describe_type;
use super::{check_abs_path, Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::PathBuf;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub path: Spanned<String>,
    pub target: Option<Spanned<String>>,
    #[serde(default)]
    pub state: State,
}

impl Spec {
    pub fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_abs_path(cx, &self.path)?;
        match (&self.target, self.state) {
            (None, State::Present) => Err(cx.err(&self.path, "a link step needs `target`")),
            (Some(t), _) if t.get_ref().is_empty() => Err(cx.err(t, "`target` is empty")),
            _ => Ok(()),
        }
    }

    pub fn prepare(&self, cx: &PrepCtx<'_>) -> Result<LinkStep, ConfigError> {
        Ok(LinkStep {
            display: self.path.get_ref().clone(),
            path: fsutil::host_path(cx.root, self.path.get_ref()).map_err(|e| cx.load.err(&self.path, e))?,
            target: self.target.as_ref().map(|t| t.get_ref().clone()),
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LinkStep {
    pub display: String,
    pub path: PathBuf,
    /// Written into the link as is (a relative target stays relative).
    pub target: Option<String>,
    pub state: State,
}

impl Kind for LinkStep {
    /// The current link target, when a link exists.
    type Observed = Option<String>;

    fn check(&self, _host: &Host) -> Result<Option<String>> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.file_type().is_symlink() => Ok(Some(
                std::fs::read_link(&self.path)
                    .with_context(|| format!("reading link {}", self.display))?
                    .to_string_lossy()
                    .into_owned(),
            )),
            Ok(md) => bail!("{} exists and is {}, not a symlink; refusing to replace it", self.display, describe_type(&md)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
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

    fn apply(&self, _host: &Host, _observed: &Option<String>, _changes: &[Change]) -> Result<()> {
        let dir = self.path.parent().context("link path has no parent")?;
        match (&self.target, self.state) {
            (_, State::Absent) => std::fs::remove_file(&self.path).with_context(|| format!("removing link {}", self.display))?,
            (Some(target), State::Present) => {
                fsutil::create_parents(&self.path)?;
                let name = self.path.file_name().context("link has no name")?.to_string_lossy();
                let tmp = dir.join(format!(".{name}{}{}", fsutil::TMP_MARK, std::process::id()));
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(target, &tmp).with_context(|| format!("creating link {}", tmp.display()))?;
                std::fs::rename(&tmp, &self.path).with_context(|| format!("renaming link into {}", self.display))?;
            }
            (None, State::Present) => unreachable!("validated: present links have a target"),
        }
        fsutil::fsync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = LinkStep {
            display: "/l".into(),
            path: "/x/l".into(),
            target: Some("/t".into()),
            state: State::Present,
        };
        assert!(s.plan(&Some("/t".into())).is_empty());
        assert_eq!(s.plan(&Some("/u".into()))[0].from.as_deref(), Some("/u"));
        assert_eq!(s.plan(&None).len(), 1);
    }
}
