//! The reboot decision, pure: what to do next given the saved reboot state, this boot's id,
//! whether a reboot is needed, whether the run succeeded, whether we are inside the window,
//! the lock service's answer (once asked) and the health checks' verdict (once run). The
//! driver (`mod.rs`) does the I/O and calls this again with each new answer. `carry_need`
//! decides, as purely, what a step-made reboot need of an earlier run still means.

use serde::{Deserialize, Serialize};

/// `/var/lib/bootstrap/reboot.json`: written as soon as a slot is acquired (before the
/// pre-reboot hooks), removed only when the lock service confirmed the slot is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebootState {
    pub group: String,
    pub holder: String,
    /// The boot id when the slot was acquired: a different one now means we rebooted.
    pub boot_id: String,
    pub acquired_at: String,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockAnswer {
    /// Acquired now, or already held (recursive).
    Got,
    Full,
    /// Unreachable, quorum lost, timed out: never reboot on that.
    Unavailable,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    RunFailed,
    OutsideWindow,
    NoSlot,
    LockUnavailable,
    Unhealthy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing needed, nothing held.
    Nothing,
    /// Needed but not now; nothing held. With reboot.json of this boot, the lock service has
    /// just said the slot is not ours (`Full`), so the record is dropped.
    Pending(Why),
    /// reboot.json of this boot says we hold a slot and the lock service cannot confirm or deny
    /// it: keep the record, no reboot; a later run asks again.
    Keep(Why),
    /// Ask the lock service for a slot (recursive: a slot we hold is confirmed).
    AskLock,
    /// Holding a slot: run the pre-reboot hooks, write reboot.json, reboot.
    Reboot,
    /// Holding a slot we must not use now: release it, no reboot.
    GiveBack(Why),
    /// Back from our reboot: run the health checks.
    CheckHealth,
    /// Back from our reboot and healthy: release the slot.
    Release,
    /// Back from our reboot and unhealthy: keep the slot so the rollout stops here.
    Halt(Why),
}

#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub state: Option<&'a RebootState>,
    pub boot_id: &'a str,
    pub needed: bool,
    pub run_ok: bool,
    pub in_window: bool,
    /// None: not asked yet.
    pub lock: Option<LockAnswer>,
    /// None: not checked yet.
    pub healthy: Option<bool>,
}

pub fn decide(i: &Inputs) -> Decision {
    use Decision::*;
    match i.state {
        // We rebooted holding a slot. Even if another reboot is needed already (a new kernel
        // arrived meanwhile) the slot goes back first and the next run asks again, so one node
        // never holds a slot across two reboots.
        Some(s) if s.boot_id != i.boot_id => match (i.run_ok, i.healthy) {
            (false, _) => Halt(Why::RunFailed),
            (true, None) => CheckHealth,
            (true, Some(true)) => Release,
            (true, Some(false)) => Halt(Why::Unhealthy),
        },
        state => {
            // A slot from this very boot: the run that took it was killed before rebooting.
            let held = state.is_some() || i.lock == Some(LockAnswer::Got);
            if !held && !i.needed {
                return Nothing;
            }
            let not_now = |why| if held { GiveBack(why) } else { Pending(why) };
            if !i.run_ok {
                return not_now(Why::RunFailed);
            }
            // Checked before asking and again after the answer: the window may close while we wait.
            if !i.in_window {
                return not_now(Why::OutsideWindow);
            }
            match i.lock {
                None => AskLock,
                Some(LockAnswer::Got) => Reboot,
                // A slot we had was taken away (an operator released it): start over.
                Some(LockAnswer::Full) => Pending(Why::NoSlot),
                Some(LockAnswer::Unavailable) if state.is_some() => Keep(Why::LockUnavailable),
                Some(LockAnswer::Unavailable) => Pending(Why::LockUnavailable),
            }
        }
    }
}

