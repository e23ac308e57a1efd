//! The fleet view: after every run a node puts its status record at
//! `<prefix>/groups/<group>/v1/nodes/<holder>` under a lease of `[report] ttl` (three timer
//! periods by default), and a note that it exists at `…/v1/seen/<holder>` under a lease of
//! [`FORGET_AFTER`]. A node whose record expired but whose note did not is "not reporting".
//! `bootstrap fleet status` reads both, the rollouts and the reboot semaphore.

use super::etcd::{b64, kvs, prefix_end, Rollouts, Status};
use crate::reboot::etcd::LockError;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// How long a node that stopped reporting is still listed (then its `seen/` note expires).
pub const FORGET_AFTER: std::time::Duration = std::time::Duration::from_secs(3 * 24 * 3600);
/// The most keys one read of a fleet view takes.
const LIMIT: u64 = 100_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleRef {
    #[serde(default)]
    pub sha256: Option<String>,
    #[serde(default)]
    pub origin: String,
}

/// A node's status record (the contract's fields).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Record {
    pub name: String,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub bundle: BundleRef,
    /// `ok` | `failed`
    pub status: String,
    #[serde(default)]
    pub changed: u64,
    #[serde(default)]
    pub failed: u64,
    #[serde(default)]
    pub failed_step: Option<String>,
    pub at: String,
    #[serde(default)]
    pub agent_version: String,
    /// The reboot part's action (`none`, `pending`, `released`, `halted`, …).
    #[serde(default)]
    pub reboot: Option<String>,
    /// The node's rollout group (`[rollout] group`, else ENV-SERVICE): how the S3 form of the
    /// view groups records (in etcd the key says it too). Absent when the node has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// A run that failed before it had a report (no bundle, a role that does not load): the
    /// error, shortened. Absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Record {
    /// The record as it leaves the node (etcd, S3): JSON with every string redacted, so a
    /// secret that made it into a step id or a name never reaches what the fleet reads.
    pub fn to_json(&self) -> String {
        crate::secrets::redact_json(&serde_json::to_string(self).unwrap_or_default())
    }
}

/// What `seen/<holder>` keeps: enough to list a node that stopped reporting.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seen {
    pub name: String,
    pub at: String,
}

/// Put `record` for `holder` under a lease of `ttl`, and the `seen/` note: three requests.
pub fn publish(r: &Rollouts, holder: &str, record: &Record, ttl: std::time::Duration) -> Result<(), LockError> {
    let c = r.client();
    let lease = c.grant(ttl.as_secs().max(1))?;
    let long = c.grant(FORGET_AFTER.as_secs())?;
    let base = c.base();
    let seen = Seen {
        name: crate::secrets::redact(&record.name),
        at: record.at.clone(),
    };
    c.gateway(
        "/v3/kv/txn",
        json!({ "success": [
            { "request_put": { "key": b64(&format!("{base}/nodes/{holder}")), "value": b64(&record.to_json()), "lease": lease } },
            { "request_put": { "key": b64(&format!("{base}/seen/{holder}")), "value": b64(&serde_json::to_string(&seen).unwrap_or_default()), "lease": long } },
        ] }),
    )?;
    Ok(())
}

/// One group of the fleet view.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Group {
    pub group: String,
    /// Reporting nodes by holder id.
    pub nodes: BTreeMap<String, Record>,
    /// Nodes seen before whose record expired: holder id → the last note.
    pub not_reporting: BTreeMap<String, Seen>,
    pub rollouts: Vec<Status>,
    /// The reboot semaphore's holders (reboots in flight or halted).
    pub reboot_holders: Vec<String>,
}

