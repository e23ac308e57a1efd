//! `directory`: a directory with mode, owner and group; `absent` removes it only when empty.

use super::file::describe_type;
use super::{apply_meta, check_abs_path, meta_changes, parse_mode, wanted_ids, Change, Host, Kind, LoadCtx, Meta, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil::{self, Mode};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::PathBuf;
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

impl Spec {
    pub fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_abs_path(cx, &self.path)?;
        if self.path.get_ref().trim_end_matches('/').is_empty() {
            return Err(cx.err(&self.path, "a directory step cannot manage /"));
        }
        parse_mode(cx, &self.mode).map(|_| ())
    }

    pub fn prepare(&self, cx: &PrepCtx<'_>) -> Result<DirStep, ConfigError> {
        Ok(DirStep {
            display: self.path.get_ref().clone(),
            path: fsutil::host_path(cx.root, self.path.get_ref()).map_err(|e| cx.load.err(&self.path, e))?,
            mode: parse_mode(&cx.load, &self.mode)?,
            owner: self.owner.clone(),
            group: self.group.clone(),
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct DirStep {
    pub display: String,
    pub path: PathBuf,
    pub mode: Option<Mode>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub state: State,
}

impl Kind for DirStep {
    type Observed = Option<Meta>;

    fn check(&self, host: &Host) -> Result<Option<Meta>> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.is_dir() => Ok(Some(Meta::read(&host.root, &md))),
            Ok(md) => bail!("{} exists and is {}, not a directory", self.display, describe_type(&md)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.path.display())),
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
        match (self.state, observed) {
            (State::Absent, _) => {
                std::fs::remove_dir(&self.path).with_context(|| format!("removing directory {} (only an empty directory is removed)", self.display))
            }
            (State::Present, Some(_)) => apply_meta(host, &self.path, changes, self.mode, &self.owner, &self.group),
            (State::Present, None) => {
                fsutil::create_parents(&self.path)?;
                let ids = wanted_ids(&host.root, &self.owner, &self.group)?;
                let mode = self.mode.unwrap_or(DEFAULT_MODE).0;
                // Created with no access for others, then owned and moded, so it is never
                // briefly more open than the role says.
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&self.path)
                    .with_context(|| format!("creating {}", self.path.display()))?;
                if let Some((uid, gid)) = ids {
                    std::os::unix::fs::lchown(&self.path, Some(uid), Some(gid)).with_context(|| format!("chown {}", self.path.display()))?;
                }
                std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {}", self.path.display()))?;
                fsutil::fsync_dir(self.path.parent().unwrap_or(&self.path))
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
            path: "/x/d".into(),
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
