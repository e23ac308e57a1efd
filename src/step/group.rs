//! `group`: a local group, managed with groupadd/groupmod/groupdel (`--root`, chrooted, under `--root`).

use super::{check_account_name, read_group, shadow_tool, Change, GroupEntry, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use anyhow::Result;
use serde::Deserialize;
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

#[derive(Debug, Clone)]
pub struct GroupStep {
    pub name: String,
    pub gid: Option<u32>,
    pub system: bool,
    pub state: State,
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
