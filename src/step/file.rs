//! `file`: content, source or template; mode, owner, group; present or absent.

use super::{apply_meta, check_abs_path, content_diff, meta_changes, parse_mode, wanted_ids, Change, Host, Kind, LoadCtx, Meta, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil::{self, Mode};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub path: Spanned<String>,
    pub content: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    #[serde(default)]
    pub template: bool,
    pub mode: Option<Spanned<String>>,
    pub owner: Option<String>,
    pub group: Option<String>,
    #[serde(default)]
    pub state: State,
}

/// Mode of a new file when the role names none.
const DEFAULT_MODE: Mode = Mode(0o644);

impl super::KindSpec for Spec {
    type Step = FileStep;

    fn identity(&self) -> Option<String> {
        Some(self.path.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_abs_path(cx, &self.path)?;
        parse_mode(cx, &self.mode)?;
        match (&self.content, &self.source, self.state) {
            (Some(_), Some(s), _) => return Err(cx.err(s, "a file step takes `content` or `source`, not both")),
            (None, None, State::Present) => return Err(cx.err(&self.path, "a file step with state = \"present\" needs `content` or `source`")),
            (Some(c), None, State::Absent) => return Err(cx.err(c, "`content` makes no sense with state = \"absent\"")),
            (None, Some(s), State::Absent) => return Err(cx.err(s, "`source` makes no sense with state = \"absent\"")),
            _ => {}
        }
        super::validate_body(cx, &self.content, &self.source, self.template)
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<FileStep, ConfigError> {
        let l = &cx.load;
        let content = super::render_body(cx, &self.content, &self.source, self.template)?;
        let mut step = FileStep {
            display: self.path.get_ref().clone(),
            content,
            mode: parse_mode(l, &self.mode)?,
            owner: self.owner.clone(),
            group: self.group.clone(),
            state: self.state,
            sensitive: false,
        };
        // A step whose templates called secret() is made sensitive by `role::prepare`. Second
        // net: content that holds a value known as secret (a kubeadm token seen earlier, say).
        if step.content.as_deref().is_some_and(|c| crate::secrets::is_secret(&String::from_utf8_lossy(c))) {
            step.mark_sensitive();
        }
        Ok(step)
    }
}

#[derive(Debug, Clone)]
pub struct FileStep {
    /// The path as the role names it (resolved under the root by `Host::fs`).
    pub display: String,
    pub content: Option<Vec<u8>>,
    pub mode: Option<Mode>,
    pub owner: Option<String>,
    pub group: Option<String>,
    pub state: State,
    /// Holds a secret: content changes are summarised (sha256), never diffed.
    pub sensitive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Missing,
    File { content: Vec<u8>, meta: Meta },
}

impl FileStep {
    /// The `content` change: a unified diff, or for a sensitive file a summary without content.
    fn content_change(&self, old: Option<&[u8]>, new: &[u8]) -> Change {
        if self.sensitive {
            return Change::content_summary("content", old, new);
        }
        Change {
            diff: Some(content_diff(&self.display, old.unwrap_or_default(), new)),
            ..Change::new::<&str, &str>("content", None, None)
        }
    }
}

impl Kind for FileStep {
    type Observed = Observed;

    /// No content diff (a summary instead), and a file without a mode of its own is 0600.
    fn mark_sensitive(&mut self) {
        self.sensitive = true;
        self.mode.get_or_insert(Mode(0o600));
    }

    fn is_sensitive(&self) -> bool {
        self.sensitive
    }

    fn check(&self, host: &Host) -> Result<Observed> {
        let Some(at) = host.fs()?.parent(&self.display, false)? else {
            return Ok(Observed::Missing);
        };
        let Some(st) = at.lstat()? else { return Ok(Observed::Missing) };
        if st.kind != fsutil::FileKind::File {
            bail!(
                "{} exists and is not a regular file ({}); refusing to replace it",
                self.display,
                st.kind.describe()
            );
        }
        let content = match self.state {
            State::Absent => Vec::new(),
            State::Present => at.read()?.with_context(|| format!("{} vanished while it was read", self.display))?,
        };
        Ok(Observed::File {
            content,
            meta: Meta::read(&host.root, &st),
        })
    }

    fn plan(&self, observed: &Observed) -> Vec<Change> {
        match (self.state, observed) {
            (State::Absent, Observed::Missing) => vec![],
            (State::Absent, Observed::File { .. }) => vec![Change::new("state", Some("present"), Some("absent"))],
            (State::Present, Observed::Missing) => {
                let new = self.content.as_deref().unwrap_or_default();
                let mut c = vec![Change::new("state", Some("absent"), Some("present"))];
                c.push(self.content_change(None, new));
                c.push(Change::new("mode", None::<&str>, Some(self.mode.unwrap_or(DEFAULT_MODE))));
                if let Some(o) = &self.owner {
                    c.push(Change::new("owner", None::<&str>, Some(o)));
                }
                if let Some(g) = &self.group {
                    c.push(Change::new("group", None::<&str>, Some(g)));
                }
                c
            }
            (State::Present, Observed::File { content, meta }) => {
                let mut c = Vec::new();
                let new = self.content.as_deref().unwrap_or_default();
                if content.as_slice() != new {
                    c.push(self.content_change(Some(content), new));
                }
                c.extend(meta_changes(self.mode, &self.owner, &self.group, meta));
                c
            }
        }
    }

    fn apply(&self, host: &Host, observed: &Observed, changes: &[Change]) -> Result<()> {
        let fs = host.owned_fs()?;
        if self.state == State::Absent {
            return fs
                .parent(&self.display, false)?
                .with_context(|| format!("{} vanished", self.display))?
                .remove_file();
        }
        let at = fs.parent(&self.display, true)?.with_context(|| format!("no directory for {}", self.display))?;
        let content_changes = changes.iter().any(|c| c.field == "content");
        match observed {
            Observed::File { .. } if !content_changes => apply_meta(host, &at, changes, self.mode, &self.owner, &self.group),
            _ => {
                // New content: write a fresh file that has its final owner and mode before any byte lands.
                let (mode, ids) = match observed {
                    Observed::File { meta, .. } => {
                        let uid = match &self.owner {
                            Some(o) => fsutil::require_uid(&host.root, o)?,
                            None => meta.uid,
                        };
                        let gid = match &self.group {
                            Some(g) => fsutil::require_gid(&host.root, g)?,
                            None => meta.gid,
                        };
                        (self.mode.map(|m| m.0).unwrap_or(meta.mode), Some((uid, gid)))
                    }
                    Observed::Missing => (self.mode.unwrap_or(DEFAULT_MODE).0, wanted_ids(&host.root, &self.owner, &self.group)?),
                };
                at.write(self.content.as_deref().unwrap_or_default(), mode, ids)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(content: &str, mode: Option<u32>) -> FileStep {
        FileStep {
            display: "/etc/x".into(),
            content: Some(content.as_bytes().to_vec()),
            mode: mode.map(Mode),
            owner: Some("root".into()),
            group: None,
            state: State::Present,
            sensitive: false,
        }
    }

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 0,
            gid: 0,
            owner: "root".into(),
            group: "root".into(),
        }
    }

    #[test]
    fn plan_table() {
        let have = |c: &str, m: u32| Observed::File {
            content: c.as_bytes().to_vec(),
            meta: meta(m),
        };
        let fields = |s: &FileStep, o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        assert!(fields(&step("a\n", Some(0o644)), &have("a\n", 0o644)).is_empty());
        assert_eq!(fields(&step("a\n", Some(0o600)), &have("a\n", 0o644)), ["mode"]);
        assert_eq!(fields(&step("b\n", None), &have("a\n", 0o644)), ["content"]);
        assert_eq!(fields(&step("b\n", Some(0o644)), &Observed::Missing), ["state", "content", "mode", "owner"]);
        let mut absent = step("", None);
        absent.state = State::Absent;
        assert!(fields(&absent, &Observed::Missing).is_empty());
        assert_eq!(fields(&absent, &have("a", 0o644)), ["state"]);
        // numeric owner matches the same uid
        let mut numeric = step("a\n", None);
        numeric.owner = Some("0".into());
        assert!(fields(&numeric, &have("a\n", 0o644)).is_empty());
    }

    /// A file whose rendering used a secret: no content in its plan (a summary that the
    /// engine's redaction keeps), and private when the role names no mode.
    #[test]
    fn a_sensitive_file_plans_without_its_content() {
        let mut s = step("new-secret-line\n", None);
        s.mark_sensitive();
        assert_eq!(s.mode, Some(Mode(0o600)));
        let have = Observed::File {
            content: b"old-secret-line\n".to_vec(),
            meta: meta(0o644),
        };
        let plan = s.plan(&have);
        assert_eq!(plan.iter().map(|c| c.field.as_str()).collect::<Vec<_>>(), ["content", "mode"]);
        let d = plan[0].diff.clone().unwrap();
        assert!(d.starts_with("content changed, sha256 ") && !d.contains("secret-line"), "{d}");
        assert_eq!(plan[0].redacted().diff, Some(d));
        assert_eq!(plan[1].redacted().to.as_deref(), Some("<redacted>"));
        let new = s.plan(&Observed::Missing);
        assert!(new[1].diff.as_deref().unwrap().starts_with("content changed, sha256 (none)→"), "{new:?}");
        // A mode of its own is kept.
        let mut own = step("x\n", Some(0o640));
        own.mark_sensitive();
        assert_eq!(own.mode, Some(Mode(0o640)));
    }

    #[test]
    fn diff_is_unified() {
        let d = content_diff("/etc/x", b"a\nb\n", b"a\nc\n");
        assert!(d.contains("--- /etc/x (on host)") && d.contains("-b\n") && d.contains("+c\n"), "{d}");
        assert!(content_diff("/x", &[0xff, 0], b"a").starts_with("binary content differs"));
        let big = "x\n".repeat(200_000);
        assert!(content_diff("/x", big.as_bytes(), b"a").contains("too large to diff"));
    }
}
