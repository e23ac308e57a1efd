//! Error types that callers branch on (exit codes), and source positions for config errors.

use std::path::{Path, PathBuf};

/// Exit code for an invalid agent config, role or template (EX_CONFIG): nothing was changed.
pub const EXIT_CONFIG: u8 = 78;

/// A configuration, role or template error. The message already names the file, line and
/// column (or the step) it is about. Always maps to exit code 78.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// An error at a byte offset of a file whose text we have.
    pub fn at(file: &Path, src: &str, offset: usize, msg: impl std::fmt::Display) -> Self {
        let (line, col) = line_col(src, offset);
        ConfigError(format!("{}:{line}:{col}: {msg}", file.display()))
    }

    /// An error about a whole file.
    pub fn file(file: &Path, msg: impl std::fmt::Display) -> Self {
        ConfigError(format!("{}: {msg}", file.display()))
    }

    pub fn msg(msg: impl std::fmt::Display) -> Self {
        ConfigError(msg.to_string())
    }
}

/// A place in a file, kept on prepared steps so later errors can name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pos {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
}

impl Pos {
    pub fn new(file: &Path, src: &str, offset: usize) -> Self {
        let (line, col) = line_col(src, offset);
        Pos {
            file: file.to_path_buf(),
            line,
            col,
        }
    }
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.col)
    }
}

/// 1-based line and column (in characters) of a byte offset.
pub fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..floor_char_boundary(src, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let col = before[line_start..].chars().count() + 1;
    (line, col)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Another run holds the run lock and did not let go within the timeout.
#[derive(Debug, thiserror::Error)]
#[error("another bootstrap run (pid {holder}) holds {path}; gave up after waiting {waited_secs}s (raise --lock-timeout to wait longer)")]
pub struct LockTimeout {
    pub path: String,
    pub holder: String,
    pub waited_secs: u64,
}

/// Which exit code an error chain maps to.
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| e.is::<ConfigError>()) {
        EXIT_CONFIG
    } else {
        1
    }
}

/// Deserialize a spanned TOML value; errors name the position of the offending key or value.
pub fn de<T: serde::de::DeserializeOwned>(v: toml::Spanned<toml::de::DeValue<'_>>, file: &Path, src: &str) -> Result<T, ConfigError> {
    T::deserialize(toml::de::ValueDeserializer::from(v)).map_err(|e| toml_err(e, file, src))
}

/// A TOML error at its position in `file`.
pub fn toml_err(e: toml::de::Error, file: &Path, src: &str) -> ConfigError {
    match e.span() {
        Some(s) => ConfigError::at(file, src, s.start, e.message().trim_end()),
        None => ConfigError::file(file, e.message().trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_table() {
        let src = "a = 1\nbé = 2\n\nc";
        for (off, want) in [(0, (1, 1)), (4, (1, 5)), (6, (2, 1)), (9, (2, 3)), (14, (3, 1)), (15, (4, 1)), (99, (4, 2))] {
            assert_eq!(line_col(src, off), want, "offset {off}");
        }
    }
}
