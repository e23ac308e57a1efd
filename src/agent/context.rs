//! What every command that converges or reports starts from: the root, the facts (local,
//! instance metadata, tags), the node's name and the merged agent config.

use std::path::PathBuf;

/// What every command that converges or reports needs: the root, the facts, the merged config.
pub struct Context {
    pub root: PathBuf,
    pub facts: crate::facts::Facts,
    pub config: crate::config::Config,
}

impl Context {
    /// Read the agent config, gather local facts, and on EC2 (or when IMDS is configured)
    /// the instance metadata and the user-data config; then settle the node's name.
    /// `first_boot` allows the metadata service the longer first-boot deadline.
    pub fn gather(root: &std::path::Path, naming: &crate::facts::NamingFlags, first_boot: bool) -> anyhow::Result<Context> {
        use crate::error::ConfigError;
        use crate::facts::{self, imds};
        if !root.is_absolute() || !root.is_dir() {
            return Err(ConfigError::msg(format!("--root {}: must be an existing directory given as an absolute path", root.display())).into());
        }
        let file_config = crate::config::Config::load(root)?;
        file_config.validate()?;
        let mut facts = facts::gather_local(root, naming).map_err(|e| ConfigError::msg(format!("{e:#}")))?;
        let imds_on = file_config.imds.enabled.unwrap_or(file_config.imds.base_url.is_some() || facts::on_ec2());
        let mut user_data = crate::config::Config::default();
        if imds_on {
            let base = file_config.imds.base_url.clone().unwrap_or_else(|| imds::DEFAULT_BASE_URL.to_string());
            let budget = if first_boot { imds::FIRST_BOOT_DEADLINE } else { imds::TIMER_DEADLINE };
            let client = imds::Imds::new(&base, budget)?;
            facts::add_imds(&mut facts, &client)?;
            // No tags in instance metadata (not enabled on the instance): ask the EC2 API,
            // unless the node is already named by flags or config.
            let named = facts.name.is_some() || file_config.naming.name.is_some();
            if facts.tags.is_empty() && !named {
                if let Some(id) = facts.instance_id.clone() {
                    match facts::ec2::describe_tags(facts.region.as_deref(), file_config.aws.ec2_endpoint.as_deref(), &id) {
                        Ok(t) => facts.tags = t,
                        Err(e) => tracing::warn!("no instance tags: {e:#}"),
                    }
                }
            }
            if let Some(ud) = client.get("user-data")? {
                if let Some(c) = crate::config::Config::from_user_data(&ud)? {
                    user_data = c;
                }
            }
        }
        let ud_name = user_data.naming.name.clone();
        facts::resolve_name(&mut facts, file_config.naming.name.as_deref(), ud_name.as_deref()).map_err(|e| ConfigError::msg(format!("{e:#}")))?;
        // The agent's own config files win over user-data.
        let config = user_data.overlaid(file_config);
        config.validate()?;
        crate::secrets::configure(crate::secrets::Settings {
            ssm_endpoint: config.aws.ssm_endpoint.clone(),
            region: facts.region.clone(),
        });
        Ok(Context {
            root: root.to_path_buf(),
            facts,
            config,
        })
    }

    /// The reboot group: `[reboot] group` (substituted), else `ENV-SERVICE`.
    pub fn reboot_group(&self) -> Result<String, crate::error::ConfigError> {
        self.reboot_group_opt()?
            .ok_or_else(|| crate::error::ConfigError::msg("no reboot group: set [reboot] group in /etc/bootstrap/config.toml or name the node (ENV-SERVICE)"))
    }

    fn reboot_group_opt(&self) -> Result<Option<String>, crate::error::ConfigError> {
        Ok(match (&self.config.reboot.group, &self.facts.env, &self.facts.service) {
            (Some(g), _, _) => Some(self.substitute(g).map_err(|e| crate::error::ConfigError::msg(format!("[reboot] group: {e}")))?),
            (None, Some(e), Some(s)) => Some(format!("{e}-{s}")),
            _ => None,
        })
    }

    /// This node's id in the semaphore: the EC2 instance id, else the machine id. An empty,
    /// `uninitialized` or malformed machine id is no id: every node with it would believe it
    /// holds the same slot.
    pub fn holder_id(&self) -> Result<String, crate::error::ConfigError> {
        if let Some(i) = &self.facts.instance_id {
            return Ok(i.clone());
        }
        let m = self.facts.machine_id.as_str();
        let why = if m.is_empty() {
            Some("is empty")
        } else if m == "uninitialized" {
            Some("is \"uninitialized\" (first boot not committed)")
        } else if m.len() != 32 || !m.chars().all(|c| c.is_ascii_hexdigit()) {
            Some("is not 32 hexadecimal digits")
        } else {
            None
        };
        match why {
            Some(why) => Err(crate::error::ConfigError::msg(format!(
                "/etc/machine-id {why}: reboot coordination needs a unique id for this node (off EC2 the machine id); \
                 give the node one (systemd-machine-id-setup) before using [reboot] strategy etcd or fleet_lock"
            ))),
            None => Ok(m.to_string()),
        }
    }

