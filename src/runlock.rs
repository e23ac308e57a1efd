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
    path: PathBuf,
}

thread_local! {
    /// The run locks this thread holds (their paths).
    static HELD: std::cell::RefCell<Vec<PathBuf>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Drop for RunLock {
    fn drop(&mut self) {
        if self._lock.is_some() {
            HELD.with(|h| h.borrow_mut().retain(|p| *p != self.path));
        }
    }
}

/// Take the exclusive run lock under `root`, waiting up to `timeout` for another run.
pub fn acquire(root: &Path, timeout: Duration) -> Result<RunLock> {
    let path: PathBuf = crate::state::StateDir::new(root).run_lock();
    if HELD.with(|h| h.borrow().contains(&path)) {
        return Ok(RunLock { _lock: None, path });
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
                HELD.with(|h| h.borrow_mut().push(path.clone()));
                return Ok(RunLock { _lock: Some(lock), path });
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
    }
}
