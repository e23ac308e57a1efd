//! `[reboot]` validated into typed values before any step runs: the window, the splay, hook
//! and health check timeouts, the checks themselves, the group and the holder id. A mistake
//! here is a `ConfigError` (exit 78) while the host is still untouched, not a surprise after
//! the steps changed it.

use super::etcd::Tls;
use super::window::Window;
use crate::config::{check_url, EtcdConfig, RebootConfig, RebootStrategy};
use crate::error::ConfigError;
use std::time::Duration;

const HOOK_TIMEOUT: Duration = Duration::from_secs(300);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// The default splay: a quarter of the window, at most this.
const MAX_DEFAULT_SPLAY: Duration = Duration::from_secs(900);

/// A pre-reboot hook: argv and its timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub argv: Vec<String>,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The unit is active.
    Unit(String),
    /// GET answers 200.
    Url(String),
    /// Exits 0.
    Command(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub check: Check,
    pub timeout: Duration,
}

/// The lock service a coordinated strategy talks to.
#[derive(Debug, Clone)]
pub enum Service {
    None,
    Etcd(EtcdService),
    FleetLock(String),
}

/// `[reboot.etcd]`, checked, with its TLS files read (on the live system, where they are used).
#[derive(Clone)]
pub struct EtcdService {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Slots when the semaphore is created.
    pub slots: u64,
    pub tls: Tls,
}

/// Without the PEM bytes: the client key never reaches a log line.
impl std::fmt::Debug for EtcdService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdService")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("slots", &self.slots)
            .field("ca", &self.tls.ca_pem.is_some())
            .field("client_cert", &self.tls.identity_pem.is_some())
            .finish()
    }
}

/// The PEM files `[reboot.etcd]` names, read; a missing or unreadable one is a config error.
pub fn etcd_tls(e: &EtcdConfig) -> Result<Tls, ConfigError> {
    let read = |what: &str, f: &str| std::fs::read(f).map_err(|err| ConfigError::msg(format!("[reboot.etcd] {what} {f}: {err}")));
    let identity_pem = match (&e.cert_file, &e.key_file) {
        (Some(c), Some(k)) => {
            let mut pem = read("cert_file", c)?;
            pem.push(b'\n');
            pem.extend(read("key_file", k)?);
            Some(pem)
        }
        (None, None) => None,
        _ => return Err(ConfigError::msg("[reboot.etcd] cert_file and key_file go together")),
    };
    Ok(Tls {
        ca_pem: e.ca_file.as_deref().map(|f| read("ca_file", f)).transpose()?,
        identity_pem,
    })
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub strategy: RebootStrategy,
    /// The reboot group (always set for `etcd` and `fleet_lock` on the live system).
    pub group: Option<String>,
    /// This node's id in the lock service (checked for `etcd` and `fleet_lock` on the live
    /// system); also seeds this node's turn in the window.
    pub holder: String,
    pub service: Service,
    pub window: Option<Window>,
    pub splay: Duration,
    pub hooks: Vec<Hook>,
    pub health: Vec<Health>,
}

/// The longest timeout a hook or health check may have: longer is a mistake in the config
/// (and would overflow the deadlines computed from it), refused by name.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

fn duration(what: &str, s: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match s {
        Some(t) => {
            let d = humantime::parse_duration(t).map_err(|e| ConfigError::msg(format!("{what} timeout {t:?}: {e}")))?;
            if d > MAX_TIMEOUT {
                return Err(ConfigError::msg(format!("{what} timeout {t:?}: at most 24h")));
            }
            Ok(d)
        }
        None => Ok(default),
    }
}

/// Hook commands (`[[reboot.pre_hook]]`, `[[asg.terminate_hook]]`) checked; `what` names the
/// table in errors.
pub fn hooks(what: &str, cfg: &[crate::config::HookConfig]) -> Result<Vec<Hook>, ConfigError> {
    let mut hooks = Vec::new();
    for (i, h) in cfg.iter().enumerate() {
        let what = format!("{what} #{}", i + 1);
        if h.command.first().is_none_or(|c| c.is_empty()) {
            return Err(ConfigError::msg(format!("{what}: command must name a program")));
        }
        hooks.push(Hook {
            argv: h.command.clone(),
            timeout: duration(&what, &h.timeout, HOOK_TIMEOUT)?,
        });
    }
    Ok(hooks)
}

