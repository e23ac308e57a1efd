//! The agent: one run pipeline that `init`, `apply`, `plan` and `reboot` share. The CLI parses
//! flags, calls in here, prints the result and maps it to an exit code; everything the run
//! does to the node is decided here.
//!
//! `converge`: fetch the bundle → load and prepare the role → take the run lock → run the
//! steps (engine) → what must come before a reboot (`init` installs its units) → coordinate the
//! reboot → persist the report, the metrics and `last-good` → show the report → reboot when a
//! slot is held for it, all under the run lock (so no other run is in the middle of dpkg when
//! logind is asked to reboot).

pub mod context;
pub mod converge;
pub mod init;
pub mod reboot;
mod rollout;

pub use context::Context;
pub use converge::{converge, Hooks, RunOptions};

/// Ask logind to reboot (the slot is held; see /var/lib/bootstrap/reboot.json).
pub fn reboot() -> anyhow::Result<()> {
    tracing::warn!("rebooting now (reboot slot held; see /var/lib/bootstrap/reboot.json)");
    crate::systemd::Systemd::reboot(&crate::systemd::Dbus::default())
}
