//! Running commands: argv vectors, explicit timeouts, a bounded tail of the output, and no
//! process of a command left behind.
//!
//! # Every process a command starts ends with its run
//!
//! A command is not one process: `sh -c 'sleep 100 &'` leaves a `sleep` holding its stdout,
//! a daemon calls `setsid` (a new session and process group, out of reach of a process-group
//! kill) and forks twice, so its parent is gone before anyone saw it. The runner must still end
//! every one of them at the timeout, and must not wait for an end of output that a leftover
//! holds open.
//!
//! How: the command is not the agent's child but a grandchild. The child in between, the
//! *keeper*, is a copy of the agent (forked, it never execs) that makes itself a child
//! subreaper (`PR_SET_CHILD_SUBREAPER`) before it forks the command, closes every file
//! descriptor but a status pipe to the agent, and then only reaps. A subreaper inherits every
//! orphan below it, so at every instant the processes the command started (setsid and
//! double-forked daemons included) are exactly the keeper's descendants in the process tree,
//! and "the keeper has no child left" means "nothing of the command is left". The keeper writes
//! the command's pid and, when it exits, its wait status to the pipe, and exits itself when it
//! has no child left: the pipe's end of file tells the agent the tree is empty. To end a run,
//! the agent sweeps `/proc` for the keeper's descendants and SIGKILLs each through a pidfd
//! whose start time it checked (no pid reuse can redirect the kill), again every
//! [`KILL_SWEEP`], until the keeper is gone.
//!
//! Why not a transient systemd scope or a cgroup: both exist only on a live systemd host, and
//! commands also run under `--root` (image builds, in containers) and in unit tests; a cgroup
//! made inside `bootstrap.service`'s own cgroup is systemd's to manage, not ours. A PID
//! namespace would contain the tree just as well but shows the command different pids than
//! `/proc` does (`pgrep -f` then matches itself). The subreaper needs no privilege, no
//! systemd, and changes nothing the command can see.
//!
//! # When a run ends
//!
//! - The main process has exited and both output pipes are closed: the run is over, and any
//!   process it left running (a daemon that closed its output) is killed now. Under
//!   `bootstrap.service` (`Type=oneshot`, `KillMode=control-group`) systemd kills such leftovers
//!   at the end of the agent's run anyway; ending them with their step makes a step's effects
//!   its own, and the same by hand and under `--root`. A long-running process belongs in a
//!   unit.
//! - The timeout passes first: everything is killed and the output is `timed_out`. This
//!   includes a main process that exited in time while a process it left running still held
//!   the output open (`sh -c 'sleep 100 &'`): the run waits for the end of the output at most
//!   until the timeout, then kills what is left; `code` keeps the main process's status,
//!   [`Output::output_held`] says so, and it does not count as success.
//! - The kill takes effect within milliseconds; a process stuck in uninterruptible I/O is given
//!   up on after [`KILL_GRACE`] (logged), so a run returns within its timeout plus a second.
//!
//! Output: each stream keeps its last [`OUTPUT_TAIL`] bytes (a command's verdict is at its end);
//! `stdout_truncated` / `stderr_truncated` say when earlier bytes were dropped.
//!
//! With [`Cmd::root`], the command is chrooted into an image root before it execs, its `cwd`
//! resolved inside that root.

