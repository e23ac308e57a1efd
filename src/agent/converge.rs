//! `converge`: the run pipeline of `apply`, `plan` and `init`.

use super::Context;
use crate::engine::report::{Report, RunStatus};
use crate::engine::{self, Mode, RunInfo};
use crate::error::ConfigError;
use crate::state::{self, StateDir};
use crate::step::Host;
use std::time::{Duration, Instant};

/// What the command line adds to a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// `--source`: wins over `[bundle] source`.
    pub source: Option<String>,
    /// How long to wait for another run to finish (apply only).
    pub lock_timeout: Duration,
    /// When the command started (a run that fails before its report records its duration).
    pub started: Instant,
    /// The command the report names: `apply`, `plan` or `init`.
    pub command: &'static str,
}

/// What a caller adds to a run.
pub struct Hooks<'a> {
    /// Runs once the steps succeeded, before reboot coordination may take a slot and run the
    /// pre-reboot hooks (`init` installs its units and writes its marker here). An error fails
    /// the run: no reboot.
    pub after_steps: Option<&'a mut dyn FnMut() -> anyhow::Result<()>>,
    /// Shows the finished report (before a reboot).
    pub show: &'a mut dyn FnMut(&Report) -> anyhow::Result<()>,
}

/// Validate the config, fetch the bundle, load and prepare the role, take the run lock, run,
/// `after_steps`, coordinate the reboot, persist, show the report, and reboot when a slot is
/// held for it: the run lock is held until logind has the request.
/// An apply that fails before it has a report still updates the metrics, so an alert sees it.
pub fn converge(cx: &Context, o: &RunOptions, mode: Mode, hooks: Hooks<'_>) -> anyhow::Result<Report> {
    let result = run(cx, o, mode, hooks);
    if let (Err(e), Mode::Apply) = (&result, mode) {
        failed_metrics(cx, e, o.started);
        super::rollout::publish_error(cx, e);
    }
    result
}

/// A run that failed before it had a report (bundle source down, a broken role) still updates
/// the metrics, so an alert sees it.
fn failed_metrics(cx: &Context, e: &anyhow::Error, start: Instant) {
    let m = crate::metrics::RunMetrics {
        report: None,
        exit_code: crate::error::exit_code_for(e),
        duration_secs: start.elapsed().as_secs_f64(),
        reboot_lock_held: StateDir::new(&cx.root).exists(state::REBOOT),
    };
    if let Err(w) = crate::metrics::write(&cx.root, cx.config.metrics.textfile.as_deref(), &m) {
        tracing::warn!("writing metrics: {w:#}");
    }
}

fn run(cx: &Context, o: &RunOptions, mode: Mode, mut hooks: Hooks<'_>) -> anyhow::Result<Report> {
    let (root, facts, config) = (cx.root.clone(), cx.facts.clone(), &cx.config);
    // Every config error before anything else, so none is found after the steps ran.
    let reboot = cx.reboot_settings()?;
    let rollout = cx.rollout_settings()?;
    let role = facts
        .service
        .clone()
        .ok_or_else(|| ConfigError::msg("no role to apply: pass --role ROLE or --name ENV-SERVICE, or name the node (config, user-data, Name tag)"))?;
    let source = match (&o.source, &config.bundle.source) {
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
    let b = Bundle {
        reboot: &reboot,
        role: &role,
        source: &source,
        verify: &verify,
    };
    let applied = if mode == Mode::Apply && rollout.gated() {
        super::rollout::gated(cx, o, &b, &rollout, fetched, &mut hooks)?
    } else {
        apply_bundle(cx, o, mode, &b, &fetched, &mut hooks, true)?
    };
    if mode == Mode::Apply && !super::rollout::superseded(cx, &applied.report) {
        super::rollout::publish(cx, &rollout, &applied.report);
    }
    (hooks.show)(&applied.report)?;
    if applied.report.reboot_now() {
        super::reboot()?;
    }
    Ok(applied.report)
}

/// What every apply of a bundle in one run shares.
pub(super) struct Bundle<'a> {
    pub reboot: &'a crate::reboot::Settings,
    pub role: &'a str,
    /// The source as given (for the report and the cache's bundle names).
    pub source: &'a str,
    pub verify: &'a crate::source::Verify,
}

/// A finished apply of one bundle, with the run lock still held (a reboot happens under it).
pub(super) struct Applied {
    pub report: Report,
    pub _lock: Option<crate::runlock::RunLock>,
}

