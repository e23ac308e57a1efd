//! `bootstrap apply` and `bootstrap plan`

use super::RunArgs;
use crate::agent::{self, Context};
use crate::engine::report::Report;
use crate::engine::Mode;
use std::io::IsTerminal;
use std::path::PathBuf;

pub fn run(a: &RunArgs, mode: Mode) -> anyhow::Result<u8> {
    let root = a.root.clone().unwrap_or_else(|| PathBuf::from("/"));
    let opts = options(a, if mode == Mode::Plan { "plan" } else { "apply" });
    let cx = Context::gather(&root, &super::facts::naming(&a.naming), false)?;
    // `[asg]` checked before any step runs (exit 78).
    let asg = crate::asg::Settings::new(&cx.config.asg)?;
    let hooks = agent::Hooks {
        after_steps: None,
        show: &mut |r| print(a, mode, r),
    };
    let result = agent::converge(&cx, &opts, mode, hooks);
    if mode == Mode::Apply {
        after_apply(&cx, &asg, &result)?;
    }
    Ok(result?.exit_code(a.detailed_exitcodes))
}

/// `[asg] unhealthy_after`: count this run, and mark the instance Unhealthy when it is due.
fn after_apply(cx: &Context, asg: &crate::asg::Settings, result: &anyhow::Result<Report>) -> anyhow::Result<()> {
    let (ok, why) = match result {
        Ok(r) => (!r.failed(), r.error.clone()),
        // Only waited for another run (or the watcher's drain): no word on this node's health.
        Err(e) if e.downcast_ref::<crate::error::LockTimeout>().is_some() => return Ok(()),
        Err(e) => (false, Some(format!("{e:#}"))),
    };
    // Drained (going away, or back into the warm pool): not counted, never marked.
    if crate::asg::watch::drained_at(&cx.root, cx.facts.instance_id.as_deref()).is_some() {
        return Ok(());
    }
    crate::asg::unhealthy::after_apply(crate::asg::unhealthy::RunInputs {
        root: &cx.root,
        facts: &cx.facts,
        config: &cx.config,
        settings: asg,
        group: cx.config.asg.group.as_deref().map(|g| cx.substitute(g)).transpose()?,
        reboot_group: cx.reboot_group().ok(),
        holder: cx.holder_id().ok(),
        ok,
        why,
        rollout_hold: &|| rollout_hold(cx, result),
    });
    Ok(())
}

/// Why this node's rollout slots hold `unhealthy_after`'s mark back (`rollout::unhealthy_hold`):
/// etcd is asked which slots of its rollout group it holds.
fn rollout_hold(cx: &Context, result: &anyhow::Result<Report>) -> Option<String> {
    let kept = crate::rollout::kept_for_inspection(result);
    let rl = match cx.rollout_settings() {
        Ok(rl) => rl,
        // A canary node whose `[rollout]` cannot be read cannot tell either.
        Err(e) => {
            let canary = cx.config.rollout.strategy == Some(crate::config::RolloutStrategy::Canary);
            return crate::rollout::unhealthy_hold(kept, canary, canary.then(|| Err(format!("[rollout]: {e}"))));
        }
    };
    let held = match (&rl.etcd, &rl.group) {
        (Some(svc), Some(group)) if rl.live && !rl.holder.is_empty() => Some(
            crate::rollout::etcd::Rollouts::new(svc, group)
                .map_err(|e| e.to_string())
                .and_then(|r| r.held_by(&rl.holder).map_err(|e| format!("etcd unreachable, rollout group {group}: {e}"))),
        ),
        _ => None,
    };
    crate::rollout::unhealthy_hold(kept, rl.gated(), held)
}

/// The run options the flags give (the clock starts here); `command` is what the report names.
pub fn options(a: &RunArgs, command: &'static str) -> agent::RunOptions {
    agent::RunOptions {
        source: a.source.clone(),
        lock_timeout: a.lock_timeout,
        started: std::time::Instant::now(),
        command,
    }
}

/// The report on stdout: JSON with `--json`; else in full on a terminal, for `plan`, or when
/// something changed or failed, and only the summary line otherwise (the timer's journal).
pub fn print(a: &RunArgs, mode: Mode, report: &Report) -> anyhow::Result<()> {
    if a.json {
        println!("{}", crate::engine::report_json(report)?);
    } else if std::io::stdout().is_terminal() || mode == Mode::Plan || report.failed() || report.summary.changed > 0 {
        print!("{}", crate::secrets::redact(&report.human()));
    } else {
        print!(
            "{}",
            crate::secrets::redact(&report.human().lines().last().map(|l| format!("{l}\n")).unwrap_or_default())
        );
    }
    Ok(())
}