use anyhow::{bail, Context, Result};
use nix::libc;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default timeout for commands a role runs (`exec` steps and their guards).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);
/// Bytes kept of each output stream: the last ones.
pub const OUTPUT_TAIL: usize = 64 * 1024;
/// How long a killed command's processes may take to die and close its output before the run
/// gives up on them (a process in uninterruptible I/O dies only when the I/O ends).
pub const KILL_GRACE: Duration = Duration::from_millis(500);
/// How often the process tree is swept again while it is being killed (a process forked just
/// before its parent died is an orphan of the keeper on the next sweep).
pub const KILL_SWEEP: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Default)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Working directory; with `root`, a path inside the root (default `/` there).
    pub cwd: Option<PathBuf>,
    pub timeout: Option<Duration>,
    /// Run chrooted into this directory (an image root under `--root`): the program, its
    /// libraries and `cwd` are looked up inside it.
    pub root: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Output {
    /// The main process's exit code; None when it was killed by a signal.
    pub code: Option<i32>,
    /// The last [`OUTPUT_TAIL`] bytes of stdout.
    pub stdout: String,
    /// The last [`OUTPUT_TAIL`] bytes of stderr.
    pub stderr: String,
    /// The timeout passed and everything the command started was killed.
    pub timed_out: bool,
    /// With `timed_out`: the main process had exited in time (`code` is its status), but
    /// processes it left running held its output open until the timeout.
    pub output_held: bool,
    /// Earlier stdout was dropped to keep the last [`OUTPUT_TAIL`] bytes.
    pub stdout_truncated: bool,
    /// Earlier stderr was dropped to keep the last [`OUTPUT_TAIL`] bytes.
    pub stderr_truncated: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out
    }

    /// The last `n` lines of stderr (or stdout when stderr is empty), for error messages.
    pub fn tail(&self, n: usize) -> String {
        let text = if self.stderr.trim().is_empty() { &self.stdout } else { &self.stderr };
        let lines: Vec<&str> = text.trim_end().lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub fn describe(&self) -> String {
        match (self.timed_out, self.output_held, self.code) {
            (true, true, Some(c)) => {
                format!("exited with status {c}, but processes it left running held its output open until the timeout (killed)")
            }
            (true, true, None) => "was killed by a signal, and processes it left running held its output open until the timeout (killed)".to_string(),
            (true, false, _) => "timed out".to_string(),
            (false, _, Some(c)) => format!("exited with status {c}"),
            (false, _, None) => "was killed by a signal".to_string(),
        }
    }
}

/// Run a command to completion, killing everything it started at the timeout (see the module
/// doc). Stdin is /dev/null.
pub fn run(cmd: &Cmd) -> Result<Output> {
    run_with(cmd, false)
}

/// [`run`], with every fsync-family system call of the command and of everything it starts
/// answered with success and not done: a seccomp filter that `sync`, `syncfs`, `fsync`,
/// `fdatasync`, `sync_file_range` and `msync` return 0 from, as `systemd-nspawn
/// --suppress-sync` and eatmydata do. The caller makes the command's writes durable afterwards
/// with one sync (`fsutil::sync_local_filesystems`), and must be able to redo the command after a crash before that (see
/// `step::package`). Where the filter cannot be installed (no CAP_SYS_ADMIN, another
/// architecture), the command runs with its syncs.
///
/// The filter is written out here rather than built with a crate: the seccomp crates set
/// `no_new_privs` to install it, which would also change what the command's setuid helpers
/// may do; as root the agent needs no such flag.
pub fn run_without_fsync(cmd: &Cmd) -> Result<Output> {
    run_with(cmd, true)
}

