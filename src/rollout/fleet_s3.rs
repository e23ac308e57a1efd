//! The fleet view without etcd: after every run a node puts its status record (the JSON of the
//! etcd record, [`Record`]) at the S3 key of `[report] s3` (`s3://BUCKET/…/${instance_id}.json`),
//! overwriting its previous one; `bootstrap fleet status --source s3://BUCKET/PREFIX/` lists the
//! objects under the prefix, reads each, and shows the view of the etcd form. S3 has no lease:
//! a record whose `at` is older than the staleness limit (`[report] ttl`, or `--stale`) is a
//! node **not reporting**; one older than [`FORGET_AFTER`] is left out (a terminated instance),
//! as its `seen/` note would have expired in etcd.

use super::fleet::{Group, Record, Seen, FORGET_AFTER};
use crate::error::ConfigError;
use crate::fetch::s3::{FetchError, S3Options};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// A node's PUT of its record: the whole request (credentials, connect, retries) within this.
pub const PUT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest object read as a record (a record is a few hundred bytes).
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// The most objects one view reads (as many keys as one etcd view reads).
pub const MAX_OBJECTS: usize = 100_000;
/// Records read at once.
const PARALLEL_READS: usize = 32;

/// Where this node's record goes: `[report] s3`, substituted and checked.
#[derive(Debug, Clone)]
pub struct Target {
    pub bucket: String,
    pub key: String,
    pub s3: S3Options,
}

impl Target {
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }
}

/// The S3 client settings of the record: `[report] s3_endpoint`/`s3_region`, else the
/// `[bundle]` ones, else `region` (the instance's).
pub fn options(cfg: &crate::config::Config, region: Option<&str>, max_bytes: u64) -> S3Options {
    S3Options {
        endpoint: cfg.report.s3_endpoint.clone().or_else(|| cfg.bundle.s3_endpoint.clone()),
        region: cfg
            .report
            .s3_region
            .clone()
            .or_else(|| cfg.bundle.s3_region.clone())
            .or_else(|| region.map(str::to_string)),
        max_bytes,
    }
}

/// A bucket name as S3 allows it (3-63 lowercase letters, digits, dots, hyphens; a letter or
/// digit at each end).
fn bucket_ok(b: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&b.len())
        && b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edge(b.chars().next())
        && edge(b.chars().last())
}

/// `s3://BUCKET/KEY` of one object: a bucket S3 accepts, a key that names an object (not empty,
/// not a "directory", no `//`, no control characters, at most 1024 bytes).
pub fn parse_object(url: &str) -> Result<(String, String), String> {
    let (bucket, key) = split(url)?;
    if key.is_empty() || key.ends_with('/') {
        return Err("expected s3://BUCKET/KEY naming one object (e.g. s3://bucket/fleet/${env}/${service}/${instance_id}.json)".into());
    }
    if key.starts_with('/') || key.contains("//") {
        return Err(format!("the key {key:?} has an empty path segment"));
    }
    if key.len() > 1024 {
        return Err("the key is longer than 1024 bytes".into());
    }
    Ok((bucket, key))
}

/// `s3://BUCKET/PREFIX` of a listing (`fleet status --source`): the prefix may be empty.
pub fn parse_prefix(url: &str) -> Result<(String, String), String> {
    split(url)
}

fn split(url: &str) -> Result<(String, String), String> {
    let rest = url.strip_prefix("s3://").ok_or("expected an s3:// URL")?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if !bucket_ok(bucket) {
        return Err(format!(
            "{bucket:?} is not an S3 bucket name (3-63 lowercase letters, digits, dots and hyphens)"
        ));
    }
    if key.chars().any(char::is_control) {
        return Err("the key has a control character".into());
    }
    Ok((bucket.to_string(), key.to_string()))
}

/// `[report] s3` as written: every `${…}` one the agent knows, `${instance_id}` among them
/// (one object per node: without it every node would overwrite the same record), and the URL
/// well formed once substituted. `subst` fills in the variables (the node's facts, or stand-ins
/// where they are not known, as in an image build).
pub fn target(
    template: &str,
    subst: impl Fn(&str) -> Result<String, ConfigError>,
    cfg: &crate::config::Config,
    region: Option<&str>,
) -> Result<Target, ConfigError> {
    let err = |m: String| ConfigError::msg(format!("[report] s3 {template:?}: {m}"));
    if !template.contains("${instance_id}") {
        return Err(err(
            "the key must contain ${instance_id}: one record per node (every node would overwrite the same one)".into(),
        ));
    }
    let url = subst(template).map_err(|e| ConfigError::msg(format!("[report] s3: {e}")))?;
    let (bucket, key) = parse_object(&url).map_err(err)?;
    Ok(Target {
        bucket,
        key,
        s3: options(cfg, region, MAX_RECORD_BYTES),
    })
}

