//! Prometheus textfile metrics, written atomically after every `apply` (a run that fails
//! before its steps, like a dead bundle source, is recorded too) for node_exporter's textfile
//! collector: `/var/lib/node_exporter/textfile_collector/bootstrap.prom` by default, written
//! only when that directory exists; `[metrics] textfile` sets another path (created).

use crate::engine::report::Report;
use std::fmt::Write as _;
use std::path::Path;

pub const DEFAULT_TEXTFILE: &str = "/var/lib/node_exporter/textfile_collector/bootstrap.prom";

/// What one run leaves behind.
pub struct RunMetrics<'a> {
    pub report: Option<&'a Report>,
    pub exit_code: u8,
    pub duration_secs: f64,
    pub reboot_lock_held: bool,
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

pub fn render(m: &RunMetrics<'_>, now_unix: f64) -> String {
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, samples: &[(String, f64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    let ok = m.report.is_some_and(|r| !r.failed()) && m.exit_code == 0;
    gauge(
        "bootstrap_last_run_timestamp_seconds",
        "Unix time the last apply ended.",
        &[(String::new(), now_unix)],
    );
    gauge(
        "bootstrap_last_run_duration_seconds",
        "Wall time of the last apply.",
        &[(String::new(), m.duration_secs)],
    );
    gauge(
        "bootstrap_last_run_success",
        "1 when the last apply succeeded, else 0.",
        &[(String::new(), if ok { 1.0 } else { 0.0 })],
    );
    gauge(
        "bootstrap_last_run_exit_code",
        "Exit code of the last apply.",
        &[(String::new(), m.exit_code as f64)],
    );
    let s = m.report.map(|r| r.summary.clone()).unwrap_or_default();
    gauge(
        "bootstrap_resources",
        "Steps of the last apply by outcome.",
        &[
            ("{state=\"changed\"}".into(), s.changed as f64),
            ("{state=\"failed\"}".into(), s.failed as f64),
            ("{state=\"in_sync\"}".into(), s.in_sync as f64),
            ("{state=\"skipped\"}".into(), s.skipped as f64),
            ("{state=\"not_run\"}".into(), s.not_run as f64),
        ],
    );
    if let Some(b) = m.report.and_then(|r| r.bundle.as_ref()) {
        let role = m.report.map(|r| r.role.as_str()).unwrap_or_default();
        gauge(
            "bootstrap_bundle_info",
            "The bundle the last apply used (always 1).",
            &[(
                format!(
                    "{{sha256=\"{}\",origin=\"{}\",role=\"{}\"}}",
                    esc(b.sha256.as_deref().unwrap_or("")),
                    esc(&b.origin),
                    esc(role)
                ),
                1.0,
            )],
        );
    }
    let pending = m.report.is_some_and(|r| r.reboot_pending);
    gauge(
        "bootstrap_reboot_pending",
        "1 when a reboot is needed but waits for a slot or the window.",
        &[(String::new(), if pending { 1.0 } else { 0.0 })],
    );
    gauge(
        "bootstrap_reboot_lock_held",
        "1 while this node holds a reboot slot.",
        &[(String::new(), if m.reboot_lock_held { 1.0 } else { 0.0 })],
    );
    out
}

/// Write the metrics file (atomically, 0644). `configured`: the `[metrics] textfile` setting.
pub fn write(root: &Path, configured: Option<&str>, m: &RunMetrics<'_>) -> anyhow::Result<()> {
    let path = configured.unwrap_or(DEFAULT_TEXTFILE);
    // Configured: its directory is made; the default: no node_exporter here, nothing to feed.
    let Some(at) = crate::fsutil::Root::open(root)?.parent(path, configured.is_some())? else {
        return Ok(());
    };
    let now = time::OffsetDateTime::now_utc();
    let unix = now.unix_timestamp() as f64 + now.nanosecond() as f64 / 1e9;
    at.write(render(m, unix).as_bytes(), 0o644, None)
}