/// The fleet view of `group`, or of every group under the prefix.
pub fn view(svc: &crate::reboot::settings::EtcdService, group: Option<&str>) -> anyhow::Result<Vec<Group>> {
    let groups: Vec<String> = match group {
        Some(g) => vec![g.to_string()],
        None => {
            let any = Rollouts::new(svc, "-")?;
            let dir = format!("{}/groups/", svc.prefix);
            let r = any.client().gateway(
                "/v3/kv/range",
                json!({ "key": b64(&dir), "range_end": prefix_end(&dir), "keys_only": true, "limit": LIMIT.to_string() }),
            )?;
            let mut gs = BTreeSet::new();
            for (k, _) in kvs(&r) {
                if let Some((g, rest)) = k.strip_prefix(&dir).and_then(|r| r.split_once('/')) {
                    if rest.starts_with("v1/nodes/") || rest.starts_with("v1/seen/") {
                        gs.insert(g.to_string());
                    }
                }
            }
            gs.into_iter().collect()
        }
    };
    let mut out = Vec::new();
    for g in groups {
        let r = Rollouts::new(svc, &g)?;
        let c = r.client();
        let range = |sub: &str| -> Result<Vec<(String, Vec<u8>)>, LockError> {
            let d = format!("{}/{sub}/", c.base());
            let resp = c.gateway(
                "/v3/kv/range",
                json!({ "key": b64(&d), "range_end": prefix_end(&d), "limit": LIMIT.to_string() }),
            )?;
            Ok(kvs(&resp).into_iter().map(|(k, v)| (k.trim_start_matches(&d).to_string(), v)).collect())
        };
        let mut grp = Group {
            group: g.clone(),
            ..Default::default()
        };
        for (id, v) in range("nodes")? {
            match serde_json::from_slice::<Record>(&v) {
                Ok(rec) => {
                    grp.nodes.insert(id, rec);
                }
                Err(e) => tracing::warn!("{}/nodes/{id}: not a node record: {e}", c.base()),
            }
        }
        for (id, v) in range("seen")? {
            if !grp.nodes.contains_key(&id) {
                grp.not_reporting.insert(id, serde_json::from_slice(&v).unwrap_or_default());
            }
        }
        grp.rollouts = r.status()?;
        grp.reboot_holders = c.get()?.map(|(s, _)| s.holders).unwrap_or_default();
        out.push(grp);
    }
    Ok(out)
}

/// The fleet view for people: per group, nodes per bundle and status, the silent ones, the
/// rollouts and reboots in flight.
/// The first 12 characters of a bundle sha for the table (characters: etcd's text is anyone's).
fn short_sha(s: &str) -> String {
    s.chars().take(12).collect()
}

pub fn human(groups: &[Group]) -> String {
    let mut s = String::new();
    if groups.is_empty() {
        s.push_str("no node has reported\n");
    }
    for g in groups {
        s.push_str(&format!(
            "group {}: {} reporting, {} not reporting\n",
            shown(&g.group),
            g.nodes.len(),
            g.not_reporting.len()
        ));
        let mut by: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for (id, r) in &g.nodes {
            let sha = r.bundle.sha256.as_deref().map(short_sha).unwrap_or_else(|| "-".into());
            by.entry((shown(&sha), shown(&r.status))).or_default().push(shown(id));
        }
        s.push_str(&format!("  {:<14} {:<8} {:>5}  nodes\n", "BUNDLE", "STATUS", "COUNT"));
        for ((sha, status), ids) in &by {
            s.push_str(&format!("  {sha:<14} {status:<8} {:>5}  {}\n", ids.len(), ids.join(" ")));
        }
        for (id, r) in &g.nodes {
            let (id, name, at) = (shown(id), shown(&r.name), shown(&r.at));
            if let Some(step) = &r.failed_step {
                s.push_str(&format!("  failed: {id} ({name}) at step {}, {at}\n", shown(step)));
            } else if let Some(e) = &r.error {
                s.push_str(&format!("  failed: {id} ({name}): {}, {at}\n", shown(e)));
            }
        }
        for (id, seen) in &g.not_reporting {
            s.push_str(&format!(
                "  not reporting: {} ({}), last report {}\n",
                shown(id),
                shown(&seen.name),
                shown(&seen.at)
            ));
        }
        for r in &g.rollouts {
            let halt = r
                .halt
                .as_ref()
                .map(|h| {
                    format!(
                        ", halted by {} at {}: {}",
                        shown(&h.node),
                        shown(h.check.as_deref().or(h.step.as_deref()).unwrap_or("run")),
                        shown(&h.reason)
                    )
                })
                .unwrap_or_default();
            s.push_str(&format!(
                "  rollout {}: {} (applied {}, healthy {}, failed {}, slots {}){halt}\n",
                shown(&short_sha(&r.sha256)),
                shown(&r.state),
                r.applied.len(),
                r.healthy.len(),
                r.failed.len(),
                r.slots
            ));
        }
        if !g.reboot_holders.is_empty() {
            let holders: Vec<String> = g.reboot_holders.iter().map(|h| shown(h)).collect();
            s.push_str(&format!("  reboots in flight: {}\n", holders.join(" ")));
        }
    }
    s
}

/// Text from a record, for a terminal: control characters (escape sequences, line breaks)
/// shown as `?`.
pub fn shown(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { '?' } else { c }).collect()
}

/// How much of an error a node record carries.
pub const ERROR_CHARS: usize = 300;

/// An error for a node record: redacted, then cut to [`ERROR_CHARS`] characters.
pub fn error_text(e: &str) -> String {
    let full = crate::secrets::redact(e);
    let mut msg: String = full.chars().take(ERROR_CHARS).collect();
    if msg.len() < full.len() {
        msg.push('…');
    }
    msg
}

