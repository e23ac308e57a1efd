//! `line`: one line in a file that something else owns (`PermitRootLogin no` in
//! sshd_config): ensured, replacing the line that `match` finds, or removed. The file is
//! rewritten atomically and keeps its mode and owner.

use super::{check_abs_path, content_diff, Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::fsutil;
use anyhow::{bail, Context, Result};
use regex_lite::Regex;
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub path: Spanned<String>,
    pub line: Option<Spanned<String>>,
    /// A regular expression (Rust `regex` syntax without Unicode classes: `regex-lite`) for the
    /// line to replace (or remove).
    #[serde(rename = "match")]
    pub match_: Option<Spanned<String>>,
    #[serde(default)]
    pub state: State,
}

/// Mode of a file the step creates.
const NEW_FILE_MODE: u32 = 0o644;
/// Longest `match` pattern compiled (a bound on the compiled program's size too).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn compile(pattern: &str) -> std::result::Result<Regex, String> {
    regex_lite::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regular expression {pattern:?}: {e}"))
}

impl super::KindSpec for Spec {
    type Step = LineStep;

    fn identity(&self) -> Option<String> {
        let what = self.match_.as_ref().or(self.line.as_ref()).map(|s| s.get_ref().as_str()).unwrap_or_default();
        Some(format!("{}:{what}", self.path.get_ref()))
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_abs_path(cx, &self.path)?;
        if let Some(m) = &self.match_ {
            compile(m.get_ref()).map_err(|e| cx.err(m, e))?;
        }
        if let Some(l) = &self.line {
            if l.get_ref().contains(['\n', '\r']) {
                return Err(cx.err(l, "`line` must be a single line (no newline)"));
            }
        }
        match (&self.line, &self.match_, self.state) {
            (None, _, State::Present) => Err(cx.err(&self.path, "a line step with state = \"present\" needs `line`")),
            (None, None, State::Absent) => Err(cx.err(&self.path, "a line step with state = \"absent\" needs `match` or `line`")),
            _ => Ok(()),
        }
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<LineStep, ConfigError> {
        let l = &cx.load;
        Ok(LineStep {
            display: self.path.get_ref().clone(),
            line: self.line.as_ref().map(|s| s.get_ref().clone()),
            pattern: self.match_.as_ref().map(|m| compile(m.get_ref()).map_err(|e| l.err(m, e))).transpose()?,
            state: self.state,
        })
    }
}

#[derive(Debug, Clone)]
pub struct LineStep {
    /// The path as the role names it.
    pub display: String,
    pub line: Option<String>,
    pub pattern: Option<Regex>,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Missing,
    File { content: Vec<u8>, mode: u32, uid: u32, gid: u32 },
}

impl LineStep {
    /// Is this line (without its end) one the step looks for?
    fn hits(&self, l: &str) -> bool {
        self.line.as_deref() == Some(l) || self.pattern.as_ref().is_some_and(|p| p.is_match(l))
    }

