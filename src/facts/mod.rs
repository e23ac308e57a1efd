//! Facts about the node, gathered once per run and immutable after.
//!
//! This module gathers the local facts (os-release, machine id, boot id, hostname) and the
//! naming facts given on the command line.

pub mod ec2;
pub mod imds;

use anyhow::{bail, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OsFacts {
    pub id: String,
    pub version_id: String,
    /// `debian` or `rhel`; `unknown` for anything else (package steps then fail clearly).
    pub family: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Facts {
    pub hostname: String,
    pub os: OsFacts,
    pub machine_id: String,
    pub boot_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Where `name` came from: flags, config, user-data, tag:Name,
    /// tag:aws:autoscaling:groupName, hostname.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ami_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_ipv4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Instance tags (from instance metadata); empty off EC2.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Naming input from the command line.
#[derive(Debug, Clone, Default)]
pub struct NamingFlags {
    pub name: Option<String>,
    pub env: Option<String>,
    pub role: Option<String>,
}

/// `production-kube-worker` → (`production`, `kube-worker`): split at the first `-`.
pub fn split_name(name: &str) -> Result<(String, String)> {
    let Some((env, service)) = name.split_once('-') else {
        bail!("name {name:?} is not of the form ENV-SERVICE (like production-haproxy)");
    };
    check_ident("environment", env)?;
    check_ident("service", service)?;
    Ok((env.to_string(), service.to_string()))
}

/// Environment and service names: lowercase letters, digits, `-` and `_` inside (services
/// may hold `-`, environments may not, since the name is split at the first `-`).
pub fn check_ident(what: &str, s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && !s.ends_with(['-', '_'])
        && !(what == "environment" && s.contains('-'));
    if !ok {
        bail!("invalid {what} name {s:?}: use lowercase letters, digits, '-' and '_' (environment names have no '-'), at most 63 characters");
    }
    Ok(())
}

pub fn parse_os_release(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').trim_matches('\'').to_string()))
        .collect()
}

pub fn os_family(id: &str, id_like: &str) -> &'static str {
    let ids: Vec<&str> = std::iter::once(id).chain(id_like.split_whitespace()).collect();
    if ids.iter().any(|i| matches!(*i, "debian" | "ubuntu")) {
        "debian"
    } else if ids.iter().any(|i| matches!(*i, "rhel" | "fedora" | "centos" | "amzn" | "rocky" | "almalinux")) {
        "rhel"
    } else {
        "unknown"
    }
}

