//! Where a bundle comes from. This version reads local bundle roots: a directory holding
//! `roles/`, given as a path or a `file://` URL.

use crate::error::ConfigError;
use std::path::PathBuf;

pub fn resolve_local(source: &str) -> Result<PathBuf, ConfigError> {
    let path = match source.split_once("://") {
        Some(("file", p)) => PathBuf::from(p),
        Some((scheme, _)) => {
            return Err(ConfigError::msg(format!("--source {source}: `{scheme}://` sources are not supported by this version yet; use a directory holding roles/")))
        }
        None => PathBuf::from(source),
    };
    if path.is_file() {
        return Err(ConfigError::msg(format!("--source {source}: bundle tarballs are not supported by this version yet; use a directory holding roles/")));
    }
    if !path.join("roles").is_dir() {
        return Err(ConfigError::msg(format!("--source {source}: {} is not a bundle root (no roles/ directory in it)", path.display())));
    }
    Ok(path)
}
