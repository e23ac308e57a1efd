//! The run lock: `flock` on `/run/bootstrap/lock`, shared by the timer, `init` and manual runs.

use crate::error::LockTimeout;
use anyhow::{Context, Result};
use nix::fcntl::{Flock, FlockArg};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a waiting run retries the lock.
const POLL: Duration = Duration::from_millis(50);

/// Held for the life of the value; the kernel drops it if the process dies.
pub struct RunLock {
    _lock: Flock<File>,
}

/// Take the exclusive run lock under `root`, waiting up to `timeout` for another run.
pub fn acquire(root: &Path, timeout: Duration) -> Result<RunLock> {
    let path: PathBuf = crate::state::StateDir::new(root).run_lock();
    crate::fsutil::create_parents(&path)?;
    let start = Instant::now();
    let mut told = false;
    let mut file = open(&path)?;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                lock.set_len(0)
                    .and_then(|_| lock.rewind())
                    .and_then(|_| writeln!(lock, "{}", std::process::id()))
                    .with_context(|| format!("writing pid to {}", path.display()))?;
                return Ok(RunLock { _lock: lock });
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

fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
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