/// The record of a run (`report` is the report's JSON).
pub fn record_of(report: &Value, name: &str, instance_id: Option<&str>) -> Record {
    let failed_step = report["steps"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["status"] == "failed"))
        .and_then(|s| s["id"].as_str())
        .map(str::to_string);
    Record {
        name: name.to_string(),
        instance_id: instance_id.map(str::to_string),
        bundle: BundleRef {
            sha256: report["bundle"]["sha256"].as_str().map(str::to_string),
            origin: report["bundle"]["origin"].as_str().unwrap_or_default().to_string(),
        },
        status: report["status"].as_str().unwrap_or("unknown").to_string(),
        changed: report["summary"]["changed"].as_u64().unwrap_or(0),
        failed: report["summary"]["failed"].as_u64().unwrap_or(0),
        failed_step,
        at: crate::clock::now_rfc3339(),
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        reboot: report["reboot"]["action"].as_str().map(str::to_string),
        group: None,
        error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error of a failed run is cut to fit a node record only after it was redacted: a
    /// secret across the cut would otherwise leave a prefix no redaction recognises.
    #[test]
    fn a_record_error_is_redacted_before_it_is_cut() {
        let secret = "Zq8x-record-error-secret-0123456789abcdef";
        crate::secrets::register(secret);
        let e = format!("{}{secret} and more", "x".repeat(ERROR_CHARS - 20));
        let text = error_text(&e);
        assert!(!text.contains(&secret[..20]), "{text}");
        assert!(text.contains("<redacted>"), "{text}");
        let long = error_text(&"y".repeat(2 * ERROR_CHARS));
        assert!(long.chars().count() == ERROR_CHARS + 1 && long.ends_with('…'), "{long}");
        assert_eq!(error_text("short"), "short");
    }

    /// Records come from etcd, written by any node: a bundle sha that is not hex (here with a
    /// two-byte character across byte 12) is shown, not a panic.
    #[test]
    fn odd_shas_from_etcd_are_shown_not_a_panic() {
        let odd = "aaaaaaaaaaaé-not-a-sha".to_string();
        let mut g = Group {
            group: "g".into(),
            ..Default::default()
        };
        let mut r = Record::default();
        r.bundle.sha256 = Some(odd.clone());
        r.status = "ok".into();
        g.nodes.insert("i-1".into(), r);
        g.rollouts.push(super::super::etcd::Status {
            sha256: odd,
            state: "canary".into(),
            ..Default::default()
        });
        let text = human(&[g]);
        assert!(text.contains("aaaaaaaaaaaé "), "{text}");
        assert!(text.contains("rollout aaaaaaaaaaaé: canary"), "{text}");
    }

    /// Records are written by any node (etcd) or anyone with the bucket (S3): what they say is
    /// printed with control characters made visible, so no escape sequence reaches the
    /// operator's terminal.
    #[test]
    fn control_characters_in_records_never_reach_the_terminal() {
        let mut g = Group {
            group: "g\x1b[2J".into(),
            ..Default::default()
        };
        let r = Record {
            name: "web\x1b]0;owned\x07".into(),
            status: "failed\r".into(),
            error: Some("boom\x1b[31m red".into()),
            ..Default::default()
        };
        g.nodes.insert("i-1\x1b[A".into(), r.clone());
        g.nodes.insert(
            "i-2".into(),
            Record {
                failed_step: Some("file:/etc/\x1b[1mx".into()),
                ..r
            },
        );
        g.not_reporting.insert(
            "i-3".into(),
            Seen {
                name: "n\x1b[K".into(),
                at: "t\x07".into(),
            },
        );
        g.reboot_holders.push("h\x1b[H".into());
        let text = human(&[g]);
        assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
        assert!(text.contains("boom\\x1b[31m red") || text.contains("boom?[31m red"), "{text:?}");
    }

    /// The record leaves the node for etcd or S3, where every node and operator reads it: a
    /// secret that made it into a step id (a path rendered from `secret()`) or the name goes
    /// out redacted.
    #[test]
    fn the_record_leaves_the_node_redacted() {
        let secret = "fleet-record-s3cr3t-7Hq";
        crate::secrets::register(secret);
        let report = json!({
            "status": "failed",
            "steps": [{ "id": format!("file:/etc/{secret}.conf"), "status": "failed" }],
            "summary": { "changed": 0, "failed": 1 },
        });
        let mut r = record_of(&report, &format!("production-{secret}"), Some("i-1"));
        r.group = Some("production-web".into());
        let out = r.to_json();
        assert!(!out.contains(secret), "{out}");
        let back: Record = serde_json::from_str(&out).unwrap();
        assert_eq!(back.failed_step.as_deref(), Some("file:/etc/<redacted>.conf"));
        assert_eq!(back.name, "production-<redacted>");
        assert_eq!(back.group.as_deref(), Some("production-web"));
    }
}