/// Load and prepare the role from `fetched`, take the run lock, run, `after_steps`, coordinate
/// the reboot, persist the report and metrics, and with `mark_good` point `last-good` at the
/// bundle when the run succeeded (a rollout marks it only once its health checks pass).
pub(super) fn apply_bundle(
    cx: &Context,
    o: &RunOptions,
    mode: Mode,
    b: &Bundle<'_>,
    fetched: &crate::source::Fetched,
    hooks: &mut Hooks<'_>,
    mark_good: bool,
) -> anyhow::Result<Applied> {
    let steps = load(cx, b, fetched)?;
    apply_loaded(cx, o, mode, b, fetched, &steps, hooks, mark_good)
}

/// Load the role from `fetched` and prepare its steps: reads only. An error here is the
/// bundle's (a role that does not parse, a missing role, a template that does not render).
pub(super) fn load(cx: &Context, b: &Bundle<'_>, fetched: &crate::source::Fetched) -> Result<Vec<crate::role::Prepared>, ConfigError> {
    let env = crate::template::environment();
    let roles = crate::role::resolve(&fetched.root, b.role, &env)?;
    let vars = crate::role::merged_vars(&roles, cx.facts.env.as_deref())?;
    crate::role::prepare(&roles, &vars, &cx.facts, &cx.root, &env)
}

/// [`apply_bundle`] with the steps [`load`]ed: from the run lock on.
#[allow(clippy::too_many_arguments)]
pub(super) fn apply_loaded(
    cx: &Context,
    o: &RunOptions,
    mode: Mode,
    b: &Bundle<'_>,
    fetched: &crate::source::Fetched,
    steps: &[crate::role::Prepared],
    hooks: &mut Hooks<'_>,
    mark_good: bool,
) -> anyhow::Result<Applied> {
    let (root, facts, config) = (cx.root.clone(), cx.facts.clone(), &cx.config);

    // Everything above only reads; the host is touched from here on.
    let lock = match mode {
        Mode::Apply => Some(crate::runlock::acquire(&root, o.lock_timeout)?),
        Mode::Plan => None,
    };
    let first_boot = mode == Mode::Apply
        && o.command == "init"
        && root == std::path::Path::new("/")
        && !crate::state::StateDir::new(&root).exists(crate::state::FIRSTBOOT_DONE);
    let host = Host {
        root: root.clone(),
        facts,
        systemd: Box::new(crate::systemd::Dbus::default()),
        refresh_lists: Default::default(),
        first_boot,
    };
    if mode == Mode::Apply {
        // A first boot that crashed while its packages were not synced yet: redo them first.
        crate::step::package::recover_unsynced(&host)?;
    }
    let mut report = engine::run(
        steps,
        &host,
        mode,
        RunInfo {
            role: b.role.to_string(),
            source: b.source.to_string(),
        },
    );
    if host.first_boot {
        // What the first boot wrote without fsyncs (`Host::owned_fs`), durable before
        // `firstboot.done` and before anything else is recorded.
        crate::fsutil::sync_local_filesystems();
    }
    report.command = o.command.into();
    report.bundle = Some(engine::report::BundleInfo {
        sha256: fetched.sha256.clone(),
        origin: fetched.origin.to_string(),
    });
    if let (Mode::Apply, false, Some(after)) = (mode, report.failed(), hooks.after_steps.as_mut()) {
        if let Err(e) = after() {
            report.status = RunStatus::Failed;
            report.error.get_or_insert(format!("{e:#}"));
        }
    }
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
        let drained = crate::asg::watch::drained_at(&root, host.facts.instance_id.as_deref());
        if let Some(at) = &drained {
            tracing::warn!("this instance was drained at {at} (scale-in): no reboot coordination, no reboot slot is taken");
        }
        match drained.map_or_else(|| crate::reboot::coordinate(&host, b.reboot, run, None).map(Some), |_| Ok(None)) {
            Ok(None) => {}
            Ok(Some(o)) => {
                report.reboot_pending = o.action == crate::reboot::Action::Pending;
                if o.action.is_failure() {
                    report.status = RunStatus::Failed;
                    report.error.get_or_insert_with(|| o.detail.clone().unwrap_or_default());
                }
                report.reboot = Some(o);
            }
            Err(e) => {
                report.status = RunStatus::Failed;
                report.error.get_or_insert(format!("reboot coordination: {e:#}"));
            }
        }
        engine::write_report(&root, &report)?;
        if let (false, Some(sha), true) = (report.failed(), &fetched.sha256, mark_good) {
            crate::source::mark_good(&root, sha)?;
        }
        let m = crate::metrics::RunMetrics {
            report: Some(&report),
            exit_code: report.exit_code(false),
            duration_secs: report.duration_ms as f64 / 1000.0,
            reboot_lock_held: StateDir::new(&root).exists(state::REBOOT),
        };
        if let Err(e) = crate::metrics::write(&root, config.metrics.textfile.as_deref(), &m) {
            tracing::warn!("writing metrics: {e:#}");
        }
    }
    Ok(Applied { report, _lock: lock })
}