/// PUT the record (redacted JSON) at the target, within [`PUT_TIMEOUT`]. The caller warns.
pub fn put(t: &Target, rec: &Record) -> Result<(), FetchError> {
    crate::fetch::s3::put(&t.s3, &t.bucket, &t.key, rec.to_json().into_bytes(), "application/json", PUT_TIMEOUT)
}

/// An object under the prefix that is not a record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Unreadable {
    /// `s3://BUCKET/KEY`.
    pub key: String,
    pub error: String,
}

/// The fleet view read from S3: the groups (as the etcd view's, without rollouts or reboot
/// holders), the objects that are not records, and what was left out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct View {
    pub groups: Vec<Group>,
    pub unreadable: Vec<Unreadable>,
    /// Records older than [`FORGET_AFTER`], not listed.
    pub forgotten: usize,
    /// More than [`MAX_OBJECTS`] objects under the prefix: only the first were read.
    pub truncated: bool,
}

/// List `source` (`s3://BUCKET/PREFIX`), read every object (each at most
/// [`MAX_RECORD_BYTES`], [`PARALLEL_READS`] at a time) and build the view.
pub fn view(s3: &S3Options, source: &str, group: Option<&str>, stale: Duration) -> anyhow::Result<View> {
    let (bucket, prefix) = parse_prefix(source).map_err(|e| ConfigError::msg(format!("--source {source:?}: {e}")))?;
    let s3 = S3Options {
        max_bytes: MAX_RECORD_BYTES,
        ..s3.clone()
    };
    let (listed, truncated) = crate::fetch::s3::list(&s3, &bucket, &prefix, MAX_OBJECTS)?;
    let mut objects: Vec<(String, Result<Vec<u8>, String>)> = Vec::new();
    let mut to_read = Vec::new();
    for o in listed {
        if o.key.ends_with('/') && o.size == 0 {
            continue; // a "folder" made by a console
        }
        if o.size > MAX_RECORD_BYTES {
            objects.push((o.key, Err(format!("{} bytes: larger than {MAX_RECORD_BYTES} bytes, not read", o.size))));
        } else {
            to_read.push(o.key);
        }
    }
    let got = crate::fetch::s3::get_many(&s3, &bucket, &to_read, PARALLEL_READS);
    for (k, r) in to_read.into_iter().zip(got) {
        objects.push((k, r.map_err(|e| e.to_string())));
    }
    let mut v = assemble(&bucket, &prefix, objects, group, stale, SystemTime::now());
    v.truncated = truncated;
    if truncated {
        tracing::warn!("{source}: more than {MAX_OBJECTS} objects; only the first {MAX_OBJECTS} were read");
    }
    Ok(v)
}