    /// `[reboot]` validated into typed values, with the group and this node's holder id; every
    /// mistake is a `ConfigError` (exit 78), found before any step runs.
    pub fn reboot_settings(&self) -> Result<crate::reboot::Settings, crate::error::ConfigError> {
        crate::reboot::Settings::new(
            &self.config.reboot,
            self.reboot_group_opt()?,
            self.holder_id(),
            self.root == std::path::Path::new("/"),
        )
    }

    /// The rollout group: `[rollout] group` (substituted), else `ENV-SERVICE`.
    pub fn rollout_group(&self) -> Result<Option<String>, crate::error::ConfigError> {
        Ok(match (&self.config.rollout.group, &self.facts.env, &self.facts.service) {
            (Some(g), _, _) => Some(
                self.substitute(g)
                    .map_err(|e| crate::error::ConfigError::msg(format!("[rollout] group: {e}")))?,
            ),
            (None, Some(e), Some(s)) => Some(format!("{e}-{s}")),
            _ => None,
        })
    }

    /// `[rollout]` and `[report]` validated, with the group and this node's holder id; every
    /// mistake is a `ConfigError` (exit 78), found before any step runs.
    pub fn rollout_settings(&self) -> Result<crate::rollout::Settings, crate::error::ConfigError> {
        let mut s = crate::rollout::Settings::new(
            &self.config,
            self.rollout_group()?,
            self.holder_id(),
            self.root == std::path::Path::new("/"),
            true,
        )?;
        s.report_s3 = self.report_s3()?;
        Ok(s)
    }

    /// The rollout's etcd, group and holder, without `[report] s3` and without checking what
    /// only a run uses (`[[rollout.health]]`, `wait`, `batch`): for the watcher giving the
    /// node's slots back in a drain, which a mistake there must not stop.
    pub fn rollout_gate_settings(&self) -> Result<crate::rollout::Settings, crate::error::ConfigError> {
        let mut cfg = self.config.clone();
        cfg.rollout.health.clear();
        cfg.rollout.wait = None;
        cfg.rollout.batch = None;
        crate::rollout::Settings::new(&cfg, self.rollout_group()?, self.holder_id(), self.root == std::path::Path::new("/"), true)
    }

    /// `[report] s3` substituted and checked (None: not set). An image build (`--root`) never
    /// publishes, but its config is checked too, with stand-ins for the facts it may not have.
    pub fn report_s3(&self) -> Result<Option<crate::rollout::fleet_s3::Target>, crate::error::ConfigError> {
        let Some(template) = &self.config.report.s3 else {
            return Ok(None);
        };
        let region = self.facts.region.as_deref();
        let t = if self.root == std::path::Path::new("/") {
            crate::rollout::fleet_s3::target(template, |s| self.substitute(s), &self.config, region)?
        } else {
            let stand_ins = [
                ("env", Some("env")),
                ("service", Some("service")),
                ("region", Some("region")),
                ("instance_id", Some("i-0")),
            ];
            let check = |s: &str| crate::config::substitute(s, &stand_ins);
            crate::rollout::fleet_s3::target(template, check, &self.config, region)?
        };
        Ok(Some(t))
    }

    /// `[rollout]` for the operator commands (`rollout`, `fleet`): no group or holder id needed.
    pub fn rollout_tool_settings(&self) -> Result<crate::rollout::Settings, crate::error::ConfigError> {
        let group = self.rollout_group().ok().flatten();
        crate::rollout::Settings::new(&self.config, group, self.holder_id(), self.root == std::path::Path::new("/"), false)
    }

    /// A config string with `${env}`, `${service}`, `${region}`, `${instance_id}` filled in.
    pub fn substitute(&self, s: &str) -> Result<String, crate::error::ConfigError> {
        let f = &self.facts;
        crate::config::substitute(
            s,
            &[
                ("env", f.env.as_deref()),
                ("service", f.service.as_deref()),
                ("region", f.region.as_deref()),
                ("instance_id", f.instance_id.as_deref()),
            ],
        )
    }
}
