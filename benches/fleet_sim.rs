//! Fleet reboot simulation: N simulated nodes, each a thread running the agent's real lock
//! code (`EtcdLock::wait_acquire`, the `reboot --wait` path) and the real decision function
//! (`decide`), against a real three-member etcd on loopback (data on tmpfs). A "reboot" is a
//! 1 s sleep. Prints, per scenario: slot violations (the most holders seen at once, by the nodes
//! and by polling etcd, against the slots), makespan against the ideal ceil(N/slots) × 1 s, and
//! etcd requests per released slot (lock protocol; lease keepalives counted apart).
//!
//! Fault mode: one etcd member is killed a third of the way through, and 5% of the nodes die
//! while holding their slot; a reaper (what `bootstrap lock reap` does from cron once
//! DescribeInstanceStatus says the instance is terminated) releases a dead holder 2 s after it died.
//!
//! Run: `benches/fleet-sim` (the six scenarios, then 1000/50 with arrivals over 5 s)
//! or `benches/fleet-sim NODES SLOTS [faults] [--arrivals SECONDS]`.
//!
//! `benches/fleet-sim rollout [NODES BATCH good|bad|leader]`: rollouts of a new bundle (see
//! the `rollout` module below).

#[path = "../tests/it/harness/etcd.rs"]
#[allow(unused_imports)]
mod etcd_harness;

use bootstrap::reboot::decide::{decide, Decision, Inputs, LockAnswer, RebootState};
use bootstrap::reboot::etcd::{EtcdLock, Waited};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REBOOT: Duration = Duration::from_secs(1);
const REAP_AFTER: Duration = Duration::from_secs(2);
const PREFIX: &str = "sim";
/// Nodes arrive spread evenly over this time (seconds; `--arrivals S` changes it): a fleet's
/// timers never fire in the same instant (RandomizedDelaySec, window_splay). The ideal makespan
/// is not adjusted for it: with 1000 nodes arriving over 1 s or 5 s the queue builds far faster
/// than 50 slots drain it, so no slot ever waits for an arrival. 1000 arrivals in 1 s is a
/// stress row: every arrival costs etcd about five requests (lease, put, look, watch), and on
/// this 2-core host three etcd members serve about 1,600 requests/s, so such a burst keeps
/// them saturated for about three seconds (request latency 400-600 ms).
const ARRIVALS: f64 = 1.0;

struct Shared {
    /// Nodes that believe they hold a slot right now (a dead node counts until the reaper takes it).
    holding: Mutex<HashSet<String>>,
    max_holding: AtomicUsize,
    /// Who believed they held a slot, and what etcd listed, when more did than there are slots.
    over: Mutex<Vec<String>>,
    max_in_etcd: AtomicUsize,
    releases: AtomicU64,
    reaped: AtomicU64,
    /// Dead holders and when they died.
    dead: Mutex<HashMap<String, Instant>>,
    done: AtomicBool,
    start: Instant,
    /// When each node got its slot (seconds from the start).
    acquired_at: Mutex<Vec<f64>>,
}

#[derive(Default, Clone)]
struct Row {
    nodes: usize,
    slots: u64,
    faults: bool,
    /// Which etcd member the fault killed: "leader" or "follower".
    killed: &'static str,
    arrivals: f64,
    conflicts: u64,
    /// Release hand-overs by the head of the queue: median and 90th percentile, ms.
    handoff: (f64, f64),
    max_nodes: usize,
    max_etcd: usize,
    makespan: f64,
    ideal: f64,
    lock_requests: u64,
    keepalives: u64,
    releases: u64,
    reaped: u64,
    dead: usize,
    errors: usize,
}

