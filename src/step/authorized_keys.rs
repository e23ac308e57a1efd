//! `authorized_keys`: ssh public keys of a user, in `~USER/.ssh/authorized_keys` (the home
//! directory from the root's /etc/passwd). The directory is 0700 and the file 0600, both owned
//! by the user. The step's keys are kept; other keys stay unless `exclusive`.

use super::{check_account_name, content_diff, Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::fsutil::{self, Stat};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub user: Spanned<String>,
    pub keys: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub exclusive: bool,
}

const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// The key types sshd accepts (`ssh -Q key`).
const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ssh-dss",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-ed25519-cert-v01@openssh.com",
    "ssh-rsa-cert-v01@openssh.com",
    "ecdsa-sha2-nistp256-cert-v01@openssh.com",
    "ecdsa-sha2-nistp384-cert-v01@openssh.com",
    "ecdsa-sha2-nistp521-cert-v01@openssh.com",
    "sk-ssh-ed25519-cert-v01@openssh.com",
    "sk-ecdsa-sha2-nistp256-cert-v01@openssh.com",
];

/// The key material of an authorized_keys line (`type blob`), found after any options
/// (`from="10.0.0.0/8",no-pty ssh-ed25519 AAAA… comment`); None for comments, blank lines and
/// lines that hold no key.
pub fn key_of(line: &str) -> Option<(&str, &str)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    // Options may hold quoted spaces: look for the first `TYPE BLOB` pair of words.
    let words: Vec<&str> = line.split_whitespace().collect();
    words.windows(2).find_map(|w| {
        let blob_ok = w[1].len() >= 16 && w[1].chars().all(|c| c.is_ascii_alphanumeric() || "+/=".contains(c));
        (KEY_TYPES.contains(&w[0]) && blob_ok).then_some((w[0], w[1]))
    })
}

fn check_key(k: &str) -> std::result::Result<(), String> {
    if k.contains(['\n', '\r']) {
        return Err("a key must be one line".into());
    }
    if key_of(k).is_none() {
        let shown: String = k.chars().take(40).collect();
        return Err(format!(
            "not an ssh public key: {shown:?}: expected `[options] TYPE BASE64 [comment]` with TYPE one of ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256, …"
        ));
    }
    Ok(())
}

impl super::KindSpec for Spec {
    type Step = KeysStep;

