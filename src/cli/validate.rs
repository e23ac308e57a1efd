//! `bootstrap validate`

use std::path::Path;

pub fn run(path: &Path) -> anyhow::Result<u8> {
    let bundle = crate::source::resolve_local(&path.to_string_lossy())?;
    let names = crate::role::validate_bundle(&bundle.root)?;
    println!("{}: {} roles OK ({})", path.display(), names.len(), names.join(", "));
    Ok(0)
}
