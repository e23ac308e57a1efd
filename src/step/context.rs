//! What loading and preparing a step needs: the role file it comes from (for errors with
//! positions), the template engine and context, and the helpers every kind's `validate` and
//! `prepare` share (bodies from `content`/`source`, paths, modes).

use crate::error::{ConfigError, Pos};
use std::path::{Path, PathBuf};
use toml::Spanned;

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
