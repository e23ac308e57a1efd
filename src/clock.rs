//! The wall clock, as the agent's records write it.

/// Now, UTC, RFC 3339 (`2026-11-30T21:00:00.123456789Z`): reports, state files, markers.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
