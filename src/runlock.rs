//! The run lock: `flock` on `/run/bootstrap/lock`, shared by the timer, `init` and manual runs.

use crate::error::LockTimeout;
use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiting run retries the lock.
const POLL: Duration = Duration::from_millis(50);

/// Held for the life of the value; the kernel drops it if the process dies. A thread that
/// holds the lock and takes it again (a run that re-took the lock after waiting for a rollout
/// slot, then applies under it) gets a nested guard that holds nothing itself: the first guard
/// must outlive it.
pub struct RunLock {
    _lock: Option<Flock<File>>,
    /// The thread that took the lock, and the lock file: this guard's entry in `HELD`.
    owner: (std::thread::ThreadId, PathBuf),
}

/// The run locks held in this process: (the thread that took it, the lock file). Keyed by
/// the taking thread, so a guard moved to another thread still drops its own entry.
static HELD: std::sync::Mutex<Vec<(std::thread::ThreadId, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn held() -> std::sync::MutexGuard<'static, Vec<(std::thread::ThreadId, PathBuf)>> {
    HELD.lock().unwrap_or_else(|e| e.into_inner())
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if self._lock.is_some() {
            held().retain(|o| *o != self.owner);
        }
    }
}

/// Take the exclusive run lock under `root`, waiting up to `timeout` for another run.
pub fn acquire(root: &Path, timeout: Duration) -> Result<RunLock> {
    let path: PathBuf = crate::state::StateDir::new(root).run_lock();
    let owner = (std::thread::current().id(), path.clone());
    if held().contains(&owner) {
        return Ok(RunLock { _lock: None, owner });
    }
    let start = Instant::now();
    let mut told = false;
    // Through the root like every host path: an image's /run link stays inside the image.
    let at = crate::fsutil::Root::open(root)?
        .parent(&format!("/{}", crate::state::RUN_LOCK), true)?
        .with_context(|| format!("no directory for {}", path.display()))?;
    let mut file = at.open_or_create(0o644)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)
                    .and_then(|_| lock.rewind())
                    .and_then(|_| writeln!(lock, "{}", std::process::id()))
                    .with_context(|| format!("writing pid to {}", path.display()))?;
                held().push(owner.clone());
                return Ok(RunLock { _lock: Some(lock), owner });
            }
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                let holder = holder(&path);
                if start.elapsed() >= timeout {
                    return Err(LockTimeout {
                        path: path.display().to_string(),
                        holder,
                        waited_secs: start.elapsed().as_secs(),
                    }
                    .into());
                }
                if !told {
                    tracing::info!("waiting for the run lock {} held by pid {holder}", path.display());
                    told = true;
                }
                file = f;
                std::thread::sleep(POLL);
            }
            Err((_, e)) => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
}

/// The pid the current holder wrote into the lock file.
fn holder(path: &Path) -> String {
    let mut s = String::new();
    let _ = File::open(path).and_then(|mut f| f.read_to_string(&mut s));
    let s = s.trim();
    if s.is_empty() {
        "unknown".into()
    } else {
        s.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The thread that holds the lock takes it again at once (nested, holding nothing); another
    /// thread waits for it until the first guard goes, nested guards or not.
    #[test]
    fn the_holding_thread_takes_it_again_others_wait() {
        let root = tempfile::tempdir().unwrap();
        let outer = acquire(root.path(), Duration::ZERO).unwrap();
        let inner = acquire(root.path(), Duration::ZERO).unwrap();
        let r = root.path().to_path_buf();
        let other = move || std::thread::spawn(move || acquire(&r, Duration::ZERO).is_ok()).join().unwrap();
        assert!(!other.clone()(), "another thread took a held lock");
        drop(inner);
        assert!(!other.clone()(), "a nested guard released the lock");
        drop(outer);
        assert!(other(), "the lock stayed held after its guard went");
        // Free again on this thread: a real lock, not a nested guard.
        let again = acquire(root.path(), Duration::ZERO).unwrap();
        assert!(again._lock.is_some());
        // Moved to another thread and dropped there: this thread holds nothing any more.
        std::thread::spawn(move || drop(again)).join().unwrap();
        let last = acquire(root.path(), Duration::ZERO).unwrap();
        assert!(last._lock.is_some(), "a stale entry made a nested guard that holds nothing");
    }
}
