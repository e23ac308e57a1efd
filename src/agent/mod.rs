//! The agent: one run pipeline that `init`, `apply`, `plan` and `reboot` share. The CLI parses
//! flags, calls in here, prints the result and maps it to an exit code; everything the run
//! does to the node is decided here.
//!
//! `converge`: fetch the bundle → load and prepare the role → take the run lock → run the
//! steps (engine) → coordinate the reboot → persist the report, the metrics and `last-good`.
//! The reboot itself is never done here: the report says so (`Report::reboot_now`) and the
//! caller calls [`reboot`] once it has printed what it must.

pub mod context;
pub mod converge;
pub mod init;
pub mod reboot;

pub use context::Context;
pub use converge::{converge, RunOptions};

/// Ask logind to reboot (the slot is held; see /var/lib/bootstrap/reboot.json).
pub fn reboot() -> anyhow::Result<()> {
    tracing::warn!("rebooting now (reboot slot held; see /var/lib/bootstrap/reboot.json)");
    crate::systemd::Systemd::reboot(&crate::systemd::Dbus::default())
}