    /// The content the file should have (pure). Present: the first line that equals `line` or
    /// matches `match` becomes `line`, every other such line is removed; none: `line` is
    /// appended. Absent: every such line is removed. Other lines and their line ends are kept.
    pub fn edit(&self, old: &str) -> String {
        let mut out = String::with_capacity(old.len() + self.line.as_ref().map_or(0, |l| l.len() + 1));
        let mut placed = false;
        for raw in old.split_inclusive('\n') {
            let body = raw.strip_suffix('\n').unwrap_or(raw);
            let body = body.strip_suffix('\r').unwrap_or(body);
            if !self.hits(body) {
                out.push_str(raw);
                continue;
            }
            if let (State::Present, false, Some(line)) = (self.state, placed, &self.line) {
                out.push_str(line);
                out.push_str(&raw[body.len()..]);
                if !raw.ends_with('\n') {
                    out.push('\n');
                }
                placed = true;
            }
        }
        if let (State::Present, false, Some(line)) = (self.state, placed, &self.line) {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

impl Kind for LineStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        let Some(at) = host.fs()?.parent(&self.display, false)? else {
            return Ok(Observed::Missing);
        };
        let Some(st) = at.lstat()? else { return Ok(Observed::Missing) };
        if st.kind != fsutil::FileKind::File {
            bail!(
                "{} is {}, not a regular file; a line step edits only regular files",
                self.display,
                st.kind.describe()
            );
        }
        let content = at.read()?.with_context(|| format!("{} vanished while it was read", self.display))?;
        Ok(Observed::File {
            content,
            mode: st.mode,
            uid: st.uid,
            gid: st.gid,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let old = match o {
            Observed::Missing if self.state == State::Absent => return vec![],
            Observed::Missing => &[][..],
            Observed::File { content, .. } => content.as_slice(),
        };
        let Ok(text) = std::str::from_utf8(old) else {
            // Not text: apply refuses it (below); the plan says why.
            return vec![Change::new("content", Some("(not UTF-8 text)"), None::<&str>)];
        };
        let new = self.edit(text);
        if matches!(o, Observed::File { .. }) && new.as_bytes() == old {
            return vec![];
        }
        let mut c = Vec::new();
        if matches!(o, Observed::Missing) {
            c.push(Change::new("state", Some("absent"), Some("present")));
        }
        c.push(Change {
            diff: Some(content_diff(&self.display, old, new.as_bytes())),
            ..Change::new::<&str, &str>("content", None, None)
        });
        c
    }

    fn apply(&self, host: &Host, o: &Observed, _changes: &[Change]) -> Result<()> {
        let at = host
            .fs()?
            .parent(&self.display, true)?
            .with_context(|| format!("no directory for {}", self.display))?;
        match o {
            Observed::Missing => at.write(self.edit("").as_bytes(), NEW_FILE_MODE, None),
            Observed::File { content, mode, uid, gid } => {
                let text = std::str::from_utf8(content).with_context(|| format!("{} is not UTF-8 text; a line step edits only text files", self.display))?;
                at.write(self.edit(text).as_bytes(), *mode, Some((*uid, *gid)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(line: Option<&str>, pattern: Option<&str>, state: State) -> LineStep {
        LineStep {
            display: "/etc/ssh/sshd_config".into(),
            line: line.map(str::to_string),
            pattern: pattern.map(|p| compile(p).unwrap()),
            state,
        }
    }

    #[test]
    fn edit_table() {
        use State::*;
        let root_no = Some("PermitRootLogin no");
        let m = Some(r"^#?\s*PermitRootLogin\b");
        /// line, match, state, the file before, the file after.
        type Case<'a> = (Option<&'a str>, Option<&'a str>, State, &'a str, &'a str);
        let cases: &[Case] = &[
            // replaced in place, other lines and their order kept
            (root_no, m, Present, "a\nPermitRootLogin yes\nb\n", "a\nPermitRootLogin no\nb\n"),
            (root_no, m, Present, "a\n#PermitRootLogin prohibit-password\n", "a\nPermitRootLogin no\n"),
            // no match: appended (a missing final newline is added first)
            (root_no, m, Present, "a\n", "a\nPermitRootLogin no\n"),
            (root_no, m, Present, "a", "a\nPermitRootLogin no\n"),
            (root_no, m, Present, "", "PermitRootLogin no\n"),
            // exactly one: later matches are removed
            (root_no, m, Present, "PermitRootLogin yes\nx\nPermitRootLogin no\n", "PermitRootLogin no\nx\n"),
            // in sync stays byte for byte (CRLF and a last line without newline included)
            (root_no, m, Present, "a\r\nPermitRootLogin no\r\nb", "a\r\nPermitRootLogin no\r\nb"),
            // without match: the exact line only
            (root_no, None, Present, "PermitRootLogin yes\n", "PermitRootLogin yes\nPermitRootLogin no\n"),
            (root_no, None, Present, "PermitRootLogin no\nPermitRootLogin no\n", "PermitRootLogin no\n"),
            // absent: every matching line goes
            (None, m, Absent, "a\nPermitRootLogin yes\n# PermitRootLogin x\nb\n", "a\nb\n"),
            (root_no, None, Absent, "PermitRootLogin no\nPermitRootLogin yes\n", "PermitRootLogin yes\n"),
            (None, m, Absent, "a\n", "a\n"),
        ];
        for (line, pat, state, old, want) in cases {
            let s = step(*line, *pat, *state);
            assert_eq!(s.edit(old), *want, "{line:?} {pat:?} {state:?} on {old:?}");
            // converged: editing again changes nothing
            assert_eq!(s.edit(want), *want, "not idempotent: {line:?} {pat:?} on {want:?}");
        }
    }

    #[test]
    fn plan_table() {
        let s = step(Some("PermitRootLogin no"), Some("^PermitRootLogin"), State::Present);
        let have = |c: &str| Observed::File {
            content: c.as_bytes().to_vec(),
            mode: 0o600,
            uid: 0,
            gid: 0,
        };
        let fields = |s: &LineStep, o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        assert!(fields(&s, &have("PermitRootLogin no\n")).is_empty());
        let p = s.plan(&have("PermitRootLogin yes\n"));
        assert_eq!(p.len(), 1);
        let d = p[0].diff.as_deref().unwrap();
        assert!(d.contains("-PermitRootLogin yes") && d.contains("+PermitRootLogin no"), "{d}");
        assert_eq!(fields(&s, &Observed::Missing), ["state", "content"]);
        let a = step(None, Some("^PermitRootLogin"), State::Absent);
        assert!(fields(&a, &Observed::Missing).is_empty());
        assert!(fields(&a, &have("x\n")).is_empty());
        assert_eq!(fields(&a, &have("PermitRootLogin no\n")), ["content"]);
        assert_eq!(
            fields(
                &s,
                &Observed::File {
                    content: vec![0xff, 0xfe],
                    mode: 0o644,
                    uid: 0,
                    gid: 0
                }
            ),
            ["content"]
        );
        assert!(compile("(").is_err());
    }
}
