//! The systemd seam: what the engine asks of the service manager.

use crate::runner::{self, Cmd};
use anyhow::{bail, Result};
use std::time::Duration;

/// How long a restart or reload may take before the run fails.
pub const UNIT_JOB_TIMEOUT: Duration = Duration::from_secs(120);

pub trait Systemd {
    fn restart(&self, unit: &str) -> Result<()>;
    fn reload(&self, unit: &str) -> Result<()>;
}

/// systemd through `systemctl`, on the running system.
pub struct Systemctl;

impl Systemctl {
    fn call(&self, verb: &str, unit: &str) -> Result<()> {
        let argv = vec!["systemctl".to_string(), verb.to_string(), "--".to_string(), unit.to_string()];
        let out = runner::run(&Cmd { argv, timeout: Some(UNIT_JOB_TIMEOUT), ..Default::default() })?;
        if !out.success() {
            bail!("systemctl {verb} {unit} {}: {}", out.describe(), out.tail(10));
        }
        Ok(())
    }
}

impl Systemd for Systemctl {
    fn restart(&self, unit: &str) -> Result<()> {
        self.call("restart", unit)
    }

    fn reload(&self, unit: &str) -> Result<()> {
        self.call("reload", unit)
    }
}
