//! The systemd seam: what steps and notify handlers ask of the service manager, spoken over
//! D-Bus (org.freedesktop.systemd1) with zbus.
//!
//! daemon-reload is batched: a step that changed unit files, their enablement or a mask only
//! owes one ([`Systemd::owe_reload`]); the reload is done once, right before the next job
//! (start, stop, restart, reload) or reboot, or when the engine settles it (before a step that
//! may use systemd's view of the units, such as `exec` or `package`, and at the end of the run).
//! Five changed unit files cost one reload, not five (each costs about 100 ms).

use crate::runner::{self, Cmd};
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use zbus::blocking::connection::Builder as ConnBuilder;
use zbus::blocking::{proxy::Builder, Connection, Proxy};
use zbus::proxy::CacheProperties;
use zbus::zvariant::OwnedObjectPath;

/// How long a start, stop, restart or reload job may take before the run fails.
pub const UNIT_JOB_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for the reply to a D-Bus method call (systemctl's default).
pub const DBUS_CALL_TIMEOUT: Duration = Duration::from_secs(25);
/// Longest wait for systemd's reply to daemon-reload, which reloads every unit (systemctl
/// allows it six minutes).
pub const DAEMON_RELOAD_TIMEOUT: Duration = Duration::from_secs(6 * 60);
/// Longest wait to connect and authenticate to the bus.
pub const DBUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
    /// Unit file state (read from disk by systemd) and active state: neither needs a reload
    /// owed for files written since.
    fn unit_state(&self, unit: &str) -> Result<UnitState>;
    /// daemon-reload now (it also pays a reload owed).
    fn daemon_reload(&self) -> Result<()>;
    /// Unit files, enablement or a mask changed on disk: a daemon-reload is owed, done once
    /// before the next job or reboot, or by [`Systemd::settle`]. (Without batching: now.)
    fn owe_reload(&self) -> Result<()> {
        self.daemon_reload()
    }
    /// Do the owed daemon-reload now, if one is owed.
    fn settle(&self) -> Result<()> {
        Ok(())
    }
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
    /// The static and the transient hostname, as systemd-hostnamed reports them
    /// (org.freedesktop.hostname1 `StaticHostname`, `Hostname`). (A test double that has no
    /// hostnamed keeps the default, an error.)
    fn hostnames(&self) -> Result<Hostnames> {
        bail!("no systemd-hostnamed behind this systemd seam")
    }
    /// Set the static hostname (hostnamed writes /etc/hostname) and the transient one.
    fn set_hostname(&self, _name: &str) -> Result<()> {
        bail!("no systemd-hostnamed behind this systemd seam")
    }
}

/// What systemd-hostnamed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hostnames {
    /// From /etc/hostname; empty when there is none.
    pub static_name: String,
    /// The kernel's hostname now.
    pub transient: String,
}

/// How long the agent waits on the bus.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    call: Duration,
    reload: Duration,
    connect: Duration,
}

const TIMEOUTS: Timeouts = Timeouts {
    call: DBUS_CALL_TIMEOUT,
    reload: DAEMON_RELOAD_TIMEOUT,
    connect: DBUS_CONNECT_TIMEOUT,
};

type Connect = Arc<dyn Fn() -> zbus::Result<ConnBuilder<'static>> + Send + Sync>;

/// systemd on the system bus; connects on first use (runs under `--root` never do). Every
/// method call has a timeout ([`DBUS_CALL_TIMEOUT`], daemon-reload [`DAEMON_RELOAD_TIMEOUT`]
/// on a second connection), and so has connecting ([`DBUS_CONNECT_TIMEOUT`]): a bus or a
/// systemd that stops answering fails the run instead of hanging it.
pub struct Dbus {
    connect: Connect,
    /// The bus, for messages.
    what: &'static str,
    timeouts: Timeouts,
    conn: OnceLock<Connection>,
    reload_conn: OnceLock<Connection>,
    /// A daemon-reload is owed (see the module doc).
    owed: AtomicBool,
}

impl Default for Dbus {
    fn default() -> Dbus {
        Dbus::new(Arc::new(ConnBuilder::system), "the system D-Bus (is systemd running?)", TIMEOUTS)
    }
}

const DEST: &str = "org.freedesktop.systemd1";

