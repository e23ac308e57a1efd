//! `user`: a local user, managed with useradd/usermod/userdel (`--root`, chrooted, under `--root`).
//! Supplementary groups are a minimum: listed groups are added, others are left alone.

use super::{check_account_name, read_group, read_groups, shadow_tool};
use super::{Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil;
use anyhow::Result;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    pub uid: Option<u32>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
    pub shell: Option<String>,
    pub home: Option<Spanned<String>>,
    #[serde(default)]
    pub system: bool,
    #[serde(default)]
    pub state: State,
}

impl super::KindSpec for Spec {
    type Step = UserStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_account_name(self.name.get_ref()).map_err(|e| cx.err(&self.name, e))?;
        for g in &self.groups {
            check_account_name(g.get_ref()).map_err(|e| cx.err(g, e))?;
        }
        if let Some(h) = &self.home {
            super::check_abs_path(cx, h)?;
        }
        Ok(())
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<UserStep, ConfigError> {
        Ok(UserStep {
            name: self.name.get_ref().clone(),
            uid: self.uid,
            groups: self.groups.iter().map(|g| g.get_ref().clone()).collect(),
            shell: self.shell.clone(),
            home: self.home.as_ref().map(|h| h.get_ref().clone()),
            system: self.system,
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct UserStep {
    pub name: String,
    pub uid: Option<u32>,
    pub groups: Vec<String>,
    pub shell: Option<String>,
    pub home: Option<String>,
    pub system: bool,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserEntry {
    pub uid: u32,
    pub home: String,
    pub shell: String,
    /// Supplementary groups that list the user as a member.
    pub groups: Vec<String>,
}

impl Kind for UserStep {
    type Observed = Option<UserEntry>;

    fn check(&self, host: &Host) -> Result<Option<UserEntry>> {
        if !host.fs()?.exists("/etc/passwd")? {
            return Ok(None);
        }
        let Some(f) = fsutil::read_db(&host.root, "etc/passwd")?
            .into_iter()
            .find(|f| f[0] == self.name && f.len() >= 7)
        else {
            return Ok(None);
        };
        let groups = read_groups(&host.root)?
            .into_iter()
            .filter(|(_, g)| g.members.contains(&self.name))
            .map(|(n, _)| n)
            .collect();
        Ok(Some(UserEntry {
            uid: f[2].parse().unwrap_or(u32::MAX),
            home: f[5].clone(),
            shell: f[6].clone(),
            groups,
        }))
    }

    fn plan(&self, observed: &Option<UserEntry>) -> Vec<Change> {
        let missing_groups = |have: &[String]| self.groups.iter().filter(|g| !have.contains(g)).cloned().collect::<Vec<_>>();
        match (self.state, observed) {
            (State::Absent, None) => vec![],
            (State::Absent, Some(_)) => vec![Change::new("state", Some("present"), Some("absent"))],
            (State::Present, None) => {
                let mut c = vec![Change::new("state", Some("absent"), Some("present"))];
                c.extend(self.uid.map(|u| Change::new("uid", None::<&str>, Some(u))));
                c.extend(self.shell.as_ref().map(|s| Change::new("shell", None::<&str>, Some(s))));
                c.extend(self.home.as_ref().map(|h| Change::new("home", None::<&str>, Some(h))));
                if !self.groups.is_empty() {
                    c.push(Change::new("groups", None::<&str>, Some(self.groups.join(","))));
                }
                c
            }
            (State::Present, Some(u)) => {
                let mut c = Vec::new();
                if let Some(want) = self.uid.filter(|w| *w != u.uid) {
                    c.push(Change::new("uid", Some(u.uid), Some(want)));
                }
                if let Some(want) = self.shell.as_ref().filter(|w| **w != u.shell) {
                    c.push(Change::new("shell", Some(&u.shell), Some(want)));
                }
                if let Some(want) = self.home.as_ref().filter(|w| **w != u.home) {
                    c.push(Change::new("home", Some(&u.home), Some(want)));
                }
                let add = missing_groups(&u.groups);
                if !add.is_empty() {
                    c.push(Change::new(
                        "groups",
                        Some(u.groups.join(",")),
                        Some([u.groups.clone(), add].concat().join(",")),
                    ));
                }
                c
            }
        }
    }

    fn apply(&self, host: &Host, observed: &Option<UserEntry>, changes: &[Change]) -> Result<()> {
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        let mut args: Vec<String> = Vec::new();
        let tool = match (self.state, observed) {
            (State::Absent, _) => "userdel",
            (State::Present, None) => {
                if self.system {
                    args.push("--system".into());
                }
                // The user's own group: reuse one that exists, else create it.
                if read_group(&host.root, &self.name)?.is_some() {
                    args.extend(["--gid".into(), self.name.clone()]);
                } else {
                    args.push("--user-group".into());
                }
                "useradd"
            }
            (State::Present, Some(_)) => "usermod",
        };
        if self.state == State::Present {
            if let Some(uid) = self.uid.filter(|_| has("uid")) {
                args.extend(["--uid".into(), uid.to_string()]);
            }
            if let Some(shell) = self.shell.as_ref().filter(|_| has("shell")) {
                args.extend(["--shell".into(), shell.clone()]);
            }
            if let Some(home) = self.home.as_ref().filter(|_| has("home")) {
                args.extend(["--home".into(), home.clone()]);
            }
            if has("groups") {
                if observed.is_some() {
                    args.push("--append".into());
                }
                args.extend(["--groups".into(), self.groups.join(",")]);
            }
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
        let s = UserStep {
            name: "u".into(),
            uid: None,
            groups: vec!["adm".into()],
            shell: Some("/bin/sh".into()),
            home: None,
            system: true,
            state: State::Present,
        };
        let have = |shell: &str, groups: &[&str]| {
            Some(UserEntry {
                uid: 999,
                home: "/h".into(),
                shell: shell.into(),
                groups: groups.iter().map(|s| s.to_string()).collect(),
            })
        };
        assert!(s.plan(&have("/bin/sh", &["adm", "other"])).is_empty());
        let c = s.plan(&have("/bin/bash", &["other"]));
        assert_eq!(c.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(), ["shell", "groups"]);
        assert_eq!(c[1].to.as_deref(), Some("other,adm"));
    }
}
