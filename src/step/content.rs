//! Diffs of file contents, as `plan` shows them (shared by `file` and `unit`).

/// Files larger than this get a summary instead of a diff.
const MAX_DIFF_BYTES: usize = 256 * 1024;
/// Diffing gives up on finding the smallest diff after this long (the diff is still correct).
const DIFF_DEADLINE: std::time::Duration = std::time::Duration::from_millis(200);

/// A unified diff of two contents, or a one-line summary when either is binary or large.
pub fn content_diff(label: &str, old: &[u8], new: &[u8]) -> String {
    if old.len().max(new.len()) > MAX_DIFF_BYTES {
        return format!(
            "content differs: {} bytes (sha256 {}) -> {} bytes (sha256 {}); too large to diff\n",
            old.len(),
            short_sha(old),
            new.len(),
            short_sha(new)
        );
    }
    match (std::str::from_utf8(old), std::str::from_utf8(new)) {
        (Ok(o), Ok(n)) => similar::TextDiff::configure()
            .timeout(DIFF_DEADLINE)
            .diff_lines(o, n)
            .unified_diff()
            .context_radius(3)
            .header(&format!("{label} (on host)"), &format!("{label} (from role)"))
            .to_string(),
        _ => format!(
            "binary content differs: {} bytes (sha256 {}) -> {} bytes (sha256 {})\n",
            old.len(),
            short_sha(old),
            new.len(),
            short_sha(new)
        ),
    }
}

/// The first 12 hex digits of a sha256, as diffs and summaries show it.
pub fn short_sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))[..12].to_string()
}
