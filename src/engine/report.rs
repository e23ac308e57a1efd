//! The run report: `last-run.json`, `--json` output, and the human summary.

use crate::role::Notify;
use crate::step::Change;
use serde::Serialize;

pub const REPORT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    InSync,
    /// apply: the step changed the host. plan: it would.
    Changed,
    Failed,
    /// `when` was false.
    Skipped,
    /// An earlier step failed.
    NotRun,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    pub id: String,
    pub kind: String,
    pub role: String,
    /// role.toml position of the step.
    pub at: String,
    pub status: StepStatus,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changes: Vec<Change>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why a step was skipped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BundleInfo {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// directory | source | cache
    pub origin: String,
}

/// What became of a notify handler.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NotifyStatus {
    /// Restarted or reloaded.
    Done,
    Failed,
    /// Owed: kept for the next successful run (apply), or would run (plan).
    Pending,
    /// Not the live system (`--root`).
    Skipped,
}

impl NotifyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyStatus::Done => "done",
            NotifyStatus::Failed => "failed",
            NotifyStatus::Pending => "pending",
            NotifyStatus::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for NotifyStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a run ended (`status` in the report).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct NotifyReport {
    pub target: String,
    pub status: NotifyStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub changed: usize,
    pub in_sync: usize,
    pub failed: usize,
    pub skipped: usize,
    pub not_run: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub version: u32,
    /// apply | plan | init
    pub command: String,
    pub started_at: String,
    /// The kernel boot id the run ran in: a report from before a reboot is no word on this boot.
    pub boot_id: String,
    pub duration_ms: u64,
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub source: String,
    /// The bundle applied: its sha256 (tarballs) and where it came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bundle: Option<BundleInfo>,
    pub root: String,
    pub status: RunStatus,
    pub summary: Summary,
    pub steps: Vec<StepReport>,
    pub notify: Vec<NotifyReport>,
    pub reboot_required: bool,
    pub reboot_pending: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reboot: Option<crate::reboot::Outcome>,
    /// What the rollout gate did in this run (`[rollout] strategy = "canary"`; see
    /// docs/rollouts.md): the bundle's state in its rollout, the slot and health times.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout: Option<serde_json::Value>,
    /// `init` under an Auto Scaling launch hook: how the lifecycle action was completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<crate::asg::LaunchOutcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.status != RunStatus::Ok
    }

    /// The reboot part took a slot and wants the node rebooted, once the report is out.
    pub fn reboot_now(&self) -> bool {
        self.reboot.as_ref().is_some_and(|o| o.reboot_now)
    }

    pub fn summarize(&mut self) {
        let mut s = Summary::default();
        for st in &self.steps {
            match st.status {
                StepStatus::InSync => s.in_sync += 1,
                StepStatus::Changed => s.changed += 1,
                StepStatus::Failed => s.failed += 1,
                StepStatus::Skipped => s.skipped += 1,
                StepStatus::NotRun => s.not_run += 1,
            }
        }
        s.failed += self.notify.iter().filter(|n| n.status == NotifyStatus::Failed).count();
        self.summary = s;
    }

    /// The exit code of the contract's table.
    pub fn exit_code(&self, detailed: bool) -> u8 {
        match (detailed, self.failed(), self.summary.changed > 0) {
            (false, false, _) => 0,
            (false, true, _) => 1,
            (true, false, false) => 0,
            (true, false, true) => 2,
            (true, true, false) => 4,
            (true, true, true) => 6,
        }
    }

    /// Text for a person at a terminal. `plan` shows every step and the diffs.
    pub fn human(&self) -> String {
        let plan = self.command == "plan";
        let mut out = String::new();
        for s in &self.steps {
            let mark = match (s.status, plan) {
                (StepStatus::InSync, _) => "in sync",
                (StepStatus::Changed, true) => "would change",
                (StepStatus::Changed, false) => "changed",
                (StepStatus::Failed, _) => "FAILED",
                (StepStatus::Skipped, _) => "skipped",
                (StepStatus::NotRun, _) => "not run",
            };
            if !plan && matches!(s.status, StepStatus::InSync | StepStatus::Skipped) {
                continue;
            }
            out.push_str(&format!("{mark:>14}  {}\n", s.id));
            for c in &s.changes {
                match (&c.diff, plan) {
                    (Some(d), true) => {
                        for line in d.lines() {
                            out.push_str(&format!("                  {line}\n"));
                        }
                    }
                    (Some(_), false) => out.push_str(&format!("                  {}: changed\n", c.field)),
                    (None, _) => out.push_str(&format!(
                        "                  {}: {} -> {}\n",
                        c.field,
                        c.from.as_deref().unwrap_or("(none)"),
                        c.to.as_deref().unwrap_or("(none)")
                    )),
                }
            }
            if let Some(n) = &s.note {
                out.push_str(&format!("                  ({n})\n"));
            }
            if let Some(e) = &s.error {
                for line in e.lines() {
                    out.push_str(&format!("                  {line}\n"));
                }
            }
        }
        for n in &self.notify {
            out.push_str(&format!(
                "{:>14}  {}{}\n",
                format!("notify {}", n.status),
                n.target,
                n.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
            ));
        }
        let s = &self.summary;
        let verb = if plan { "to change" } else { "changed" };
        out.push_str(&format!(
            "{}: {} {verb}, {} in sync, {} failed, {} skipped{} in {:.2}s{}\n",
            self.role,
            s.changed,
            s.in_sync,
            s.failed,
            s.skipped,
            if s.not_run > 0 { format!(", {} not run", s.not_run) } else { String::new() },
            self.duration_ms as f64 / 1000.0,
            if self.reboot_required { " (reboot required)" } else { "" }
        ));
        if let Some(e) = &self.error {
            out.push_str(&format!("error: {e}\n"));
        }
        out
    }
}

pub fn notify_report(n: &Notify, status: NotifyStatus, error: Option<String>) -> NotifyReport {
    NotifyReport {
        target: n.to_string(),
        status,
        error,
    }
}
