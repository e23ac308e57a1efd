//! `directory`: a directory with mode, owner and group; `absent` removes it only when empty.

use super::{apply_meta, check_abs_path, meta_changes, parse_mode, wanted_ids, Change, Host, Kind, LoadCtx, Meta, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil::{self, Mode};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub path: Spanned<String>,
    pub mode: Option<Spanned<String>>,
    pub owner: Option<String>,
    pub group: Option<String>,
    #[serde(default)]
    pub state: State,
}

const DEFAULT_MODE: Mode = Mode(0o755);

impl super::KindSpec for Spec {
    type Step = DirStep;

    fn identity(&self) -> Option<String> {
        Some(self.path.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_abs_path(cx, &self.path)?;
        if self.path.get_ref().trim_end_matches('/').is_empty() {
            return Err(cx.err(&self.path, "a directory step cannot manage /"));
        }
        parse_mode(cx, &self.mode).map(|_| ())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<DirStep, ConfigError> {
        Ok(DirStep {
            display: self.path.get_ref().clone(),
            mode: parse_mode(&cx.load, &self.mode)?,
            owner: self.owner.clone(),
            group: self.group.clone(),
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DirStep {
    /// The path as the role names it.
    pub display: String,
    pub mode: Option<Mode>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub state: State,
}

impl Kind for DirStep {
    type Observed = Option<Meta>;

    fn check(&self, host: &Host) -> Result<Option<Meta>> {
        match host.fs()?.lstat(&self.display)? {
            Some(st) if st.kind == fsutil::FileKind::Dir => Ok(Some(Meta::read(&host.root, &st))),
            Some(st) => bail!("{} exists and is {}, not a directory", self.display, st.kind.describe()),
            None => Ok(None),
        }
    }

    fn plan(&self, observed: &Option<Meta>) -> Vec<Change> {
        match (self.state, observed) {
            (State::Absent, None) => vec![],
            (State::Absent, Some(_)) => vec![Change::new("state", Some("present"), Some("absent"))],
            (State::Present, None) => {
                let mut c = vec![Change::new("state", Some("absent"), Some("present"))];
                c.push(Change::new("mode", None::<&str>, Some(self.mode.unwrap_or(DEFAULT_MODE))));
                c.extend(self.owner.iter().map(|o| Change::new("owner", None::<&str>, Some(o))));
                c.extend(self.group.iter().map(|g| Change::new("group", None::<&str>, Some(g))));
                c
            }
            (State::Present, Some(meta)) => meta_changes(self.mode, &self.owner, &self.group, meta),
        }
    }

    fn apply(&self, host: &Host, observed: &Option<Meta>, changes: &[Change]) -> Result<()> {
        let at = host
            .owned_fs()?
            .parent(&self.display, self.state == State::Present)?
            .with_context(|| format!("{} vanished", self.display))?;
        match (self.state, observed) {
            (State::Absent, _) => at.remove_dir(),
            (State::Present, Some(_)) => apply_meta(host, &at, changes, self.mode, &self.owner, &self.group),
            (State::Present, None) => {
                let ids = wanted_ids(&host.root, &self.owner, &self.group)?;
                // Created with no access for others, then owned and moded, so it is never
                // briefly more open than the role says.
                at.mkdir(self.mode.unwrap_or(DEFAULT_MODE).0, ids)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = DirStep {
            display: "/d".into(),
            mode: Some(Mode(0o750)),
            owner: None,
            group: Some("adm".into()),
            state: State::Present,
        };
        let m = |mode, group: &str, gid| {
            Some(Meta {
                mode,
                uid: 0,
                gid,
                owner: "root".into(),
                group: group.into(),
            })
        };
        assert!(s.plan(&m(0o750, "adm", 4)).is_empty());
        let fields: Vec<_> = s.plan(&m(0o755, "root", 0)).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["mode", "group"]);
        assert_eq!(s.plan(&None).len(), 3);
    }
}