impl Dbus {
    fn new(connect: Connect, what: &'static str, timeouts: Timeouts) -> Dbus {
        Dbus {
            connect,
            what,
            timeouts,
            conn: OnceLock::new(),
            reload_conn: OnceLock::new(),
            owed: AtomicBool::new(false),
        }
    }

    /// True while a daemon-reload is owed.
    pub fn reload_owed(&self) -> bool {
        self.owed.load(Ordering::SeqCst)
    }

    fn conn(&self) -> Result<&Connection> {
        self.lazy(&self.conn, self.timeouts.call)
    }

    fn lazy<'a>(&self, cell: &'a OnceLock<Connection>, call_timeout: Duration) -> Result<&'a Connection> {
        if let Some(c) = cell.get() {
            return Ok(c);
        }
        let c = self.open(call_timeout)?;
        Ok(cell.get_or_init(|| c))
    }

    /// Connect with a method-call timeout, giving up after the connect timeout (the thread
    /// stuck in the handshake is left behind: zbus cannot cancel it).
    fn open(&self, call_timeout: Duration) -> Result<Connection> {
        let connect = self.connect.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(connect().and_then(|b| b.method_timeout(call_timeout).build()));
        });
        match rx.recv_timeout(self.timeouts.connect) {
            Ok(r) => r.with_context(|| format!("connecting to {}", self.what)),
            Err(_) => bail!("connecting to {}: no answer within {} ms", self.what, self.timeouts.connect.as_millis()),
        }
    }

    fn proxy(&self, path: &str, iface: &'static str) -> Result<Proxy<'static>> {
        self.proxy_on(self.conn()?, path, iface)
    }

    fn proxy_on(&self, conn: &Connection, path: &str, iface: &'static str) -> Result<Proxy<'static>> {
        Ok(Builder::new(conn)
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

    /// Queue a job (StartUnit, StopUnit, ...) and wait until the unit has none pending. A
    /// reload owed is done first: the job must see the unit files as they are now.
    fn job(&self, method: &str, unit: &str, want_active: bool) -> Result<()> {
        self.settle().with_context(|| format!("before {method} {unit}"))?;
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
        // Cleared first: a reload that fails is not tried again by the next job (the run fails).
        self.owed.store(false, Ordering::SeqCst);
        tracing::debug!("daemon-reload");
        let conn = self.lazy(&self.reload_conn, self.timeouts.reload)?;
        self.proxy_on(conn, "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")?
            .call::<_, _, ()>("Reload", &())
            .context("daemon-reload")
    }

    fn owe_reload(&self) -> Result<()> {
        self.owed.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn settle(&self) -> Result<()> {
        if self.reload_owed() {
            self.daemon_reload()?;
        }
        Ok(())
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
        self.settle().context("before rebooting")?;
        let login: Proxy<'_> = Builder::new(self.conn()?)
            .destination("org.freedesktop.login1")?
            .path("/org/freedesktop/login1")?
            .interface("org.freedesktop.login1.Manager")?
            .cache_properties(CacheProperties::No)
            .build()?;
        login.call::<_, _, ()>("Reboot", &(false,)).context("asking logind to reboot")
    }

    fn hostnames(&self) -> Result<Hostnames> {
        let h = self.hostnamed()?;
        Ok(Hostnames {
            static_name: h.get_property("StaticHostname").context("reading the static hostname from systemd-hostnamed")?,
            transient: h.get_property("Hostname").context("reading the hostname from systemd-hostnamed")?,
        })
    }

    fn set_hostname(&self, name: &str) -> Result<()> {
        let h = self.hostnamed()?;
        // `false`: no interactive authorization (the agent runs as root).
        h.call::<_, _, ()>("SetStaticHostname", &(name, false))
            .with_context(|| format!("systemd-hostnamed SetStaticHostname {name:?}"))?;
        h.call::<_, _, ()>("SetHostname", &(name, false))
            .with_context(|| format!("systemd-hostnamed SetHostname {name:?}"))
    }
}

/// A reload still owed when the connection goes (a run that ended on an error before the
/// engine settled it) is done here, best effort: systemd must not keep stale unit files loaded.
impl Drop for Dbus {
    fn drop(&mut self) {
        if self.reload_owed() {
            if let Err(e) = self.daemon_reload() {
                tracing::warn!("the daemon-reload owed for changed unit files: {e:#}");
            }
        }
    }
}

impl Dbus {
    /// systemd-hostnamed (started by the bus on the first call), with the usual call timeout.
    fn hostnamed(&self) -> Result<Proxy<'static>> {
        Ok(Builder::new(self.conn()?)
            .destination("org.freedesktop.hostname1")?
            .path("/org/freedesktop/hostname1")?
            .interface("org.freedesktop.hostname1")?
            .cache_properties(CacheProperties::No)
            .build()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A systemd that takes every call and answers none in time.
    struct Stuck;

    #[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
    impl Stuck {
        fn get_unit_file_state(&self, _unit: &str) -> String {
            std::thread::sleep(Duration::from_secs(30));
            "enabled".into()
        }

        fn reload(&self) {
            std::thread::sleep(Duration::from_secs(30));
        }
    }

    const SHORT: Timeouts = Timeouts {
        call: Duration::from_millis(300),
        reload: Duration::from_millis(600),
        connect: Duration::from_millis(300),
    };

    /// A private dbus-daemon (a real bus), stopped by its PID on drop.
    struct Bus {
        daemon: std::process::Child,
        address: String,
        _dir: tempfile::TempDir,
    }

    impl Bus {
        fn start() -> Bus {
            let dir = tempfile::tempdir().unwrap();
            let address = format!("unix:path={}", dir.path().join("bus").display());
            let daemon = std::process::Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile", "--address", &address])
                .spawn()
                .expect("dbus-daemon (apt-get install dbus)");
            let t = Instant::now();
            while !dir.path().join("bus").exists() {
                assert!(t.elapsed() < Duration::from_secs(10), "dbus-daemon did not open {address}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Bus { daemon, address, _dir: dir }
        }

        /// Own org.freedesktop.systemd1 on this bus with a manager that never answers in time.
        fn serve_stuck_systemd(&self) -> Connection {
            ConnBuilder::address(self.address.as_str())
                .unwrap()
                .name(DEST)
                .unwrap()
                .serve_at("/org/freedesktop/systemd1", Stuck)
                .unwrap()
                .build()
                .unwrap()
        }

        fn client(&self) -> Dbus {
            let address = self.address.clone();
            Dbus::new(Arc::new(move || ConnBuilder::address(address.as_str())), "the test bus", SHORT)
        }
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.daemon.kill();
            let _ = self.daemon.wait();
        }
    }

    #[test]
    fn a_call_that_is_never_answered_fails_at_the_timeout() {
        let bus = Bus::start();
        let _systemd = bus.serve_stuck_systemd();
        let dbus = bus.client();
        let t = Instant::now();
        let e = dbus.unit_state("x.service").expect_err("an answer came from a peer that never answers");
        assert!(t.elapsed() < Duration::from_secs(2), "failed only after {:?}", t.elapsed());
        assert!(format!("{e:#}").contains("GetUnitFileState x.service"), "{e:#}");
        // daemon-reload has a timeout of its own, longer than other calls'.
        let t = Instant::now();
        assert!(dbus.daemon_reload().is_err());
        let took = t.elapsed();
        assert!(took >= SHORT.reload && took < Duration::from_secs(2), "daemon-reload failed after {took:?}");
    }

    #[test]
    fn a_bus_that_accepts_and_never_speaks_fails_the_connect_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            // Accept and hold every connection for a minute, saying nothing.
            let mut held = Vec::new();
            let t = Instant::now();
            listener.set_nonblocking(true).unwrap();
            while t.elapsed() < Duration::from_secs(60) {
                if let Ok((s, _)) = listener.accept() {
                    held.push(s);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let address = format!("unix:path={}", path.display());
        let dbus = Dbus::new(Arc::new(move || ConnBuilder::address(address.as_str())), "the test bus", SHORT);
        let t = Instant::now();
        let e = dbus.unit_state("x.service").expect_err("connected to a bus that never speaks");
        assert!(t.elapsed() < Duration::from_secs(2), "failed only after {:?}", t.elapsed());
        assert!(format!("{e:#}").contains("connecting to the test bus: no answer within 300 ms"), "{e:#}");
    }
}
