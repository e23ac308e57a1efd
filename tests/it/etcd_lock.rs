//! The reboot semaphore against a real etcd: acquire and release, the slots under concurrency,
//! lost quorum, the waiting queue and its hand-offs, deadlines, TLS, a member that never answers.

use crate::harness::etcd::Etcd;
use bootstrap::reboot::etcd::{Acquire, EtcdLock, LockError, Semaphore, Waited};
use std::time::{Duration, Instant};

#[test]
fn semaphore_acquire_release_idempotent_and_full() {
    let etcd = Etcd::start(1);
    let lock = etcd.lock("production-haproxy");
    assert_eq!(lock.key(), "com.coreos.airlock/groups/production-haproxy/v1/semaphore");
    assert!(lock.get().unwrap().is_none());
    assert_eq!(lock.acquire("i-a", 1).unwrap(), Acquire::Acquired);
    assert_eq!(
        lock.get().unwrap().unwrap().0,
        Semaphore {
            total_slots: 1,
            holders: vec!["i-a".into()]
        }
    );
    assert_eq!(lock.acquire("i-a", 1).unwrap(), Acquire::AlreadyHeld, "recursive acquire keeps the one slot");
    assert_eq!(lock.acquire("i-b", 1).unwrap(), Acquire::Full);
    assert!(lock.release("i-a", 1).unwrap());
    assert!(!lock.release("i-a", 1).unwrap(), "release is idempotent");
    assert_eq!(lock.acquire("i-b", 1).unwrap(), Acquire::Acquired);
    lock.set_slots(2).unwrap();
    assert_eq!(lock.acquire("i-c", 1).unwrap(), Acquire::Acquired);
    assert_eq!(
        lock.get().unwrap().unwrap().0,
        Semaphore {
            total_slots: 2,
            holders: vec!["i-b".into(), "i-c".into()]
        }
    );
    // The raw value, as airlock and operators read it.
    assert_eq!(
        etcd.ctl(&["get", "--print-value-only", lock.key()]).trim(),
        r#"{"total_slots":2,"holders":["i-b","i-c"]}"#
    );
}

#[test]
fn concurrent_acquires_never_exceed_the_slots() {
    let etcd = Etcd::start(1);
    let eps = etcd.endpoints();
    let handles: Vec<_> = (0..12)
        .map(|i| {
            let eps = eps.clone();
            std::thread::spawn(move || EtcdLock::new(&eps, "com.coreos.airlock", "g").unwrap().acquire(&format!("i-{i}"), 3).unwrap())
        })
        .collect();
    let results: Vec<Acquire> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| **r == Acquire::Acquired).count(), 3, "{results:?}");
    let sem = etcd.lock("g").get().unwrap().unwrap().0;
    assert_eq!(sem.holders.len(), 3);
}

#[test]
fn lost_quorum_and_dead_etcd_are_unavailable() {
    let mut etcd = Etcd::start(3);
    let lock = etcd.lock("q");
    assert_eq!(lock.acquire("i-a", 1).unwrap(), Acquire::Acquired);
    etcd.kill(1);
    etcd.kill(2);
    let err = lock.acquire("i-b", 1).unwrap_err();
    assert!(matches!(err, LockError::Unavailable(_)) && err.is_transient(), "{err}");
    etcd.kill(0);
    let err = lock.release("i-a", 1).unwrap_err();
    assert!(matches!(err, LockError::Unavailable(_)), "{err}");
}

