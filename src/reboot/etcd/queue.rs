//! The herd-free waiting queue (`reboot --wait`; see the module documentation): enqueueing
//! behind the queue's tail pointer, one bounded look at a time, watches for the waiter ahead
//! (or, at the head, for release requests and the semaphore), and the head's hand-over of free
//! slots.

use super::client::{key_of, num, prefix_end, revision, txn_range, Kv};
use super::{EtcdLock, Waited, HANDOVER_LOOKAHEAD, MAX_TXN_OPS, RELEASE_BATCH, TAIL_REPLAY, WATCH_CAP};
use crate::reboot::lock::{self, or_new, take, Acquire, LockError, Semaphore};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// How a watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Woke {
    /// An event the caller waited for, seen at this store revision (or later).
    Hit(i64),
    /// Cancelled, compacted or ended early: look again.
    Reset,
    Deadline,
}

/// What a watch waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WaitFor {
    /// The key deleted.
    Deleted,
    /// Any key in the range written (or deleted).
    Changed,
}

/// What a waiter sees in one look (see [`EtcdLock::look`]).
pub(super) struct View {
    /// Our queue key's create revision (None: not queued).
    my_rev: Option<i64>,
    /// The waiter just before us (None: we are the head, when our create revision was known).
    pred: Option<String>,
    sem: Option<(Semaphore, String)>,
    /// Pending release request keys (the head's look).
    releases: Vec<String>,
    /// The first queue keys, in queue order (the head's look).
    waiters: Vec<String>,
    /// The store revision the look was taken at.
    rev: i64,
    /// When `pred` came from the queue's tail pointer (see `enqueue`): the revision it was
    /// queued at, from which its deletion is watched.
    pred_since: Option<i64>,
}

impl EtcdLock {
    /// Queue (or refresh our key's lease) in one write that also moves the queue's tail
    /// pointer to us and reads the semaphore. Our place is the key's create revision; the
    /// tail's previous value is the waiter queued just before us, so finding it costs etcd
    /// nothing (a read sorted by create revision would scan the whole queue, and a burst of
    /// arrivals would scan it once each).
    pub(super) fn enqueue(&self, id: &str, me: &str, lease: &str) -> Result<View, LockError> {
        let tail = format!("{}/tail", self.base);
        let r: serde_json::Value = self.post(
            "/v3/kv/txn",
            serde_json::json!({ "success": [
                { "request_put": { "key": B64.encode(me), "value": B64.encode(id), "lease": lease, "prev_kv": true } },
                { "request_put": { "key": B64.encode(&tail), "value": B64.encode(me), "prev_kv": true } },
                { "request_range": { "key": B64.encode(&self.key) } },
            ] }),
        )?;
        let rev: i64 = revision(&r);
        let prev = |i: usize| -> Option<Kv> { serde_json::from_value(r["responses"][i]["response_put"]["prev_kv"].clone()).ok() };
        let sem = txn_range(&r, 2)?.into_iter().next().map(|kv| self.decode(kv)).transpose()?;
        let (pred, pred_since) = match prev(1) {
            Some(kv) => {
                let since = num(&kv.mod_revision);
                let key = String::from_utf8_lossy(&B64.decode(kv.value.unwrap_or_default()).unwrap_or_default()).to_string();
                (Some(key).filter(|k| *k != me), Some(since))
            }
            None => (None, None),
        };
        Ok(View {
            my_rev: Some(prev(0).map(|kv| num(&kv.create_revision)).unwrap_or(rev)),
            pred,
            sem,
            releases: Vec::new(),
            waiters: Vec::new(),
            rev,
            pred_since,
        })
    }

    /// Apply the pending release requests `releases` to `s`, then hand its free slots to the
    /// first `waiters` (queue keys, in order; `me` skipped), adding the deletes to `ops`, which
    /// then leave room for the semaphore's put within `MAX_TXN_OPS`.
    pub(super) fn settle(&self, s: &mut Semaphore, releases: &[String], waiters: &[String], me: Option<&str>, ops: &mut Vec<serde_json::Value>) {
        let (queue, release) = (self.queue_dir(), self.release_dir());
        let released: Vec<&str> = releases.iter().map(|k| k.trim_start_matches(&release)).collect();
        ops.extend(releases.iter().map(|k| self.delete_op(k)));
        let room = (MAX_TXN_OPS - 1).saturating_sub(ops.len());
        let waiters: Vec<&String> = waiters.iter().filter(|k| Some(k.as_str()) != me).collect();
        let holders: Vec<&str> = waiters.iter().map(|k| k.trim_start_matches(&queue)).collect();
        let granted = lock::settle(s, &released, &holders, room);
        ops.extend(waiters[..granted].iter().map(|k| self.delete_op(k)));
    }