    fn identity(&self) -> Option<String> {
        Some(self.user.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_account_name(self.user.get_ref()).map_err(|e| cx.err(&self.user, e))?;
        if self.keys.get_ref().is_empty() && !self.exclusive {
            return Err(cx.err(&self.keys, "`keys` is empty (an empty list with `exclusive = true` removes every key)"));
        }
        let mut seen = std::collections::BTreeSet::new();
        for k in self.keys.get_ref() {
            check_key(k.get_ref()).map_err(|e| cx.err(k, e))?;
            if !seen.insert(key_of(k.get_ref()).map(|(_, b)| b.to_string())) {
                return Err(cx.err(k, "this key is listed twice"));
            }
        }
        Ok(())
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<KeysStep, ConfigError> {
        Ok(KeysStep {
            user: self.user.get_ref().clone(),
            keys: self.keys.get_ref().iter().map(|k| k.get_ref().trim().to_string()).collect(),
            exclusive: self.exclusive,
        })
    }
}

#[derive(Debug, Clone)]
pub struct KeysStep {
    pub user: String,
    /// Whole lines, as the role gives them.
    pub keys: Vec<String>,
    pub exclusive: bool,
}

/// What is on the host for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// `~USER/.ssh`
    pub dir_path: String,
    /// `~USER/.ssh/authorized_keys`
    pub file_path: String,
    pub uid: u32,
    pub gid: u32,
    pub dir: Option<Stat>,
    /// The file's content and what lstat saw.
    pub file: Option<(Vec<u8>, Stat)>,
    /// The file has other names (hard links) in a directory its user controls: it may be a
    /// file of root's linked there, so it is not read, only replaced.
    pub linked: bool,
}

impl KeysStep {
    /// The file's wanted content (pure): exclusive, the keys alone; otherwise every line that
    /// is not one of the keys (by type and blob) is kept in place, a line holding one of the
    /// keys becomes the role's line (options and comment included), and missing keys are
    /// appended in the role's order.
    pub fn merge(&self, old: &str) -> String {
        let wanted: Vec<(&str, (&str, &str))> = self.keys.iter().map(|k| (k.as_str(), key_of(k).expect("validated"))).collect();
        let mut out = String::new();
        let mut placed = vec![false; wanted.len()];
        if !self.exclusive {
            for line in old.lines() {
                match key_of(line).and_then(|k| wanted.iter().position(|(_, w)| *w == k)) {
                    Some(i) if !placed[i] => {
                        out.push_str(wanted[i].0);
                        out.push('\n');
                        placed[i] = true;
                    }
                    Some(_) => {} // the same key again
                    None => {
                        out.push_str(line);
                        out.push('\n');
                    }
                }
            }
        }
        for (i, (line, _)) in wanted.iter().enumerate() {
            if !placed[i] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Kind for KeysStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        let entry = fsutil::read_db(&host.root, "etc/passwd")?
            .into_iter()
            .find(|f| f[0] == self.user && f.len() >= 6)
            .with_context(|| format!("user {:?} does not exist in /etc/passwd", self.user))?;
        let (uid, gid) = (
            entry[2]
                .parse::<u32>()
                .with_context(|| format!("user {:?}: bad uid {:?} in /etc/passwd", self.user, entry[2]))?,
            entry[3]
                .parse::<u32>()
                .with_context(|| format!("user {:?}: bad gid {:?} in /etc/passwd", self.user, entry[3]))?,
        );
        let home = entry[5].trim_end_matches('/');
        if !home.starts_with('/') || home.is_empty() {
            bail!("user {:?} has no usable home directory ({:?}) in /etc/passwd", self.user, entry[5]);
        }
        let fs = host.fs()?;
        match fs.lstat(home)? {
            Some(st) if st.kind == fsutil::FileKind::Dir => {}
            Some(st) => bail!("home {home} of user {:?} is {}, not a directory", self.user, st.kind.describe()),
            None => bail!("home {home} of user {:?} does not exist (create it with a directory step)", self.user),
        }
        let dir_path = format!("{home}/.ssh");
        let file_path = format!("{dir_path}/authorized_keys");
        let dir = fs.lstat(&dir_path)?;
        if let Some(st) = dir.filter(|st| st.kind != fsutil::FileKind::Dir) {
            bail!("{dir_path} is {}, not a directory; refusing to replace it", st.kind.describe());
        }
        let mut linked = false;
        let file = match dir {
            None => None,
            Some(_) => {
                let at = fs.parent(&file_path, false)?.with_context(|| format!("{dir_path} vanished"))?;
                let shared = at.dir_stat.uid != 0 || at.dir_stat.mode & 0o022 != 0;
                match at.lstat()? {
                    None => None,
                    Some(st) if st.kind == fsutil::FileKind::File && st.nlink > 1 && shared => {
                        linked = true;
                        Some((Vec::new(), st))
                    }
                    Some(st) if st.kind == fsutil::FileKind::File => Some((at.read()?.with_context(|| format!("{file_path} vanished while it was read"))?, st)),
                    Some(st) => bail!("{file_path} is {}, not a regular file; refusing to replace it", st.kind.describe()),
                }
            }
        };
        Ok(Observed {
            dir_path,
            file_path,
            uid,
            gid,
            dir,
            file,
            linked,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        let ids = |st: &Stat| format!("{}:{}", st.uid, st.gid);
        let want_ids = format!("{}:{}", o.uid, o.gid);
        match &o.dir {
            None => c.push(Change::new("directory", None::<&str>, Some(&o.dir_path))),
            Some(st) => {
                if st.mode != DIR_MODE {
                    c.push(Change::new("directory_mode", Some(fsutil::Mode(st.mode)), Some(fsutil::Mode(DIR_MODE))));
                }
                if ids(st) != want_ids {
                    c.push(Change::new("directory_owner", Some(ids(st)), Some(&want_ids)));
                }
            }
        }
        let old = o.file.as_ref().map(|(b, _)| b.as_slice()).unwrap_or_default();
        let new = self.merge(&String::from_utf8_lossy(old));
        if o.linked {
            let n = o.file.as_ref().map(|(_, st)| st.nlink).unwrap_or_default();
            c.push(Change {
                diff: Some(format!("{} has {n} hard links: not read, replaced by a file of its own\n", o.file_path)),
                ..Change::new::<&str, &str>("content", None, None)
            });
        } else if o.file.is_none() || new.as_bytes() != old {
            c.push(Change {
                diff: Some(content_diff(&o.file_path, old, new.as_bytes())),
                ..Change::new::<&str, &str>("content", None, None)
            });
        }
        match &o.file {
            None => {
                c.push(Change::new("mode", None::<&str>, Some(fsutil::Mode(FILE_MODE))));
                c.push(Change::new("owner", None::<&str>, Some(&want_ids)));
            }
            Some((_, st)) => {
                if st.mode != FILE_MODE {
                    c.push(Change::new("mode", Some(fsutil::Mode(st.mode)), Some(fsutil::Mode(FILE_MODE))));
                }
                if ids(st) != want_ids {
                    c.push(Change::new("owner", Some(ids(st)), Some(&want_ids)));
                }
            }
        }
        c
    }

    fn apply(&self, host: &Host, o: &Observed, changes: &[Change]) -> Result<()> {
        let fs = host.fs()?;
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        let owner = Some((o.uid, o.gid));
        let dir = fs.parent(&o.dir_path, false)?.with_context(|| format!("the home of {} vanished", self.user))?;
        if has("directory") {
            dir.mkdir(DIR_MODE, owner)?;
        } else if has("directory_mode") || has("directory_owner") {
            dir.set_meta(Some(DIR_MODE), Some(o.uid), Some(o.gid))?;
        }
        // A wrong mode or owner is fixed by writing a new file too, never by chown/chmod of the
        // one found: in a directory its user controls, that could be a hard link to a file of
        // root's (say /etc/shadow), which a chown would hand to the user.
        let at = fs.parent(&o.file_path, false)?.with_context(|| format!("{} vanished", o.dir_path))?;
        let old = o.file.as_ref().map(|(b, _)| b.as_slice()).unwrap_or_default();
        at.write(self.merge(&String::from_utf8_lossy(old)).as_bytes(), FILE_MODE, owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa alice@laptop";
    const B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb bob";
    const C: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCccccccccccccccc carol";

    fn step(keys: &[&str], exclusive: bool) -> KeysStep {
        KeysStep {
            user: "deploy".into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            exclusive,
        }
    }

    #[test]
    fn keys_are_found_after_options() {
        assert_eq!(key_of(A).unwrap().0, "ssh-ed25519");
        let with_opts = format!("from=\"10.0.0.0/8\",no-pty {B}");
        assert_eq!(key_of(&with_opts), key_of(B));
        assert_eq!(key_of("# ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaa"), None);
        assert_eq!(key_of("not a key at all"), None);
        assert!(check_key("ssh-ed25519").is_err() && check_key(A).is_ok() && check_key(&format!("{A}\n{B}")).is_err());
    }

    #[test]
    fn merge_table() {
        let a_renamed = A.replace("alice@laptop", "alice@new");
        let cases: Vec<(KeysStep, String, String)> = vec![
            // appended, others kept, comments kept
            (step(&[A], false), format!("# team\n{C}\n"), format!("# team\n{C}\n{A}\n")),
            (step(&[A, B], false), String::new(), format!("{A}\n{B}\n")),
            // in sync
            (step(&[A], false), format!("{C}\n{A}\n"), format!("{C}\n{A}\n")),
            // the same key with another comment or options becomes the role's line, in place
            (step(&[&a_renamed], false), format!("{A}\n{C}\n"), format!("{a_renamed}\n{C}\n")),
            (step(&[A], false), format!("no-pty {A}\n{C}\n{A}\n"), format!("{A}\n{C}\n")),
            // exclusive: the keys alone
            (step(&[A, B], true), format!("{C}\n# x\n{B}\n"), format!("{A}\n{B}\n")),
            (step(&[], true), format!("{C}\n"), String::new()),
        ];
        for (s, old, want) in cases {
            assert_eq!(s.merge(&old), want, "{:?} exclusive={} on {old:?}", s.keys, s.exclusive);
            assert_eq!(s.merge(&want), want, "not idempotent");
        }
    }

    #[test]
    fn plan_table() {
        let st = |kind, mode, uid| Stat { kind, mode, uid, gid: uid, nlink: 1 };
        let s = step(&[A], false);
        let o = |dir: Option<Stat>, file: Option<(&str, Stat)>| Observed {
            dir_path: "/home/deploy/.ssh".into(),
            file_path: "/home/deploy/.ssh/authorized_keys".into(),
            uid: 1000,
            gid: 1000,
            dir,
            file: file.map(|(c, st)| (c.as_bytes().to_vec(), st)),
            linked: false,
        };
        let fields = |o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        let d = Some(st(fsutil::FileKind::Dir, 0o700, 1000));
        let f = st(fsutil::FileKind::File, 0o600, 1000);
        let ok = format!("{A}\n");
        assert!(fields(&o(d, Some((&ok, f)))).is_empty());
        assert_eq!(fields(&o(None, None)), ["directory", "content", "mode", "owner"]);
        assert_eq!(fields(&o(d, None)), ["content", "mode", "owner"]);
        assert_eq!(
            fields(&o(Some(st(fsutil::FileKind::Dir, 0o755, 0)), Some((&ok, f)))),
            ["directory_mode", "directory_owner"]
        );
        assert_eq!(fields(&o(d, Some((&ok, st(fsutil::FileKind::File, 0o644, 0))))), ["mode", "owner"]);
        let p = s.plan(&o(d, Some((&format!("{C}\n"), f))));
        assert_eq!(p.len(), 1);
        assert!(p[0].diff.as_deref().unwrap().contains(&format!("+{A}")), "{p:?}");
    }
}
