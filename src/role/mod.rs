//! Roles (schema 1): `roles/<service>/role.toml`, includes, vars, env overlays and steps.
//!
//! Loading parses and validates everything that needs no facts (so `validate` can run
//! offline); `prepare` then evaluates `when` and renders templates with facts and vars.
//! Any error here is a `ConfigError` (exit 78) naming file, line and column, and happens
//! before the host is touched.
//!
//! Loops (`for_each`, see [`expand`]): a step with `for_each` is checked at load as written
//! (its keys and their types, so an unknown key is an error with its position) and expanded
//! at `prepare`, where facts and env overlays are known: the step's TOML table is read again
//! from the role's source (spans and all), every string in it but `when` and `content` is
//! rendered with `item` (and `key`) in the context, and each expansion is then parsed and
//! validated like any step, so its errors name the original step's file:line:col. Step ids
//! are unique across the expanded run (checked again after expansion).
//!
//! Per-role defaults (`[defaults.<kind>]`) fill the fields a step of that kind does not set;
//! step `vars` are merged over the role's vars for that step's templates.

pub mod expand;

use crate::error::{de, toml_err, ConfigError, Pos};
use crate::facts::Facts;
use crate::step::{Common, LoadCtx, PrepCtx, Spec, Step, COMMON_KEYS, KINDS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

pub const SCHEMA: u32 = 1;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    schema: Spanned<u32>,
    description: Option<String>,
    #[serde(default)]
    include: Vec<Spanned<String>>,
    #[serde(default)]
    vars: toml::Table,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Overlay {
    #[serde(default)]
    vars: toml::Table,
}

/// One role file, parsed and validated.
#[derive(Debug)]
pub struct Role {
    pub name: String,
    pub dir: PathBuf,
    pub file: PathBuf,
    pub src: String,
    pub description: Option<String>,
    pub include: Vec<Spanned<String>>,
    pub vars: toml::Table,
    pub steps: Vec<RoleStep>,
    /// The template engine for this role: includes and imports load from its `files/`.
    pub env: minijinja::Environment<'static>,
}

#[derive(Debug)]
pub struct RoleStep {
    pub pos: Pos,
    /// Its index in the role file's `[[step]]` array (a `for_each` step is read again from
    /// there at prepare).
    pub index: usize,
    pub common: Common,
    /// For a `for_each` step, the spec as written (templates not rendered, not validated).
    pub spec: Spec,
}

/// `[defaults.<kind>]`: the fields a step of that kind gets when it does not set them.
pub type Defaults<'a> = BTreeMap<String, DeTable<'a>>;

/// `restart:UNIT` or `reload:UNIT`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Notify {
    pub action: NotifyAction,
    pub unit: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NotifyAction {
    Restart,
    Reload,
}

impl Notify {
    pub fn parse(s: &str) -> Result<Notify, String> {
        let (action, unit) = match s.split_once(':') {
            Some(("restart", u)) => (NotifyAction::Restart, u),
            Some(("reload", u)) => (NotifyAction::Reload, u),
            _ => return Err(format!("invalid notify target {s:?}: expected \"restart:UNIT\" or \"reload:UNIT\"")),
        };
        let ok = unit.contains('.') && !unit.starts_with('.') && unit.chars().all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c));
        if !ok {
            return Err(format!("invalid unit name {unit:?} in notify target {s:?} (like haproxy.service)"));
        }
        Ok(Notify {
            action,
            unit: unit.to_string(),
        })
    }
}

impl std::fmt::Display for Notify {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = match self.action {
            NotifyAction::Restart => "restart",
            NotifyAction::Reload => "reload",
        };
        write!(f, "{a}:{}", self.unit)
    }
}

/// The roles directory of a bundle root.
pub fn roles_dir(bundle: &Path) -> PathBuf {
    bundle.join("roles")
}