/// The view from the objects read (key → body or why not), as of `now` (pure).
pub fn assemble(bucket: &str, prefix: &str, objects: Vec<(String, Result<Vec<u8>, String>)>, group: Option<&str>, stale: Duration, now: SystemTime) -> View {
    let mut v = View::default();
    // group → (key under the prefix, time of the record, record)
    let mut groups: BTreeMap<String, Vec<(String, SystemTime, Record)>> = BTreeMap::new();
    for (key, body) in objects {
        let url = format!("s3://{bucket}/{key}");
        let rec = body.and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| format!("not a node record: {e}")));
        let rec = match rec {
            Ok(r) => r,
            Err(error) => {
                v.unreadable.push(Unreadable { key: url, error });
                continue;
            }
        };
        let at = match humantime::parse_rfc3339(&rec.at) {
            Ok(t) => t,
            Err(_) => {
                v.unreadable.push(Unreadable {
                    key: url,
                    error: format!("\"at\": {:?} is not an RFC 3339 UTC time", rec.at),
                });
                continue;
            }
        };
        let age = now.duration_since(at).unwrap_or_default();
        if age > FORGET_AFTER {
            v.forgotten += 1;
            continue;
        }
        let g = rec.group.clone().unwrap_or_else(|| rec.name.clone());
        if group.is_some_and(|want| want != g) {
            continue;
        }
        let rel = key.strip_prefix(prefix).unwrap_or(&key).trim_start_matches('/').to_string();
        let entry = groups.entry(g).or_default();
        entry.push((rel, at, rec));
    }
    for (name, recs) in groups {
        let mut grp = Group {
            group: name,
            ..Default::default()
        };
        // A node is named by its object's file name (the instance id of the usual key), by the
        // key under the prefix where two objects of a group share one.
        let stem = |rel: &str| -> String {
            let last = rel.rsplit('/').next().unwrap_or(rel);
            last.strip_suffix(".json").unwrap_or(last).to_string()
        };
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        for (rel, _, _) in &recs {
            *count.entry(stem(rel)).or_default() += 1;
        }
        for (rel, at, rec) in recs {
            let s = stem(&rel);
            let id = if count[&s] > 1 {
                rel.strip_suffix(".json").unwrap_or(&rel).to_string()
            } else {
                s
            };
            if now.duration_since(at).unwrap_or_default() > stale {
                grp.not_reporting.insert(id, Seen { name: rec.name, at: rec.at });
            } else {
                grp.nodes.insert(id, rec);
            }
        }
        v.groups.push(grp);
    }
    v
}