fn read_trim(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// Gather local facts for the system under `root`. With a root other than `/` that has no
/// os-release of its own (an empty image root), the running system's is used.
pub fn gather_local(root: &Path, flags: &NamingFlags) -> Result<Facts> {
    let os_text = ["etc/os-release", "usr/lib/os-release"]
        .iter()
        .find_map(|p| fs::read_to_string(root.join(p)).ok())
        .or_else(|| fs::read_to_string("/etc/os-release").ok())
        .unwrap_or_default();
    let os = parse_os_release(&os_text);
    let id = os.get("ID").cloned().unwrap_or_else(|| "unknown".into());
    let family = os_family(&id, os.get("ID_LIKE").map(String::as_str).unwrap_or("")).to_string();
    let machine_id = read_trim(&root.join("etc/machine-id"))
        .or_else(|| read_trim(Path::new("/etc/machine-id")))
        .unwrap_or_default();
    let boot_id = read_trim(Path::new("/proc/sys/kernel/random/boot_id")).unwrap_or_default();
    let hostname = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();

    let (name, env, service, source) = match (&flags.name, &flags.env, &flags.role) {
        (Some(n), _, _) => {
            let (e, s) = split_name(n)?;
            if flags.env.as_ref().is_some_and(|fe| fe != &e) || flags.role.as_ref().is_some_and(|fr| fr != &s) {
                bail!("--name {n} disagrees with --env/--role");
            }
            (Some(n.clone()), Some(e), Some(s), Some("flags"))
        }
        (None, Some(e), Some(r)) => {
            check_ident("environment", e)?;
            check_ident("service", r)?;
            (Some(format!("{e}-{r}")), Some(e.clone()), Some(r.clone()), Some("flags"))
        }
        (None, e, r) => {
            if let Some(e) = e {
                check_ident("environment", e)?;
            }
            if let Some(r) = r {
                check_ident("service", r)?;
            }
            (None, e.clone(), r.clone(), e.as_ref().or(r.as_ref()).map(|_| "flags"))
        }
    };
    Ok(Facts {
        hostname,
        os: OsFacts {
            id,
            version_id: os.get("VERSION_ID").cloned().unwrap_or_default(),
            family,
        },
        machine_id,
        boot_id,
        name,
        env,
        service,
        name_source: source.map(str::to_string),
        instance_id: None,
        region: None,
        availability_zone: None,
        instance_type: None,
        ami_id: None,
        local_ipv4: None,
        public_ipv4: None,
        mac: None,
        tags: BTreeMap::new(),
    })
}

/// Is this an EC2 instance? (DMI says so, as cloud-init's ds-identify and afterburn check.)
pub fn on_ec2() -> bool {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default().trim().to_lowercase();
    read("/sys/class/dmi/id/sys_vendor") == "amazon ec2"
        || read("/sys/class/dmi/id/board_vendor") == "amazon ec2"
        || read("/sys/hypervisor/uuid").starts_with("ec2")
}

/// Fill the EC2 facts from instance metadata.
pub fn add_imds(facts: &mut Facts, imds: &imds::Imds) -> Result<()> {
    facts.instance_id = imds.meta("instance-id")?;
    facts.availability_zone = imds.meta("placement/availability-zone")?;
    facts.region = imds.meta("placement/region")?;
    facts.instance_type = imds.meta("instance-type")?;
    facts.ami_id = imds.meta("ami-id")?;
    facts.local_ipv4 = imds.meta("local-ipv4")?;
    facts.public_ipv4 = imds.meta("public-ipv4")?;
    facts.mac = imds.meta("mac")?;
    if let Some(tags) = imds.tags()? {
        facts.tags = tags;
    }
    Ok(())
}

/// When flags did not name the node: the first of config, user-data config, the Name tag, the
/// autoscaling group tag, the hostname that gives a valid `ENV-SERVICE`.
pub fn resolve_name(facts: &mut Facts, config_name: Option<&str>, user_data_name: Option<&str>) -> Result<()> {
    if facts.name.is_some() {
        return Ok(());
    }
    let short_host = facts.hostname.split('.').next().unwrap_or_default().to_string();
    let candidates: [(&str, Option<&str>); 5] = [
        ("config", config_name),
        ("user-data", user_data_name),
        ("tag:Name", facts.tags.get("Name").map(String::as_str)),
        ("tag:aws:autoscaling:groupName", facts.tags.get("aws:autoscaling:groupName").map(String::as_str)),
        ("hostname", Some(short_host.as_str())),
    ];
    for (source, value) in candidates {
        let Some(v) = value else { continue };
        match split_name(v) {
            Ok((e, s)) => {
                if facts.env.as_ref().is_some_and(|fe| fe != &e) {
                    continue;
                }
                let service = facts.service.clone().unwrap_or(s);
                facts.name = Some(format!("{e}-{service}"));
                facts.env = Some(e);
                facts.service = Some(service);
                facts.name_source = Some(source.to_string());
                return Ok(());
            }
            // A configured name must be right; tags and hostnames may just not follow the scheme.
            Err(err) if matches!(source, "config" | "user-data") => return Err(err),
            Err(_) => continue,
        }
    }
    Ok(())
}

impl Facts {
    /// `KEY=value` lines for systemd `EnvironmentFile=` (keys upper-cased, dots become `_`).
    pub fn to_env(&self) -> String {
        let v = serde_json::to_value(self).expect("facts serialize");
        let mut out = String::new();
        flatten("", &v, &mut |k, val| {
            out.push_str(&format!("BOOTSTRAP_{}={}\n", k.replace(['.', '-'], "_").to_uppercase(), shell_quote(val)))
        });
        out
    }

    pub fn to_text(&self) -> String {
        let v = serde_json::to_value(self).expect("facts serialize");
        let mut out = String::new();
        flatten("", &v, &mut |k, val| out.push_str(&format!("{} = {val}\n", k)));
        out
    }
}

fn flatten(prefix: &str, v: &serde_json::Value, f: &mut dyn FnMut(&str, &str)) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, v, f);
            }
        }
        serde_json::Value::String(s) => f(prefix, s),
        other => f(prefix, &other.to_string()),
    }
}

fn shell_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:".contains(c)) {
        s.to_string()
    } else {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(split_name("production-haproxy").unwrap(), ("production".into(), "haproxy".into()));
        assert_eq!(split_name("production-kube-worker").unwrap(), ("production".into(), "kube-worker".into()));
        for bad in ["production", "-haproxy", "production-", "Prod-haproxy", "prod-ha proxy", "prod-ha/x"] {
            assert!(split_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn families() {
        assert_eq!(os_family("debian", ""), "debian");
        assert_eq!(os_family("ubuntu", "debian"), "debian");
        assert_eq!(os_family("amzn", "centos rhel fedora"), "rhel");
        assert_eq!(os_family("rocky", "rhel centos fedora"), "rhel");
        assert_eq!(os_family("arch", ""), "unknown");
        let m = parse_os_release("ID=debian\nVERSION_ID=\"12\"\n");
        assert_eq!(m["VERSION_ID"], "12");
    }
}
