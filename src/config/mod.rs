//! Agent config: `/etc/bootstrap/config.toml` then `/etc/bootstrap/config.d/*.toml` in file
//! name order, later wins field by field. Unknown keys are errors with file:line:column.
//! Strings may use `${env}`, `${service}`, `${region}`, `${instance_id}` and nothing else.

use crate::error::ConfigError;
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "etc/bootstrap/config.toml";
pub const CONFIG_DIR: &str = "etc/bootstrap/config.d";

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub bundle: BundleConfig,
    #[serde(default)]
    pub naming: NamingConfig,
    #[serde(default)]
    pub imds: ImdsConfig,
    #[serde(default)]
    pub aws: AwsConfig,
    #[serde(default)]
    pub reboot: RebootConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub rollout: RolloutConfig,
    #[serde(default)]
    pub report: ReportConfig,
    #[serde(default)]
    pub asg: AsgConfig,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStrategy {
    /// Apply a new bundle as soon as it is fetched (the default).
    #[default]
    Immediate,
    /// A new bundle only under a rollout slot in etcd: canaries first, then batches.
    Canary,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Keep the failed node on the new bundle, for inspection (the default).
    #[default]
    Halt,
    /// Re-apply last-good on the failed node.
    Rollback,
}

/// `[rollout]`: how a new bundle goes out to the group (see docs/rollouts.md).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    pub strategy: Option<RolloutStrategy>,
    /// Nodes that apply a new bundle first (default 1).
    pub canary: Option<u64>,
    /// Nodes applying a new bundle at once after the canaries are healthy (default 1).
    pub batch: Option<u64>,
    /// Default `${env}-${service}`.
    pub group: Option<String>,
    pub on_failure: Option<OnFailure>,
    /// How long a run waits for a rollout slot (default 25m, within a timer period).
    pub wait: Option<String>,
    /// Checks after a new bundle was applied; the slot is released only when all pass.
    #[serde(default)]
    pub health: Vec<HealthConfig>,
    /// Default: `[reboot.etcd]`.
    #[serde(default)]
    pub etcd: EtcdConfig,
}

/// `[report]`: where a node publishes its status record after every run (the fleet view).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportConfig {
    /// The record's lease in etcd (default 90m: three timer periods); in S3, the age after
    /// which `fleet status --source s3://…` lists a node as not reporting.
    pub ttl: Option<String>,
    /// Also put the record at this S3 key after every run (fleets without etcd):
    /// `s3://BUCKET/…/${instance_id}.json`, `${…}` substituted.
    pub s3: Option<String>,
    /// S3 endpoint override for the record (default: `[bundle] s3_endpoint`).
    pub s3_endpoint: Option<String>,
    /// The record bucket's region (default: `[bundle] s3_region`, else the instance's).
    pub s3_region: Option<String>,
}