fn run_with(cmd: &Cmd, no_sync: bool) -> Result<Output> {
    let (prog, args) = cmd.argv.split_first().context("empty command")?;
    let timeout = cmd.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT);
    let (status_r, status_w) = pipe().context("creating a pipe")?;
    let mut c = Command::new(prog);
    c.args(args).envs(&cmd.env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Own process group (the keeper's, which the command shares): signals meant for the
    // agent's group (a Ctrl-C at a terminal) do not reach the command.
    c.process_group(0);
    let chroot = match &cmd.root {
        Some(root) => {
            let cwd = cmd.cwd.as_deref().unwrap_or(Path::new("/"));
            Some((c_path(root)?, c_path(cwd)?))
        }
        None => {
            if let Some(cwd) = &cmd.cwd {
                c.current_dir(cwd);
            }
            None
        }
    };
    let w = status_w.as_raw_fd();
    // SAFETY: the closure runs in the forked child and makes only async-signal-safe system
    // calls (prctl, fork, chroot, chdir, close, write, waitpid, _exit); it allocates nothing
    // (the paths were made above).
    unsafe {
        c.pre_exec(move || keeper_then_command(w, chroot.as_ref(), no_sync));
    }
    let spawned = c.spawn();
    // The keeper holds the only write end now: end of file on it means the keeper is gone.
    drop(status_w);
    let mut child = spawned.with_context(|| match &cmd.root {
        Some(root) => format!(
            "starting {prog:?} chrooted into {} (cwd {})",
            root.display(),
            cmd.cwd.as_deref().unwrap_or(Path::new("/")).display()
        ),
        None => format!("starting {prog:?}"),
    })?;
    let keeper = child.id() as i32;
    let (Some(out), Some(err)) = (child.stdout.take(), child.stderr.take()) else {
        bail!("starting {prog:?}: no output pipes");
    };
    let mut w = Watch {
        streams: [Stream::new(out.into()), Stream::new(err.into())],
        status: Some(status_r),
        status_bytes: Vec::new(),
    };

    let deadline = Instant::now() + timeout;
    let mut kill_deadline: Option<Instant> = None;
    let (mut timed_out, mut output_held, mut killed) = (false, false, 0usize);
    loop {
        let now = Instant::now();
        let main_done = w.main_status().is_some();
        let output_closed = w.streams.iter().all(|s| s.fd.is_none());
        let tree_gone = w.status.is_none();
        if output_closed && tree_gone {
            break;
        }
        if kill_deadline.is_none() && ((main_done && output_closed) || now >= deadline) {
            // Main exited and its output is closed (leftovers only), or the timeout passed.
            if !(main_done && output_closed) {
                timed_out = true;
                output_held = main_done;
            }
            kill_deadline = Some(now + KILL_GRACE);
        }
        let wait = match kill_deadline {
            Some(kd) => {
                if now >= kd {
                    tracing::warn!(
                        "{prog}: processes it started did not die within {} ms of SIGKILL (uninterruptible I/O?); giving up on them",
                        KILL_GRACE.as_millis()
                    );
                    break;
                }
                killed += sweep(keeper);
                KILL_SWEEP.min(kd - now)
            }
            None => deadline - now,
        };
        if let Err(e) = w.poll(wait) {
            // Nothing of the command outlives the run, not even on this path.
            let t = Instant::now();
            while sweep(keeper) > 0 && t.elapsed() < KILL_GRACE {
                std::thread::sleep(KILL_SWEEP);
            }
            return Err(e).with_context(|| format!("reading the output of {prog:?}"));
        }
    }
    if killed > 0 && !timed_out {
        tracing::warn!("{prog} exited but left processes running; they were killed (a long-running process belongs in a unit)");
    }
    // The keeper exits as soon as it closes the pipe; if it is still there, leave it (a zombie
    // until the agent exits) rather than wait on a process that would not die.
    if w.status.is_none() {
        let _ = child.wait();
    } else {
        let _ = child.try_wait();
    }
    let Some(status) = w.main_status() else {
        bail!("lost track of {prog:?}: the process that watched it died before reporting its exit status");
    };
    let [out, err] = w.streams;
    let (stdout, stdout_truncated) = out.tail.finish();
    let (stderr, stderr_truncated) = err.tail.finish();
    Ok(Output {
        code: if libc::WIFEXITED(status) { Some(libc::WEXITSTATUS(status)) } else { None },
        stdout,
        stderr,
        timed_out,
        output_held,
        stdout_truncated,
        stderr_truncated,
    })
}

fn c_path(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).with_context(|| format!("path {} holds a NUL byte", p.display()))
}

/// A pipe, both ends close-on-exec.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 fills the two descriptors, which we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// In the forked child: become the keeper (a subreaper), fork the command, and return in the
/// command (which then execs); the keeper never returns.
fn keeper_then_command(status_w: RawFd, chroot: Option<&(CString, CString)>, no_sync: bool) -> io::Result<()> {
    // SAFETY: async-signal-safe system calls only (see `run`).
    unsafe {
        if libc::prctl(
            libc::PR_SET_CHILD_SUBREAPER,
            1 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // The command. A failure here reaches `spawn` as its error, like a failed exec.
                if no_sync {
                    // A filter that cannot be installed leaves the syncs in (see
                    // `run_without_fsync`): slower, never less safe.
                    let _ = suppress_sync();
                }
                if let Some((root, cwd)) = chroot {
                    if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 || libc::chdir(cwd.as_ptr()) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            }
            main => keep(main, status_w),
        }
    }
}

/// The architecture a seccomp filter sees (`seccomp_data.arch`), for the syscall numbers below.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_003E);
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: Option<u32> = Some(0xC000_00B7);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const AUDIT_ARCH: Option<u32> = None;

const fn bpf_stmt(code: u32, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Jump `jt` instructions ahead when the accumulator equals `k`, else fall through.
const fn bpf_jeq(k: u32, jt: u8) -> libc::sock_filter {
    libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf: 0,
        k,
    }
}

/// The system calls that make data durable, answered 0 by [`NO_SYNC_FILTER`].
const SYNC_CALLS: [libc::c_long; 6] = [
    libc::SYS_sync,
    libc::SYS_syncfs,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_sync_file_range,
    libc::SYS_msync,
];

