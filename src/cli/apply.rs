//! `bootstrap apply` and `bootstrap plan`

use super::RunArgs;
use crate::engine::{self, Mode, RunInfo};
use crate::error::ConfigError;
use crate::step::Host;
use std::io::IsTerminal;
use std::path::PathBuf;

pub fn run(a: &RunArgs, mode: Mode) -> anyhow::Result<u8> {
    let root = a.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let start = std::time::Instant::now();
    let cx = super::Context::gather(&root, &a.naming, false)?;
    let result = converge(&cx, a, mode);
    if let (Err(e), Mode::Apply) = (&result, mode) {
        failed_metrics(&cx, e, start);
    }
    let c = result?;
    if c.reboot_now {
        reboot()?;
    }
    Ok(c.code)
}

/// What a converge ended with.
pub struct Converged {
    pub code: u8,
    /// A reboot slot is held and the report written: the caller reboots once it has done
    /// everything that must come before (`init` installs its units first).
    pub reboot_now: bool,
}

/// Ask logind to reboot (the slot is held; see /var/lib/bootstrap/reboot.json).
pub fn reboot() -> anyhow::Result<()> {
    tracing::warn!("rebooting now (reboot slot held; see /var/lib/bootstrap/reboot.json)");
    crate::systemd::Systemd::reboot(&crate::systemd::Dbus::default())
}

/// A run that failed before it had a report (bundle source down, a broken role) still updates
/// the metrics, so an alert sees it.
pub fn failed_metrics(cx: &super::Context, e: &anyhow::Error, start: std::time::Instant) {
    let m = crate::metrics::RunMetrics {
        report: None,
        exit_code: crate::error::exit_code_for(e),
        duration_secs: start.elapsed().as_secs_f64(),
        reboot_lock_held: crate::state::StateDir::new(&cx.root).exists(crate::state::REBOOT),
    };
    if let Err(w) = crate::metrics::write(&cx.root, cx.config.metrics.textfile.as_deref(), &m) {
        tracing::warn!("writing metrics: {w:#}");
    }
}

/// Validate the config, fetch the bundle, load and prepare the role, take the run lock, run,
/// coordinate the reboot, report. Never reboots itself (see `Converged`).
pub fn converge(cx: &super::Context, a: &RunArgs, mode: Mode) -> anyhow::Result<Converged> {
    let (root, facts, config) = (cx.root.clone(), cx.facts.clone(), &cx.config);
    // Every config error before anything else, so none is found after the steps ran.
    let reboot = cx.reboot_settings()?;
    let role = facts
        .service
        .clone()
        .ok_or_else(|| ConfigError::msg("no role to apply: pass --role ROLE or --name ENV-SERVICE, or name the node (config, user-data, Name tag)"))?;
    let source = match (&a.source, &config.bundle.source) {
        (Some(s), _) => s.clone(),
        (None, Some(s)) => cx.substitute(s)?,
        (None, None) => {
            return Err(ConfigError::msg("no bundle source: pass --source or set [bundle] source in /etc/bootstrap/config.toml or user-data").into())
        }
    };
    let verify = crate::source::Verify {
        sha256: config.bundle.sha256.clone(),
        public_key: config.bundle.public_key.clone(),
        limits: crate::source::bundle::Limits {
            max_bytes: config.bundle.max_bytes.unwrap_or(crate::source::bundle::Limits::default().max_bytes),
            max_entries: config.bundle.max_entries.unwrap_or(crate::source::bundle::Limits::default().max_entries),
        },
        s3: crate::source::s3::S3Options {
            endpoint: config.bundle.s3_endpoint.clone(),
            region: config.bundle.s3_region.clone().or(facts.region.clone()),
            max_bytes: 0,
        },
    };
    let src = crate::source::Source::parse(&source)?;
    // A tarball is checked and unpacked (into the cache for apply) before roles are read.
    let fetched = crate::source::fetch(&src, &root, &verify, mode == Mode::Apply)?;
    let bundle = fetched.root.clone();

    let env = crate::template::environment();
    let roles = crate::role::resolve(&bundle, &role, &env)?;
    let vars = crate::role::merged_vars(&roles, facts.env.as_deref())?;
    let steps = crate::role::prepare(&roles, &vars, &facts, &root, &env)?;

    // Everything above only reads; the host is touched from here on.
    let _lock = match mode {
        Mode::Apply => Some(crate::runlock::acquire(&root, a.lock_timeout)?),
        Mode::Plan => None,
    };
    let host = Host {
        root: root.clone(),
        facts,
        systemd: Box::new(crate::systemd::Dbus::default()),
    };
    let mut report = engine::run(
        &steps,
        &host,
        mode,
        RunInfo {
            role: role.clone(),
            source: source.to_string(),
        },
    );
    report.bundle = Some(engine::report::BundleInfo {
        sha256: fetched.sha256.clone(),
        origin: fetched.origin.to_string(),
    });
    let mut reboot_now = false;
    if mode == Mode::Apply {
        // The first step with reboot_required that changed the host (report.steps follows steps).
        let changed = steps
            .iter()
            .zip(&report.steps)
            .find(|(p, r)| p.reboot_required && r.status == engine::report::StepStatus::Changed)
            .map(|(p, _)| p.id.clone());
        let run = crate::reboot::RunResult {
            ok: !report.failed(),
            changed: changed.as_deref(),
        };
        match crate::reboot::coordinate(&host, &reboot, run, None) {
            Ok(o) => {
                report.reboot_pending = o.action == crate::reboot::Action::Pending;
                if o.action.is_failure() {
                    report.status = engine::report::RunStatus::Failed;
                    report.error.get_or_insert_with(|| o.detail.clone().unwrap_or_default());
                }
                reboot_now = o.reboot_now;
                report.reboot = Some(o);
            }
            Err(e) => {
                report.status = engine::report::RunStatus::Failed;
                report.error.get_or_insert(format!("reboot coordination: {e:#}"));
            }
        }
        engine::write_report(&root, &report)?;
        if let (false, Some(sha)) = (report.failed(), &fetched.sha256) {
            crate::source::mark_good(&root, sha)?;
        }
        let m = crate::metrics::RunMetrics {
            report: Some(&report),
            exit_code: report.exit_code(false),
            duration_secs: report.duration_ms as f64 / 1000.0,
            reboot_lock_held: crate::state::StateDir::new(&root).exists(crate::state::REBOOT),
        };
        if let Err(e) = crate::metrics::write(&root, config.metrics.textfile.as_deref(), &m) {
            tracing::warn!("writing metrics: {e:#}");
        }
    }
    if a.json {
        println!("{}", engine::report_json(&report)?);
    } else if std::io::stdout().is_terminal() || mode == Mode::Plan || report.failed() || report.summary.changed > 0 {
        print!("{}", crate::secrets::redact(&report.human()));
    } else {
        print!(
            "{}",
            crate::secrets::redact(&report.human().lines().last().map(|l| format!("{l}\n")).unwrap_or_default())
        );
    }
    Ok(Converged {
        code: report.exit_code(a.detailed_exitcodes),
        reboot_now,
    })
}