/// `[asg]`: the EC2 Auto Scaling lifecycle (docs/asg.md). Checked into `asg::Settings`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsgConfig {
    /// Use the Auto Scaling lifecycle with a discovered launch hook (default: on when
    /// `launch_hook` or `unhealthy_after` is set).
    pub enabled: Option<bool>,
    /// The launching lifecycle hook `init` completes (default: the group's one hook for
    /// `autoscaling:EC2_INSTANCE_LAUNCHING`, found with DescribeLifecycleHooks).
    pub launch_hook: Option<String>,
    /// The Auto Scaling group (default: the instance's `aws:autoscaling:groupName` tag).
    pub group: Option<String>,
    /// How often `init` records a heartbeat (default: a quarter of the hook's
    /// HeartbeatTimeout, at most 5m); must be under half of it.
    pub heartbeat_interval: Option<String>,
    /// How long `init` may try to converge before it abandons the launch (default 30m).
    pub first_boot_deadline: Option<String>,
    /// The pause between failed first-boot runs (default 30s).
    pub retry_interval: Option<String>,
    /// Mark the instance Unhealthy after this many consecutive failed `apply` runs.
    pub unhealthy_after: Option<u32>,
    /// At most this many (`"2"`) or this share (`"10%"`) of the group marked at once (default 1).
    pub max_unhealthy: Option<String>,
    /// How often `bootstrap watch` reads `autoscaling/target-lifecycle-state` (default 5s).
    pub watch_interval: Option<String>,
    /// The terminating lifecycle hook `watch` completes (default: the group's one hook for
    /// `autoscaling:EC2_INSTANCE_TERMINATING`).
    pub terminate_lifecycle_hook: Option<String>,
    /// Auto Scaling API endpoint override (tests).
    pub endpoint: Option<String>,
    /// Checks that must pass before the launch completes with CONTINUE (the forms of
    /// `[[reboot.health]]`).
    #[serde(default)]
    pub health: Vec<HealthConfig>,
    /// Drain commands `watch` runs when the instance is being terminated (default: the
    /// `[[reboot.pre_hook]]` commands).
    #[serde(default)]
    pub terminate_hook: Vec<HookConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Prometheus textfile path (default /var/lib/node_exporter/textfile_collector/bootstrap.prom,
    /// written only when that directory exists).
    pub textfile: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RebootStrategy {
    /// Never reboot (the default until a strategy is chosen).
    #[default]
    Off,
    /// Reboot right away when needed, without coordination.
    Immediate,
    /// Hold a slot of the group's etcd semaphore while rebooting.
    Etcd,
    /// Ask a FleetLock server (airlock) for a slot.
    FleetLock,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebootConfig {
    pub strategy: Option<RebootStrategy>,
    /// Default `${env}-${service}`.
    pub group: Option<String>,
    /// `"Mon..Fri 02:00"` (UTC): when a reboot may start.
    pub window_start: Option<String>,
    /// `"2h"`.
    pub window_length: Option<String>,
    /// Each node starts at its own offset in `[0, window_splay)` after the window opens.
    /// Default: a quarter of the window, at most 15 minutes. `"0s"` turns it off.
    pub window_splay: Option<String>,
    #[serde(default)]
    pub etcd: EtcdConfig,
    #[serde(default)]
    pub fleet_lock: FleetLockConfig,
    /// Commands run after a slot is taken and before rebooting (a drain); a failure releases
    /// the slot and cancels the reboot.
    #[serde(default)]
    pub pre_hook: Vec<HookConfig>,
    /// Checks after the reboot; the slot is released only when all pass.
    #[serde(default)]
    pub health: Vec<HealthConfig>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetLockConfig {
    pub url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub command: Vec<String>,
    /// Default 5m.
    pub timeout: Option<String>,
}

/// One of `unit` (active), `url` (HTTP 200), `command` (exit 0).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    pub unit: Option<String>,
    pub url: Option<String>,
    pub command: Option<Vec<String>>,
    /// Default 30s.
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    #[serde(default)]
    pub endpoints: Vec<String>,
    pub prefix: Option<String>,
    /// Slots when the semaphore is created (default 1).
    pub slots: Option<u64>,
    /// PEM CA bundle that signs the etcd servers' certificates (https:// endpoints).
    pub ca_file: Option<String>,
    /// PEM client certificate and key, for etcd with `--client-cert-auth`.
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    /// EC2 API endpoint override (for DescribeTags; tests).
    pub ec2_endpoint: Option<String>,
    /// SSM endpoint override (for `secret("ssm:/…")`; tests).
    pub ssm_endpoint: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImdsConfig {
    /// Default: on when DMI says this is EC2, or when `base_url` is set.
    pub enabled: Option<bool>,
    /// Default http://169.254.169.254.
    pub base_url: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleConfig {
    /// `s3://bucket/roles-${env}.tar.gz`, `https://…`, `file:///…`, or a directory.
    pub source: Option<String>,
    /// Pinned sha256 of the bundle tarball.
    pub sha256: Option<String>,
    /// minisign public key (base64 line or the whole minisign.pub text): the detached
    /// `<bundle>.minisig` must verify.
    pub public_key: Option<String>,
    /// Unpacked size limit in bytes.
    pub max_bytes: Option<u64>,
    /// Entry count limit.
    pub max_entries: Option<usize>,
    /// S3 endpoint override (S3-compatible servers, tests).
    pub s3_endpoint: Option<String>,
    /// S3 region (default: the instance's region, else the SDK's default chain).
    pub s3_region: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamingConfig {
    /// ENV-SERVICE.
    pub name: Option<String>,
}

/// Later config wins, field by field: a value set later replaces the earlier one; an unset
/// one (`None`, an empty list) keeps it. Structs merge each of their fields.
pub trait Merge {
    fn merge(&mut self, later: Self);
}

impl<T> Merge for Option<T> {
    fn merge(&mut self, later: Self) {
        if later.is_some() {
            *self = later;
        }
    }
}

/// A list is one value: a later non-empty list replaces the earlier one whole.
impl<T> Merge for Vec<T> {
    fn merge(&mut self, later: Self) {
        if !later.is_empty() {
            *self = later;
        }
    }
}

/// `Merge` for a struct, field by field. The struct is taken apart with a pattern that names
/// every field and has no `..`: a field added to the struct and not here does not compile.
macro_rules! merge_fields {
    ($($ty:ident { $($field:ident),* $(,)? })*) => {
        $(impl Merge for $ty {
            fn merge(&mut self, later: Self) {
                let $ty { $($field),* } = later;
                $(Merge::merge(&mut self.$field, $field);)*
            }
        })*
    };
}

merge_fields! {
    Config { bundle, naming, imds, aws, reboot, metrics, rollout, report, asg }
    RolloutConfig { strategy, canary, batch, group, on_failure, wait, health, etcd }
    ReportConfig { ttl, s3, s3_endpoint, s3_region }
    AsgConfig { enabled, launch_hook, group, heartbeat_interval, first_boot_deadline, retry_interval, unhealthy_after, max_unhealthy, watch_interval, terminate_lifecycle_hook, endpoint, health, terminate_hook }
    BundleConfig { source, sha256, public_key, max_bytes, max_entries, s3_endpoint, s3_region }
    NamingConfig { name }
    ImdsConfig { enabled, base_url }
    AwsConfig { ec2_endpoint, ssm_endpoint }
    MetricsConfig { textfile }
    RebootConfig { strategy, group, window_start, window_length, window_splay, etcd, fleet_lock, pre_hook, health }
    EtcdConfig { endpoints, prefix, slots, ca_file, cert_file, key_file }
    FleetLockConfig { url }
}

impl Config {
    /// `over` wins field by field.
    pub fn overlaid(mut self, over: Config) -> Config {
        self.merge(over);
        self
    }

    /// The settings used only later in a run (endpoints, the metrics file), checked now: a
    /// mistake is a `ConfigError` (exit 78) before anything on the host changed. `[reboot]` is
    /// checked by `reboot::Settings`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls = [
            ("[imds] base_url", &self.imds.base_url),
            ("[aws] ec2_endpoint", &self.aws.ec2_endpoint),
            ("[aws] ssm_endpoint", &self.aws.ssm_endpoint),
            ("[bundle] s3_endpoint", &self.bundle.s3_endpoint),
            ("[report] s3_endpoint", &self.report.s3_endpoint),
            ("[asg] endpoint", &self.asg.endpoint),
        ];
        for (what, url) in urls {
            if let Some(u) = url {
                check_url(what, u)?;
            }
        }
        if let Some(t) = &self.metrics.textfile {
            if !Path::new(t).is_absolute() {
                return Err(ConfigError::msg(format!("[metrics] textfile {t:?}: expected an absolute path")));
            }
        }
        Ok(())
    }

    /// User-data that starts with the line `#bootstrap-config` is agent config; anything else
    /// (a shell script) is not ours. Errors name `user-data:LINE:COL`.
    pub fn from_user_data(text: &str) -> Result<Option<Config>, ConfigError> {
        if text.lines().next().map(str::trim) != Some("#bootstrap-config") {
            return Ok(None);
        }
        Config::parse(Path::new("user-data"), text).map(Some)
    }

    pub fn parse(file: &Path, src: &str) -> Result<Config, ConfigError> {
        toml::from_str(src).map_err(|e| crate::error::toml_err(e, file, src))
    }

    /// Read the config under `root`; no files at all is an empty config.
    pub fn load(root: &Path) -> Result<Config, ConfigError> {
        let mut files: Vec<PathBuf> = Vec::new();
        if root.join(CONFIG_FILE).is_file() {
            files.push(root.join(CONFIG_FILE));
        }
        if let Ok(rd) = std::fs::read_dir(root.join(CONFIG_DIR)) {
            let mut frags: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml")).collect();
            frags.sort();
            files.extend(frags);
        }
        let mut cfg = Config::default();
        for f in files {
            let src = std::fs::read_to_string(&f).map_err(|e| ConfigError::file(&f, format!("cannot read: {e}")))?;
            cfg.merge(Config::parse(&f, &src)?);
        }
        Ok(cfg)
    }
}

/// An http(s) URL with a host.
pub fn check_url(what: &str, url: &str) -> Result<(), ConfigError> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(ConfigError::msg(format!("{what} {url:?}: expected an http:// or https:// URL"))),
        Err(e) => Err(ConfigError::msg(format!("{what} {url:?}: {e}"))),
    }
}

/// Substitute `${env}`, `${service}`, `${region}`, `${instance_id}`; any other `${` is an error.
pub fn substitute(s: &str, vars: &[(&str, Option<&str>)]) -> Result<String, ConfigError> {
    let mut out = s.to_string();
    for (k, v) in vars {
        let pat = format!("${{{k}}}");
        if out.contains(&pat) {
            let v = v.ok_or_else(|| ConfigError::msg(format!("{s:?}: ${{{k}}} is not known on this node")))?;
            out = out.replace(&pat, v);
        }
    }
    if let Some(i) = out.find("${") {
        let name: String = out[i..].chars().take_while(|c| *c != '}').collect();
        return Err(ConfigError::msg(format!(
            "{s:?}: unknown substitution {name}}} (only ${{env}}, ${{service}}, ${{region}}, ${{instance_id}})"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitution() {
        let v = [
            ("env", Some("production")),
            ("service", Some("haproxy")),
            ("region", None),
            ("instance_id", None),
        ];
        assert_eq!(substitute("s3://b/roles-${env}.tar.gz", &v).unwrap(), "s3://b/roles-production.tar.gz");
        assert!(substitute("s3://b/${region}/x", &v).is_err());
        assert!(substitute("s3://b/${home}/x", &v).unwrap_err().to_string().contains("${home}"));
    }

    /// Every field of the config, set: in a later fragment each one wins over an earlier
    /// value, and an empty later fragment keeps each one. A field added to the config and not
    /// to `EVERY_FIELD` fails `every_field_is_set` (`None` or `[]` in its Debug form).
    const EVERY_FIELD: &str = r#"
[bundle]
source = "s3://b/k.tar.gz"
sha256 = "abc"
public_key = "key"
max_bytes = 7
max_entries = 8
s3_endpoint = "http://s3"
s3_region = "eu-west-1"
[naming]
name = "production-web"
[imds]
enabled = true
base_url = "http://imds"
[aws]
ec2_endpoint = "http://ec2"
ssm_endpoint = "http://ssm"
[metrics]
textfile = "/m.prom"
[reboot]
strategy = "etcd"
group = "g"
window_start = "Mon 02:00"
window_length = "1h"
window_splay = "1m"
[reboot.etcd]
endpoints = ["http://e:2379"]
prefix = "/p"
slots = 2
ca_file = "/ca"
cert_file = "/cert"
key_file = "/key"
[reboot.fleet_lock]
url = "http://fl"
[[reboot.pre_hook]]
command = ["drain"]
timeout = "1m"
[[reboot.health]]
unit = "a.service"
url = "http://h"
command = ["true"]
timeout = "1s"
[rollout]
strategy = "canary"
canary = 2
batch = 2
group = "g"
on_failure = "rollback"
wait = "1m"
[[rollout.health]]
unit = "a.service"
url = "http://h"
command = ["true"]
timeout = "1s"
[rollout.etcd]
endpoints = ["http://e:2379"]
prefix = "/p"
slots = 2
ca_file = "/ca"
cert_file = "/cert"
key_file = "/key"
[report]
ttl = "1m"
s3 = "s3://fleet/${env}/${service}/${instance_id}.json"
s3_endpoint = "http://s3r"
s3_region = "eu-west-2"
[asg]
enabled = true
launch_hook = "launch"
group = "asg"
heartbeat_interval = "1m"
first_boot_deadline = "20m"
retry_interval = "10s"
unhealthy_after = 2
max_unhealthy = "10%"
watch_interval = "5s"
terminate_lifecycle_hook = "drain"
endpoint = "http://as"
[[asg.health]]
unit = "b.service"
url = "http://h2"
command = ["true"]
timeout = "2s"
[[asg.terminate_hook]]
command = ["drain"]
timeout = "2m"
"#;

    #[test]
    fn every_field_merges() {
        let full = Config::parse(Path::new("full.toml"), EVERY_FIELD).unwrap();
        let text = format!("{full:?}");
        assert!(!text.contains("None") && !text.contains("[]"), "EVERY_FIELD must set every field: {text}");
        // Every field set later wins over a different earlier value.
        let earlier = Config::parse(
            Path::new("earlier.toml"),
            &EVERY_FIELD
                .replace("= \"", "= \"x")
                .replace("[\"", "[\"x")
                .replace("\"xetcd\"", "\"fleet_lock\"")
                .replace("\"xcanary\"", "\"immediate\"")
                .replace("\"xrollback\"", "\"halt\"")
                .replace(" = 7", " = 70")
                .replace(" = 8", " = 80")
                .replace(" = 2", " = 20")
                .replace("true", "false"),
        )
        .unwrap();
        assert_ne!(format!("{earlier:?}"), text);
        let mut merged = earlier.clone();
        merged.merge(full.clone());
        assert_eq!(format!("{merged:?}"), text, "a field set later did not win");
        // Nothing set later keeps every field.
        let mut kept = earlier.clone();
        kept.merge(Config::default());
        assert_eq!(format!("{kept:?}"), format!("{earlier:?}"), "an unset field dropped the earlier value");
    }

    #[test]
    fn late_settings_are_checked_at_load() {
        let bad = |text: &str| Config::parse(Path::new("c.toml"), text).unwrap().validate().unwrap_err().to_string();
        assert!(bad("[aws]\nssm_endpoint = \"localhost:4566\"\n").contains("[aws] ssm_endpoint"));
        assert!(bad("[bundle]\ns3_endpoint = \"file:///x\"\n").contains("http:// or https://"));
        assert!(bad("[imds]\nbase_url = \"169.254.169.254\"\n").contains("[imds] base_url"));
        assert!(bad("[metrics]\ntextfile = \"bootstrap.prom\"\n").contains("absolute path"));
        let good = "[aws]\nec2_endpoint = \"http://127.0.0.1:5000\"\n[metrics]\ntextfile = \"/m/b.prom\"\n";
        Config::parse(Path::new("c.toml"), good).unwrap().validate().unwrap();
    }

    #[test]
    fn fragments_merge_and_reject_unknown_keys() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join(CONFIG_DIR)).unwrap();
        std::fs::write(d.path().join(CONFIG_FILE), "[bundle]\nsource = \"file:///a\"\nsha256 = \"x\"\n").unwrap();
        std::fs::write(d.path().join(CONFIG_DIR).join("20-b.toml"), "[bundle]\nsource = \"file:///c\"\n").unwrap();
        std::fs::write(d.path().join(CONFIG_DIR).join("10-a.toml"), "[bundle]\nsource = \"file:///b\"\n").unwrap();
        let c = Config::load(d.path()).unwrap();
        assert_eq!(c.bundle.source.as_deref(), Some("file:///c"));
        assert_eq!(c.bundle.sha256.as_deref(), Some("x"));
        std::fs::write(d.path().join(CONFIG_DIR).join("30-bad.toml"), "[bundle]\nsorce = 1\n").unwrap();
        let e = Config::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("30-bad.toml:2:1: unknown field `sorce`"), "{e}");
    }
}
