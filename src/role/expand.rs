//! `for_each`: one step written once, expanded per item at prepare.
//!
//! The items are a TOML list (`item`), a table (`key` and `item`), or the name of a var holding
//! one (the role's vars with env overlays applied, or the step's own `vars`). The step's table
//! is read again from the role's source so every value keeps its span; each string in it is
//! rendered as a template with the item in the context, except `when` (an expression, which
//! sees the item when it is evaluated), `content` (a body: with `template = true` it is
//! rendered by its kind, and sees the item too) and `for_each` itself. The rendered table is
//! then parsed and validated as any step, with `[defaults]` applied, so an error in an
//! expansion names the original step's file:line:col; its id is its kind and rendered
//! identity (`file:/etc/app/svc07.conf`), or its rendered `id`.

use super::{Role, RoleStep};
use crate::error::{toml_err, ConfigError};
use crate::step::LoadCtx;
use crate::template::{render, Origin};
use minijinja::Value;
use std::collections::BTreeMap;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Keys of a step table that are not rendered at expansion.
const NOT_RENDERED: &[&str] = &["when", "content", "for_each"];

/// One expansion of a `for_each` step.
pub struct Expansion {
    pub step: RoleStep,
    /// `item` (and `key`), on top of every other name in the step's context.
    pub top: Vec<(String, Value)>,
    /// Where it was declared: the step's position and the item.
    pub label: String,
}

/// Load-time check of a `for_each` value as written.
pub fn check_for_each(cx: &LoadCtx<'_>, fe: &Spanned<toml::Value>) -> Result<(), ConfigError> {
    match fe.get_ref() {
        toml::Value::Array(_) | toml::Value::Table(_) => Ok(()),
        toml::Value::String(name) if crate::facts::check_ident("var", name).is_ok() => Ok(()),
        _ => Err(cx.err(fe, "`for_each` must be a list, a table, or the name of a var holding one")),
    }
}

/// The items: `(key, item)`, a key only for a table.
fn items(cx: &LoadCtx<'_>, rs: &RoleStep, fe: &Spanned<toml::Value>, vars: &toml::Table) -> Result<Vec<(Option<String>, toml::Value)>, ConfigError> {
    let (value, what) = match fe.get_ref() {
        toml::Value::String(name) => {
            let v = rs.common.vars.as_ref().and_then(|sv| sv.get(name)).or_else(|| vars.get(name));
            match v {
                Some(v) => (v, format!("var `{name}`")),
                None => return Err(cx.err(fe, format!("`for_each` names var `{name}`, which is not set"))),
            }
        }
        v => (v, "`for_each`".to_string()),
    };
    match value {
        toml::Value::Array(a) => Ok(a.iter().map(|x| (None, x.clone())).collect()),
        toml::Value::Table(t) => Ok(t.iter().map(|(k, x)| (Some(k.clone()), x.clone())).collect()),
        other => Err(cx.err(fe, format!("{what} must be a list or a table to loop over, not a {}", other.type_str()))),
    }
}

/// The step's context: the run's, then its own `vars`, then `top`.
pub fn step_context(base: &Value, step_vars: Option<&toml::Table>, top: &[(String, Value)]) -> Value {
    if step_vars.is_none() && top.is_empty() {
        return base.clone();
    }
    let mut map: BTreeMap<String, Value> = BTreeMap::new();
    if let Ok(keys) = base.try_iter() {
        for k in keys {
            if let (Some(name), Ok(v)) = (k.as_str(), base.get_item(&k)) {
                map.insert(name.to_string(), v);
            }
        }
    }
    for (k, v) in step_vars.into_iter().flatten() {
        map.insert(k.clone(), Value::from_serialize(v));
    }
    for (k, v) in top {
        map.insert(k.clone(), v.clone());
    }
    Value::from(map)
}

/// Expand one `for_each` step of `role` over its items.
pub fn expand(role: &Role, cx: &LoadCtx<'_>, rs: &RoleStep, fe: &Spanned<toml::Value>, vars: &toml::Table, ctx: &Value) -> Result<Vec<Expansion>, ConfigError> {
    let list = items(cx, rs, fe, vars)?;
    let mut doc = DeTable::parse(&role.src).map_err(|e| toml_err(e, cx.file, cx.src))?.into_inner();
    let defaults = match doc.remove("defaults") {
        Some(d) => super::parse_defaults(d, cx)?,
        None => super::Defaults::new(),
    };
    let raw = match doc.remove("step").map(Spanned::into_inner) {
        Some(DeValue::Array(a)) if rs.index < a.len() => a.into_iter().nth(rs.index).expect("index checked"),
        _ => return Err(ConfigError(format!("{}: step not found again in {}", rs.pos, cx.file.display()))),
    };
    let mut out = Vec::with_capacity(list.len());
    for (n, (key, item)) in list.into_iter().enumerate() {
        let mut top = vec![("item".to_string(), Value::from_serialize(&item))];
        let label = match &key {
            Some(k) => {
                top.push(("key".to_string(), Value::from(k.clone())));
                format!("{} (key {k:?})", rs.pos)
            }
            None => format!("{} (item {})", rs.pos, n + 1),
        };
        let ictx = step_context(ctx, rs.common.vars.as_ref(), &top);
        let rendered = render_step(raw.clone(), cx, &ictx)?;
        let step = super::parse_step(rendered, rs.index, cx, &defaults, true)?;
        out.push(Expansion { step, top, label });
    }
    Ok(out)
}