/// Waiters queue in arrival order and get the slot one by one; while the slot is held they
/// send nothing (no polling); each handover costs a constant number of requests.
#[test]
fn waiters_take_the_slot_in_queue_order_without_polling() {
    let etcd = Etcd::start(1);
    let holder = etcd.lock("w");
    assert_eq!(holder.acquire("first", 1).unwrap(), Acquire::Acquired);
    let order = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut waiters = Vec::new();
    let mut locks = Vec::new();
    for i in 0..8 {
        let l = etcd.lock("w");
        locks.push(l.clone());
        let order = order.clone();
        waiters.push(std::thread::spawn(move || {
            let id = format!("n{i}");
            let got = l.wait_acquire(&id, 1, Instant::now() + Duration::from_secs(60)).unwrap();
            assert_eq!(got, Waited::Acquired);
            let sem = l.get().unwrap().unwrap().0;
            assert_eq!(sem.holders, vec![id.clone()], "one holder at a time");
            order.lock().unwrap().push(id.clone());
            std::thread::sleep(Duration::from_millis(100));
            assert!(l.release(&id, 1).unwrap());
        }));
        // Arrival order is queue order.
        std::thread::sleep(Duration::from_millis(150));
    }
    let queued = etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/w/v1/queue/"]);
    assert_eq!(queued.split_whitespace().count(), 8, "{queued}");
    // What `lock status` shows: the queue's length and its first waiters in order, and (in a
    // group nobody waits in, so no queue head picks it up) a release request not yet applied.
    let b = holder.backlog(3).unwrap();
    assert_eq!((b.waiting, b.first_waiters.join(" ")), (8, "n0 n1 n2".to_string()), "{b:?}");
    assert_eq!((b.releases_pending, b.first_releases.len()), (0, 0), "{b:?}");
    etcd.ctl(&["put", "com.coreos.airlock/groups/idle/v1/release/ghost", ""]);
    let b = etcd.lock("idle").backlog(3).unwrap();
    assert_eq!(
        (b.waiting, b.releases_pending, b.first_releases.join(" ")),
        (0, 1, "ghost".to_string()),
        "{b:?}"
    );
    let count = |ls: &[EtcdLock]| ls.iter().map(|l| l.counters.requests.load(std::sync::atomic::Ordering::Relaxed)).sum::<u64>();
    let before = count(&locks);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count(&locks), before, "waiters are quiet while the slot is held");
    assert!(holder.release("first", 1).unwrap());
    for w in waiters {
        w.join().unwrap();
    }
    let want: Vec<String> = (0..8).map(|i| format!("n{i}")).collect();
    assert_eq!(*order.lock().unwrap(), want);
    let per_waiter = count(&locks) as f64 / 8.0;
    assert!(per_waiter <= 16.0, "{per_waiter} requests per waiter");
    assert_eq!(
        etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/w/v1/queue/"]).trim(),
        "",
        "the queue is empty"
    );
}

/// A wave of releases while nodes wait: each releaser leaves a request, the head of the queue
/// applies them and grants the freed slots in queue order; nobody fights over the semaphore, and
/// no slot is ever given twice.
#[test]
fn a_wave_of_releases_goes_through_the_queue_head() {
    let etcd = Etcd::start(1);
    let admin = etcd.lock("wave");
    admin.set_slots(5).unwrap();
    let first: Vec<String> = (0..5).map(|i| format!("h{i}")).collect();
    for h in &first {
        assert_eq!(admin.acquire(h, 5).unwrap(), Acquire::Acquired);
    }
    let granted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut waiters = Vec::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<String>();
    // The first five granted waiters hold their slot until the test lets them go.
    let release_now = std::sync::Arc::new(std::sync::Barrier::new(6));
    for i in 0..10 {
        let (l, granted, done_tx, barrier) = (etcd.lock("wave"), granted.clone(), done_tx.clone(), release_now.clone());
        waiters.push(std::thread::spawn(move || {
            let id = format!("w{i}");
            assert_eq!(l.wait_acquire(&id, 5, Instant::now() + Duration::from_secs(60)).unwrap(), Waited::Acquired);
            let holders = l.get().unwrap().unwrap().0.holders;
            assert!(holders.len() <= 5 && holders.contains(&id), "{holders:?}");
            granted.lock().unwrap().push(id.clone());
            done_tx.send(id.clone()).unwrap();
            if i < 5 {
                barrier.wait();
            }
            assert!(l.release(&id, 5).unwrap());
        }));
        std::thread::sleep(Duration::from_millis(100));
    }
    let queued = || etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/wave/v1/queue/"]);
    assert_eq!(queued().split_whitespace().count(), 10, "{}", queued());
    // The five holders come back at the same moment and release.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(5));
    let releasers: Vec<_> = first
        .iter()
        .map(|h| {
            let (l, h, b) = (etcd.lock("wave"), h.clone(), barrier.clone());
            std::thread::spawn(move || {
                b.wait();
                assert!(l.release(&h, 5).unwrap());
                l.counters.handoffs.lock().unwrap().len()
            })
        })
        .collect();
    let handed: usize = releasers.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(handed, 5, "every release was applied by the head of the queue");
    let mut got: Vec<String> = (0..5).map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap()).collect();
    got.sort();
    assert_eq!(got, ["w0", "w1", "w2", "w3", "w4"], "the first five in queue order");
    let mut sem = admin.get().unwrap().unwrap().0.holders;
    sem.sort();
    assert_eq!(sem, got, "the holders are exactly the granted waiters");
    assert_eq!(
        etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/wave/v1/release/"])
            .trim(),
        ""
    );
    // Then the second wave.
    release_now.wait();
    for w in waiters {
        w.join().unwrap();
    }
    assert_eq!(granted.lock().unwrap().len(), 10);
    assert!(admin.get().unwrap().unwrap().0.holders.is_empty());
    assert_eq!(queued().trim(), "");
    assert_eq!(
        etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/wave/v1/release/"])
            .trim(),
        ""
    );
}

