//! `group`: a local group, managed with groupadd/groupmod/groupdel (`--prefix` under `--root`).

use super::{Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil;
use crate::runner::{self, Cmd};
use anyhow::{bail, Result};
use serde::Deserialize;
use std::path::Path;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    pub gid: Option<u32>,
    #[serde(default)]
    pub system: bool,
    #[serde(default)]
    pub state: State,
}

impl super::KindSpec for Spec {
    type Step = GroupStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_account_name(self.name.get_ref()).map_err(|e| cx.err(&self.name, e))
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<GroupStep, ConfigError> {
        Ok(GroupStep {
            name: self.name.get_ref().clone(),
            gid: self.gid,
            system: self.system,
            state: self.state,
        })
    }
}

/// Names useradd/groupadd accept portably.
pub fn check_account_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid account name {name:?}: use lowercase letters, digits, '_' and '-', starting with a letter or '_'"
        ))
    }
}

#[derive(Debug, Clone)]
pub struct GroupStep {
    pub name: String,
    pub gid: Option<u32>,
    pub system: bool,
    pub state: State,
}

/// A group as the root's /etc/group has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupEntry {
    pub gid: u32,
    pub members: Vec<String>,
}

pub fn read_group(root: &Path, name: &str) -> Result<Option<GroupEntry>> {
    Ok(read_groups(root)?.into_iter().find(|(n, _)| n == name).map(|(_, g)| g))
}

pub fn read_groups(root: &Path) -> Result<Vec<(String, GroupEntry)>> {
    if !root.join("etc/group").exists() {
        return Ok(vec![]);
    }
    Ok(fsutil::read_db(root, "etc/group")?
        .into_iter()
        .filter(|f| f.len() >= 3)
        .map(|f| {
            let members = f
                .get(3)
                .map(|m| m.split(',').filter(|s| !s.is_empty()).map(str::to_string).collect())
                .unwrap_or_default();
            (
                f[0].clone(),
                GroupEntry {
                    gid: f[2].parse().unwrap_or(u32::MAX),
                    members,
                },
            )
        })
        .collect())
}

/// Run one of the shadow-utils tools against the host's account files: `--prefix ROOT` when
/// the root is not `/`, after giving an empty image root an account database to edit.
pub fn shadow_tool(host: &Host, tool: &str, args: Vec<String>) -> Result<()> {
    let mut argv = vec![tool.to_string()];
    if !host.is_live() {
        ensure_account_db(&host.root)?;
        argv.push("--prefix".into());
        argv.push(host.root.to_string_lossy().into_owned());
    }
    argv.extend(args);
    let out = runner::run(&Cmd {
        argv: argv.clone(),
        timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    })?;
    if !out.success() {
        bail!("`{}` {}: {}", argv.join(" "), out.describe(), out.tail(5));
    }
    Ok(())
}

/// An image root with no /etc/passwd gets one holding only root, so useradd --prefix works.
fn ensure_account_db(root: &Path) -> Result<()> {
    let files: [(&str, &str, u32); 4] = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
        ("etc/group", "root:x:0:\n", 0o644),
        ("etc/shadow", "root:*:1::::::\n", 0o600),
        ("etc/gshadow", "root:*::\n", 0o600),
    ];
    for (rel, content, mode) in files {
        let p = root.join(rel);
        if !p.exists() {
            fsutil::create_parents(&p)?;
            fsutil::atomic_write(&p, content.as_bytes(), mode, None)?;
        }
    }
    Ok(())
}

impl Kind for GroupStep {
    type Observed = Option<GroupEntry>;

    fn check(&self, host: &Host) -> Result<Option<GroupEntry>> {
        read_group(&host.root, &self.name)
    }

    fn plan(&self, observed: &Option<GroupEntry>) -> Vec<Change> {
        match (self.state, observed) {
            (State::Absent, None) => vec![],
            (State::Absent, Some(_)) => vec![Change::new("state", Some("present"), Some("absent"))],
            (State::Present, None) => {
                let mut c = vec![Change::new("state", Some("absent"), Some("present"))];
                c.extend(self.gid.map(|g| Change::new("gid", None::<&str>, Some(g))));
                c
            }
            (State::Present, Some(g)) => match self.gid {
                Some(want) if want != g.gid => vec![Change::new("gid", Some(g.gid), Some(want))],
                _ => vec![],
            },
        }
    }

    fn apply(&self, host: &Host, observed: &Option<GroupEntry>, _changes: &[Change]) -> Result<()> {
        let mut args = Vec::new();
        let tool = match (self.state, observed) {
            (State::Absent, _) => "groupdel",
            (State::Present, None) => {
                if self.system {
                    args.push("--system".into());
                }
                "groupadd"
            }
            (State::Present, Some(_)) => "groupmod",
        };
        if let (State::Present, Some(gid)) = (self.state, self.gid) {
            args.extend(["--gid".to_string(), gid.to_string()]);
        }
        args.push(self.name.clone());
        shadow_tool(host, tool, args)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        let s = GroupStep {
            name: "g".into(),
            gid: Some(500),
            system: false,
            state: State::Present,
        };
        assert!(s.plan(&Some(GroupEntry { gid: 500, members: vec![] })).is_empty());
        assert_eq!(s.plan(&Some(GroupEntry { gid: 501, members: vec![] }))[0].field, "gid");
        assert_eq!(s.plan(&None).len(), 2);
        assert!(check_account_name("haproxy").is_ok());
        assert!(check_account_name("Bad").is_err() && check_account_name("1x").is_err() && check_account_name("a:b").is_err());
    }
}