fn node(i: usize, lock: EtcdLock, group: &str, slots: u64, dies: bool, sh: &Shared) -> Result<(), String> {
    let id = format!("i-{i:017x}");
    // Before the reboot: needed, the run succeeded, no window.
    let mut inputs = Inputs {
        state: None,
        boot_id: "boot-1",
        needed: true,
        run_ok: true,
        in_window: true,
        lock: None,
        healthy: None,
    };
    loop {
        match decide(&inputs) {
            Decision::AskLock => {
                if i == 0 && std::env::var("SIM_DEBUG").is_ok() {
                    eprintln!("node 0 asks at {:.3}s", sh.start.elapsed().as_secs_f64());
                }
                let w = lock
                    .wait_acquire(&id, slots, Instant::now() + Duration::from_secs(3600))
                    .map_err(|e| format!("{id}: {e}"))?;
                inputs.lock = Some(match w {
                    Waited::Acquired | Waited::AlreadyHeld => LockAnswer::Got,
                    Waited::Deadline | Waited::Closed => LockAnswer::Full,
                });
            }
            Decision::Reboot => break,
            d => return Err(format!("{id}: unexpected decision {d:?} before the reboot")),
        }
    }
    sh.acquired_at.lock().unwrap().push(sh.start.elapsed().as_secs_f64());
    let now = {
        let mut h = sh.holding.lock().unwrap();
        h.insert(id.clone());
        h.len()
    };
    sh.max_holding.fetch_max(now, SeqCst);
    if now as u64 > slots {
        let mut who: Vec<String> = sh.holding.lock().unwrap().iter().cloned().collect();
        who.sort();
        let etcd = lock.get().map(|s| s.map(|(s, _)| s.holders));
        sh.over.lock().unwrap().push(format!(
            "{now} > {slots} slots at {:.2}s: nodes {who:?}; etcd {etcd:?}",
            sh.start.elapsed().as_secs_f64()
        ));
    }
    std::thread::sleep(REBOOT);
    if dies {
        sh.dead.lock().unwrap().insert(id, Instant::now());
        return Ok(());
    }
    // After the reboot: the same decision code releases the slot once healthy.
    let st = RebootState {
        group: group.into(),
        holder: id.clone(),
        boot_id: "boot-1".into(),
        acquired_at: String::new(),
        reason: "sim".into(),
    };
    let mut after = Inputs {
        state: Some(&st),
        boot_id: "boot-2",
        needed: false,
        run_ok: true,
        in_window: true,
        lock: None,
        healthy: None,
    };
    loop {
        match decide(&after) {
            Decision::CheckHealth => after.healthy = Some(true),
            Decision::Release => break,
            d => return Err(format!("{id}: unexpected decision {d:?} after the reboot")),
        }
    }
    sh.holding.lock().unwrap().remove(&id);
    let mut backoff = Duration::from_millis(100);
    let t0 = Instant::now();
    let at = sh.start.elapsed().as_secs_f64();
    let _guard = scopeguard(move || {
        if std::env::var("SIM_DEBUG").is_ok() && t0.elapsed() > Duration::from_millis(300) {
            eprintln!("release at {at:.2}s took {:.0} ms", t0.elapsed().as_secs_f64() * 1000.0);
        }
    });
    loop {
        match lock.release(&id, slots) {
            Ok(_) => break,
            Err(e) if e.is_transient() => {
                tracing::debug!("release: {e}; retrying in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(format!("{id}: release: {e}")),
        }
    }
    sh.releases.fetch_add(1, SeqCst);
    Ok(())
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

fn scenario(n: usize, slots: u64, faults: bool, arrivals: f64) -> Row {
    let shm = std::path::Path::new("/dev/shm");
    let mut etcd = etcd_harness::Etcd::start_with(3, false, shm.exists().then_some(shm));
    let eps = etcd.endpoints();
    let group = format!("sim-{n}-{slots}-{faults}");
    let admin = EtcdLock::new(&eps, PREFIX, &group).unwrap();
    admin.set_slots(slots).unwrap();
    // Each node's client is built before the clock starts: building 1000 TLS-capable HTTP
    // clients at once would measure this machine's two cores, not the protocol.
    let locks: Vec<EtcdLock> = (0..n).map(|_| EtcdLock::new(&eps, PREFIX, &group).unwrap()).collect();
    let sh = Arc::new(Shared {
        holding: Mutex::new(HashSet::new()),
        over: Mutex::new(Vec::new()),
        max_holding: AtomicUsize::new(0),
        max_in_etcd: AtomicUsize::new(0),
        releases: AtomicU64::new(0),
        reaped: AtomicU64::new(0),
        dead: Mutex::new(HashMap::new()),
        done: AtomicBool::new(false),
        start: Instant::now(),
        acquired_at: Mutex::new(Vec::new()),
    });
    let counters = Arc::new(Mutex::new(locks.clone()));
    // Observer: etcd's own view of the holders.
    let monitor = {
        let (sh, l) = (sh.clone(), admin.clone());
        std::thread::spawn(move || {
            while !sh.done.load(SeqCst) {
                if let Ok(Some((s, _))) = l.get() {
                    sh.max_in_etcd.fetch_max(s.holders.len(), SeqCst);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Reaper: releases dead holders 2 s after they died.
    let reaper = {
        let (sh, l) = (sh.clone(), admin.clone());
        std::thread::spawn(move || {
            while !sh.done.load(SeqCst) {
                let due: Vec<String> = sh
                    .dead
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, t)| t.elapsed() >= REAP_AFTER)
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in due {
                    // The node is gone: it stops counting as a holder before its slot is freed,
                    // as a live node does before its release (the write that frees the slot
                    // also grants it, and its answer can come late: a lost answer costs the
                    // request timeout).
                    sh.holding.lock().unwrap().remove(&id);
                    if l.release_now(&id, slots).is_ok() {
                        sh.dead.lock().unwrap().remove(&id);
                        sh.reaped.fetch_add(1, SeqCst);
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    let dies = move |i: usize| faults && i % 20 == 7;
    let start = Instant::now();
    let handles: Vec<_> = locks
        .into_iter()
        .enumerate()
        .map(|(i, lock)| {
            let (group, sh) = (group.clone(), sh.clone());
            let arrive = Duration::from_secs_f64(arrivals * i as f64 / n as f64);
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    std::thread::sleep(arrive.saturating_sub(sh.start.elapsed()));
                    node(i, lock, &group, slots, dies(i), &sh)
                })
                .unwrap()
        })
        .collect();
    let ideal = (n as f64 / slots as f64).ceil() * REBOOT.as_secs_f64();
    let mut killed = "";
    if faults {
        std::thread::sleep(Duration::from_secs_f64(ideal / 3.0));
        // The member that leads, by default (its loss adds an election, and writes it was
        // forwarded but never proposed wait out the client's request timeout: the harsher
        // fault, and the one a rolling etcd restart causes); SIM_KILL=follower kills another.
        let http = reqwest::blocking::Client::new();
        let leads = |i: usize| {
            http.post(format!("{}/v3/maintenance/status", eps[i]))
                .body("{}")
                .send()
                .and_then(|r| r.json::<serde_json::Value>())
                .is_ok_and(|s| s["leader"] == s["header"]["member_id"])
        };
        let leader = (0..eps.len()).find(|&i| leads(i));
        let victim = match (std::env::var("SIM_KILL").as_deref(), leader) {
            (Ok("follower"), Some(l)) => (l + 1) % eps.len(),
            (_, Some(l)) => l,
            (_, None) => 1,
        };
        etcd.kill(victim);
        killed = if Some(victim) == leader { "leader" } else { "follower" };
        eprintln!("  killed etcd member {victim} (the {killed}) at {:.1}s", start.elapsed().as_secs_f64());
    }
    let mut errors = 0;
    for h in handles {
        if let Err(e) = h.join().unwrap() {
            eprintln!("  {e}");
            errors += 1;
        }
    }
    let makespan = start.elapsed().as_secs_f64();
    for o in sh.over.lock().unwrap().iter() {
        eprintln!("  OVER: {o}");
    }
    let mut at = sh.acquired_at.lock().unwrap().clone();
    at.sort_by(f64::total_cmp);
    let step = std::env::var("SIM_STEP").ok().and_then(|s| s.parse().ok()).unwrap_or((at.len() / 10).max(1));
    eprintln!(
        "  slots granted by time: {}",
        at.iter()
            .enumerate()
            .filter(|(i, _)| i % step == 0)
            .map(|(i, t)| format!("#{i}@{t:.1}s"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    // Let the reaper finish with the last dead holders.
    while !sh.dead.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(100));
    }
    sh.done.store(true, SeqCst);
    monitor.join().unwrap();
    reaper.join().unwrap();
    let (mut lock_requests, mut keepalives) = (0, 0);
    let conflicts: u64 = counters.lock().unwrap().iter().map(|l| l.counters.cas_conflicts.load(SeqCst)).sum();
    let mut handoffs: Vec<u32> = counters
        .lock()
        .unwrap()
        .iter()
        .flat_map(|l| l.counters.handoffs.lock().unwrap().clone())
        .collect();
    handoffs.sort_unstable();
    let pct = |q: f64| {
        handoffs
            .get(((handoffs.len() as f64 * q) as usize).min(handoffs.len().saturating_sub(1)))
            .map_or(0.0, |&us| us as f64 / 1000.0)
    };
    let handoff = (pct(0.5), pct(0.9));
    eprintln!(
        "  CAS conflicts: {conflicts}; releases handed to the queue's head: {} (median {:.1} ms, p90 {:.1} ms)",
        handoffs.len(),
        handoff.0,
        handoff.1
    );
    for l in counters.lock().unwrap().iter() {
        let k = l.counters.keepalives.load(SeqCst);
        keepalives += k;
        lock_requests += l.counters.requests.load(SeqCst) - k;
    }
    let left = admin.get().unwrap().map(|(s, _)| s.holders.len()).unwrap_or(0);
    assert_eq!(left, 0, "holders left in the semaphore");
    Row {
        nodes: n,
        slots,
        faults,
        killed,
        arrivals,
        conflicts,
        handoff,
        max_nodes: sh.max_holding.load(SeqCst),
        max_etcd: sh.max_in_etcd.load(SeqCst),
        makespan,
        ideal,
        lock_requests,
        keepalives,
        releases: sh.releases.load(SeqCst),
        reaped: sh.reaped.load(SeqCst),
        dead: (0..n).filter(|i| dies(*i)).count(),
        errors,
    }
}

fn main() {
    // RUST_LOG=bootstrap=debug: the lock client's retries, with timestamps, on stderr.
    // (The same directive syntax as BOOTSTRAP_LOG: tracing's `Targets`, no env-filter.)
    if let Some(targets) = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<tracing_subscriber::filter::Targets>().ok())
    {
        use tracing_subscriber::layer::SubscriberExt as _;
        use tracing_subscriber::util::SubscriberInitExt as _;
        tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_thread_names(false))
            .with(targets)
            .init();
    }
    // One connection per waiting node, plus etcd's own: raise the soft fd limit to the hard one.
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "rollout") {
        return rollout::main(&args[1..]);
    }
    let arrivals = match args.iter().position(|a| a == "--arrivals") {
        Some(i) => {
            let s = args.get(i + 1).and_then(|v| v.parse().ok()).expect("--arrivals SECONDS");
            args.drain(i..i + 2);
            Some(s)
        }
        None => None,
    };
    let scenarios: Vec<(usize, u64, bool, f64)> = if args.is_empty() {
        // The six, then the 50-slot pair again with arrivals over 5 s.
        let mut v: Vec<_> = [(1000, 50), (1000, 5), (200, 1)]
            .iter()
            .flat_map(|&(n, s)| [(n, s, false, ARRIVALS), (n, s, true, ARRIVALS)])
            .collect();
        v.extend([(1000, 50, false, 5.0), (1000, 50, true, 5.0)]);
        v.into_iter().map(|(n, s, f, a)| (n, s, f, arrivals.unwrap_or(a))).collect()
    } else {
        vec![(
            args[0].parse().expect("NODES"),
            args[1].parse().expect("SLOTS"),
            args.get(2).is_some_and(|a| a == "faults"),
            arrivals.unwrap_or(ARRIVALS),
        )]
    };
    let mut rows = Vec::new();
    for (n, s, f, a) in scenarios {
        eprintln!("scenario: {n} nodes, {s} slots, faults: {f}, arrivals over {a} s");
        rows.push(scenario(n, s, f, a));
    }
    println!();
    println!("| nodes | slots | arrivals | faults | max holders (nodes / etcd) | violations | makespan | ideal | ratio | released + reaped | lock requests / slot | keepalives / slot | release hand-over p50 / p90 | CAS conflicts | errors |");
    println!("|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let slots_freed = (r.releases + r.reaped).max(1) as f64;
        let violations = (r.max_nodes.max(r.max_etcd) as u64).saturating_sub(r.slots);
        println!(
            "| {} | {} | {:.0}s | {} | {} / {} | {} | {:.1}s | {:.0}s | {:.3} | {} + {} | {:.1} | {:.2} | {:.0} / {:.0} ms | {} | {} |",
            r.nodes,
            r.slots,
            r.arrivals,
            if r.faults {
                format!("etcd {} killed, {} nodes died holding", r.killed, r.dead)
            } else {
                "none".into()
            },
            r.max_nodes,
            r.max_etcd,
            violations,
            r.makespan,
            r.ideal,
            r.makespan / r.ideal,
            r.releases,
            r.reaped,
            r.lock_requests as f64 / slots_freed,
            r.keepalives as f64 / slots_freed,
            r.handoff.0,
            r.handoff.1,
            r.conflicts,
            r.errors,
        );
    }
}

/// Rollouts of a new bundle (issue 17): N simulated nodes, each a thread running the agent's
/// real rollout code (`rollout::decide`, `Rollouts::view`, `wait_slot`, `start_applying`, `healthy`,
/// `halt`, the node record's `fleet::publish`) in the order `agent::rollout::gated` runs it,
/// against a real three-member etcd on loopback. Every node has last-good bundle "old" and has
/// fetched the new one; "apply and health checks" is a 1 s sleep. Scenarios: a good bundle
/// (canary 1, then batches), a bad bundle (every node that applies it fails its health check),
/// and a bundle that fails on the first node to get a slot after the etcd leader is killed
/// mid-rollout. Prints, per scenario: nodes that applied the bundle, nodes that applied it
/// after it was halted (their last check of the halt started after the halt was recorded: must
/// be 0), makespan against the ideal (1 + ceil((N - 1) / batch)) × 1 s, and etcd requests per
/// node (everything: gate read, queue, records, release, node record; keepalives apart).
mod rollout {
    use super::etcd_harness;
    use bootstrap::config::OnFailure;
    use bootstrap::reboot::etcd::{EtcdLock, LockError, Waited};
    use bootstrap::rollout::etcd::{Halt, Rollouts};
    use bootstrap::rollout::{decide, fleet, Gate, Inputs, Why};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    const APPLY: Duration = Duration::from_secs(1);
    const CANARY: u64 = 1;
    const SHA: &str = "5151515151515151515151515151515151515151515151515151515151515151";

    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    pub enum Kind {
        Good,
        Bad,
        /// Fails on the first node to get a slot after the etcd leader was killed.
        LeaderKilled,
    }

    struct Shared {
        start: Instant,
        /// (node, when its last halt check started, s).
        applied: Mutex<Vec<(usize, f64)>>,
        /// When the halt was recorded (s); NaN: not halted.
        halted_at: Mutex<f64>,
        killed_at: Mutex<Option<f64>>,
        fail_taken: AtomicBool,
        left_halted: AtomicU64,
        retries: AtomicU64,
        /// When the last node that applied the bundle had released its slot (s).
        last_done: Mutex<f64>,
    }

    /// Retry transient etcd errors (a node's next run would, later), up to a minute.
    fn retry<T>(sh: &Shared, mut f: impl FnMut() -> Result<T, LockError>) -> Result<T, String> {
        let t0 = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && t0.elapsed() < Duration::from_secs(60) => {
                    sh.retries.fetch_add(1, SeqCst);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn node(i: usize, r: Rollouts, kind: Kind, batch: u64, sh: &Shared) -> Result<(), String> {
        let id = format!("i-{i:017x}");
        let me = id.as_str();
        let record = fleet::Record {
            name: "sim-web".into(),
            status: "ok".into(),
            at: "t".into(),
            ..Default::default()
        };
        let view = retry(sh, || r.view(SHA, Some("old"), me))?;
        let gate = decide(Inputs {
            gated: true,
            fetched: Some(SHA),
            last_good: Some("old"),
            view: Some(&view),
            me,
            on_failure: OnFailure::Halt,
        });
        match gate {
            Gate::Queue(_) | Gate::Held => {}
            Gate::Fallback(_, Why::Halted | Why::Aborted) => {
                sh.left_halted.fetch_add(1, SeqCst);
                return retry(sh, || fleet::publish(&r, me, &record, Duration::from_secs(600)));
            }
            g => return Err(format!("{id}: unexpected gate {g:?}")),
        }
        let deadline = Instant::now() + Duration::from_secs(3600);
        match retry(sh, || r.wait_slot(SHA, me, CANARY, deadline))? {
            Waited::Acquired | Waited::AlreadyHeld => {}
            Waited::Closed => {
                sh.left_halted.fetch_add(1, SeqCst);
                return retry(sh, || fleet::publish(&r, me, &record, Duration::from_secs(600)));
            }
            Waited::Deadline => return Err(format!("{id}: no slot within the hour")),
        }
        // The check before touching the host (at the leader, with the `applied` record).
        let checked = sh.start.elapsed().as_secs_f64();
        if !retry(sh, || r.start_applying(SHA, me))? {
            retry(sh, || r.give_back(SHA, me))?;
            sh.left_halted.fetch_add(1, SeqCst);
            return retry(sh, || fleet::publish(&r, me, &record, Duration::from_secs(600)));
        }
        sh.applied.lock().unwrap().push((i, checked));
        std::thread::sleep(APPLY);
        let fails = match kind {
            Kind::Good => false,
            Kind::Bad => true,
            Kind::LeaderKilled => sh.killed_at.lock().unwrap().is_some_and(|k| checked > k) && !sh.fail_taken.swap(true, SeqCst),
        };
        if fails {
            let h = Halt {
                node: id.clone(),
                step: None,
                check: Some("sim".into()),
                reason: "health check failed: sim".into(),
                at: String::new(),
            };
            retry(sh, || r.halt(SHA, &h))?;
            let mut at = sh.halted_at.lock().unwrap();
            if at.is_nan() {
                *at = sh.start.elapsed().as_secs_f64();
            }
        } else {
            retry(sh, || r.healthy(SHA, me, CANARY, batch))?;
        }
        {
            let mut d = sh.last_done.lock().unwrap();
            *d = d.max(sh.start.elapsed().as_secs_f64());
        }
        retry(sh, || fleet::publish(&r, me, &record, Duration::from_secs(600)))
    }

    pub struct Row {
        arrivals: f64,
        n: usize,
        batch: u64,
        kind: Kind,
        applied: usize,
        after_halt: usize,
        left_halted: u64,
        makespan: f64,
        ideal: f64,
        req_mean: f64,
        req_max: u64,
        keepalives: f64,
        retries: u64,
        errors: usize,
    }

    pub fn scenario(n: usize, batch: u64, kind: Kind, arrivals: f64) -> Row {
        let shm = std::path::Path::new("/dev/shm");
        let mut etcd = etcd_harness::Etcd::start_with(3, false, shm.exists().then_some(shm));
        let eps = etcd.endpoints();
        let group = format!("rollout-{n}-{batch}-{kind:?}");
        let clients: Vec<Rollouts> = (0..n)
            .map(|_| Rollouts::from_lock(EtcdLock::new(&eps, super::PREFIX, &group).unwrap()))
            .collect();
        let sh = Arc::new(Shared {
            start: Instant::now(),
            applied: Mutex::new(Vec::new()),
            halted_at: Mutex::new(f64::NAN),
            killed_at: Mutex::new(None),
            fail_taken: AtomicBool::new(false),
            left_halted: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            last_done: Mutex::new(0.0),
        });
        let start = Instant::now();
        let handles: Vec<_> = clients
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, r)| {
                let sh = sh.clone();
                let arrive = Duration::from_secs_f64(arrivals * i as f64 / n as f64);
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        std::thread::sleep(arrive.saturating_sub(sh.start.elapsed()));
                        node(i, r, kind, batch, &sh)
                    })
                    .unwrap()
            })
            .collect();
        let ideal = (1.0 + ((n as f64 - 1.0) / batch as f64).ceil()) * APPLY.as_secs_f64();
        if kind == Kind::LeaderKilled {
            std::thread::sleep(Duration::from_secs_f64(ideal / 3.0));
            let http = reqwest::blocking::Client::new();
            let leads = |i: usize| {
                http.post(format!("{}/v3/maintenance/status", eps[i]))
                    .body("{}")
                    .send()
                    .and_then(|r| r.json::<serde_json::Value>())
                    .is_ok_and(|s| s["leader"] == s["header"]["member_id"])
            };
            let victim = (0..eps.len()).find(|&i| leads(i)).unwrap_or(1);
            etcd.kill(victim);
            *sh.killed_at.lock().unwrap() = Some(sh.start.elapsed().as_secs_f64());
            eprintln!("  killed etcd member {victim} (the leader) at {:.1}s", start.elapsed().as_secs_f64());
        }
        let mut errors = 0;
        for h in handles {
            if let Err(e) = h.join().unwrap() {
                eprintln!("  {e}");
                errors += 1;
            }
        }
        let all_done = start.elapsed().as_secs_f64();
        // The rollout is done when the last node released its slot (healthy); its node record
        // afterwards is not part of it. (`sh.start` is a moment before `start`.)
        let makespan = *sh.last_done.lock().unwrap() - start.duration_since(sh.start).as_secs_f64();
        eprintln!("  last node released at {makespan:.2}s; every node (records included) done at {all_done:.2}s");
        let applied = sh.applied.lock().unwrap().clone();
        let mut at: Vec<f64> = applied.iter().map(|a| a.1).collect();
        at.sort_by(f64::total_cmp);
        eprintln!(
            "  applies started by time: {}",
            at.iter()
                .enumerate()
                .filter(|(i, _)| i % (batch as usize).max(1) == 1 || *i == 0 || *i + 1 == at.len())
                .map(|(i, t)| format!("#{i}@{t:.2}s"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let halted_at = *sh.halted_at.lock().unwrap();
        let after_halt = applied.iter().filter(|(_, t)| !halted_at.is_nan() && *t > halted_at).count();
        if !halted_at.is_nan() {
            eprintln!("  halted at {halted_at:.2}s; {} nodes applied the bundle", applied.len());
        }
        let per: Vec<(u64, u64)> = clients
            .iter()
            .map(|c| {
                let k = c.client().counters.keepalives.load(SeqCst);
                (c.client().counters.requests.load(SeqCst) - k, k)
            })
            .collect();
        let req_mean = per.iter().map(|p| p.0).sum::<u64>() as f64 / n as f64;
        let req_max = per.iter().map(|p| p.0).max().unwrap_or(0);
        let keepalives = per.iter().map(|p| p.1).sum::<u64>() as f64 / n as f64;
        Row {
            arrivals,
            n,
            batch,
            kind,
            applied: applied.len(),
            after_halt,
            left_halted: sh.left_halted.load(SeqCst),
            makespan,
            ideal,
            req_mean,
            req_max,
            keepalives,
            retries: sh.retries.load(SeqCst),
            errors,
        }
    }

    pub fn main(args: &[String]) {
        let mut args = args.to_vec();
        let arrivals = match args.iter().position(|a| a == "--arrivals") {
            Some(i) => {
                let s: f64 = args.get(i + 1).and_then(|v| v.parse().ok()).expect("--arrivals SECONDS");
                args.drain(i..i + 2);
                Some(s)
            }
            None => None,
        };
        let kind = |s: &str| match s {
            "good" => Kind::Good,
            "bad" => Kind::Bad,
            "leader" => Kind::LeaderKilled,
            _ => panic!("good|bad|leader"),
        };
        let a = arrivals.unwrap_or(super::ARRIVALS);
        let scenarios: Vec<(usize, u64, Kind, f64)> = if args.is_empty() {
            vec![
                (1000, 50, Kind::Good, a),
                (1000, 50, Kind::Good, arrivals.unwrap_or(5.0)),
                (1000, 50, Kind::Bad, a),
                (1000, 50, Kind::LeaderKilled, a),
                (200, 50, Kind::Good, a),
            ]
        } else {
            vec![(
                args[0].parse().expect("NODES"),
                args[1].parse().expect("BATCH"),
                kind(args.get(2).map_or("good", String::as_str)),
                a,
            )]
        };
        let mut rows = Vec::new();
        for (n, b, k, a) in scenarios {
            eprintln!("rollout scenario: {n} nodes, canary {CANARY}, batch {b}, bundle {k:?}, arrivals over {a} s");
            rows.push(scenario(n, b, k, a));
        }
        println!();
        println!("| nodes | arrivals | canary | batch | bundle | applied | applied after the halt | left on last-good (halted) | makespan | ideal | ratio | etcd requests / node (mean / max) | keepalives / node | retried | errors |");
        println!("|---:|---:|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in rows {
            println!(
                "| {} | {:.0}s | {CANARY} | {} | {} | {} | {} | {} | {:.1}s | {:.0}s | {} | {:.1} / {} | {:.2} | {} | {} |",
                r.n,
                r.arrivals,
                r.batch,
                match r.kind {
                    Kind::Good => "good",
                    Kind::Bad => "bad (fails its health check)",
                    Kind::LeaderKilled => "fails after the etcd leader is killed",
                },
                r.applied,
                r.after_halt,
                r.left_halted,
                r.makespan,
                r.ideal,
                if r.kind == Kind::Good {
                    format!("{:.3}", r.makespan / r.ideal)
                } else {
                    "-".into()
                },
                r.req_mean,
                r.req_max,
                r.keepalives,
                r.retries,
                r.errors,
            );
        }
    }
}