/// A release request nobody applies (the only waiter is gone without its lease expiring yet)
/// does not strand the slot: after the hand-off timeout the releaser writes the semaphore
/// itself and hands the slot to that waiter, as a direct release would.
#[test]
fn a_release_the_queue_does_not_pick_up_is_written_directly() {
    let etcd = Etcd::start(1);
    let l = etcd.lock("stuck");
    assert_eq!(l.acquire("h", 1).unwrap(), Acquire::Acquired);
    etcd.ctl(&["put", "com.coreos.airlock/groups/stuck/v1/queue/ghost", "ghost"]);
    let start = Instant::now();
    assert!(l.release("h", 1).unwrap());
    assert!(start.elapsed() >= Duration::from_secs(4), "waited for the head first: {:?}", start.elapsed());
    assert_eq!(l.get().unwrap().unwrap().0.holders, ["ghost"]);
    assert_eq!(
        etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/stuck/v1/"]).trim(),
        "com.coreos.airlock/groups/stuck/v1/semaphore"
    );
    assert!(l.counters.handoffs.lock().unwrap().is_empty());
}

/// The deadline (the end of the window) ends the wait: no slot, and the queue entry is gone
/// so the next waiter moves up at once.
#[test]
fn a_wait_ends_at_its_deadline_and_leaves_the_queue() {
    let etcd = Etcd::start(1);
    let l = etcd.lock("d");
    assert_eq!(l.acquire("holder", 1).unwrap(), Acquire::Acquired);
    let start = Instant::now();
    assert_eq!(
        l.wait_acquire("late", 1, Instant::now() + Duration::from_millis(1500)).unwrap(),
        Waited::Deadline
    );
    assert!(start.elapsed() >= Duration::from_millis(1400));
    assert_eq!(
        etcd.ctl(&["get", "--keys-only", "--prefix", "com.coreos.airlock/groups/d/v1/queue/"]).trim(),
        ""
    );
    assert_eq!(l.get().unwrap().unwrap().0.holders, ["holder"]);
    // A holder that waits again (killed after acquiring) does not queue.
    assert_eq!(
        l.wait_acquire("holder", 1, Instant::now() + Duration::from_secs(5)).unwrap(),
        Waited::AlreadyHeld
    );
}

/// TLS with client certificates: the CA and the client pair from config work; without the
/// client certificate etcd refuses and the agent says the lock is unavailable.
#[test]
fn etcd_over_tls_with_client_certificates() {
    let etcd = Etcd::start_tls();
    assert!(etcd.endpoints()[0].starts_with("https://"));
    let t = etcd.tls().unwrap();
    let good = EtcdLock::with_tls(&etcd.endpoints(), "p", "g", &t.client(true)).unwrap();
    assert_eq!(good.acquire("i-a", 1).unwrap(), Acquire::Acquired);
    let no_cert = EtcdLock::with_tls(&etcd.endpoints(), "p", "g", &t.client(false)).unwrap();
    let err = no_cert.acquire("i-b", 1).unwrap_err();
    assert!(matches!(err, LockError::Unavailable(_)), "{err}");
    let no_ca = EtcdLock::new(&etcd.endpoints(), "p", "g").unwrap();
    let err = no_ca.acquire("i-b", 1).unwrap_err().to_string();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(good.get().unwrap().unwrap().0.holders, ["i-a"]);
}

