//! `container`: one docker container over the Engine API (src/docker.rs). Idempotence by a
//! hash of the desired configuration, stored on the container as the label
//! `bootstrap.config-hash` (and the configuration itself, secrets replaced by their hash, as
//! `bootstrap.config`, so `plan` can show what changed): same hash → leave it; other hash →
//! recreate once; with `pull = "always"` a pulled image whose id differs from the container's
//! → recreate.

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::docker::Docker;
use crate::error::ConfigError;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use toml::Spanned;

pub const HASH_LABEL: &str = "bootstrap.config-hash";
pub const CONFIG_LABEL: &str = "bootstrap.config";

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Pull {
    Always,
    #[default]
    Missing,
    Never,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CState {
    #[default]
    Running,
    Stopped,
    Absent,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    pub image: Option<Spanned<String>>,
    #[serde(default)]
    pub pull: Pull,
    /// Values are templates (so `{{ secret("ssm:/…") }}` works).
    #[serde(default)]
    pub env: BTreeMap<String, Spanned<String>>,
    /// `"8080:80"`, `"127.0.0.1:8443:443"`, `"53:53/udp"`.
    #[serde(default)]
    pub ports: Vec<Spanned<String>>,
    /// `"/srv/data:/data"`, `"/srv/conf:/etc/app:ro"`.
    #[serde(default)]
    pub volumes: Vec<Spanned<String>>,
    pub command: Option<Vec<String>>,
    /// `no` | `always` | `unless-stopped` | `on-failure`
    pub restart: Option<Spanned<String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub state: CState,
}

/// What is hashed and stored: the desired configuration.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Desired {
    pub image: String,
    pub env: BTreeMap<String, String>,
    pub ports: Vec<String>,
    pub volumes: Vec<String>,
    pub command: Option<Vec<String>>,
    pub restart: String,
    pub labels: BTreeMap<String, String>,
}

