//! Templates (minijinja) over facts and vars, with strict undefined.
//!
//! Field values are templated after the TOML is parsed; the TOML text itself never is.

use crate::error::{line_col, ConfigError, Pos};
use minijinja::{Environment, UndefinedBehavior, Value};
use std::cell::Cell;
use std::path::Path;

/// How many instructions one render (or one `when` expression) may execute. Ample for any
/// config (a loop writing 100,000 backend lines renders); an endless or huge loop stops here
/// (after 0.9 s of CPU in a debug build) with an error naming the template, instead of hanging
/// the run.
pub const FUEL: u64 = 5_000_000;

thread_local! {
    /// `secret()` calls on this thread so far (see [`SecretCalls`]).
    static SECRET_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Did rendering call `secret()`? Take a mark before rendering a step's templates and ask
/// after: any call in between, through any filter or macro, counts (the value itself is never
/// looked at, so a secret that a filter reshapes is still known).
#[derive(Debug, Clone, Copy)]
pub struct SecretCalls(u64);

impl SecretCalls {
    pub fn mark() -> SecretCalls {
        SecretCalls(SECRET_CALLS.with(Cell::get))
    }

    pub fn called_since(self) -> bool {
        SECRET_CALLS.with(Cell::get) != self.0
    }
}

/// Where a template's text came from, so errors can name it.
#[derive(Debug, Clone)]
pub enum Origin {
    /// A file of its own (`roles/x/files/y.j2`): errors name its line and column.
    File(std::path::PathBuf),
    /// An inline string in role.toml at this position: errors name it and the template line.
    Inline(Pos),
}

pub fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_fuel(Some(FUEL));
    // secret("ssm:/path") | secret("file:/path"): the value, remembered for redaction; the
    // call is counted, so the step that rendered it is sensitive as a whole.
    env.add_function("secret", |uri: String| -> Result<String, minijinja::Error> {
        SECRET_CALLS.with(|c| c.set(c.get().wrapping_add(1)));
        crate::secrets::resolve(&uri).map_err(|e| minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, format!("{e:#}")))
    });
    env
}

/// The engine for one role: `{% include %}` and `{% import %}` load templates from the role's
/// `files/` only (an absolute name or one with `..` is refused).
pub fn role_environment(base: &Environment<'static>, files: &Path) -> Environment<'static> {
    let mut env = base.clone();
    let files = files.to_path_buf();
    env.set_loader(move |name: &str| {
        let rel = Path::new(name);
        if name.is_empty() || rel.is_absolute() || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            return Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("template {name:?} must be a relative path inside the role's files/ (no `..`, not absolute)"),
            ));
        }
        let p = files.join(rel);
        match std::fs::read_to_string(&p) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("reading {}: {e}", p.display()),
            )),
        }
    });
    env
}

/// The context templates and `when` see: vars at top level, facts under `facts`.
pub fn context(vars: &toml::Table, facts: &crate::facts::Facts) -> Value {
    let mut map: std::collections::BTreeMap<String, Value> = vars.iter().map(|(k, v)| (k.clone(), Value::from_serialize(v))).collect();
    map.insert("facts".into(), Value::from_serialize(facts));
    Value::from(map)
}

fn describe(origin: &Origin, src: &str, e: &minijinja::Error) -> ConfigError {
    let what = match e.detail() {
        _ if e.kind() == minijinja::ErrorKind::OutOfFuel => {
            format!("template error: stopped after {FUEL} instructions (an endless or too large loop?)")
        }
        Some(d) => format!("template error: {} ({d})", e.kind()),
        None => format!("template error: {}", e.kind()),
    };
    // An error inside an included or imported template (the innermost cause) also names
    // that file, under the role's files/, and its line.
    let mut inner = e;
    while let Some(cause) = std::error::Error::source(inner).and_then(|c| c.downcast_ref::<minijinja::Error>()) {
        inner = cause;
    }
    let what = match inner.name().filter(|n| *n != "<string>" && !std::ptr::eq(inner, e)) {
        Some(n) => {
            let d = inner.detail().map(|d| format!(" ({d})")).unwrap_or_default();
            format!("{what}: in files/{n} line {}: {}{d}", inner.line().unwrap_or(1), inner.kind())
        }
        None => what,
    };
    match origin {
        Origin::File(path) => {
            let (line, col) = match e.range() {
                Some(r) => line_col(src, r.start),
                None => (e.line().unwrap_or(1), 1),
            };
            ConfigError(format!("{}:{line}:{col}: {what}", path.display()))
        }
        Origin::Inline(pos) => {
            let tline = e.range().map(|r| line_col(src, r.start).0).or(e.line()).unwrap_or(1);
            ConfigError(format!("{pos}: {what} at template line {tline}"))
        }
    }
}