/// Render the strings of a step table (its top-level keys but [`NOT_RENDERED`]).
fn render_step<'a>(step: Spanned<DeValue<'a>>, cx: &LoadCtx<'_>, ctx: &Value) -> Result<Spanned<DeValue<'a>>, ConfigError> {
    let span = step.span();
    let DeValue::Table(t) = step.into_inner() else {
        return Err(ConfigError::at(cx.file, cx.src, span.start, "each step must be a table"));
    };
    let mut out = DeTable::new();
    for (k, v) in t {
        let v = if NOT_RENDERED.contains(&k.get_ref().as_ref()) {
            v
        } else {
            render_value(v, cx, ctx)?
        };
        out.insert(k, v);
    }
    Ok(Spanned::new(span, DeValue::Table(out)))
}

fn render_value<'a>(v: Spanned<DeValue<'a>>, cx: &LoadCtx<'_>, ctx: &Value) -> Result<Spanned<DeValue<'a>>, ConfigError> {
    let span = v.span();
    let inner = match v.into_inner() {
        DeValue::String(s) => {
            let at = Spanned::new(span.clone(), ());
            DeValue::String(render(cx.env, &Origin::Inline(cx.pos(&at)), &s, ctx)?.into())
        }
        DeValue::Array(a) => DeValue::Array(a.into_iter().map(|x| render_value(x, cx, ctx)).collect::<Result<_, _>>()?),
        DeValue::Table(t) => {
            let mut out = DeTable::new();
            for (k, x) in t {
                out.insert(k, render_value(x, cx, ctx)?);
            }
            DeValue::Table(out)
        }
        other => other,
    };
    Ok(Spanned::new(span, inner))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expand the one step of a role written from `step` (after `kind = "file"`) with these
    /// vars: the expansions' ids, or the error.
    fn expand_ids(step: &str, vars: &str) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let rdir = dir.path().join("roles/r");
        std::fs::create_dir_all(&rdir).unwrap();
        std::fs::write(
            rdir.join("role.toml"),
            format!("schema = 1\n[defaults.file]\nmode = \"0600\"\ncontent = \"\"\n[[step]]\nkind = \"file\"\n{step}"),
        )
        .unwrap();
        let env = crate::template::environment();
        let role = super::super::load_role(dir.path(), "r", &env).map_err(|e| e.to_string())?;
        let vars: toml::Table = toml::from_str(vars).unwrap();
        let ctx = Value::from_serialize(&vars);
        let rs = &role.steps[0];
        let cx = LoadCtx {
            file: &role.file,
            src: &role.src,
            role_dir: &role.dir,
            env: &role.env,
        };
        let fe = rs.common.for_each.as_ref().expect("a for_each step");
        let xs = expand(&role, &cx, rs, fe, &vars, &ctx).map_err(|e| e.to_string())?;
        Ok(xs.iter().map(|x| x.step.spec.identity()).collect())
    }

    #[test]
    fn expansions_and_their_ids() {
        let ok: &[(&str, &str, &[&str])] = &[
            ("for_each = [\"a\", \"b\"]\npath = \"/etc/{{ item }}\"\n", "", &["file:/etc/a", "file:/etc/b"]),
            ("for_each = [1, 2]\npath = \"/etc/n{{ item * 10 }}\"\n", "", &["file:/etc/n10", "file:/etc/n20"]),
            (
                "for_each = { x = 1, y = 2 }\npath = \"/etc/{{ key }}-{{ item }}\"\n",
                "",
                &["file:/etc/x-1", "file:/etc/y-2"],
            ),
            ("for_each = [{ n = \"a\" }]\npath = \"/etc/{{ item.n }}\"\n", "", &["file:/etc/a"]),
            (
                "for_each = \"svcs\"\npath = \"{{ base }}/{{ item }}\"\n",
                "svcs = [\"s07\"]\nbase = \"/etc/pb\"",
                &["file:/etc/pb/s07"],
            ),
            (
                "for_each = \"mine\"\nvars = { mine = [\"m\"] }\npath = \"/etc/{{ item }}\"\n",
                "",
                &["file:/etc/m"],
            ),
            ("for_each = []\npath = \"/etc/{{ item }}\"\n", "", &[]),
        ];
        for (step, vars, want) in ok {
            let want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
            assert_eq!(expand_ids(step, vars), Ok(want), "{step}");
        }
        let bad: &[(&str, &str, &str)] = &[
            (
                "for_each = \"nope\"\npath = \"/etc/{{ item }}\"\n",
                "",
                "role.toml:7:12: `for_each` names var `nope`, which is not set",
            ),
            (
                "for_each = \"n\"\npath = \"/etc/{{ item }}\"\n",
                "n = 3",
                "role.toml:7:12: var `n` must be a list or a table",
            ),
            ("for_each = [\"a\"]\npath = \"/etc/{{ key }}\"\n", "", "role.toml:8:8: template error"),
            (
                "for_each = [\"../x\"]\npath = \"/etc/{{ item }}\"\n",
                "",
                "role.toml:8:8: path \"/etc/../x\" contains `..`",
            ),
            ("for_each = [\"a\"]\npath = \"/etc/{{ item }}\"\nmode = \"{{ item }}\"\n", "", "role.toml:9:8:"),
        ];
        for (step, vars, want) in bad {
            let err = expand_ids(step, vars).expect_err(step);
            assert!(err.contains(want), "{step}\nwant {want}\ngot  {err}");
        }
    }

    #[test]
    fn step_context_layers_vars_then_item() {
        let base = Value::from_serialize(serde_json::json!({"a": 1, "b": 2, "item": "shadowed"}));
        let sv: toml::Table = toml::from_str("b = 20\nc = 30").unwrap();
        let top = vec![("item".to_string(), Value::from("x"))];
        let v = step_context(&base, Some(&sv), &top);
        let get = |k: &str| v.get_attr(k).unwrap().to_string();
        assert_eq!((get("a"), get("b"), get("c"), get("item")), ("1".into(), "20".into(), "30".into(), "x".into()));
    }
}