/// The queue's tail pointer names the waiter queued last; a new waiter watches that one. When it
/// has already left (gave up at its deadline), shortly before or more than a thousand revisions
/// before (the watch would replay that history, so the waiter looks up its place instead), the
/// new waiter still gets the slot when it frees, and does not take it while it is held.
#[test]
fn a_waiter_whose_tail_predecessor_left_still_gets_the_slot() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let etcd = Etcd::start(1);
    let l = etcd.lock("t");
    let tail = "com.coreos.airlock/groups/t/v1/tail";
    let http = reqwest::blocking::Client::new();
    let url = format!("{}/v3/kv/put", etcd.endpoints()[0]);
    for (round, filler) in [(0, 0), (1, 1100)] {
        let (holder, gone, next) = (format!("holder{round}"), format!("gone{round}"), format!("next{round}"));
        if round == 0 {
            assert_eq!(l.acquire(&holder, 1).unwrap(), Acquire::Acquired);
        }
        assert_eq!(l.wait_acquire(&gone, 1, Instant::now() + Duration::from_millis(300)).unwrap(), Waited::Deadline);
        assert!(etcd.ctl(&["get", "--print-value-only", tail]).trim().ends_with(&format!("/queue/{gone}")));
        for i in 0..filler {
            let r = http
                .post(&url)
                .json(&serde_json::json!({ "key": b64("unrelated"), "value": b64(&i.to_string()) }))
                .send()
                .unwrap();
            assert!(r.status().is_success());
        }
        let w = {
            let l = etcd.lock("t");
            let next = next.clone();
            std::thread::spawn(move || l.wait_acquire(&next, 1, Instant::now() + Duration::from_secs(20)).unwrap())
        };
        // Queued, pointing the tail at itself, and not holding while the slot is taken.
        let queued = Instant::now();
        while !etcd.ctl(&["get", "--print-value-only", tail]).trim().ends_with(&format!("/queue/{next}")) {
            assert!(queued.elapsed() < Duration::from_secs(10), "{next} never queued");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        assert!(!w.is_finished(), "{next} returned while the only slot was held");
        let held = if round == 0 { holder } else { "next0".to_string() };
        assert_eq!(l.get().unwrap().unwrap().0.holders, [held.as_str()]);
        l.release(&held, 1).unwrap();
        assert_eq!(w.join().unwrap(), Waited::Acquired);
        assert_eq!(l.get().unwrap().unwrap().0.holders, [next.as_str()]);
    }
}

/// A member that accepts connections and never answers (hung, or the leader a follower forwarded
/// to just died): each request gives up on it after the request timeout and asks the next
/// endpoint, which it then prefers, so only the first request pays.
#[test]
fn a_member_that_never_answers_is_skipped_after_the_request_timeout() {
    let etcd = Etcd::start(1);
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut endpoints = vec![format!("http://{}", hung.local_addr().unwrap())];
    endpoints.extend(etcd.endpoints());
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let held = accepted.clone();
    std::thread::spawn(move || {
        for s in hung.incoming() {
            held.lock().unwrap().push(s.unwrap()); // read nothing, answer nothing, keep it open
        }
    });
    // A client starts at a random endpoint: new clients until one starts at the hung member.
    let mut tried_hung = false;
    for _ in 0..30 {
        let before = accepted.lock().unwrap().len();
        let l = EtcdLock::new(&endpoints, "com.coreos.airlock", "hung").unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let got = l.acquire("a", 1);
            let released = l.release("a", 1);
            tx.send((got, released)).unwrap();
        });
        // The request timeout (2 s) is what ends the wait: reqwest's own default would be 30 s.
        let (got, released) = rx
            .recv_timeout(Duration::from_secs(15))
            .expect("the hung member held the client past its request timeout");
        assert_eq!(got.unwrap(), Acquire::Acquired);
        assert!(released.unwrap());
        let hung_requests = accepted.lock().unwrap().len() - before;
        assert!(hung_requests <= 1, "{hung_requests} requests went to the hung member: only the first may");
        if hung_requests == 1 {
            tried_hung = true;
            break;
        }
    }
    assert!(tried_hung, "no client started at the hung member");
    assert!(etcd.lock("hung").get().unwrap().unwrap().0.holders.is_empty());
}