/// Check that a template parses (no rendering: `validate` has no facts).
pub fn check_syntax(env: &Environment<'_>, origin: &Origin, src: &str) -> Result<(), ConfigError> {
    env.template_from_str(src).map(|_| ()).map_err(|e| describe(origin, src, &e))
}

pub fn render(env: &Environment<'_>, origin: &Origin, src: &str, ctx: &Value) -> Result<String, ConfigError> {
    let tmpl = env.template_from_str(src).map_err(|e| describe(origin, src, &e))?;
    tmpl.render(ctx).map_err(|e| describe(origin, src, &e))
}

pub fn check_expression(env: &Environment<'_>, pos: &Pos, expr: &str) -> Result<(), ConfigError> {
    env.compile_expression(expr)
        .map(|_| ())
        .map_err(|e| ConfigError(format!("{pos}: invalid `when` expression {expr:?}: {e}")))
}

/// Evaluate a `when` expression; undefined names are errors.
pub fn eval_when(env: &Environment<'_>, pos: &Pos, expr: &str, ctx: &Value) -> Result<bool, ConfigError> {
    let compiled = env
        .compile_expression(expr)
        .map_err(|e| ConfigError(format!("{pos}: invalid `when` expression {expr:?}: {e}")))?;
    let v = compiled
        .eval(ctx)
        .map_err(|e| ConfigError(format!("{pos}: `when` expression {expr:?} failed: {e}")))?;
    if v.is_undefined() {
        return Err(ConfigError(format!("{pos}: `when` expression {expr:?} is undefined")));
    }
    Ok(v.is_true())
}

/// Display helper for errors about a template file relative to the bundle.
pub fn file_origin(path: &Path) -> Origin {
    Origin::File(path.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_undefined_names_the_line() {
        let env = environment();
        let ctx = Value::from_serialize(serde_json::json!({"a": 1}));
        let origin = Origin::File("t.j2".into());
        assert_eq!(render(&env, &origin, "x={{ a }}\n", &ctx).unwrap(), "x=1\n");
        let err = render(&env, &origin, "ok\nx={{ nope }}\n", &ctx).unwrap_err().to_string();
        assert!(err.starts_with("t.j2:2:"), "{err}");
        assert!(err.contains("undefined"), "{err}");
        let pos = Pos {
            file: "r.toml".into(),
            line: 3,
            col: 8,
        };
        assert!(eval_when(&env, &pos, "a == 1", &ctx).unwrap());
        assert!(eval_when(&env, &pos, "nope == 1", &ctx).is_err());
    }

    /// A render that calls `secret()` is known as such, whatever filter reshapes the value;
    /// one that does not is not.
    #[test]
    fn a_render_that_calls_secret_is_flagged() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "line-one-4hQ\nline-two-9Zx\n").unwrap();
        let env = environment();
        let ctx = Value::from_serialize(serde_json::json!({"a": 1}));
        let origin = Origin::File("t.j2".into());
        let mark = SecretCalls::mark();
        assert_eq!(render(&env, &origin, "x={{ a }}\n", &ctx).unwrap(), "x=1\n");
        assert!(!mark.called_since(), "no secret() in that render");
        let src = format!("k:\n  {{{{ secret('file:{}') | indent(2) | upper }}}}\n", key.display());
        let mark = SecretCalls::mark();
        assert_eq!(render(&env, &origin, &src, &ctx).unwrap(), "k:\n  LINE-ONE-4HQ\n  LINE-TWO-9ZX\n");
        assert!(mark.called_since(), "secret() through filters is seen");
        // A second call (the value now cached) counts as well.
        let mark = SecretCalls::mark();
        render(&env, &origin, &format!("{{% if secret('file:{}') %}}x{{% endif %}}", key.display()), &ctx).unwrap();
        assert!(mark.called_since());
    }

    /// A template with a loop too large to finish stops with an error that names it, instead
    /// of hanging the run (10^10 iterations, each well inside minijinja's range limit).
    #[test]
    fn an_endless_template_stops_with_an_error_naming_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let env = environment();
            let ctx = Value::from_serialize(serde_json::json!({}));
            let src = "ok\n{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\n";
            let _ = tx.send(render(&env, &Origin::File("roles/x/files/loop.j2".into()), src, &ctx));
        });
        // Not a timing goal: without a limit the render runs for hours; a minute means "hangs".
        let got = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the template hung");
        let err = got.expect_err("a 10^10-step template must fail").to_string();
        assert!(err.starts_with("roles/x/files/loop.j2:2:"), "{err}");
        assert!(err.contains("stopped after") && err.contains("loop"), "{err}");
    }
}
