//! Mode, owner and group of an existing path: observed, compared with what a role wants, and
//! changed through a descriptor (shared by `file` and `directory`).

use super::{Change, Host};
use anyhow::Result;
use std::path::Path;

/// Does an actual owner (name, resolved from the uid) match a wanted one (name or number)?
pub fn same_owner(want: &str, actual_name: &str, actual_id: u32) -> bool {
    want == actual_name || want.parse::<u32>().ok() == Some(actual_id)
}

/// Changes of mode/owner/group between an existing path and what the role wants.
pub fn meta_changes(want_mode: Option<crate::fsutil::Mode>, want_owner: &Option<String>, want_group: &Option<String>, have: &Meta) -> Vec<Change> {
    let mut out = Vec::new();
    if let Some(m) = want_mode {
        if have.mode != m.0 {
            out.push(Change::new("mode", Some(crate::fsutil::Mode(have.mode)), Some(m)));
        }
    }
    if let Some(o) = want_owner {
        if !same_owner(o, &have.owner, have.uid) {
            out.push(Change::new("owner", Some(&have.owner), Some(o)));
        }
    }
    if let Some(g) = want_group {
        if !same_owner(g, &have.group, have.gid) {
            out.push(Change::new("group", Some(&have.group), Some(g)));
        }
    }
    out
}

/// Mode and ownership of an existing path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub owner: String,
    pub group: String,
}

impl Meta {
    /// Mode and owner of what `lstat` saw, with names from the root's account files.
    pub fn read(root: &Path, st: &crate::fsutil::Stat) -> Meta {
        Meta {
            mode: st.mode,
            uid: st.uid,
            gid: st.gid,
            owner: crate::fsutil::uid_name(root, st.uid),
            group: crate::fsutil::gid_name(root, st.gid),
        }
    }
}

/// Apply mode/owner/group changes to an existing file or directory in place, through a
/// descriptor of it opened without following links.
pub fn apply_meta(
    host: &Host,
    path: &crate::fsutil::Parent,
    changes: &[Change],
    mode: Option<crate::fsutil::Mode>,
    owner: &Option<String>,
    group: &Option<String>,
) -> Result<()> {
    let has = |f: &str| changes.iter().any(|c| c.field == f);
    if has("owner") || has("group") {
        let uid = match owner {
            Some(o) if has("owner") => Some(crate::fsutil::require_uid(&host.root, o)?),
            _ => None,
        };
        let gid = match group {
            Some(g) if has("group") => Some(crate::fsutil::require_gid(&host.root, g)?),
            _ => None,
        };
        path.set_meta(None, uid, gid)?;
    }
    if let (Some(m), true) = (mode, has("mode")) {
        path.set_meta(Some(m.0), None, None)?;
    }
    Ok(())
}

/// The (uid, gid) a new path should get, when the role names an owner or group.
pub fn wanted_ids(root: &Path, owner: &Option<String>, group: &Option<String>) -> Result<Option<(u32, u32)>> {
    if owner.is_none() && group.is_none() {
        return Ok(None);
    }
    let uid = match owner {
        Some(o) => crate::fsutil::require_uid(root, o)?,
        None => nix::unistd::geteuid().as_raw(),
    };
    let gid = match group {
        Some(g) => crate::fsutil::require_gid(root, g)?,
        None => nix::unistd::getegid().as_raw(),
    };
    Ok(Some((uid, gid)))
}