/// Parse and validate `roles/<name>/role.toml`.
pub fn load_role(bundle: &Path, name: &str, env: &minijinja::Environment<'static>) -> Result<Role, ConfigError> {
    let dir = roles_dir(bundle).join(name);
    let file = dir.join("role.toml");
    let src = std::fs::read_to_string(&file).map_err(|e| ConfigError::file(&file, format!("cannot read role: {e}")))?;
    let parsed = DeTable::parse(&src).map_err(|e| toml_err(e, &file, &src))?;
    let span = parsed.span();
    let mut table = parsed.into_inner();
    let steps = table.remove("step");
    let defaults = table.remove("defaults");
    let header: Header = Header::deserialize(toml::de::Deserializer::from(Spanned::new(span, table))).map_err(|e| toml_err(e, &file, &src))?;
    if *header.schema.get_ref() != SCHEMA {
        return Err(ConfigError::at(
            &file,
            &src,
            header.schema.span().start,
            format!("unsupported schema {}; this bootstrap reads schema {SCHEMA}", header.schema.get_ref()),
        ));
    }
    let renv = crate::template::role_environment(env, &dir.join("files"));
    let cx = LoadCtx {
        file: &file,
        src: &src,
        role_dir: &dir,
        env: &renv,
    };
    let defaults = match defaults {
        Some(d) => parse_defaults(d, &cx)?,
        None => Defaults::new(),
    };
    let mut out_steps = Vec::new();
    if let Some(steps) = steps {
        let steps_span = steps.span();
        let DeValue::Array(items) = steps.into_inner() else {
            return Err(ConfigError::at(&file, &src, steps_span.start, "`step` must be an array of tables ([[step]])"));
        };
        for (index, item) in items.into_iter().enumerate() {
            out_steps.push(parse_step(item, index, &cx, &defaults, false)?);
        }
    }
    Ok(Role {
        name: name.to_string(),
        dir,
        file: file.clone(),
        src: src.clone(),
        description: header.description,
        include: header.include,
        vars: header.vars,
        steps: out_steps,
        env: renv,
    })
}

/// `[defaults]`: a table per known kind, each checked against that kind's fields now (an
/// unknown key or a wrong type is an error at its position even when no step uses it).
pub(crate) fn parse_defaults<'a>(d: Spanned<DeValue<'a>>, cx: &LoadCtx<'_>) -> Result<Defaults<'a>, ConfigError> {
    let span = d.span();
    let DeValue::Table(t) = d.into_inner() else {
        return Err(ConfigError::at(
            cx.file,
            cx.src,
            span.start,
            "`defaults` must be a table of kinds ([defaults.file])",
        ));
    };
    let mut out = Defaults::new();
    for (k, v) in t {
        let kind = Spanned::new(k.span(), k.get_ref().to_string());
        if !KINDS.contains(&kind.get_ref().as_str()) {
            return Err(cx.err(
                &kind,
                format!("unknown step kind `{}` in [defaults]; expected one of {}", kind.get_ref(), KINDS.join(", ")),
            ));
        }
        let vspan = v.span();
        let DeValue::Table(kt) = v.into_inner() else {
            return Err(cx.err(&kind, format!("[defaults.{}] must be a table of that kind's fields", kind.get_ref())));
        };
        // Parsed alone, a kind's table misses its required fields; any other error stands.
        if let Err(e) = Spec::parse(&kind, Spanned::new(vspan, DeValue::Table(kt.clone())), cx) {
            if !e.0.contains("missing field") {
                return Err(e);
            }
        }
        out.insert(kind.into_inner(), kt);
    }
    Ok(out)
}

/// Parse one `[[step]]` table. `expanded`: an expansion of a `for_each` step (its strings
/// rendered), validated in full; a `for_each` step as written is only parsed.
pub(crate) fn parse_step(item: Spanned<DeValue<'_>>, index: usize, cx: &LoadCtx<'_>, defaults: &Defaults<'_>, expanded: bool) -> Result<RoleStep, ConfigError> {
    let span = item.span();
    let pos = Pos::new(cx.file, cx.src, span.start);
    let DeValue::Table(mut t) = item.into_inner() else {
        return Err(ConfigError(format!("{pos}: each step must be a table")));
    };
    let kind_name = match t.get("kind").map(|k| k.get_ref()) {
        Some(DeValue::String(k)) => Some(k.to_string()),
        _ => None,
    };
    if let Some(k) = kind_name {
        if let Some(d) = defaults.get(&k) {
            for (dk, dv) in d {
                if !t.contains_key(dk.get_ref().as_ref()) {
                    t.insert(dk.clone(), dv.clone());
                }
            }
        }
    }
    let kind: Spanned<String> = match t.remove("kind") {
        Some(k) => de(k, cx.file, cx.src)?,
        None => return Err(ConfigError(format!("{pos}: step has no `kind`"))),
    };
    let mut common = DeTable::new();
    for key in COMMON_KEYS {
        if let Some((k, v)) = t.remove_entry(*key) {
            common.insert(k, v);
        }
    }
    let mut common: Common = de(Spanned::new(span.clone(), DeValue::Table(common)), cx.file, cx.src)?;
    if expanded {
        common.for_each = None;
    }
    let spec = Spec::parse(&kind, Spanned::new(span, DeValue::Table(t)), cx)?;
    if let Some(fe) = &common.for_each {
        expand::check_for_each(cx, fe)?;
    } else {
        spec.validate(cx)?;
    }
    if let Some(w) = &common.when {
        crate::template::check_expression(cx.env, &cx.pos(w), w.get_ref())?;
    }
    // (A `for_each` step's targets may be templates: checked in each expansion.)
    for n in common.notify.iter().filter(|_| common.for_each.is_none()) {
        Notify::parse(n.get_ref()).map_err(|e| cx.err(n, e))?;
    }
    Ok(RoleStep { pos, index, common, spec })
}

