//! Running commands: argv vectors, explicit timeouts, captured output.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Default timeout for commands a role runs (`exec` steps and their guards).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Default)]
pub struct Cmd {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<PathBuf>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Output {
    /// None when the command was killed by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
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
        if self.timed_out {
            "timed out".to_string()
        } else {
            match self.code {
                Some(c) => format!("exited with status {c}"),
                None => "was killed by a signal".to_string(),
            }
        }
    }
}

/// Run a command to completion, killing it at the timeout. Stdin is /dev/null.
pub fn run(cmd: &Cmd) -> Result<Output> {
    let (prog, args) = cmd.argv.split_first().context("empty command")?;
    let mut c = Command::new(prog);
    c.args(args).envs(&cmd.env).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // Own process group, so a timeout kills the command's children too (and their pipes close).
    std::os::unix::process::CommandExt::process_group(&mut c, 0);
    if let Some(cwd) = &cmd.cwd {
        c.current_dir(cwd);
    }
    let mut child = c.spawn().with_context(|| format!("starting {prog:?}"))?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let timeout = cmd.timeout.unwrap_or(DEFAULT_COMMAND_TIMEOUT);
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for command")? {
            break st;
        }
        if start.elapsed() >= timeout {
            timed_out = true;
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
            break child.wait().context("waiting for killed command")?;
        }
        std::thread::sleep(Duration::from_millis(5).max(Duration::from_millis((start.elapsed().as_millis() / 20).min(100) as u64)));
    };
    let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
    Ok(Output {
        code: status.code(),
        stdout,
        stderr,
        timed_out,
    })
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
}