/// Health checks (`[[reboot.health]]`, `[[asg.health]]`) checked; `what` names the table in
/// errors.
pub fn health_checks(what: &str, cfg: &[crate::config::HealthConfig]) -> Result<Vec<Health>, ConfigError> {
    let mut health = Vec::new();
    for (i, c) in cfg.iter().enumerate() {
        let what = format!("{what} #{}", i + 1);
        let check = match (&c.unit, &c.url, &c.command) {
            (Some(u), None, None) => {
                crate::step::unit::check_unit_name(u).map_err(|e| ConfigError::msg(format!("{what}: {e}")))?;
                Check::Unit(u.clone())
            }
            (None, Some(url), None) => {
                check_url(&format!("{what} url"), url)?;
                Check::Url(url.clone())
            }
            (None, None, Some(argv)) => {
                if argv.first().is_none_or(|c| c.is_empty()) {
                    return Err(ConfigError::msg(format!("{what}: command must name a program")));
                }
                Check::Command(argv.clone())
            }
            _ => return Err(ConfigError::msg(format!("{what}: give exactly one of unit, url, command"))),
        };
        health.push(Health {
            check,
            timeout: duration(&what, &c.timeout, HEALTH_TIMEOUT)?,
        });
    }
    Ok(health)
}

impl Settings {
    /// `group`: `[reboot] group` substituted, else ENV-SERVICE (None: neither). `holder`: the
    /// instance id, else the machine id, or why this node has no usable id. `live`: the run
    /// changes the running system (only then does it coordinate, so only then do a missing
    /// group or holder id matter).
    pub fn new(cfg: &RebootConfig, group: Option<String>, holder: Result<String, ConfigError>, live: bool) -> Result<Settings, ConfigError> {
        let strategy = cfg.strategy.unwrap_or_default();
        let coordinated = matches!(strategy, RebootStrategy::Etcd | RebootStrategy::FleetLock);
        let service = match strategy {
            RebootStrategy::Etcd => {
                let e = &cfg.etcd;
                if e.endpoints.is_empty() {
                    return Err(ConfigError::msg("no etcd endpoints: set [reboot.etcd] endpoints in /etc/bootstrap/config.toml"));
                }
                if e.cert_file.is_some() != e.key_file.is_some() {
                    return Err(ConfigError::msg("[reboot.etcd] cert_file and key_file go together"));
                }
                for ep in &e.endpoints {
                    check_url("[reboot.etcd] endpoints", ep)?;
                }
                Service::Etcd(EtcdService {
                    endpoints: e.endpoints.clone(),
                    prefix: e.prefix.clone().unwrap_or_else(|| super::etcd::DEFAULT_PREFIX.to_string()),
                    slots: e.slots.unwrap_or(1),
                    // The files are the node's: read where they are used, on the live system.
                    tls: if live { etcd_tls(e)? } else { Tls::default() },
                })
            }
            RebootStrategy::FleetLock => {
                let url = cfg
                    .fleet_lock
                    .url
                    .as_deref()
                    .ok_or_else(|| ConfigError::msg("[reboot] strategy = \"fleet_lock\" needs [reboot.fleet_lock] url"))?;
                check_url("[reboot.fleet_lock] url", url)?;
                Service::FleetLock(url.to_string())
            }
            RebootStrategy::Off | RebootStrategy::Immediate => Service::None,
        };
        let window = match (&cfg.window_start, &cfg.window_length) {
            (Some(s), Some(l)) => Some(Window::parse(s, l).map_err(|e| ConfigError::msg(format!("[reboot] window: {e}")))?),
            (None, None) => None,
            _ => return Err(ConfigError::msg("[reboot] window_start and window_length go together")),
        };
        let splay = match (&cfg.window_splay, &window) {
            (Some(s), _) => humantime::parse_duration(s).map_err(|e| ConfigError::msg(format!("[reboot] window_splay {s:?}: {e}")))?,
            (None, Some(w)) => (w.length.unsigned_abs() / 4).min(MAX_DEFAULT_SPLAY),
            (None, None) => Duration::ZERO,
        };
        let hooks = hooks("[[reboot.pre_hook]]", &cfg.pre_hook)?;
        let health = health_checks("[[reboot.health]]", &cfg.health)?;
        let holder = match holder {
            Ok(h) => h,
            Err(e) if coordinated && live => return Err(e),
            Err(_) => String::new(),
        };
        if coordinated && live && group.is_none() {
            return Err(ConfigError::msg(
                "no reboot group: set [reboot] group in /etc/bootstrap/config.toml or name the node (ENV-SERVICE)",
            ));
        }
        if let (Service::Etcd(e), Some(g), true) = (&service, &group, live) {
            // A CA or client certificate that does not parse is found now, not after the steps.
            super::etcd::EtcdLock::with_tls(&e.endpoints, &e.prefix, g, &e.tls).map_err(|err| ConfigError::msg(format!("[reboot.etcd]: {err}")))?;
        }
        Ok(Settings {
            strategy,
            group,
            holder,
            service,
            window,
            splay,
            hooks,
            health,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<Settings, ConfigError> {
        let c = crate::config::Config::parse(std::path::Path::new("config.toml"), toml_text).unwrap();
        Settings::new(&c.reboot, Some("production-web".into()), Ok("i-1".into()), true)
    }

    #[test]
    fn good_settings_are_typed() {
        let s = parse(
            "[reboot]\nstrategy = \"etcd\"\nwindow_start = \"Mon..Fri 02:00\"\nwindow_length = \"2h\"\n\
             [reboot.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n\
             [[reboot.pre_hook]]\ncommand = [\"drain\"]\ntimeout = \"10m\"\n\
             [[reboot.health]]\nurl = \"http://127.0.0.1/healthz\"\n[[reboot.health]]\nunit = \"kubelet.service\"\ntimeout = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(s.splay, Duration::from_secs(900));
        assert_eq!(
            s.hooks,
            [Hook {
                argv: vec!["drain".into()],
                timeout: Duration::from_secs(600)
            }]
        );
        assert_eq!(
            s.health,
            [
                Health {
                    check: Check::Url("http://127.0.0.1/healthz".into()),
                    timeout: HEALTH_TIMEOUT
                },
                Health {
                    check: Check::Unit("kubelet.service".into()),
                    timeout: Duration::from_secs(5)
                },
            ]
        );
        assert_eq!(parse("").unwrap().strategy, RebootStrategy::Off);
    }

    #[test]
    fn every_mistake_is_a_config_error_naming_it() {
        let cases = [
            ("[reboot]\nwindow_start = \"Mon 25:00\"\nwindow_length = \"1h\"\n", "out of range"),
            ("[reboot]\nwindow_length = \"1h\"\n", "go together"),
            ("[reboot]\nwindow_splay = \"soon\"\n", "window_splay \"soon\""),
            ("[[reboot.pre_hook]]\ncommand = []\n", "[[reboot.pre_hook]] #1: command"),
            (
                "[[reboot.pre_hook]]\ncommand = [\"a\"]\n[[reboot.pre_hook]]\ncommand = [\"b\"]\ntimeout = \"x\"\n",
                "#2 timeout \"x\"",
            ),
            ("[[reboot.health]]\n", "exactly one of unit, url, command"),
            ("[[reboot.health]]\nunit = \"a.service\"\ncommand = [\"true\"]\n", "exactly one"),
            ("[[reboot.health]]\nurl = \"not a url\"\n", "\"not a url\""),
            ("[[reboot.health]]\nurl = \"file:///etc/passwd\"\n", "http:// or https://"),
            ("[[reboot.health]]\nunit = \"kubelet\"\n", "invalid unit name"),
            ("[[reboot.health]]\ncommand = [\"true\"]\ntimeout = \"never\"\n", "\"never\""),
            ("[reboot]\nstrategy = \"etcd\"\n", "no etcd endpoints"),
            ("[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"127.0.0.1:2379\"]\n", "endpoints"),
            (
                "[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"http://e\"]\ncert_file = \"c\"\n",
                "go together",
            ),
            ("[reboot]\nstrategy = \"fleet_lock\"\n", "needs [reboot.fleet_lock] url"),
        ];
        for (text, want) in cases {
            let e = parse(text).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    /// The etcd TLS files are read with the settings (before any step), not when the slot is
    /// taken after the steps ran.
    #[test]
    fn etcd_tls_files_are_read_at_load() {
        let e = parse("[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"https://e:2379\"]\nca_file = \"/nonexistent/ca.pem\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("[reboot.etcd] ca_file /nonexistent/ca.pem"), "{e}");
    }

    #[test]
    fn group_and_holder_matter_only_when_coordinating_the_live_system() {
        let c = crate::config::Config::parse(
            std::path::Path::new("c"),
            "[reboot]\nstrategy = \"fleet_lock\"\n[reboot.fleet_lock]\nurl = \"http://l/\"\n",
        )
        .unwrap();
        let bad = || Err(ConfigError::msg("/etc/machine-id is empty"));
        let e = Settings::new(&c.reboot, Some("g".into()), bad(), true).unwrap_err();
        assert!(e.to_string().contains("machine-id"), "{e}");
        let e = Settings::new(&c.reboot, None, Ok("i-1".into()), true).unwrap_err();
        assert!(e.to_string().contains("no reboot group"), "{e}");
        // An image build under --root coordinates nothing.
        assert!(Settings::new(&c.reboot, None, bad(), false).is_ok());
        let off = crate::config::RebootConfig::default();
        assert!(Settings::new(&off, None, bad(), true).is_ok());
    }
}
