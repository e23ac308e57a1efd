//! The reboot decision, pure: what to do given the saved reboot state, this boot's id, and
//! whether a reboot is needed. The driver (`mod.rs`) does the I/O.

use serde::{Deserialize, Serialize};

/// `/var/lib/bootstrap/reboot.json`: written after a slot is acquired, before rebooting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootState {
    pub group: String,
    pub holder: String,
    /// The boot id when the slot was acquired: a different one now means we rebooted.
    pub boot_id: String,
    pub acquired_at: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing needed, nothing held.
    Nothing,
    /// A reboot is needed: try to take a slot, then reboot.
    Acquire,
    /// We hold a slot from this very boot (a run killed after acquiring): reboot with it.
    RebootWithSlot,
    /// We rebooted holding a slot: release it if the converge succeeded and the node is healthy.
    ReleaseIfHealthy,
}

pub fn next_action(state: Option<&RebootState>, boot_id: &str, reboot_needed: bool) -> Action {
    match (state, reboot_needed) {
        (None, false) => Action::Nothing,
        (None, true) => Action::Acquire,
        (Some(s), _) if s.boot_id == boot_id => Action::RebootWithSlot,
        (Some(_), _) => Action::ReleaseIfHealthy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decision_table() {
        let held = |b: &str| RebootState {
            group: "g".into(),
            holder: "i-1".into(),
            boot_id: b.into(),
            acquired_at: "t".into(),
            reason: "r".into(),
        };
        let cases = [
            (None, false, Action::Nothing),
            (None, true, Action::Acquire),
            (Some(held("boot-1")), true, Action::RebootWithSlot),
            (Some(held("boot-1")), false, Action::RebootWithSlot),
            (Some(held("boot-0")), false, Action::ReleaseIfHealthy),
            // Still needed after the reboot (a new kernel arrived meanwhile): release first; the
            // next run asks again, so one node never holds a slot across two reboots.
            (Some(held("boot-0")), true, Action::ReleaseIfHealthy),
        ];
        for (state, needed, want) in cases {
            assert_eq!(next_action(state.as_ref(), "boot-1", needed), want, "{state:?} needed={needed}");
        }
    }
}
