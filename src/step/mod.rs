//! Step kinds. Each kind parses its TOML table (`Spec`), validates it at load time, is
//! prepared (templates rendered) into a runnable step, and then runs `check` (read-only I/O)
//! → `plan` (pure: the list of field changes) → `apply` (only when the plan is not empty).

use crate::error::{ConfigError, Pos};
use crate::facts::Facts;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use toml::Spanned;

/// What every step kind shares.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    pub id: Option<String>,
    pub when: Option<Spanned<String>>,
    #[serde(default)]
    pub notify: Vec<Spanned<String>>,
    #[serde(default)]
    pub reboot_required: bool,
    #[serde(default)]
    pub sensitive: bool,
}

pub const COMMON_KEYS: &[&str] = &["id", "when", "notify", "reboot_required", "sensitive"];

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    #[default]
    Present,
    Absent,
}

/// The registry of step kinds: one line per kind, `"name" => Variant(module)`. It declares the
/// kind's module and generates the kind list, the `Spec` and `Step` enums and their dispatch.
/// A new kind is its own file (a `Spec` implementing [`KindSpec`], a step implementing
/// [`Kind`]) plus one line here.
macro_rules! kinds {
    ($($name:literal => $variant:ident($module:ident),)*) => {
        $(pub mod $module;)*

        /// The step kinds this version runs.
        pub const KINDS: &[&str] = &[$($name),*];

        /// The parsed, validated table of one step (before templating).
        #[derive(Debug, Clone)]
        pub enum Spec {
            $($variant($module::Spec),)*
        }

        /// A step ready to run: templates rendered.
        #[derive(Debug, Clone)]
        pub enum Step {
            $($variant(<$module::Spec as KindSpec>::Step),)*
        }

        impl Spec {
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Spec::$variant(_) => $name,)*
                }
            }

            /// Parse a step table of the given kind (errors carry the key's position).
            pub fn parse(kind: &Spanned<String>, table: Spanned<toml::de::DeValue<'_>>, cx: &LoadCtx<'_>) -> Result<Spec, ConfigError> {
                Ok(match kind.get_ref().as_str() {
                    $($name => Spec::$variant(crate::error::de(table, cx.file, cx.src)?),)*
                    k => return Err(cx.err(kind, format!("unknown step kind `{k}`; expected one of {}", KINDS.join(", ")))),
                })
            }

            /// Static checks that need no facts (modes, paths, guards, template syntax, source files).
            pub fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
                match self {
                    $(Spec::$variant(s) => s.validate(cx),)*
                }
            }

            /// `kind:identity`, the default step id.
            pub fn identity(&self) -> String {
                let (kind, tail) = match self {
                    $(Spec::$variant(s) => ($name, s.identity()),)*
                };
                match tail {
                    Some(t) => format!("{kind}:{t}"),
                    None => kind.to_string(),
                }
            }

            pub fn prepare(&self, cx: &PrepCtx<'_>) -> Result<Step, ConfigError> {
                Ok(match self {
                    $(Spec::$variant(s) => Step::$variant(s.prepare(cx)?),)*
                })
            }
        }

        impl Step {
            /// check → plan, and when `apply` is given and something differs: `apply(plan)`, then
            /// the step's apply. Returns the plan.
            pub fn run(&self, host: &Host, apply: Option<BeforeApply<'_>>) -> Result<Vec<Change>> {
                match self {
                    $(Step::$variant(s) => converge(s, host, apply),)*
                }
            }

            /// Steps that only make sense on the running system (skipped under `--root`).
            pub fn needs_live_system(&self) -> bool {
                match self {
                    $(Step::$variant(s) => s.needs_live_system(),)*
                }
            }

            /// See [`Kind::mark_sensitive`].
            pub fn mark_sensitive(&mut self) {
                match self {
                    $(Step::$variant(s) => s.mark_sensitive(),)*
                }
            }

            pub fn is_sensitive(&self) -> bool {
                match self {
                    $(Step::$variant(s) => s.is_sensitive(),)*
                }
            }
        }
    };
}

kinds! {
    "file" => File(file),
    "directory" => Directory(directory),
    "link" => Link(link),
    "user" => User(user),
    "group" => Group(group),
    "exec" => Exec(exec),
    "package" => Package(package),
    "unit" => Unit(unit),
    "container" => Container(container),
    "kubeadm_join" => KubeadmJoin(kubeadm),
}

