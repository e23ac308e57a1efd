//! The systemd seam: what steps and notify handlers ask of the service manager, spoken over
//! D-Bus (org.freedesktop.systemd1) with zbus.

use crate::runner::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use zbus::blocking::{proxy::Builder, Connection, Proxy};
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

/// How long a start, stop, restart or reload job may take before the run fails.
pub const UNIT_JOB_TIMEOUT: Duration = Duration::from_secs(90);
/// How often a job's progress is read while waiting for it.
const JOB_POLL: Duration = Duration::from_millis(50);
/// Journal lines included when a unit fails.
const JOURNAL_LINES: usize = 20;

/// A unit as systemd sees it right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    /// `GetUnitFileState`: enabled, disabled, masked, static, ... or `not-found`.
    pub file_state: String,
    /// `ActiveState`: active, inactive, failed, activating, ...
    pub active_state: String,
}

impl UnitState {
    pub fn is_enabled(&self) -> bool {
        matches!(self.file_state.as_str(), "enabled" | "enabled-runtime" | "static" | "generated" | "alias")
    }

    pub fn is_masked(&self) -> bool {
        self.file_state.starts_with("masked")
    }

    pub fn is_active(&self) -> bool {
        matches!(self.active_state.as_str(), "active" | "activating" | "reloading")
    }
}

pub trait Systemd {
    fn unit_state(&self, unit: &str) -> Result<UnitState>;
    fn daemon_reload(&self) -> Result<()>;
    /// Enable or disable on disk (symlinks); the caller reloads once afterwards.
    fn enable(&self, unit: &str, enable: bool) -> Result<()>;
    /// Mask or unmask on disk; the caller reloads once afterwards.
    fn mask(&self, unit: &str, mask: bool) -> Result<()>;
    fn start(&self, unit: &str) -> Result<()>;
    fn stop(&self, unit: &str) -> Result<()>;
    fn restart(&self, unit: &str) -> Result<()>;
    fn reload(&self, unit: &str) -> Result<()>;
    /// Reboot through logind (org.freedesktop.login1.Manager.Reboot).
    fn reboot(&self) -> Result<()>;
}

/// systemd on the system bus; connects on first use (runs under `--root` never do).
#[derive(Default)]
pub struct Dbus {
    conn: OnceLock<Connection>,
}

const DEST: &str = "org.freedesktop.systemd1";

impl Dbus {
    fn conn(&self) -> Result<&Connection> {
        if let Some(c) = self.conn.get() {
            return Ok(c);
        }
        let c = Connection::system().context("connecting to the system D-Bus (is systemd running?)")?;
        Ok(self.conn.get_or_init(|| c))
    }