/// Load a role and everything it includes, includes first, each role once.
pub fn resolve(bundle: &Path, top: &str, env: &minijinja::Environment<'static>) -> Result<Vec<Role>, ConfigError> {
    crate::facts::check_ident("service", top).map_err(|e| ConfigError::msg(format!("role {top:?}: {e}")))?;
    if !roles_dir(bundle).join(top).join("role.toml").is_file() {
        return Err(ConfigError::msg(format!(
            "role {top:?} not found: no {}",
            roles_dir(bundle).join(top).join("role.toml").display()
        )));
    }
    let mut order = Vec::new();
    let mut stack = Vec::new();
    visit(bundle, top, env, &mut stack, &mut order)?;
    check_duplicate_ids(&order)?;
    Ok(order)
}

/// The id of a step: its `id`, else `kind:identity` (sensitive exec steps: role and index).
fn step_id(role: &Role, index: usize, rs: &RoleStep) -> String {
    match (&rs.common.id, rs.common.sensitive, &rs.spec) {
        (Some(id), _, _) => id.clone(),
        (None, true, Spec::Exec(_)) => format!("exec:{}#{}", role.name, index + 1),
        (None, _, spec) => spec.identity(),
    }
}

/// Two steps managing the same thing in one run fight each other: an error.
fn check_duplicate_ids(roles: &[Role]) -> Result<(), ConfigError> {
    let mut seen: BTreeMap<String, &Pos> = BTreeMap::new();
    for role in roles {
        for (i, rs) in role.steps.iter().enumerate().filter(|(_, rs)| rs.common.for_each.is_none()) {
            let id = step_id(role, i, rs);
            if let Some(first) = seen.get(&id) {
                return Err(ConfigError(format!(
                    "{}: step `{id}` is declared twice (first at {first}); give one an `id` or merge them",
                    rs.pos
                )));
            }
            seen.insert(id, &rs.pos);
        }
    }
    Ok(())
}

fn visit(bundle: &Path, name: &str, env: &minijinja::Environment<'static>, stack: &mut Vec<String>, order: &mut Vec<Role>) -> Result<(), ConfigError> {
    let role = load_role(bundle, name, env)?;
    stack.push(name.to_string());
    for inc in &role.include {
        let n = inc.get_ref();
        if stack.contains(n) {
            let cycle = [stack.as_slice(), std::slice::from_ref(n)].concat().join(" -> ");
            return Err(ConfigError::at(&role.file, &role.src, inc.span().start, format!("include cycle: {cycle}")));
        }
        if order.iter().any(|r| &r.name == n) {
            continue;
        }
        if crate::facts::check_ident("service", n).is_err() || !roles_dir(bundle).join(n).join("role.toml").is_file() {
            return Err(ConfigError::at(
                &role.file,
                &role.src,
                inc.span().start,
                format!("included role `{n}` not found (no {})", roles_dir(bundle).join(n).join("role.toml").display()),
            ));
        }
        visit(bundle, n, env, stack, order)?;
    }
    stack.pop();
    order.push(role);
    Ok(())
}

/// `roles/<name>/env/<env>.toml`, when it exists: a `[vars]` table only.
pub fn load_overlay(role: &Role, env_name: &str) -> Result<Option<toml::Table>, ConfigError> {
    let file = role.dir.join("env").join(format!("{env_name}.toml"));
    let src = match std::fs::read_to_string(&file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ConfigError::file(&file, format!("cannot read: {e}"))),
    };
    let o: Overlay = toml::from_str(&src).map_err(|e| toml_err(e, &file, &src))?;
    Ok(Some(o.vars))
}

/// Vars every step sees: the roles' `[vars]` in apply order (a role overrides what it
/// includes), then the env overlays in the same order (an environment overrides defaults).
pub fn merged_vars(roles: &[Role], env_name: Option<&str>) -> Result<toml::Table, ConfigError> {
    let mut vars = toml::Table::new();
    for r in roles {
        vars.extend(r.vars.clone());
    }
    if let Some(e) = env_name {
        for r in roles {
            if let Some(o) = load_overlay(r, e)? {
                vars.extend(o);
            }
        }
    }
    Ok(vars)
}

