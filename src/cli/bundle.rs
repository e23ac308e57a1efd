//! `bootstrap bundle build`

use std::path::Path;

pub fn build(dir: &Path, output: &Path, sign: Option<&Path>) -> anyhow::Result<u8> {
    let sha = crate::source::bundle::build_to_files(dir, output, sign)?;
    println!("{}  sha256 {sha}{}", output.display(), if sign.is_some() { " (signed)" } else { "" });
    Ok(0)
}