    /// One consistent read, of bounded size whatever the queue length: our queue key, the
    /// semaphore, the waiter just before us (the newest key created before ours, `my_rev`), and
    /// for a `head` look the pending release requests and the first `HANDOVER_LOOKAHEAD`
    /// waiters in queue order. Reads sorted by create revision cost etcd time linear in the
    /// queue's length, so a newly queued waiter, far back, looks only for its predecessor; a
    /// waiter woken by its predecessor leaving is likely the head now and reads both; the head
    /// (`my_rev` None) needs no predecessor: later keys queue behind it.
    ///
    /// `seen`: a store revision this client has already seen on the member it talks to (its own
    /// write, or the watch event that woke it). Then the read is served by that member without
    /// a round of raft (`serializable`): under load a linearizable read waits for the member to
    /// apply everything proposed before it, which is the latency a hand-over should not pay. It
    /// is as fresh as what prompted it: an answer older than `seen` (another member answered)
    /// is read again linearizably. Writes stay compare-and-swaps, so a read that is a little
    /// old can cost a retry, never a slot.
    fn look(&self, me: &str, my_rev: Option<i64>, head: bool, seen: Option<i64>) -> Result<View, LockError> {
        let v = self.look_once(me, my_rev, head, seen.is_some())?;
        match seen {
            Some(r) if v.rev < r => self.look_once(me, my_rev, head, false),
            _ => Ok(v),
        }
    }