/// A step ready for the engine.
#[derive(Debug)]
pub struct Prepared {
    pub id: String,
    pub kind: &'static str,
    pub role: String,
    pub pos: Pos,
    pub notify: Vec<Notify>,
    pub reboot_required: bool,
    pub sensitive: bool,
    /// None when `when` was false.
    pub step: Option<Step>,
}

/// Expand `for_each` steps, evaluate `when`, render templates, map paths under `root`.
/// (`_env` is the base engine; each role renders with its own, which loads from its files/.)
pub fn prepare(roles: &[Role], vars: &toml::Table, facts: &Facts, root: &Path, _env: &minijinja::Environment<'static>) -> Result<Vec<Prepared>, ConfigError> {
    let ctx = crate::template::context(vars, facts);
    let mut out: Vec<Prepared> = Vec::new();
    // Where each prepared step was declared (an expansion: its step and item), for errors.
    let mut declared: Vec<String> = Vec::new();
    for role in roles {
        let load = || LoadCtx {
            file: &role.file,
            src: &role.src,
            role_dir: &role.dir,
            env: &role.env,
        };
        for (i, rs) in role.steps.iter().enumerate() {
            match &rs.common.for_each {
                None => {
                    out.push(prepare_one(role, load(), rs, step_id(role, i, rs), &ctx, &[], root)?);
                    declared.push(rs.pos.to_string());
                }
                Some(fe) => {
                    for (n, x) in expand::expand(role, &load(), rs, fe, vars, &ctx)?.into_iter().enumerate() {
                        let id = match (&x.step.common.id, x.step.common.sensitive, &x.step.spec) {
                            (None, true, Spec::Exec(_)) => format!("exec:{}#{}.{}", role.name, i + 1, n + 1),
                            _ => step_id(role, i, &x.step),
                        };
                        out.push(prepare_one(role, load(), &x.step, id, &ctx, &x.top, root)?);
                        declared.push(x.label);
                    }
                }
            }
        }
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for (p, at) in out.iter().zip(&declared) {
        if let Some(first) = seen.insert(&p.id, at) {
            return Err(ConfigError(format!(
                "{at}: step `{}` is declared twice (first at {first}); give one an `id` or merge them",
                p.id
            )));
        }
    }
    Ok(out)
}

/// One step (or one expansion): its vars over the role's, then `top` (`item`, `key`).
fn prepare_one(
    role: &Role,
    load: LoadCtx<'_>,
    rs: &RoleStep,
    id: String,
    ctx: &minijinja::Value,
    top: &[(String, minijinja::Value)],
    root: &Path,
) -> Result<Prepared, ConfigError> {
    let ctx = expand::step_context(ctx, rs.common.vars.as_ref(), top);
    let active = match &rs.common.when {
        Some(w) => crate::template::eval_when(load.env, &load.pos(w), w.get_ref(), &ctx)?,
        None => true,
    };
    // A step whose rendering called secret() (any of its templates, through any
    // filter) is sensitive as a whole, as if the role said `sensitive = true`.
    let mut sensitive = rs.common.sensitive;
    let step = if active {
        let mark = crate::template::SecretCalls::mark();
        let mut s = rs.spec.prepare(&PrepCtx { load, vars: &ctx, root })?;
        // (A file whose content holds a value known as secret marks itself.)
        sensitive |= mark.called_since() || s.is_sensitive();
        if sensitive {
            s.mark_sensitive();
        }
        Some(s)
    } else {
        None
    };
    Ok(Prepared {
        id,
        kind: rs.spec.kind(),
        role: role.name.clone(),
        pos: rs.pos.clone(),
        notify: rs
            .common
            .notify
            .iter()
            .map(|n| Notify::parse(n.get_ref()).expect("validated at load"))
            .collect(),
        reboot_required: rs.common.reboot_required,
        sensitive,
        step,
    })
}

/// Lint a whole bundle offline: every role parses, includes resolve, templates compile,
/// sources exist, every env overlay parses. Returns the role names checked.
pub fn validate_bundle(bundle: &Path) -> Result<Vec<String>, ConfigError> {
    let dir = roles_dir(bundle);
    let entries = std::fs::read_dir(&dir).map_err(|e| ConfigError::file(&dir, format!("cannot read roles directory: {e}")))?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(ConfigError::file(&dir, "no roles in bundle"));
    }
    let env = crate::template::environment();
    for n in &names {
        let roles = resolve(bundle, n, &env)?;
        let me = roles.last().expect("resolve returns the role itself");
        if let Ok(envs) = std::fs::read_dir(me.dir.join("env")) {
            for e in envs.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "toml") {
                    let stem = p.file_stem().unwrap_or_default().to_string_lossy().into_owned();
                    load_overlay(me, &stem)?;
                }
            }
        }
    }
    Ok(names)
}
