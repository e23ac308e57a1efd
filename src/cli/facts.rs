//! `bootstrap facts`

use super::{FactsFormat, NamingArgs};
use crate::error::ConfigError;
use std::path::Path;

pub fn naming(n: &NamingArgs) -> crate::facts::NamingFlags {
    crate::facts::NamingFlags { name: n.name.clone(), env: n.env.clone(), role: n.role.clone() }
}

pub fn run(n: &NamingArgs, format: FactsFormat, root: Option<&Path>) -> anyhow::Result<u8> {
    let root = root.unwrap_or(Path::new("/"));
    let facts = crate::facts::gather_local(root, &naming(n)).map_err(|e| ConfigError::msg(format!("{e:#}")))?;
    match format {
        FactsFormat::Json => println!("{}", serde_json::to_string_pretty(&facts)?),
        FactsFormat::Env => print!("{}", facts.to_env()),
        FactsFormat::Text => print!("{}", facts.to_text()),
    }
    Ok(0)
}
