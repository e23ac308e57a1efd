//! The reboot lock's vocabulary, shared by the lock services (`etcd`, `fleetlock`): the answers
//! (`Acquire`), the errors (`LockError`), and the semaphore airlock keeps in etcd
//! (`{"total_slots":N,"holders":[…]}`) with its pure logic: who takes a slot, who gets one from
//! a batch of releases and the queue's waiters. No I/O here; `etcd/` reads and writes the value.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How long a compare-and-swap keeps retrying against other writers before giving up. A burst
/// of releases (a whole wave of nodes back from their reboots) is many writers on one key: each
/// round one wins, so this is a time budget, not a small attempt count.
pub(super) const CAS_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Semaphore {
    pub total_slots: u64,
    #[serde(default)]
    pub holders: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// No endpoint answered, a timeout, a 5xx, or quorum lost: try again later, never reboot.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// The key kept changing under us.
    #[error("etcd semaphore {0} kept changing; gave up after {secs} s", secs = CAS_DEADLINE.as_secs())]
    Conflict(String),
    /// The key holds something that is not a semaphore.
    #[error("etcd key {key} does not hold a semaphore: {why}")]
    Malformed { key: String, why: String },
}

impl LockError {
    pub fn is_transient(&self) -> bool {
        matches!(self, LockError::Unavailable(_) | LockError::Conflict(_))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquire {
    /// This call took a slot.
    Acquired,
    /// The holder already had one (a run killed after acquiring comes back to its slot).
    AlreadyHeld,
    /// No slot free.
    Full,
}

impl Semaphore {
    /// Whether `id` holds a slot.
    pub fn holds(&self, id: &str) -> bool {
        self.holders.iter().any(|h| h == id)
    }
}

/// The semaphore from its stored JSON (`{"total_slots":N,"holders":[…]}`; `holders` may be
/// absent). Any input gives a value or an error, never a panic.
pub fn decode(raw: &[u8]) -> Result<Semaphore, serde_json::Error> {
    serde_json::from_slice(raw)
}

/// The semaphore as read (with its mod revision), or a new empty one when the key is absent.
pub fn or_new(read: Option<(Semaphore, String)>, default_slots: u64) -> (Semaphore, Option<String>) {
    match read {
        Some((s, r)) => (s, Some(r)),
        None => (
            Semaphore {
                total_slots: default_slots,
                holders: vec![],
            },
            None,
        ),
    }
}

/// The acquire decision on one read of the semaphore: (write it back?, answer).
pub fn take(s: &mut Semaphore, id: &str) -> (Option<()>, Acquire) {
    if s.holders.iter().any(|h| h == id) {
        (None, Acquire::AlreadyHeld)
    } else if (s.holders.len() as u64) >= s.total_slots {
        (None, Acquire::Full)
    } else {
        s.holders.push(id.to_string());
        (Some(()), Acquire::Acquired)
    }
}

/// Give `id`'s slot back; true when it held one.
pub fn give_back(s: &mut Semaphore, id: &str) -> bool {
    let held = s.holds(id);
    s.holders.retain(|h| h != id);
    held
}

/// Apply a batch of releases (`released`: holders giving their slot back) to `s`, then hand its
/// free slots to the first `waiters` (holders, in queue order), at most `room` of them. Returns
/// how many waiters, from the front, were granted (a waiter already holding a slot is counted
/// but not added twice).
pub fn settle(s: &mut Semaphore, released: &[&str], waiters: &[&str], room: usize) -> usize {
    for holder in released {
        s.holders.retain(|h| h != holder);
    }
    let free = s.total_slots.saturating_sub(s.holders.len() as u64) as usize;
    let granted = waiters.len().min(free.min(room));
    for holder in &waiters[..granted] {
        if !s.holds(holder) {
            s.holders.push(holder.to_string());
        }
    }
    granted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sem(total_slots: u64, holders: &[&str]) -> Semaphore {
        Semaphore {
            total_slots,
            holders: holders.iter().map(|h| h.to_string()).collect(),
        }
    }

    /// Every subset of `of`, each in `of`'s order.
    fn subsets<'a>(of: &[&'a str]) -> Vec<Vec<&'a str>> {
        (0..1u32 << of.len())
            .map(|m| of.iter().enumerate().filter(|(i, _)| m & (1 << i) != 0).map(|(_, h)| *h).collect())
            .collect()
    }

    /// Every ordering of every subset of `of` of at most `max` elements.
    fn sequences<'a>(of: &[&'a str], max: usize) -> Vec<Vec<&'a str>> {
        let mut out = vec![vec![]];
        let mut last: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..max {
            let next: Vec<Vec<&str>> = last
                .iter()
                .flat_map(|s| of.iter().filter(|h| !s.contains(h)).map(move |h| s.iter().copied().chain([*h]).collect()))
                .collect();
            out.extend(next.iter().cloned());
            last = next;
        }
        out
    }

    fn no_duplicates(s: &Semaphore) -> bool {
        s.holders.iter().enumerate().all(|(i, h)| !s.holders[..i].contains(h))
    }

    /// Every small semaphore (0 to 3 slots, every set of holders, over the limit too) against
    /// every acquire, checked against the rules the fleet relies on.
    #[test]
    fn take_exhaustive_invariants() {
        let mut n = 0;
        for total in 0..=3 {
            for holders in subsets(&["a", "b", "c", "d"]) {
                for id in ["a", "b", "e"] {
                    let before = sem(total, &holders);
                    let mut s = before.clone();
                    let (write, answer) = take(&mut s, id);
                    let ctx = format!("{before:?} take {id} -> {answer:?} {s:?}");
                    // Written back exactly when it took a slot, and changed only then.
                    assert_eq!(write.is_some(), answer == Acquire::Acquired, "{ctx}");
                    assert_eq!(s != before, answer == Acquire::Acquired, "{ctx}");
                    assert_eq!(s.total_slots, total, "{ctx}");
                    match answer {
                        Acquire::AlreadyHeld => assert!(before.holds(id), "{ctx}"),
                        Acquire::Full => assert!(!before.holds(id) && before.holders.len() as u64 >= total, "{ctx}"),
                        Acquire::Acquired => {
                            // Appended; never more holders than slots.
                            assert!(!before.holds(id) && s.holders.len() as u64 <= total, "{ctx}");
                            assert_eq!(s.holders[..before.holders.len()], before.holders[..], "{ctx}");
                            assert_eq!(s.holders.last().map(String::as_str), Some(id), "{ctx}");
                        }
                    }
                    assert!(s.holds(id) || answer == Acquire::Full, "{ctx}");
                    assert!(no_duplicates(&s), "{ctx}");
                    // Idempotent: asking again changes nothing and answers AlreadyHeld (or Full again).
                    let mut again = s.clone();
                    let (write2, answer2) = take(&mut again, id);
                    assert_eq!(again, s, "{ctx}");
                    assert!(write2.is_none(), "{ctx}");
                    assert_eq!(answer2, if answer == Acquire::Full { Acquire::Full } else { Acquire::AlreadyHeld }, "{ctx}");
                    // A release gives exactly that slot back, once.
                    let mut released = s.clone();
                    assert_eq!(give_back(&mut released, id), answer != Acquire::Full, "{ctx}");
                    assert!(!released.holds(id), "{ctx}");
                    assert_eq!(
                        released.holders,
                        before.holders.iter().filter(|h| *h != id).cloned().collect::<Vec<_>>(),
                        "{ctx}"
                    );
                    let once = released.clone();
                    assert!(!give_back(&mut released, id), "{ctx}");
                    assert_eq!(released, once, "{ctx}");
                    n += 1;
                }
            }
        }
        assert_eq!(n, 4 * 16 * 3);
    }

    /// Every small semaphore against every batch of releases (holders or not) and every queue
    /// of waiters (holders among them too), with or without room left in the transaction.
    #[test]
    fn settle_exhaustive_invariants() {
        let mut n = 0;
        let waiter_lists = sequences(&["a", "c", "d", "e"], 3);
        for total in 0..=3 {
            for holders in subsets(&["a", "b", "c"]) {
                for released in subsets(&["a", "b", "d"]) {
                    for waiters in &waiter_lists {
                        for room in [0, 1, 2, 127] {
                            let before = sem(total, &holders);
                            let mut s = before.clone();
                            let granted = settle(&mut s, &released, waiters, room);
                            let ctx = format!("{before:?} released {released:?} waiters {waiters:?} room {room} -> {granted} {s:?}");
                            assert_eq!(s.total_slots, total, "{ctx}");
                            assert!(no_duplicates(&s), "{ctx}");
                            let kept: Vec<&str> = before.holders.iter().map(String::as_str).filter(|h| !released.contains(h)).collect();
                            // The first `granted` waiters, in queue order; as many as the free
                            // slots, the waiters and the room allow, no more.
                            let free = (total as usize).saturating_sub(kept.len());
                            assert_eq!(granted, waiters.len().min(free).min(room), "{ctx}");
                            let new: Vec<&str> = waiters[..granted].iter().copied().filter(|w| !kept.contains(w)).collect();
                            // Holders that stay keep their order; granted waiters follow, in queue order (FIFO).
                            assert_eq!(s.holders, kept.iter().chain(&new).map(|h| h.to_string()).collect::<Vec<_>>(), "{ctx}");
                            // Never more holders than slots, unless already over (then nobody is added).
                            if kept.len() as u64 <= total {
                                assert!(s.holders.len() as u64 <= total, "{ctx}");
                            } else {
                                assert_eq!(granted, 0, "{ctx}");
                            }
                            // A releasing holder is gone, unless the queue granted it a slot again.
                            for r in &released {
                                assert!(!s.holds(r) || waiters[..granted].contains(r), "{ctx}");
                            }
                            // A waiter not granted is not a holder unless it already was.
                            for w in &waiters[granted..] {
                                assert!(!s.holds(w) || kept.contains(w), "{ctx}");
                            }
                            // Idempotent: waiters granted again are not listed twice, and the
                            // same releases applied twice are applied once.
                            let mut again = s.clone();
                            settle(&mut again, &[], &waiters[..granted], room);
                            assert_eq!(again, s, "{ctx}");
                            let mut twice = before.clone();
                            settle(&mut twice, &released, &[], room);
                            let once = twice.clone();
                            settle(&mut twice, &released, &[], room);
                            assert_eq!(twice, once, "{ctx}");
                            n += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(n, 4 * 8 * 8 * waiter_lists.len() * 4);
        assert_eq!(waiter_lists.len(), 1 + 4 + 12 + 24);
    }

    #[test]
    fn settle_table() {
        // (before, released, waiters, room, granted, holders after)
        type Case = (
            Semaphore,
            &'static [&'static str],
            &'static [&'static str],
            usize,
            usize,
            &'static [&'static str],
        );
        let cases: [Case; 9] = [
            // Nothing released, nothing waiting.
            (sem(2, &["a"]), &[], &[], 127, 0, &["a"]),
            // A release frees a slot for the first waiter, not the second.
            (sem(1, &["a"]), &["a"], &["c", "d"], 127, 1, &["c"]),
            // Two free slots: the first two waiters, in queue order.
            (sem(3, &["a"]), &[], &["d", "c", "e"], 127, 2, &["a", "d", "c"]),
            // The transaction's room caps the grants.
            (sem(3, &[]), &[], &["c", "d", "e"], 1, 1, &["c"]),
            // Over the limit (slots lowered): a release frees nothing yet.
            (sem(1, &["a", "b", "c"]), &["a"], &["d"], 127, 0, &["b", "c"]),
            // A release of a node that holds nothing is a no-op.
            (sem(1, &["a"]), &["b"], &["c"], 127, 0, &["a"]),
            // A waiter already holding counts as granted and is not listed twice.
            (sem(2, &["a"]), &[], &["a", "c"], 127, 1, &["a"]),
            // Released and waiting again: back at the end.
            (sem(2, &["a", "b"]), &["a"], &["a"], 127, 1, &["b", "a"]),
            // No slots at all.
            (sem(0, &[]), &[], &["c"], 127, 0, &[]),
        ];
        for (before, released, waiters, room, granted, holders) in cases {
            let mut s = before.clone();
            let ctx = format!("{before:?} released {released:?} waiters {waiters:?} room {room}");
            assert_eq!(settle(&mut s, released, waiters, room), granted, "{ctx}");
            assert_eq!(s, sem(before.total_slots, holders), "{ctx}");
        }
    }

    #[test]
    fn or_new_creates_an_empty_semaphore() {
        assert_eq!(or_new(None, 3), (sem(3, &[]), None));
        assert_eq!(or_new(Some((sem(1, &["a"]), "7".into())), 3), (sem(1, &["a"]), Some("7".into())));
    }

    /// The value airlock reads and writes, byte for byte, and malformed values as errors.
    #[test]
    fn decode_table() {
        let s = sem(2, &["i-1", "i-2"]);
        let json = serde_json::to_vec(&s).unwrap();
        assert_eq!(json, br#"{"total_slots":2,"holders":["i-1","i-2"]}"#);
        assert_eq!(decode(&json).unwrap(), s);
        assert_eq!(decode(br#"{"total_slots":1}"#).unwrap(), sem(1, &[]));
        assert_eq!(decode(br#"{"total_slots":1,"holders":[],"group":"x"}"#).unwrap(), sem(1, &[]));
        for bad in [
            &b""[..],
            b"null",
            b"{}",
            b"[]",
            b"{\"holders\":[]}",
            b"{\"total_slots\":-1}",
            b"{\"total_slots\":\"1\"}",
            b"{\"total_slots\":1.5}",
            b"{\"total_slots\":18446744073709551616}",
            b"{\"total_slots\":1,\"holders\":null}",
            b"{\"total_slots\":1,\"holders\":[1]}",
            b"{\"total_slots\":1,\"holders\":\"a\"}",
            b"{\"total_slots\":1",
            b"\xff\xfe",
            b"{\"total_slots\":1,\"holders\":[\"\xff\"]}",
        ] {
            assert!(decode(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