    fn proxy(&self, path: &str, iface: &'static str) -> Result<Proxy<'static>> {
        Ok(Builder::new(self.conn()?)
            .destination(DEST)?
            .path(path.to_string())?
            .interface(iface)?
            .cache_properties(CacheProperties::No)
            .build()?)
    }

    fn manager(&self) -> Result<Proxy<'static>> {
        self.proxy("/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
    }

    fn unit_path(&self, unit: &str) -> Result<OwnedObjectPath> {
        self.manager()?.call("LoadUnit", &(unit,)).with_context(|| format!("loading unit {unit}"))
    }

    fn unit_prop(&self, path: &OwnedObjectPath, prop: &str) -> Result<String> {
        Ok(self.proxy(path.as_str(), "org.freedesktop.systemd1.Unit")?.get_property::<String>(prop)?)
    }

    /// Queue a job (StartUnit, StopUnit, ...) and wait until the unit has none pending.
    fn job(&self, method: &str, unit: &str, want_active: bool) -> Result<()> {
        let _job: OwnedObjectPath = self.manager()?.call(method, &(unit, "replace")).with_context(|| format!("{method} {unit}"))?;
        let path = self.unit_path(unit)?;
        let unit_proxy = self.proxy(path.as_str(), "org.freedesktop.systemd1.Unit")?;
        let start = Instant::now();
        loop {
            let (job_id, _): (u32, OwnedObjectPath) = unit_proxy.get_property("Job")?;
            let state: String = unit_proxy.get_property("ActiveState")?;
            if job_id == 0 && !matches!(state.as_str(), "activating" | "deactivating" | "reloading") {
                let ok = if want_active {
                    state == "active" || self.ran_to_success(&path)?
                } else {
                    state != "active"
                };
                if ok {
                    return Ok(());
                }
                bail!("{unit} is {state} after {method}; its journal:\n{}", journal(unit));
            }
            if start.elapsed() > UNIT_JOB_TIMEOUT {
                bail!(
                    "{unit} still {state} {}s after {method}; its journal:\n{}",
                    UNIT_JOB_TIMEOUT.as_secs(),
                    journal(unit)
                );
            }
            std::thread::sleep(JOB_POLL);
        }
    }

    /// A oneshot service that ran and exited cleanly is inactive with Result=success.
    fn ran_to_success(&self, path: &OwnedObjectPath) -> Result<bool> {
        let svc = self.proxy(path.as_str(), "org.freedesktop.systemd1.Service")?;
        Ok(matches!(svc.get_property::<String>("Type").as_deref(), Ok("oneshot")) && svc.get_property::<String>("Result")? == "success")
    }
}

/// The unit's last journal lines (best effort: an empty string if journalctl fails).
pub fn journal(unit: &str) -> String {
    let argv = [
        "journalctl",
        "--no-pager",
        "-o",
        "short-monotonic",
        "-n",
        &JOURNAL_LINES.to_string(),
        "-u",
        unit,
    ];
    runner::run(&Cmd {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .map(|o| o.stdout.trim_end().to_string())
    .unwrap_or_default()
}

impl Systemd for Dbus {
    fn unit_state(&self, unit: &str) -> Result<UnitState> {
        let file_state = match self.manager()?.call::<_, _, String>("GetUnitFileState", &(unit,)) {
            Ok(s) => s,
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.DBus.Error.FileNotFound" || name.as_str() == "org.freedesktop.systemd1.NoSuchUnit" =>
            {
                "not-found".to_string()
            }
            Err(e) => return Err(e).with_context(|| format!("GetUnitFileState {unit}")),
        };
        let active_state = self.unit_prop(&self.unit_path(unit)?, "ActiveState")?;
        Ok(UnitState { file_state, active_state })
    }

    fn daemon_reload(&self) -> Result<()> {
        self.manager()?.call::<_, _, ()>("Reload", &()).context("daemon-reload")
    }

    fn enable(&self, unit: &str, enable: bool) -> Result<()> {
        let m = self.manager()?;
        if enable {
            let _: (bool, Vec<(String, String, String)>) = m
                .call("EnableUnitFiles", &(vec![unit], false, true))
                .with_context(|| format!("enabling {unit}"))?;
        } else {
            let _: Vec<(String, String, String)> = m.call("DisableUnitFiles", &(vec![unit], false)).with_context(|| format!("disabling {unit}"))?;
        }
        Ok(())
    }

    fn mask(&self, unit: &str, mask: bool) -> Result<()> {
        let m = self.manager()?;
        if mask {
            let _: Vec<(String, String, String)> = m.call("MaskUnitFiles", &(vec![unit], false, true)).with_context(|| format!("masking {unit}"))?;
        } else {
            let _: Vec<(String, String, String)> = m.call("UnmaskUnitFiles", &(vec![unit], false)).with_context(|| format!("unmasking {unit}"))?;
        }
        Ok(())
    }

    fn start(&self, unit: &str) -> Result<()> {
        self.job("StartUnit", unit, true)
    }

    fn stop(&self, unit: &str) -> Result<()> {
        self.job("StopUnit", unit, false)
    }

    fn restart(&self, unit: &str) -> Result<()> {
        self.job("RestartUnit", unit, true)
    }

    fn reload(&self, unit: &str) -> Result<()> {
        self.job("ReloadUnit", unit, true)
    }

    fn reboot(&self) -> Result<()> {
        let login: Proxy<'_> = Builder::new(self.conn()?)
            .destination("org.freedesktop.login1")?
            .path("/org/freedesktop/login1")?
            .interface("org.freedesktop.login1.Manager")?
            .cache_properties(CacheProperties::No)
            .build()?;
        login.call::<_, _, ()>("Reboot", &(false,)).context("asking logind to reboot")
    }
}