const fn no_sync_filter() -> [libc::sock_filter; 12] {
    let ld_w_abs = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
    let ret = libc::BPF_RET | libc::BPF_K;
    let mut f = [bpf_stmt(ret, libc::SECCOMP_RET_ALLOW); 12];
    // 0: load seccomp_data.arch; 1: another architecture (i386 on x86_64, arm32 on aarch64)
    // is let through. x32 calls carry x86_64's arch with bit 30 set in the number, so they
    // match no number below and are let through too.
    f[0] = bpf_stmt(ld_w_abs, 4);
    f[1] = bpf_jeq(
        match AUDIT_ARCH {
            Some(a) => a,
            None => 0,
        },
        1,
    );
    // 2: allow. 3: load seccomp_data.nr; 4..=9: a sync call jumps to 11; 10: allow.
    f[3] = bpf_stmt(ld_w_abs, 0);
    let mut i = 0;
    while i < SYNC_CALLS.len() {
        f[4 + i] = bpf_jeq(SYNC_CALLS[i] as u32, (11 - (4 + i) - 1) as u8);
        i += 1;
    }
    // 11: return 0 without running the call (SECCOMP_RET_ERRNO with errno 0).
    f[11] = bpf_stmt(ret, libc::SECCOMP_RET_ERRNO);
    f
}

static NO_SYNC_FILTER: [libc::sock_filter; 12] = no_sync_filter();

/// Install [`NO_SYNC_FILTER`] on the calling thread (inherited by every process it starts);
/// false when it could not be.
///
/// SAFETY: async-signal-safe (one system call on static data).
unsafe fn suppress_sync() -> bool {
    if AUDIT_ARCH.is_none() {
        return false;
    }
    let prog = libc::sock_fprog {
        len: NO_SYNC_FILTER.len() as u16,
        filter: NO_SYNC_FILTER.as_ptr() as *mut libc::sock_filter,
    };
    unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog) == 0 }
}

/// The keeper: hold nothing but the status pipe, report the command's pid and status, reap
/// every orphan, exit when no child is left (the command and all it started are gone).
///
/// SAFETY: called in a forked child; async-signal-safe system calls only.
unsafe fn keep(main: libc::pid_t, status_w: RawFd) -> ! {
    unsafe {
        close_all_but(status_w);
        // The agent may stop listening (it gave up on a process that would not die).
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        write_all(status_w, &main.to_ne_bytes());
        loop {
            let mut st: libc::c_int = 0;
            let pid = libc::waitpid(-1, &mut st, 0);
            if pid == main {
                write_all(status_w, &st.to_ne_bytes());
            } else if pid < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break; // ECHILD
            }
        }
        libc::_exit(0)
    }
}

/// Close every descriptor but `keep`: the output pipes, the agent's sockets and lock files.
unsafe fn close_all_but(keep: RawFd) {
    let k = keep as libc::c_uint;
    unsafe {
        let below = k == 0 || libc::syscall(libc::SYS_close_range, 0 as libc::c_uint, k - 1, 0 as libc::c_uint) == 0;
        let above = libc::syscall(libc::SYS_close_range, k + 1, libc::c_uint::MAX, 0 as libc::c_uint) == 0;
        if !(below && above) {
            // Before Linux 5.9: one by one, up to the descriptor limit.
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as RawFd
            } else {
                1 << 16
            };
            for fd in 0..max {
                if fd != keep {
                    libc::close(fd);
                }
            }
        }
    }
}

unsafe fn write_all(fd: RawFd, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: writes from a live buffer.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            buf = &buf[n as usize..];
        } else if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        } else {
            return;
        }
    }
}

/// SIGKILL every live process below `keeper` in the process tree; returns how many.
fn sweep(keeper: i32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut children: HashMap<i32, Vec<(i32, u64, bool)>> = HashMap::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Some(st) = proc_stat(pid) {
            children.entry(st.ppid).or_default().push((pid, st.start, st.zombie));
        }
    }
    let mut n = 0;
    let mut todo = vec![keeper];
    while let Some(p) = todo.pop() {
        for &(pid, start, zombie) in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            todo.push(pid);
            if !zombie && kill_exact(pid, start) {
                n += 1;
            }
        }
    }
    n
}