/// `/var/lib/bootstrap/reboot-needed.json`: a `reboot_required` step changed in this boot and
/// no reboot has happened since. Later runs find the step in sync; this record keeps the need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Need {
    /// The step whose change asked for the reboot (the first one in this boot).
    pub step: String,
    pub since: String,
    /// The boot it was needed in: any other boot id now means the reboot happened.
    pub boot_id: String,
}

/// What to do with the need record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NeedRecord {
    Keep,
    Write(Need),
    Remove,
}

/// The step-made reboot need that holds now, from the record of earlier runs and the
/// `reboot_required` step this run changed (if any), and what becomes of the record. A record
/// of this boot stands (the earliest reason is kept) until a boot with another id.
pub fn carry_need(record: Option<&Need>, boot_id: &str, changed: Option<&str>, now: &str) -> (Option<Need>, NeedRecord) {
    match (record, changed) {
        (Some(r), _) if r.boot_id == boot_id => (Some(r.clone()), NeedRecord::Keep),
        (_, Some(step)) => {
            let n = Need {
                step: step.to_string(),
                since: now.to_string(),
                boot_id: boot_id.to_string(),
            };
            (Some(n.clone()), NeedRecord::Write(n))
        }
        (Some(_), None) => (None, NeedRecord::Remove),
        (None, None) => (None, NeedRecord::Keep),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;

    fn st(boot: &str) -> RebootState {
        RebootState {
            group: "g".into(),
            holder: "i-1".into(),
            boot_id: boot.into(),
            acquired_at: "t".into(),
            reason: "r".into(),
        }
    }

    /// Every combination of inputs, checked against the rules the fleet relies on.
    #[test]
    fn exhaustive_invariants() {
        let this = st("boot-1");
        let other = st("boot-0");
        let states = [None, Some(&this), Some(&other)];
        let locks = [None, Some(LockAnswer::Got), Some(LockAnswer::Full), Some(LockAnswer::Unavailable)];
        let mut n = 0;
        for state in states {
            for needed in [false, true] {
                for run_ok in [false, true] {
                    for in_window in [false, true] {
                        for lock in locks {
                            for healthy in [None, Some(true), Some(false)] {
                                let i = Inputs {
                                    state,
                                    boot_id: "boot-1",
                                    needed,
                                    run_ok,
                                    in_window,
                                    lock,
                                    healthy,
                                };
                                let d = decide(&i);
                                let rebooted = state.is_some_and(|s| s.boot_id != "boot-1");
                                let ctx = format!("{i:?} -> {d:?}");
                                // Reboot only holding a slot, inside the window, after a good run.
                                if d == Reboot {
                                    assert!(lock == Some(LockAnswer::Got) && in_window && run_ok && !rebooted, "{ctx}");
                                }
                                // Never ask for a slot outside the window or after a failed run.
                                if d == AskLock {
                                    assert!(in_window && run_ok && lock.is_none() && !rebooted, "{ctx}");
                                }
                                // After our reboot: release only healthy after a good run, else halt; never reboot again.
                                if rebooted {
                                    assert!(matches!(d, CheckHealth | Release | Halt(_)), "{ctx}");
                                    assert_eq!(d == Release, run_ok && healthy == Some(true), "{ctx}");
                                }
                                if matches!(d, Release | Halt(_) | CheckHealth) {
                                    assert!(rebooted, "{ctx}");
                                }
                                // A slot held in this boot that will not be used now is given back.
                                if !rebooted && (state == Some(&this) || lock == Some(LockAnswer::Got)) && (!run_ok || !in_window) {
                                    assert!(matches!(d, GiveBack(_)), "{ctx}");
                                }
                                if matches!(d, GiveBack(_)) {
                                    assert!(state == Some(&this) || lock == Some(LockAnswer::Got), "{ctx}");
                                }
                                // reboot.json of this boot is dropped only when the lock service said
                                // the slot is not ours; while it cannot answer, the record stays.
                                if !rebooted && state == Some(&this) && matches!(d, Pending(_)) {
                                    assert_eq!(lock, Some(LockAnswer::Full), "{ctx}");
                                }
                                if matches!(d, Keep(_)) {
                                    assert!(state == Some(&this) && lock == Some(LockAnswer::Unavailable), "{ctx}");
                                }
                                if !rebooted && state == Some(&this) && lock == Some(LockAnswer::Unavailable) {
                                    assert!(matches!(d, Keep(_) | GiveBack(_)), "{ctx}");
                                }
                                // Nothing needed and nothing held: nothing, whatever else.
                                if state.is_none() && !needed && lock != Some(LockAnswer::Got) {
                                    assert_eq!(d, Nothing, "{ctx}");
                                }
                                n += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(n, 3 * 2 * 2 * 2 * 4 * 3);
    }

    #[test]
    fn decision_table() {
        let this = st("boot-1");
        let other = st("boot-0");
        let i = |state, needed, run_ok, in_window, lock, healthy| Inputs {
            state,
            boot_id: "boot-1",
            needed,
            run_ok,
            in_window,
            lock,
            healthy,
        };
        use LockAnswer::*;
        let cases = [
            (i(None, false, true, true, None, None), Nothing),
            (i(None, true, true, true, None, None), AskLock),
            (i(None, true, true, false, None, None), Pending(Why::OutsideWindow)),
            (i(None, true, false, true, None, None), Pending(Why::RunFailed)),
            (i(None, true, true, true, Some(Got), None), Reboot),
            (i(None, true, true, true, Some(Full), None), Pending(Why::NoSlot)),
            (i(None, true, true, true, Some(Unavailable), None), Pending(Why::LockUnavailable)),
            (i(None, true, true, false, Some(Got), None), GiveBack(Why::OutsideWindow)),
            (i(Some(&this), false, true, true, None, None), AskLock),
            (i(Some(&this), false, true, true, Some(Got), None), Reboot),
            (i(Some(&this), true, false, true, None, None), GiveBack(Why::RunFailed)),
            (i(Some(&this), true, true, true, Some(Full), None), Pending(Why::NoSlot)),
            (i(Some(&this), true, true, true, Some(Unavailable), None), Keep(Why::LockUnavailable)),
            (i(Some(&this), false, true, true, Some(Unavailable), None), Keep(Why::LockUnavailable)),
            (i(Some(&other), false, true, true, None, None), CheckHealth),
            (i(Some(&other), true, true, true, None, Some(true)), Release),
            (i(Some(&other), false, true, true, None, Some(false)), Halt(Why::Unhealthy)),
            (i(Some(&other), false, false, true, None, None), Halt(Why::RunFailed)),
        ];
        for (inp, want) in cases {
            assert_eq!(decide(&inp), want, "{inp:?}");
        }
    }

    #[test]
    fn a_step_made_need_lasts_until_a_reboot() {
        let need = |step: &str, since: &str, boot: &str| Need {
            step: step.into(),
            since: since.into(),
            boot_id: boot.into(),
        };
        let this = need("kernel", "t0", "boot-1");
        let before = need("kernel", "t0", "boot-0");
        let cases = [
            // Nothing recorded, nothing changed.
            (None, None, None, NeedRecord::Keep),
            // A change is recorded.
            (
                None,
                Some("grub"),
                Some(need("grub", "t1", "boot-1")),
                NeedRecord::Write(need("grub", "t1", "boot-1")),
            ),
            // Later runs of the same boot: the step is in sync, the need stands.
            (Some(&this), None, Some(this.clone()), NeedRecord::Keep),
            // A second change in the same boot keeps the first reason.
            (Some(&this), Some("grub"), Some(this.clone()), NeedRecord::Keep),
            // A boot since: the need was met.
            (Some(&before), None, None, NeedRecord::Remove),
            // ... and a new change after that boot is a new need.
            (
                Some(&before),
                Some("grub"),
                Some(need("grub", "t1", "boot-1")),
                NeedRecord::Write(need("grub", "t1", "boot-1")),
            ),
        ];
        for (record, changed, want, todo) in cases {
            assert_eq!(carry_need(record, "boot-1", changed, "t1"), (want, todo), "{record:?} {changed:?}");
        }
    }
}