fn parse_port(p: &str) -> Result<(String, String, String), String> {
    let (spec, proto) = match p.rsplit_once('/') {
        Some((s, pr)) if ["tcp", "udp", "sctp"].contains(&pr) => (s, pr),
        Some(_) => return Err(format!("port {p:?}: protocol must be tcp, udp or sctp")),
        None => (p, "tcp"),
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let (ip, host, cont) = match parts.as_slice() {
        [h, c] => ("", *h, *c),
        [ip, h, c] => (*ip, *h, *c),
        _ => return Err(format!("port {p:?}: expected HOST:CONTAINER or IP:HOST:CONTAINER")),
    };
    for n in [host, cont] {
        if n.parse::<u16>().map_or(true, |v| v == 0) {
            return Err(format!("port {p:?}: {n:?} is not a port number"));
        }
    }
    Ok((ip.to_string(), host.to_string(), format!("{cont}/{proto}")))
}

impl super::KindSpec for Spec {
    type Step = ContainerStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        let n = self.name.get_ref();
        if n.is_empty() || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
            return Err(cx.err(&self.name, format!("container name {n:?}: use letters, digits, _ . -")));
        }
        if self.state != CState::Absent && self.image.is_none() {
            return Err(cx.err(&self.name, "a container step needs `image` (unless state = \"absent\")"));
        }
        for p in &self.ports {
            parse_port(p.get_ref()).map_err(|e| cx.err(p, e))?;
        }
        for v in &self.volumes {
            let parts: Vec<&str> = v.get_ref().split(':').collect();
            if !(2..=3).contains(&parts.len()) || !parts[1].starts_with('/') {
                return Err(cx.err(v, format!("volume {:?}: expected SOURCE:/container/path[:ro]", v.get_ref())));
            }
        }
        if let Some(r) = &self.restart {
            if !["no", "always", "unless-stopped", "on-failure"].contains(&r.get_ref().as_str()) {
                return Err(cx.err(r, format!("restart {:?}: one of no, always, unless-stopped, on-failure", r.get_ref())));
            }
        }
        for v in self.env.values() {
            crate::template::check_syntax(cx.env, &crate::template::Origin::Inline(cx.pos(v)), v.get_ref())?;
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<ContainerStep, ConfigError> {
        let l = &cx.load;
        let mut env = BTreeMap::new();
        for (k, v) in &self.env {
            env.insert(
                k.clone(),
                crate::template::render(l.env, &crate::template::Origin::Inline(l.pos(v)), v.get_ref(), cx.vars)?,
            );
        }
        Ok(ContainerStep {
            name: self.name.get_ref().clone(),
            pull: self.pull,
            state: self.state,
            desired: Desired {
                image: self.image.as_ref().map(|i| i.get_ref().clone()).unwrap_or_default(),
                env,
                ports: self.ports.iter().map(|p| p.get_ref().clone()).collect(),
                volumes: self.volumes.iter().map(|v| v.get_ref().clone()).collect(),
                command: self.command.clone(),
                restart: self.restart.as_ref().map(|r| r.get_ref().clone()).unwrap_or_else(|| "no".into()),
                labels: self.labels.clone(),
            },
        })
    }
}

#[derive(Debug, Clone)]
pub struct ContainerStep {
    pub name: String,
    pub pull: Pull,
    pub state: CState,
    pub desired: Desired,
}

#[derive(Debug, Clone)]
pub struct Existing {
    pub id: String,
    pub running: bool,
    pub hash: Option<String>,
    pub config: Option<String>,
    pub image_id: String,
}

#[derive(Debug, Clone)]
pub struct Observed {
    pub container: Option<Existing>,
    /// The local image's id (after the pull, with `pull = "always"`); None: not present.
    pub image_id: Option<String>,
}

impl ContainerStep {
    /// The hash label and what `plan` diffs: the configuration with every value that came from
    /// a secret replaced by its own short hash (a label is readable by anyone with the socket).
    fn stored(&self) -> (String, String) {
        let mut shown = self.desired.clone();
        for v in shown.env.values_mut() {
            if crate::secrets::is_secret(v) {
                *v = format!("<secret sha256:{}>", &hex::encode(Sha256::digest(v.as_bytes()))[..12]);
            }
        }
        let json = serde_json::to_string_pretty(&shown).expect("JSON");
        let hash = hex::encode(Sha256::digest(serde_json::to_vec(&self.desired).expect("JSON")));
        (hash, json)
    }

    fn create_body(&self) -> serde_json::Value {
        let d = &self.desired;
        let (hash, shown) = self.stored();
        let mut labels = d.labels.clone();
        labels.insert(HASH_LABEL.into(), hash);
        labels.insert(CONFIG_LABEL.into(), shown);
        let mut exposed = serde_json::Map::new();
        let mut bindings = serde_json::Map::new();
        for p in &d.ports {
            let (ip, host, cont) = parse_port(p).expect("validated");
            exposed.insert(cont.clone(), serde_json::json!({}));
            let list = bindings.entry(cont).or_insert_with(|| serde_json::json!([]));
            list.as_array_mut().expect("array").push(serde_json::json!({ "HostIp": ip, "HostPort": host }));
        }
        let mut body = serde_json::json!({
            "Image": d.image,
            "Env": d.env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
            "Labels": labels,
            "ExposedPorts": exposed,
            "HostConfig": {
                "PortBindings": bindings,
                "Binds": d.volumes,
                "RestartPolicy": { "Name": if d.restart == "no" { "" } else { d.restart.as_str() } },
            },
        });
        if let Some(c) = &d.command {
            body["Cmd"] = serde_json::json!(c);
        }
        body
    }

    fn ensure_image(&self, docker: &Docker, observed: &Observed) -> Result<()> {
        if observed.image_id.is_some() {
            return Ok(());
        }
        if self.pull == Pull::Never {
            bail!("image {} is not present and pull = \"never\"", self.desired.image);
        }
        docker.pull(&self.desired.image)
    }

    fn start(&self, docker: &Docker, id: &str) -> Result<()> {
        let r = docker.request("POST", &format!("/containers/{id}/start"), None, std::time::Duration::from_secs(120))?;
        match r.status {
            204 | 304 => Ok(()),
            _ => {
                let msg = r.message();
                if msg.contains("port is already allocated") || msg.contains("address already in use") {
                    bail!("starting container {}: a host port is taken ({:?}): {msg}", self.name, self.desired.ports);
                }
                bail!("starting container {}: HTTP {}: {msg}", self.name, r.status)
            }
        }
    }
}

impl Kind for ContainerStep {
    type Observed = Observed;

    fn needs_live_system(&self) -> bool {
        true
    }

    fn check(&self, _host: &Host) -> Result<Observed> {
        let docker = Docker::from_env();
        let container = docker.get(&format!("/containers/{}/json", crate::docker::enc(&self.name)))?.map(|c| {
            let label = |k: &str| c["Config"]["Labels"][k].as_str().map(str::to_string);
            Existing {
                id: c["Id"].as_str().unwrap_or_default().to_string(),
                running: c["State"]["Running"] == true,
                hash: label(HASH_LABEL),
                config: label(CONFIG_LABEL),
                image_id: c["Image"].as_str().unwrap_or_default().to_string(),
            }
        });
        if self.state == CState::Absent {
            return Ok(Observed { container, image_id: None });
        }
        let inspect = || -> Result<Option<String>> {
            Ok(docker
                .get(&format!("/images/{}/json", crate::docker::enc(&self.desired.image)))?
                .and_then(|i| i["Id"].as_str().map(str::to_string)))
        };
        let mut image_id = inspect()?;
        // With pull = "always" the registry decides: pull now (this touches no container), and
        // compare the image id with the container's. A digest-pinned reference (`@sha256:…`)
        // names content that cannot change: present locally is up to date, no pull.
        let pinned = crate::docker::parse_ref(&self.desired.image).digest.is_some();
        if self.pull == Pull::Always && !(pinned && image_id.is_some()) {
            docker.pull(&self.desired.image)?;
            image_id = inspect()?;
        }
        Ok(Observed { container, image_id })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let (hash, shown) = self.stored();
        let short = |id: &str| id.trim_start_matches("sha256:").chars().take(12).collect::<String>();
        match (&o.container, self.state) {
            (None, CState::Absent) => vec![],
            (Some(c), CState::Absent) => vec![Change::new("container", Some(short(&c.id)), None::<String>)],
            (None, _) => vec![Change::new(
                "container",
                None::<String>,
                Some(format!("{} from {}", self.name, self.desired.image)),
            )],
            (Some(c), want) => {
                let mut out = Vec::new();
                if c.hash.as_deref() != Some(hash.as_str()) {
                    let mut ch = Change::new("config", c.hash.as_deref().map(short), Some(short(&hash)));
                    let old = c.config.clone().unwrap_or_default();
                    ch.diff = Some(
                        similar::TextDiff::from_lines(&old, &shown)
                            .unified_diff()
                            .header(&format!("{} (running)", self.name), &format!("{} (role)", self.name))
                            .to_string(),
                    );
                    out.push(ch);
                } else if self.pull == Pull::Always && o.image_id.as_deref().is_some_and(|i| i != c.image_id) {
                    out.push(Change::new("image", Some(short(&c.image_id)), o.image_id.as_deref().map(short)));
                }
                let running = want == CState::Running;
                if c.running != running && out.is_empty() {
                    let st = |r: bool| if r { "running" } else { "stopped" };
                    out.push(Change::new("state", Some(st(c.running)), Some(st(running))));
                }
                out
            }
        }
    }

    fn apply(&self, _host: &Host, o: &Observed, changes: &[Change]) -> Result<()> {
        let docker = Docker::from_env();
        let recreate = changes.iter().any(|c| ["container", "config", "image"].contains(&c.field.as_str()));
        if let Some(c) = &o.container {
            if self.state == CState::Absent || recreate {
                let r = docker.request("DELETE", &format!("/containers/{}?force=true", c.id), None, std::time::Duration::from_secs(120))?;
                if ![204, 404].contains(&r.status) {
                    bail!("removing container {}: HTTP {}: {}", self.name, r.status, r.message());
                }
            }
        }
        if self.state == CState::Absent {
            return Ok(());
        }
        let id = if recreate {
            self.ensure_image(&docker, o)?;
            let r = docker.request(
                "POST",
                &format!("/containers/create?name={}", crate::docker::enc(&self.name)),
                Some(&self.create_body()),
                std::time::Duration::from_secs(120),
            )?;
            match r.status {
                201 => r.json()?["Id"].as_str().unwrap_or_default().to_string(),
                404 => bail!("creating container {}: image {} not found: {}", self.name, self.desired.image, r.message()),
                s => bail!("creating container {}: HTTP {s}: {}", self.name, r.message()),
            }
        } else {
            o.container.as_ref().map(|c| c.id.clone()).unwrap_or_default()
        };
        match self.state {
            CState::Running => self.start(&docker, &id),
            CState::Stopped => {
                let r = docker.request("POST", &format!("/containers/{id}/stop?t=30"), None, std::time::Duration::from_secs(60))?;
                if ![204, 304].contains(&r.status) {
                    bail!("stopping container {}: HTTP {}: {}", self.name, r.status, r.message());
                }
                Ok(())
            }
            CState::Absent => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(parse_port("8080:80").unwrap(), ("".into(), "8080".into(), "80/tcp".into()));
        assert_eq!(parse_port("127.0.0.1:53:53/udp").unwrap(), ("127.0.0.1".into(), "53".into(), "53/udp".into()));
        assert!(parse_port("80").is_err());
        assert!(parse_port("x:80").is_err());
        assert!(parse_port("80:80/icmp").is_err());
    }
}