/// A kind's parsed table: checked at load, prepared (templates rendered) into its step.
pub trait KindSpec {
    type Step: Kind;
    /// The default id's part after `kind:` (None: the kind alone, for a kind a node has once).
    fn identity(&self) -> Option<String>;
    /// Static checks that need no facts.
    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError>;
    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<Self::Step, ConfigError>;
}

/// One field that differs between the host and the role.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Change {
    pub field: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Unified diff for file content (or, for a sensitive step, a summary without content).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    /// `diff` is a summary that shows no content (only hashes): redaction keeps it.
    #[serde(skip)]
    pub summary: bool,
}

impl Change {
    pub fn new<A: ToString, B: ToString>(field: &str, from: Option<A>, to: Option<B>) -> Change {
        Change {
            field: field.into(),
            from: from.map(|s| s.to_string()),
            to: to.map(|s| s.to_string()),
            diff: None,
            summary: false,
        }
    }

    /// A content change shown without its content (a sensitive step): "content changed,
    /// sha256 a→b" (`(none)` for a new file).
    pub fn content_summary(field: &str, old: Option<&[u8]>, new: &[u8]) -> Change {
        let old = old.map(short_sha).unwrap_or_else(|| "(none)".into());
        let diff = format!("content changed, sha256 {old}→{} (sensitive: not shown)\n", short_sha(new));
        Change {
            diff: Some(diff),
            summary: true,
            ..Change::new::<&str, &str>(field, None, None)
        }
    }

    pub const REDACTED: &'static str = "<redacted>";

    /// The same change with every value replaced (for `sensitive` steps); a content summary,
    /// which holds no content, is kept.
    pub fn redacted(&self) -> Change {
        let r = |o: &Option<String>| o.as_ref().map(|_| Self::REDACTED.to_string());
        Change {
            field: self.field.clone(),
            from: r(&self.from),
            to: r(&self.to),
            diff: if self.summary { self.diff.clone() } else { r(&self.diff) },
            summary: self.summary,
        }
    }
}

/// The first 12 hex digits of a sha256, as diffs and summaries show it.
pub fn short_sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))[..12].to_string()
}

/// What a step needs from the host it runs on.
pub struct Host {
    pub root: PathBuf,
    pub facts: Facts,
    pub systemd: Box<dyn crate::systemd::Systemd>,
}

impl Host {
    /// The root, opened: every host path a step touches is resolved through it, chroot-style
    /// and one directory descriptor at a time (see `fsutil::Root`).
    pub fn fs(&self) -> Result<crate::fsutil::Root> {
        crate::fsutil::Root::open(&self.root)
    }

    /// True when changes go to the running system (not an image root).
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }
}

/// Context for loading a step: its role file and directory, and the template engine.
pub struct LoadCtx<'a> {
    pub file: &'a Path,
    pub src: &'a str,
    pub role_dir: &'a Path,
    pub env: &'a minijinja::Environment<'static>,
}

impl LoadCtx<'_> {
    pub fn pos<T>(&self, s: &Spanned<T>) -> Pos {
        Pos::new(self.file, self.src, s.span().start)
    }

    pub fn err<T>(&self, s: &Spanned<T>, msg: impl std::fmt::Display) -> ConfigError {
        ConfigError::at(self.file, self.src, s.span().start, msg)
    }

    /// Resolve `source` to a file under the role's `files/`, refusing to leave it.
    pub fn source_path(&self, source: &Spanned<String>) -> Result<PathBuf, ConfigError> {
        let rel = Path::new(source.get_ref());
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(self.err(
                source,
                format!("source {:?} must be a relative path inside the role's files/", source.get_ref()),
            ));
        }
        let p = self.role_dir.join("files").join(rel);
        if !p.is_file() {
            return Err(self.err(source, format!("source file {} does not exist", p.display())));
        }
        Ok(p)
    }
}

/// Context for preparing a step: the load context plus the template context and the root.
pub struct PrepCtx<'a> {
    pub load: LoadCtx<'a>,
    pub vars: &'a minijinja::Value,
    pub root: &'a Path,
}

