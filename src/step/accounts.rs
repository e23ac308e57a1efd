//! The root's account database: reading groups, valid account names, and running the
//! shadow-utils tools (shared by `user` and `group`).

use super::Host;
use crate::fsutil;
use crate::runner::{self, Cmd};
use anyhow::{bail, Result};
use std::path::Path;

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
    if !fsutil::Root::open(root)?.exists("/etc/group")? {
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

/// Run one of the shadow-utils tools against the host's account files: `--root ROOT` (the tool
/// chroots into the image before it opens a file, so a link in the image such as an absolute
/// `/etc` cannot lead it to a host path) when the root is not `/`, after giving an empty image
/// root an account database to edit.
pub fn shadow_tool(host: &Host, tool: &str, args: Vec<String>) -> Result<()> {
    let mut argv = vec![tool.to_string()];
    if !host.is_live() {
        ensure_account_db(&host.root)?;
        argv.push("--root".into());
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

/// An image root with no /etc/passwd gets one holding only root, so useradd --root works.
fn ensure_account_db(root: &Path) -> Result<()> {
    let files: [(&str, &str, u32); 4] = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n", 0o644),
        ("etc/group", "root:x:0:\n", 0o644),
        ("etc/shadow", "root:*:1::::::\n", 0o600),
        ("etc/gshadow", "root:*::\n", 0o600),
    ];
    let fs = fsutil::Root::open(root)?;
    for (rel, content, mode) in files {
        let path = format!("/{rel}");
        if !fs.exists(&path)? {
            fs.write(&path, content.as_bytes(), mode, None)?;
        }
    }
    Ok(())
}
