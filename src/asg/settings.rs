//! `[asg]` validated into typed values before any step runs (a mistake is a `ConfigError`,
//! exit 78, while the host is untouched).

use crate::config::{check_url, AsgConfig};
use crate::error::ConfigError;
use crate::reboot::settings::{health_checks, hooks, Health, Hook};
use std::time::Duration;

pub const DEFAULT_FIRST_BOOT_DEADLINE: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_WATCH_INTERVAL: Duration = Duration::from_secs(5);
/// The longest default heartbeat interval.
pub const MAX_DEFAULT_HEARTBEAT: Duration = Duration::from_secs(300);
/// The shortest heartbeat interval (the API's request rate is limited).
pub const MIN_HEARTBEAT: Duration = Duration::from_secs(1);

/// How many instances of the group may be marked Unhealthy at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxUnhealthy {
    Count(u32),
    /// A percentage of the group's desired capacity (at least one instance).
    Percent(u32),
}

impl MaxUnhealthy {
    /// The limit for a group of `size` instances.
    pub fn limit(self, size: u32) -> u32 {
        match self {
            MaxUnhealthy::Count(n) => n,
            MaxUnhealthy::Percent(p) => (size.saturating_mul(p) / 100).max(1),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// The lifecycle is used at all.
    pub enabled: bool,
    pub launch_hook: Option<String>,
    /// `[asg] group` as written (substituted by the caller), else the instance's tag.
    pub group: Option<String>,
    pub heartbeat_interval: Option<Duration>,
    pub first_boot_deadline: Duration,
    pub retry_interval: Duration,
    pub unhealthy_after: Option<u32>,
    pub max_unhealthy: MaxUnhealthy,
    pub watch_interval: Duration,
    pub terminate_lifecycle_hook: Option<String>,
    pub endpoint: Option<String>,
    pub health: Vec<Health>,
    /// None: `watch` runs the `[[reboot.pre_hook]]` commands.
    pub terminate_hooks: Option<Vec<Hook>>,
}

/// The longest `[asg]` interval or deadline.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

fn duration(what: &str, s: &Option<String>, default: Duration) -> Result<Duration, ConfigError> {
    match s {
        Some(t) => {
            let d = humantime::parse_duration(t).map_err(|e| ConfigError::msg(format!("[asg] {what} {t:?}: {e}")))?;
            // Longer is a mistake (and would overflow the deadlines computed from it).
            if d > MAX_DURATION {
                return Err(ConfigError::msg(format!("[asg] {what} {t:?}: at most 7 days")));
            }
            Ok(d)
        }
        None => Ok(default),
    }
}

/// `"2"` (instances) or `"10%"` (of the group's desired capacity).
pub fn parse_max_unhealthy(s: &str) -> Result<MaxUnhealthy, ConfigError> {
    let bad = |why: &str| ConfigError::msg(format!("[asg] max_unhealthy {s:?}: {why}"));
    let t = s.trim();
    if let Some(p) = t.strip_suffix('%') {
        let p: u32 = p.trim().parse().map_err(|_| bad("expected a count (\"2\") or a percentage (\"10%\")"))?;
        if p == 0 || p > 100 {
            return Err(bad("a percentage from 1% to 100%"));
        }
        return Ok(MaxUnhealthy::Percent(p));
    }
    match t.parse::<u32>() {
        Ok(0) => Err(bad("0 would never mark an instance; leave unhealthy_after unset instead")),
        Ok(n) => Ok(MaxUnhealthy::Count(n)),
        Err(_) => Err(bad("expected a count (\"2\") or a percentage (\"10%\")")),
    }
}

impl Settings {
    pub fn new(cfg: &AsgConfig) -> Result<Settings, ConfigError> {
        if let Some(e) = &cfg.endpoint {
            check_url("[asg] endpoint", e)?;
        }
        let heartbeat_interval = match &cfg.heartbeat_interval {
            Some(_) => {
                let d = duration("heartbeat_interval", &cfg.heartbeat_interval, Duration::ZERO)?;
                if d < MIN_HEARTBEAT {
                    return Err(ConfigError::msg(format!("[asg] heartbeat_interval: at least {}s", MIN_HEARTBEAT.as_secs())));
                }
                Some(d)
            }
            None => None,
        };
        if cfg.unhealthy_after == Some(0) {
            return Err(ConfigError::msg(
                "[asg] unhealthy_after = 0: at least 1 failed run (leave it unset to never mark)",
            ));
        }
        for (what, v) in [
            ("launch_hook", &cfg.launch_hook),
            ("terminate_lifecycle_hook", &cfg.terminate_lifecycle_hook),
            ("group", &cfg.group),
        ] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                return Err(ConfigError::msg(format!("[asg] {what}: empty")));
            }
        }
        let first_boot_deadline = duration("first_boot_deadline", &cfg.first_boot_deadline, DEFAULT_FIRST_BOOT_DEADLINE)?;
        let retry_interval = duration("retry_interval", &cfg.retry_interval, DEFAULT_RETRY_INTERVAL)?;
        let watch_interval = duration("watch_interval", &cfg.watch_interval, DEFAULT_WATCH_INTERVAL)?;
        if watch_interval < Duration::from_secs(1) {
            return Err(ConfigError::msg("[asg] watch_interval: at least 1s"));
        }
        Ok(Settings {
            enabled: cfg
                .enabled
                .unwrap_or(cfg.launch_hook.is_some() || cfg.unhealthy_after.is_some() || cfg.terminate_lifecycle_hook.is_some()),
            launch_hook: cfg.launch_hook.clone(),
            group: cfg.group.clone(),
            heartbeat_interval,
            first_boot_deadline,
            retry_interval,
            unhealthy_after: cfg.unhealthy_after,
            max_unhealthy: match &cfg.max_unhealthy {
                Some(s) => parse_max_unhealthy(s)?,
                None => MaxUnhealthy::Count(1),
            },
            watch_interval,
            terminate_lifecycle_hook: cfg.terminate_lifecycle_hook.clone(),
            endpoint: cfg.endpoint.clone(),
            health: health_checks("[[asg.health]]", &cfg.health)?,
            terminate_hooks: if cfg.terminate_hook.is_empty() {
                None
            } else {
                Some(hooks("[[asg.terminate_hook]]", &cfg.terminate_hook)?)
            },
        })
    }
}