/// The S3 view for people: the etcd view's table, then what could not be read.
pub fn human(v: &View) -> String {
    let mut s = super::fleet::human(&v.groups);
    for u in &v.unreadable {
        // The key is anyone's with the bucket, the error may quote the object.
        s.push_str(&format!("unreadable: {}: {}\n", super::fleet::shown(&u.key), super::fleet::shown(&u.error)));
    }
    if v.forgotten > 0 {
        s.push_str(&format!(
            "{} record(s) older than {} not listed (instances gone: an S3 lifecycle rule can delete them)\n",
            v.forgotten,
            humantime::format_duration(FORGET_AFTER)
        ));
    }
    if v.truncated {
        s.push_str(&format!(
            "more than {MAX_OBJECTS} objects under the prefix: only the first {MAX_OBJECTS} were read\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> crate::config::Config {
        crate::config::Config::default()
    }

    fn subst(s: &str) -> Result<String, ConfigError> {
        crate::config::substitute(
            s,
            &[
                ("env", Some("production")),
                ("service", Some("web")),
                ("region", None),
                ("instance_id", Some("i-0abc")),
            ],
        )
    }

    #[test]
    fn the_report_url_is_checked_and_substituted() {
        let t = target(
            "s3://fleet-reports/nodes/${env}/${service}/${instance_id}.json",
            subst,
            &cfg(),
            Some("eu-west-1"),
        )
        .unwrap();
        assert_eq!((t.bucket.as_str(), t.key.as_str()), ("fleet-reports", "nodes/production/web/i-0abc.json"));
        assert_eq!(t.url(), "s3://fleet-reports/nodes/production/web/i-0abc.json");
        assert_eq!(t.s3.region.as_deref(), Some("eu-west-1"));
        assert_eq!(t.s3.max_bytes, MAX_RECORD_BYTES);
        let cases = [
            ("s3://fleet/${env}/${home}/${instance_id}.json", "unknown substitution ${home}"),
            ("s3://fleet/${region}/${instance_id}.json", "${region} is not known"),
            ("https://fleet/${instance_id}.json", "expected an s3:// URL"),
            ("s3://Fleet_Reports/${instance_id}.json", "not an S3 bucket name"),
            ("s3://fl/${instance_id}.json", "not an S3 bucket name"),
            ("s3:///${instance_id}.json", "not an S3 bucket name"),
            ("s3://fleet/${instance_id}/", "naming one object"),
            ("s3://fleet//${instance_id}.json", "empty path segment"),
            ("s3://fleet/${env}/${service}.json", "must contain ${instance_id}"),
        ];
        for (url, want) in cases {
            let e = target(url, subst, &cfg(), None).unwrap_err().to_string();
            assert!(e.starts_with("[report] s3"), "{url}: {e}");
            assert!(e.contains(want), "{url}: {e}");
        }
        // The endpoint and region: [report] first, then [bundle].
        let c = crate::config::Config::parse(
            std::path::Path::new("c"),
            "[bundle]\ns3_endpoint = \"http://b\"\ns3_region = \"us-east-1\"\n[report]\ns3_endpoint = \"http://r\"\n",
        )
        .unwrap();
        let o = options(&c, Some("eu-west-1"), 1);
        assert_eq!((o.endpoint.as_deref(), o.region.as_deref()), (Some("http://r"), Some("us-east-1")));
        assert_eq!(parse_prefix("s3://fleet").unwrap(), ("fleet".into(), "".into()));
        assert_eq!(parse_prefix("s3://fleet/nodes/").unwrap(), ("fleet".into(), "nodes/".into()));
    }

    fn rec(name: &str, group: Option<&str>, at: &str) -> Vec<u8> {
        serde_json::to_vec(&Record {
            name: name.into(),
            status: "ok".into(),
            at: at.into(),
            group: group.map(str::to_string),
            ..Default::default()
        })
        .unwrap()
    }

    /// Fresh, stale, forgotten, unreadable, grouped, filtered: every object ends up in exactly
    /// one place, and nothing from outside is a panic.
    #[test]
    fn objects_become_the_view() {
        let now = humantime::parse_rfc3339("2026-12-01T03:00:00Z").unwrap();
        let objects = vec![
            (
                "n/production/web/i-1.json".to_string(),
                Ok(rec("production-web", Some("production-web"), "2026-12-01T02:59:00.123456789Z")),
            ),
            (
                "n/production/web/i-2.json".to_string(),
                Ok(rec("production-web", Some("production-web"), "2026-12-01T01:00:00Z")),
            ),
            (
                "n/production/web/i-3.json".to_string(),
                Ok(rec("production-web", Some("production-web"), "2026-11-20T01:00:00Z")),
            ),
            ("n/production/db/i-4.json".to_string(), Ok(rec("production-db", None, "2026-12-01T02:59:00Z"))),
            ("n/staging/db/i-4.json".to_string(), Ok(rec("production-db", None, "2026-12-01T02:58:00Z"))),
            ("n/garbage.json".to_string(), Ok(b"\xff not json".to_vec())),
            ("n/big.json".to_string(), Err("70000 bytes: larger".into())),
            ("n/odd-at.json".to_string(), Ok(rec("x", None, "yesterday"))),
            ("n/offset-at.json".to_string(), Ok(rec("x", None, "2026-12-01T02:59:00+01:00"))),
            (
                "n/future.json".to_string(),
                Ok(rec("production-web", Some("production-web"), "2026-12-01T04:00:00Z")),
            ),
        ];
        let v = assemble("b", "n/", objects.clone(), None, Duration::from_secs(3600), now);
        let web = v.groups.iter().find(|g| g.group == "production-web").unwrap();
        assert_eq!(web.nodes.keys().collect::<Vec<_>>(), ["future", "i-1"]);
        assert_eq!(web.not_reporting.keys().collect::<Vec<_>>(), ["i-2"]);
        assert_eq!(web.not_reporting["i-2"].at, "2026-12-01T01:00:00Z");
        assert_eq!(v.forgotten, 1);
        // Two objects named alike in one group: told apart by their key.
        let db = v.groups.iter().find(|g| g.group == "production-db").unwrap();
        assert_eq!(db.nodes.keys().collect::<Vec<_>>(), ["production/db/i-4", "staging/db/i-4"]);
        let bad: Vec<&str> = v.unreadable.iter().map(|u| u.key.as_str()).collect();
        assert_eq!(
            bad,
            ["s3://b/n/garbage.json", "s3://b/n/big.json", "s3://b/n/odd-at.json", "s3://b/n/offset-at.json"]
        );
        assert!(v.unreadable[0].error.contains("not a node record"), "{:?}", v.unreadable);
        let text = human(&v);
        assert!(text.contains("group production-web: 2 reporting, 1 not reporting"), "{text}");
        assert!(text.contains("unreadable: s3://b/n/garbage.json: not a node record"), "{text}");
        assert!(text.contains("1 record(s) older than 3days not listed"), "{text}");
        // --group keeps one group (unreadable objects are still shown: their group is unknown).
        let v = assemble("b", "n/", objects, Some("production-db"), Duration::from_secs(3600), now);
        assert_eq!(v.groups.len(), 1);
        assert_eq!(v.unreadable.len(), 4);
    }
}