struct ProcStat {
    ppid: i32,
    start: u64,
    zombie: bool,
}

/// `/proc/PID/stat`: parent, start time (clock ticks since boot) and whether it is a zombie.
fn proc_stat(pid: i32) -> Option<ProcStat> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold anything: fields follow the last ')'.
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some(ProcStat {
        zombie: *f.first()? == "Z",
        ppid: f.get(1)?.parse().ok()?,
        start: f.get(19)?.parse().ok()?,
    })
}

/// SIGKILL `pid` if it is still the process that started at `start`. A pidfd pins the
/// process; its start time, read after the pidfd was opened, proves the pid was not reused.
fn kill_exact(pid: i32, start: u64) -> bool {
    // SAFETY: plain system calls on a descriptor we own.
    unsafe {
        let fd = libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint);
        if fd >= 0 {
            let fd = OwnedFd::from_raw_fd(fd as RawFd);
            if proc_stat(pid).map(|s| s.start) != Some(start) {
                return false;
            }
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            ) == 0
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
            // Before Linux 5.3: a narrow window for pid reuse remains.
            proc_stat(pid).map(|s| s.start) == Some(start) && libc::kill(pid, libc::SIGKILL) == 0
        } else {
            false
        }
    }
}

/// One output stream: its pipe while open, and the tail read so far.
struct Stream {
    fd: Option<OwnedFd>,
    tail: Tail,
}

impl Stream {
    fn new(fd: OwnedFd) -> Stream {
        Stream {
            fd: Some(fd),
            tail: Tail::default(),
        }
    }
}

/// The pipes a run watches: stdout, stderr, and the keeper's status pipe.
struct Watch {
    streams: [Stream; 2],
    status: Option<OwnedFd>,
    status_bytes: Vec<u8>,
}

impl Watch {
    /// The main process's wait status, once the keeper reported it.
    fn main_status(&self) -> Option<libc::c_int> {
        let b: [u8; 4] = self.status_bytes.get(4..8)?.try_into().ok()?;
        Some(libc::c_int::from_ne_bytes(b))
    }

    /// Wait up to `wait` for any pipe to be readable, and read what is there.
    fn poll(&mut self, wait: Duration) -> io::Result<()> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        for fd in self.streams.iter().filter_map(|s| s.fd.as_ref()).chain(self.status.as_ref()) {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if fds.is_empty() {
            std::thread::sleep(wait);
            return Ok(());
        }
        let ms = wait.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live array of `fds.len()` pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted { Ok(()) } else { Err(e) };
        }
        let mut buf = [0u8; 16 * 1024];
        for p in fds.iter().filter(|p| p.revents != 0) {
            // SAFETY: reads into a live buffer from a descriptor we own.
            let r = unsafe { libc::read(p.fd, buf.as_mut_ptr().cast(), buf.len()) };
            let data = if r > 0 { &buf[..r as usize] } else { &[][..] };
            // End of file, or an error other than a retry: the pipe is done.
            let closed = r == 0 || (r < 0 && !matches!(io::Error::last_os_error().kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock));
            if self.status.as_ref().is_some_and(|f| f.as_raw_fd() == p.fd) {
                self.status_bytes.extend_from_slice(data);
                if closed {
                    self.status = None;
                }
            } else if let Some(s) = self.streams.iter_mut().find(|s| s.fd.as_ref().is_some_and(|f| f.as_raw_fd() == p.fd)) {
                s.tail.push(data);
                if closed {
                    s.fd = None;
                }
            }
        }
        Ok(())
    }
}

/// The last [`OUTPUT_TAIL`] bytes of a stream.
#[derive(Default)]
struct Tail {
    buf: Vec<u8>,
    dropped: bool,
}