/// The heartbeat interval for a hook with `timeout`: the configured one if it is under half
/// the timeout (else a quarter of it, with a warning), by default a quarter, at most 5 minutes.
pub fn heartbeat_interval(configured: Option<Duration>, timeout: Duration) -> Duration {
    let quarter = (timeout / 4).max(MIN_HEARTBEAT);
    match configured {
        Some(c) if c <= timeout / 2 => c,
        Some(c) => {
            tracing::warn!(
                "[asg] heartbeat_interval {}s is not well inside the hook's HeartbeatTimeout {}s: using {}s",
                c.as_secs(),
                timeout.as_secs(),
                quarter.as_secs()
            );
            quarter
        }
        None => quarter.min(MAX_DEFAULT_HEARTBEAT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        let c = crate::config::Config::parse(std::path::Path::new("config.toml"), text).unwrap();
        Settings::new(&c.asg)
    }

    #[test]
    fn defaults_and_forms() {
        let s = parse("").unwrap();
        assert!(!s.enabled);
        assert_eq!(s.first_boot_deadline, DEFAULT_FIRST_BOOT_DEADLINE);
        assert_eq!(s.max_unhealthy, MaxUnhealthy::Count(1));
        assert!(s.terminate_hooks.is_none());
        let s =
            parse("[asg]\nlaunch_hook = \"l\"\nmax_unhealthy = \"25%\"\n[[asg.health]]\nunit = \"a.service\"\n[[asg.terminate_hook]]\ncommand = [\"drain\"]\n")
                .unwrap();
        assert!(s.enabled);
        assert_eq!(s.max_unhealthy, MaxUnhealthy::Percent(25));
        assert_eq!(s.health.len(), 1);
        assert_eq!(s.terminate_hooks.unwrap()[0].argv, ["drain"]);
        assert!(parse("[asg]\nunhealthy_after = 2\n").unwrap().enabled);
        assert!(!parse("[asg]\nunhealthy_after = 2\nenabled = false\n").unwrap().enabled);
    }

    #[test]
    fn every_mistake_is_a_config_error_naming_it() {
        for (text, want) in [
            ("[asg]\nheartbeat_interval = \"soon\"\n", "[asg] heartbeat_interval \"soon\""),
            ("[asg]\nheartbeat_interval = \"100ms\"\n", "at least 1s"),
            ("[asg]\nfirst_boot_deadline = \"x\"\n", "first_boot_deadline"),
            ("[asg]\nunhealthy_after = 0\n", "unhealthy_after = 0"),
            ("[asg]\nmax_unhealthy = \"0\"\n", "max_unhealthy"),
            ("[asg]\nmax_unhealthy = \"150%\"\n", "1% to 100%"),
            ("[asg]\nmax_unhealthy = \"many\"\n", "expected a count"),
            ("[asg]\nendpoint = \"as:443\"\n", "[asg] endpoint"),
            ("[asg]\nlaunch_hook = \" \"\n", "launch_hook: empty"),
            ("[[asg.health]]\n", "[[asg.health]] #1: give exactly one"),
            ("[[asg.terminate_hook]]\ncommand = []\n", "[[asg.terminate_hook]] #1: command"),
            // Too long to compute a deadline from: refused by name, not an overflow.
            (
                "[asg]\nfirst_boot_deadline = \"500000000000y\"\n",
                "[asg] first_boot_deadline \"500000000000y\": at most 7 days",
            ),
            (
                "[[asg.terminate_hook]]\ncommand = [\"true\"]\ntimeout = \"500000000000y\"\n",
                "[[asg.terminate_hook]] #1 timeout \"500000000000y\": at most 24h",
            ),
            (
                "[[asg.health]]\ncommand = [\"true\"]\ntimeout = \"300000000000y\"\n",
                "timeout \"300000000000y\": at most 24h",
            ),
        ] {
            let e = parse(text).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let e = crate::config::Config::parse(std::path::Path::new("c.toml"), "[asg]\nlaunch_hok = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.toml:2:1: unknown field `launch_hok`"), "{e}");
    }

    #[test]
    fn heartbeats_stay_well_inside_the_timeout() {
        let s = Duration::from_secs;
        assert_eq!(heartbeat_interval(None, s(3600)), s(300));
        assert_eq!(heartbeat_interval(None, s(60)), s(15));
        assert_eq!(heartbeat_interval(Some(s(10)), s(60)), s(10));
        assert_eq!(heartbeat_interval(Some(s(40)), s(60)), s(15));
        assert_eq!(heartbeat_interval(None, s(2)), s(1));
        assert_eq!(MaxUnhealthy::Percent(10).limit(5), 1);
        assert_eq!(MaxUnhealthy::Percent(10).limit(50), 5);
        assert_eq!(MaxUnhealthy::Count(3).limit(50), 3);
    }
}