/// A kind's check → plan → apply.
pub trait Kind {
    type Observed;
    /// Read the host's current state (read-only).
    fn check(&self, host: &Host) -> Result<Self::Observed>;
    /// Pure: what differs (empty = in sync).
    fn plan(&self, observed: &Self::Observed) -> Vec<Change>;
    /// Make the host match. Called only when `plan` was not empty.
    fn apply(&self, host: &Host, observed: &Self::Observed, changes: &[Change]) -> Result<()>;
    /// Only makes sense on the running system (skipped under `--root`).
    fn needs_live_system(&self) -> bool {
        false
    }
    /// The step's rendering called `secret()` (or the role says `sensitive = true`): it is
    /// sensitive as a whole. Files and units show no content diff, only a summary; a file
    /// without a mode of its own is 0600; an exec step keeps its argv and output out of errors.
    /// (The engine redacts every change value of such a step.)
    fn mark_sensitive(&mut self) {}
    /// The step found a secret in what it prepared by itself.
    fn is_sensitive(&self) -> bool {
        false
    }
}

/// Called with the plan just before a step applies it; an error stops the step.
pub type BeforeApply<'a> = &'a mut dyn FnMut(&[Change]) -> Result<()>;

fn converge<K: Kind>(k: &K, host: &Host, apply: Option<BeforeApply<'_>>) -> Result<Vec<Change>> {
    let observed = k.check(host)?;
    let changes = k.plan(&observed);
    if let (Some(before), false) = (apply, changes.is_empty()) {
        before(&changes)?;
        k.apply(host, &observed, &changes)?;
    }
    Ok(changes)
}

/// Check a step's `content`/`source` body: the source exists inside the role's files/, and
/// with `template` both parse as templates.
pub fn validate_body(cx: &LoadCtx<'_>, content: &Option<Spanned<String>>, source: &Option<Spanned<String>>, template: bool) -> Result<(), ConfigError> {
    use crate::template::{check_syntax, Origin};
    if let (Some(c), true) = (content, template) {
        check_syntax(cx.env, &Origin::Inline(cx.pos(c)), c.get_ref())?;
    }
    if let Some(s) = source {
        let p = cx.source_path(s)?;
        if template {
            let text = std::fs::read_to_string(&p).map_err(|e| cx.err(s, format!("reading template {}: {e}", p.display())))?;
            check_syntax(cx.env, &Origin::File(p), &text)?;
        }
    }
    Ok(())
}

/// The bytes of a step's `content`/`source` body, rendered when `template` is set.
pub fn render_body(
    cx: &PrepCtx<'_>,
    content: &Option<Spanned<String>>,
    source: &Option<Spanned<String>>,
    template: bool,
) -> Result<Option<Vec<u8>>, ConfigError> {
    use crate::template::{render, Origin};
    let l = &cx.load;
    Ok(match (content, source) {
        (Some(c), _) if template => Some(render(l.env, &Origin::Inline(l.pos(c)), c.get_ref(), cx.vars)?.into_bytes()),
        (Some(c), _) => Some(c.get_ref().clone().into_bytes()),
        (None, Some(s)) => {
            let p = l.source_path(s)?;
            let bytes = std::fs::read(&p).map_err(|e| l.err(s, format!("reading {}: {e}", p.display())))?;
            if template {
                let text = String::from_utf8(bytes).map_err(|_| l.err(s, format!("template {} is not UTF-8", p.display())))?;
                Some(render(l.env, &Origin::File(p), &text, cx.vars)?.into_bytes())
            } else {
                Some(bytes)
            }
        }
        (None, None) => None,
    })
}

/// Map a host path error into a config error at the field's position.
pub fn check_abs_path(cx: &LoadCtx<'_>, p: &Spanned<String>) -> Result<(), ConfigError> {
    crate::fsutil::host_path(Path::new("/"), p.get_ref()).map(|_| ()).map_err(|e| cx.err(p, e))
}

pub fn parse_mode(cx: &LoadCtx<'_>, m: &Option<Spanned<String>>) -> Result<Option<crate::fsutil::Mode>, ConfigError> {
    m.as_ref()
        .map(|m| crate::fsutil::Mode::parse(m.get_ref()).map_err(|e| cx.err(m, e)))
        .transpose()
}

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
