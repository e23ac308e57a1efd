//! Step kinds. Each kind parses its TOML table (`Spec`), validates it at load time, is
//! prepared (templates rendered) into a runnable step, and then runs `check` (read-only I/O)
//! → `plan` (pure: the list of field changes) → `apply` (only when the plan is not empty).

mod accounts;
mod content;
mod context;
mod meta;

pub use accounts::{check_account_name, read_group, read_groups, shadow_tool, GroupEntry};
pub use content::{content_diff, short_sha};
pub use context::{check_abs_path, parse_mode, render_body, validate_body, LoadCtx, PrepCtx};
pub use meta::{apply_meta, meta_changes, same_owner, wanted_ids, Meta};

use crate::error::ConfigError;
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
    /// A list, a table, or the name of a var holding one: the step is expanded once per item
    /// (see `role::expand`).
    pub for_each: Option<Spanned<toml::Value>>,
    /// Vars for this step's templates, merged over the role's.
    pub vars: Option<toml::Table>,
}

pub const COMMON_KEYS: &[&str] = &["id", "when", "notify", "reboot_required", "sensitive", "for_each", "vars"];

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
    "sysctl" => Sysctl(sysctl),
    "kernel_module" => KernelModule(kernel_module),
    "line" => Line(line),
    "authorized_keys" => AuthorizedKeys(authorized_keys),
    "hostname" => Hostname(hostname),
    "filesystem" => Filesystem(filesystem),
    "mount" => Mount(mount),
    "repository" => Repository(repository),
    "archive" => Archive(archive),
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

/// What a step needs from the host it runs on.
pub struct Host {
    pub root: PathBuf,
    pub facts: Facts,
    pub systemd: Box<dyn crate::systemd::Systemd>,
    /// Set by a `repository` step that changed a source: the next package step that installs
    /// refreshes its lists first (once; it clears the flag).
    pub refresh_lists: std::cell::Cell<bool>,
    /// The node's first boot (`init` before `firstboot.done`, on the running system): package
    /// transactions run without fsyncs and are synced once after (`step::package`).
    pub first_boot: bool,
}

impl Host {
    /// The root, opened: every host path a step touches is resolved through it, chroot-style
    /// and one directory descriptor at a time (see `fsutil::Root`).
    pub fn fs(&self) -> Result<crate::fsutil::Root> {
        crate::fsutil::Root::open(&self.root)
    }

    /// [`Host::fs`] for the steps that own a path's whole content (`file`, `unit`, `directory`,
    /// `link`): at first boot their writes skip the fsyncs, and the run syncs once after the
    /// steps, before `firstboot.done`. A machine that goes down before that sync may leave such
    /// a file empty or old: the next `init` (no marker yet) checks its content and writes it
    /// again. Steps that edit a file they do not own (`line`, `sysctl`, `authorized_keys`, ...)
    /// always sync: a lost edit would take the rest of the file with it.
    pub fn owned_fs(&self) -> Result<crate::fsutil::Root> {
        Ok(self.fs()?.deferring_syncs(self.first_boot))
    }

    /// True when changes go to the running system (not an image root).
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }
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