    fn look_once(&self, me: &str, my_rev: Option<i64>, head: bool, serializable: bool) -> Result<View, LockError> {
        let pred = !head || my_rev.is_some();
        let (queue, release) = (self.queue_dir(), self.release_dir());
        let mut ops = vec![
            serde_json::json!({ "request_range": { "key": B64.encode(me), "keys_only": true } }),
            serde_json::json!({ "request_range": { "key": B64.encode(&self.key) } }),
        ];
        if head {
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&release), "range_end": B64.encode(prefix_end(&release)), "keys_only": true,
                "limit": RELEASE_BATCH.to_string(),
            } }));
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true,
                "sort_order": "ASCEND", "sort_target": "CREATE", "limit": HANDOVER_LOOKAHEAD.to_string(),
            } }));
        }
        if let Some(mine) = my_rev.filter(|_| pred) {
            ops.push(serde_json::json!({ "request_range": {
                "key": B64.encode(&queue), "range_end": B64.encode(prefix_end(&queue)), "keys_only": true,
                "max_create_revision": (mine - 1).to_string(), "sort_order": "DESCEND", "sort_target": "CREATE", "limit": "1",
            } }));
        }
        if serializable {
            for op in &mut ops {
                op["request_range"]["serializable"] = true.into();
            }
        }
        let r: serde_json::Value = self.post("/v3/kv/txn", serde_json::json!({ "success": ops }))?;
        let range = |i| txn_range(&r, i);
        let keys = |i: usize| -> Result<Vec<String>, LockError> { Ok(range(i)?.into_iter().map(key_of).collect()) };
        Ok(View {
            my_rev: range(0)?.first().map(|kv| num(&kv.create_revision)),
            pred: match my_rev.filter(|_| pred) {
                Some(_) => keys(if head { 4 } else { 2 })?.into_iter().next(),
                None => None,
            },
            sem: range(1)?.into_iter().next().map(|kv| self.decode(kv)).transpose()?,
            releases: if head { keys(2)? } else { Vec::new() },
            waiters: if head { keys(3)? } else { Vec::new() },
            rev: revision(&r),
            pred_since: None,
        })
    }

    /// Block until `key` (or a key in [`key`, `range_end`)) is deleted or changed (`what`) after
    /// store revision `after`, the watch is reset (cancelled, compacted, stream ended early: the
    /// caller looks again), or the deadline passes. A broken connection is an error.
    ///
    /// The watch starts at the current revision, not at `after + 1`: etcd serves a watch that
    /// starts in the past from a catch-up loop that runs every 100 ms, which would add up to
    /// that much to every hand-over (measured: median 45 ms a release, 14 ms this way). What
    /// happened between `after` and the watch's start is read once instead (a count, bounded).
    /// `from_past`: start at `after + 1` after all, for a waiter in no hurry (newly queued,
    /// likely far back), which saves that read. With the queue's tail pointer (see
    /// `enqueue`) an arrival costs etcd three requests: lease, enqueue, watch (fleet
    /// simulation, 1000 nodes arriving within a second, 50 slots: median 1.10 × ideal, against
    /// 1.12 with a look per arrival and 1.17 with a catch-up read as well).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn wait_for(
        &self,
        key: &str,
        range_end: Option<&[u8]>,
        what: WaitFor,
        after: i64,
        from_past: bool,
        deadline: Instant,
    ) -> Result<Woke, LockError> {
        let left = deadline.saturating_duration_since(Instant::now()).min(WATCH_CAP);
        if left.is_zero() {
            return Ok(Woke::Deadline);
        }
        let until = Instant::now() + left;
        let mut create = serde_json::json!({ "key": B64.encode(key) });
        if from_past {
            create["start_revision"] = (after + 1).to_string().into();
        }
        if let Some(end) = range_end {
            create["range_end"] = B64.encode(end).into();
        }
        let resp = self.send("/v3/watch", &serde_json::json!({ "create_request": create }), Some(left))?;
        let stream = serde_json::Deserializer::from_reader(std::io::BufReader::new(resp)).into_iter::<serde_json::Value>();
        for msg in stream {
            let msg = match msg {
                Ok(m) => m,
                Err(_) if Instant::now() + Duration::from_millis(50) >= until => return Ok(Woke::Deadline),
                Err(e) => return Err(LockError::Unavailable(format!("watch {key}: {e}"))),
            };
            if !msg["error"].is_null() {
                return Err(LockError::Unavailable(format!("watch {key}: {}", msg["error"])));
            }
            let res = &msg["result"];
            if res["canceled"] == true || res["compact_revision"].as_str().is_some_and(|r| r != "0") {
                return Ok(Woke::Reset);
            }
            if res["created"] == true {
                let start = res["header"]["revision"].as_str().and_then(|v| v.parse::<i64>().ok()).unwrap_or(i64::MAX);
                if !from_past && start > after {
                    if let Some(at) = self.happened(key, range_end, what, after)? {
                        return Ok(Woke::Hit(at));
                    }
                }
                continue;
            }
            let events = res["events"].as_array().map(Vec::as_slice).unwrap_or_default();
            if events.iter().any(|e| what == WaitFor::Changed || e["type"] == "DELETE") {
                let at = revision(res);
                return Ok(Woke::Hit(at));
            }
        }
        Ok(if Instant::now() + Duration::from_millis(50) < until {
            Woke::Reset
        } else {
            Woke::Deadline
        })
    }

    /// Whether what `wait_for` waits for already happened after revision `after` (the key is
    /// gone, or a key in the range was written since), and the revision this read saw.
    fn happened(&self, key: &str, range_end: Option<&[u8]>, what: WaitFor, after: i64) -> Result<Option<i64>, LockError> {
        let mut q = serde_json::json!({ "key": B64.encode(key), "count_only": true });
        if let Some(end) = range_end {
            q["range_end"] = B64.encode(end).into();
        }
        if what == WaitFor::Changed {
            q["min_mod_revision"] = (after + 1).to_string().into();
        }
        let r: serde_json::Value = self.post("/v3/kv/range", q)?;
        let count = r["count"].as_str().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        let at = revision(&r);
        Ok(match what {
            WaitFor::Deleted => count == 0,
            WaitFor::Changed => count > 0,
        }
        .then_some(at))
    }

    /// The head of the queue, on what it saw: apply the pending release requests, take a slot
    /// when one is free and grant the other free slots to the waiters right behind, all in one
    /// compare-and-swap that also removes their queue keys and ours. Each granted waiter wakes
    /// (its predecessor's key is gone), finds itself a holder and goes; the first waiter not
    /// granted becomes the head. While the semaphore is full the head watches the release
    /// requests and the semaphore, nothing else.
    fn lead(&self, id: &str, me: &str, mut seen: Option<View>, default_slots: u64, deadline: Instant, left: &Cell<bool>) -> Result<Option<Waited>, LockError> {
        // The revision of the event that woke us, for the next look (see `look`).
        let mut woke_at = None;
        loop {
            if Instant::now() >= deadline {
                return Ok(Some(Waited::Deadline));
            }
            let v = match seen.take() {
                Some(v) => v,
                None => self.look(me, None, true, woke_at.take())?,
            };
            let (mut s, sem_rev) = or_new(v.sem, default_slots);
            if s.holds(id) {
                left.set(v.my_rev.is_none());
                return Ok(Some(Waited::Acquired));
            }
            if self.closed(&s) {
                return Ok(Some(Waited::Closed));
            }
            if v.my_rev.is_none() {
                return Ok(None);
            }
            // Pending release requests first, then our slot, then the other free ones.
            let mut ops = Vec::new();
            self.settle(&mut s, &v.releases, &[], None, &mut ops);
            let acquired = take(&mut s, id).1 == Acquire::Acquired;
            if acquired {
                ops.push(self.delete_op(me));
                ops.push(self.delete_op(&self.release_key(id)));
                self.settle(&mut s, &[], &v.waiters, Some(me), &mut ops);
            }
            if ops.is_empty() {
                // The watch covers [release/, semaphore]: the release requests and the semaphore.
                let mut end = self.key.clone().into_bytes();
                end.push(0);
                if let Woke::Hit(at) = self.wait_for(&self.release_dir(), Some(&end), WaitFor::Changed, v.rev, false, deadline)? {
                    woke_at = Some(at);
                }
                continue;
            }
            let won = self.cas_with(sem_rev.as_deref(), &s, &ops)?.is_ok();
            tracing::debug!(holder = id, won, acquired, releases = v.releases.len(), "queue head wrote the semaphore");
            if won && acquired {
                left.set(true);
                return Ok(Some(Waited::Acquired));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn wait_in_queue(
        &self,
        id: &str,
        me: &str,
        queued: View,
        default_slots: u64,
        deadline: Instant,
        enqueue: &dyn Fn() -> Result<View, LockError>,
        left: &Cell<bool>,
    ) -> Result<Waited, LockError> {
        let mut backoff = Duration::from_millis(200);
        let mut first = true;
        let mut my_rev = queued.my_rev;
        // A revision seen on the member we talk to (our write, the event that woke us): the
        // next look may be served by it alone (see `look`).
        let mut seen = Some(queued.rev);
        // The enqueue's answer, which serves as the first look when it names the waiter before us.
        let mut ready = Some(queued);
        let mut woken = false;
        loop {
            if Instant::now() >= deadline {
                return Ok(Waited::Deadline);
            }
            let step = (|| -> Result<Option<Waited>, LockError> {
                let v = match ready.take() {
                    // Unless that waiter was queued so long ago that watching its key from then
                    // would replay much history: then a look finds it, as it does after a wake.
                    Some(v) if v.pred.is_some() && v.pred_since.is_some_and(|p| v.rev - p <= TAIL_REPLAY) => {
                        seen = None;
                        v
                    }
                    _ => self.look(me, my_rev, woken, seen.take())?,
                };
                woken = false;
                // Holding already: we were killed after acquiring (first look), or the waiter
                // ahead of us granted us a slot (it hands out every free slot at once).
                if v.sem.as_ref().is_some_and(|(s, _)| s.holds(id)) {
                    left.set(v.my_rev.is_none());
                    return Ok(Some(if first { Waited::AlreadyHeld } else { Waited::Acquired }));
                }
                first = false;
                if v.sem.as_ref().is_some_and(|(s, _)| self.closed(s)) {
                    return Ok(Some(Waited::Closed));
                }
                if v.my_rev.is_none() {
                    // Our lease expired (etcd unreachable for a minute): to the back of the queue.
                    let q = enqueue()?;
                    (my_rev, seen) = (q.my_rev, Some(q.rev));
                    ready = Some(q);
                    return Ok(None);
                }
                if v.my_rev != my_rev {
                    // Learn our place, then look again with it.
                    (my_rev, seen) = (v.my_rev, Some(v.rev));
                    return Ok(None);
                }
                match v.pred.clone() {
                    None => {
                        let seen = (!v.waiters.is_empty()).then_some(v);
                        self.lead(id, me, seen, default_slots, deadline, left)
                    }
                    Some(pred) => {
                        // Newly queued, likely far back: no hurry, so no catch-up read either.
                        let after = v.pred_since.unwrap_or(v.rev);
                        if let Woke::Hit(at) = self.wait_for(&pred, None, WaitFor::Deleted, after, !woken, deadline)? {
                            (woken, seen) = (true, Some(at));
                        }
                        Ok(None)
                    }
                }
            })();
            match step {
                Ok(Some(w)) => return Ok(w),
                Ok(None) => backoff = Duration::from_millis(200),
                Err(e) if e.is_transient() => {
                    tracing::debug!("waiting for a reboot slot: {e}; retrying");
                    let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=backoff.as_millis() as u64);
                    std::thread::sleep((backoff / 2 + Duration::from_millis(jitter)).min(deadline.saturating_duration_since(Instant::now())));
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }
}