impl Tail {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        // Trim only now and then: the buffer stays under twice the tail.
        if self.buf.len() > 2 * OUTPUT_TAIL {
            self.trim();
        }
    }

    fn trim(&mut self) {
        if self.buf.len() > OUTPUT_TAIL {
            self.buf.drain(..self.buf.len() - OUTPUT_TAIL);
            self.dropped = true;
        }
    }

    /// The tail as text, and whether earlier bytes were dropped.
    fn finish(mut self) -> (String, bool) {
        self.trim();
        if self.dropped {
            // Do not start in the middle of a UTF-8 sequence.
            let skip = self.buf.iter().take(3).take_while(|b| **b & 0xC0 == 0x80).count();
            self.buf.drain(..skip);
        }
        (String::from_utf8_lossy(&self.buf).into_owned(), self.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(argv: &[&str]) -> Cmd {
        Cmd {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn captures_and_times_out() {
        let o = run(&cmd(&["sh", "-c", "echo out; echo err >&2; exit 3"])).unwrap();
        assert_eq!((o.code, o.stdout.as_str(), o.stderr.as_str()), (Some(3), "out\n", "err\n"));
        let mut c = cmd(&["sh", "-c", "sleep 5; echo never"]);
        c.timeout = Some(Duration::from_millis(100));
        let o = run(&c).unwrap();
        assert!(o.timed_out && !o.success());
        assert!(run(&cmd(&["/nonexistent/prog"])).is_err());
    }

    fn sh(script: &str, timeout: Duration) -> (Output, Duration) {
        let mut c = cmd(&["sh", "-c", script]);
        c.timeout = Some(timeout);
        let t = Instant::now();
        let o = run(&c).unwrap();
        (o, t.elapsed())
    }

    /// Whether `pid` is a live (not zombie) process; if so it is killed, so that a failing test
    /// leaves nothing behind.
    fn alive_then_kill(pid: &str) -> bool {
        let pid: i32 = pid.trim().parse().unwrap();
        let live = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')));
        if live {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
        live
    }

    #[test]
    fn a_background_process_holding_the_output_does_not_outlast_the_timeout() {
        // The reproduction: the shell exits at once, `sleep` keeps stdout open.
        let (o, took) = sh("sleep 30 & echo $!", Duration::from_secs(1));
        let left = alive_then_kill(&o.stdout);
        assert!(took < Duration::from_secs(2), "returned after {took:?}");
        assert!(!left, "the background sleep was left running");
        assert!(o.timed_out && !o.success(), "{o:?}");
        assert_eq!(o.code, Some(0), "the shell itself exited 0: {o:?}");
        assert!(o.output_held, "{o:?}");
        assert!(o.describe().contains("held its output open until the timeout"), "{}", o.describe());
    }

    #[test]
    fn a_setsid_daemon_is_killed_at_the_timeout() {
        // A new session and process group, output closed: out of reach of a process-group kill.
        let (o, took) = sh("setsid sleep 30 >/dev/null 2>&1 </dev/null & echo $!; sleep 30", Duration::from_secs(1));
        let left = alive_then_kill(&o.stdout);
        assert!(took < Duration::from_secs(2), "returned after {took:?}");
        assert!(!left, "the setsid daemon survived the timeout");
        assert!(o.timed_out && o.code.is_none(), "{o:?}");
    }

    #[test]
    fn a_double_forked_daemon_is_killed_at_the_timeout() {
        // The daemon's parent exits at once: it is orphaned before anyone saw its parent link.
        let (o, took) = sh(
            "setsid sh -c 'sleep 30 >/dev/null 2>&1 </dev/null & echo $!' & sleep 30",
            Duration::from_secs(1),
        );
        let left = alive_then_kill(&o.stdout);
        assert!(took < Duration::from_secs(2), "returned after {took:?}");
        assert!(!left, "the double-forked daemon survived the timeout");
    }

    #[test]
    fn processes_left_behind_by_a_finished_command_are_ended_with_it() {
        let (o, took) = sh("sleep 30 >/dev/null 2>&1 </dev/null & echo $!", Duration::from_secs(10));
        let left = alive_then_kill(&o.stdout);
        assert!(took < Duration::from_secs(2), "returned after {took:?}");
        assert!(!left, "the command's background process outlived it");
        assert!(o.success() && !o.timed_out, "{o:?}");
    }

    #[test]
    fn output_keeps_a_bounded_tail_of_each_stream() {
        let script = "head -c 1000000 /dev/zero | tr '\\0' a; echo END; head -c 300000 /dev/zero | tr '\\0' b >&2; echo ERR >&2";
        let (o, _) = sh(script, Duration::from_secs(30));
        assert!(o.success(), "{o:?}");
        assert_eq!(o.stdout.len(), 64 * 1024, "stdout kept in full or cut wrongly");
        assert!(o.stdout.ends_with("aaaEND\n"), "not the tail: {:?}", &o.stdout[o.stdout.len() - 10..]);
        assert_eq!(o.stderr.len(), 64 * 1024);
        assert!(o.stderr.ends_with("bbbERR\n"));
        assert!(o.stdout_truncated && o.stderr_truncated, "truncation not reported");
        let (o, _) = sh("head -c 65536 /dev/zero | tr '\\0' a", Duration::from_secs(30));
        assert_eq!(o.stdout.len(), 64 * 1024);
        assert!(!o.stdout_truncated && !o.stderr_truncated, "nothing was dropped");
    }

    /// A minimal image root: dash and the libraries `ldd` names, a marker file and a directory.
    fn mini_root() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let sh = std::fs::canonicalize("/bin/sh").unwrap();
        let ldd = std::process::Command::new("ldd").arg(&sh).output().unwrap();
        let mut files = vec![sh.clone()];
        for l in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(p) = l.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(p));
            }
        }
        for f in &files {
            let dst = root.path().join(f.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            std::fs::copy(f, &dst).unwrap();
        }
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        if !root.path().join("bin/sh").exists() {
            std::fs::copy(&sh, root.path().join("bin/sh")).unwrap();
        }
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(root.path().join("etc/marker"), "inside-the-root\n").unwrap();
        std::fs::create_dir_all(root.path().join("work")).unwrap();
        root
    }

    #[test]
    fn a_command_with_a_root_runs_chrooted_into_it() {
        let root = mini_root();
        let mut c = cmd(&["sh", "-c", "read x < /etc/marker; echo \"$x $(pwd)\"; test -e /proc/self || echo no-proc"]);
        c.root = Some(root.path().to_path_buf());
        c.env.insert("PATH".into(), "/bin".into());
        let o = run(&c).unwrap();
        assert_eq!((o.code, o.stdout.as_str()), (Some(0), "inside-the-root /\nno-proc\n"), "{o:?}");

        // `cwd` is inside the root, even as a relative path (never the agent's directory).
        for cwd in ["/work", "work"] {
            c.cwd = Some(cwd.into());
            let o = run(&c).unwrap();
            assert_eq!(o.stdout, "inside-the-root /work\nno-proc\n", "cwd {cwd}: {o:?}");
        }

        // A program or a cwd the root lacks is an error naming the root, not a host fallback.
        c.cwd = Some("/no-such-dir".into());
        let e = format!("{:#}", run(&c).unwrap_err());
        assert!(e.contains(&root.path().display().to_string()) && e.contains("/no-such-dir"), "{e}");
        c.cwd = None;
        c.argv = vec!["ls".into(), "/".into()];
        let e = format!("{:#}", run(&c).unwrap_err());
        assert!(e.contains("\"ls\" chrooted into") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn normal_exits_are_fast_and_keep_their_codes() {
        for (script, code) in [("exit 0", Some(0)), ("exit 7", Some(7)), ("echo x; exit 255", Some(255)), ("kill -9 $$", None)] {
            let (o, took) = sh(script, Duration::from_secs(30));
            assert_eq!(o.code, code, "{script}: {o:?}");
            assert!(!o.timed_out, "{script}");
            assert!(took < Duration::from_secs(1), "{script} took {took:?}");
        }
        // Background work the command waits for is not cut short, and its output is kept.
        let (o, _) = sh("(sleep 0.2; echo late) & wait; echo done", Duration::from_secs(30));
        assert_eq!((o.code, o.stdout.as_str()), (Some(0), "late\ndone\n"));
    }

    /// `sync FIFO` fails (fsync of a FIFO is EINVAL) unless the call never reaches the kernel:
    /// under `run_without_fsync` it succeeds, in the command and in what it starts, and the
    /// command has one seccomp filter more than under `run` (which is untouched).
    #[test]
    fn run_without_fsync_answers_sync_calls_without_making_them() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let script = format!(
            "sed -n 's/^Seccomp_filters:[[:space:]]*//p' /proc/self/status; sync {f} && sh -c 'sync {f}'",
            f = fifo.display()
        );
        let c = cmd(&["sh", "-c", &script]);
        let plain = run(&c).unwrap();
        assert!(!plain.success() && plain.stderr.contains("Invalid argument"), "{plain:?}");
        let o = run_without_fsync(&c).unwrap();
        assert!(o.success(), "{o:?}");
        let filters = |o: &Output| o.stdout.trim().parse::<u32>().unwrap();
        assert_eq!(filters(&o), filters(&plain) + 1, "{plain:?} {o:?}");
    }
}
