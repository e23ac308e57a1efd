//! `kubeadm_join`: join this node to a Kubernetes cluster once. A node with
//! `/etc/kubernetes/kubelet.conf` is joined and never joined again. The token is always treated
//! as a secret: it never appears in a log, report, error or the echoed argv.

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::runner::{self, Cmd};
use anyhow::{bail, Result};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

pub const KUBELET_CONF: &str = "/etc/kubernetes/kubelet.conf";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `host:port` of the API server (argv mode).
    pub api_server: Option<Spanned<String>>,
    /// A template, e.g. `{{ secret("ssm:/kube/join-token") }}`.
    pub token: Option<Spanned<String>>,
    /// `sha256:…` (argv mode).
    pub ca_cert_hash: Option<Spanned<String>>,
    /// A JoinConfiguration (inline template) instead of the three above.
    pub config: Option<Spanned<String>>,
    /// Extra kubeadm arguments, e.g. ["--node-name", "{{ facts.hostname }}"] (templates).
    #[serde(default)]
    pub extra_args: Vec<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

impl super::KindSpec for Spec {
    type Step = JoinStep;

    fn identity(&self) -> Option<String> {
        None
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        use crate::template::{check_syntax, Origin};
        match (&self.config, &self.api_server, &self.token, &self.ca_cert_hash) {
            (Some(c), None, None, None) => check_syntax(cx.env, &Origin::Inline(cx.pos(c)), c.get_ref())?,
            (None, Some(a), Some(t), Some(h)) => {
                for f in [a, t, h] {
                    check_syntax(cx.env, &Origin::Inline(cx.pos(f)), f.get_ref())?;
                }
            }
            (Some(c), ..) => {
                return Err(cx.err(
                    c,
                    "give either `config` (a JoinConfiguration) or `api_server`, `token` and `ca_cert_hash`, not both",
                ))
            }
            (None, a, ..) => {
                let at = a.as_ref().or(self.token.as_ref()).or(self.ca_cert_hash.as_ref());
                let msg = "a kubeadm_join step needs `api_server`, `token` and `ca_cert_hash` (or `config`)";
                return Err(match at {
                    Some(f) => cx.err(f, msg),
                    None => ConfigError(format!("{}: {msg}", cx.file.display())),
                });
            }
        }
        for a in &self.extra_args {
            check_syntax(cx.env, &Origin::Inline(cx.pos(a)), a.get_ref())?;
        }
        if let Some(t) = &self.timeout {
            humantime::parse_duration(t.get_ref()).map_err(|e| cx.err(t, format!("invalid timeout {:?}: {e}", t.get_ref())))?;
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<JoinStep, ConfigError> {
        let l = &cx.load;
        let r = |f: &Spanned<String>| crate::template::render(l.env, &crate::template::Origin::Inline(l.pos(f)), f.get_ref(), cx.vars);
        let token = self.token.as_ref().map(r).transpose()?;
        // The token is a secret whatever its source.
        if let Some(t) = &token {
            crate::secrets::register(t);
        }
        let config = self.config.as_ref().map(r).transpose()?;
        if let Some(c) = &config {
            // Its token line, at least.
            for line in c.lines() {
                if let Some(v) = line.trim().strip_prefix("token:") {
                    crate::secrets::register(v.trim().trim_matches('"').trim_matches('\''));
                }
            }
        }
        Ok(JoinStep {
            api_server: self.api_server.as_ref().map(r).transpose()?,
            token,
            ca_cert_hash: self.ca_cert_hash.as_ref().map(r).transpose()?,
            config,
            extra_args: self.extra_args.iter().map(r).collect::<Result<_, _>>()?,
            timeout: self
                .timeout
                .as_ref()
                .map(|t| humantime::parse_duration(t.get_ref()).expect("validated"))
                .unwrap_or(DEFAULT_TIMEOUT),
            kubelet_conf: crate::fsutil::host_path(cx.root, KUBELET_CONF).map_err(|e| ConfigError(e.to_string()))?,
            root: cx.root.to_path_buf(),
        })
    }
}

#[derive(Debug, Clone)]
pub struct JoinStep {
    pub api_server: Option<String>,
    pub token: Option<String>,
    pub ca_cert_hash: Option<String>,
    pub config: Option<String>,
    pub extra_args: Vec<String>,
    pub timeout: Duration,
    pub kubelet_conf: PathBuf,
    pub root: PathBuf,
}

impl JoinStep {
    /// kubeadm's argv; `config_path` when joining from a JoinConfiguration file.
    pub fn argv(&self, config_path: Option<&str>) -> Vec<String> {
        let mut a = vec!["kubeadm".to_string(), "join".to_string()];
        match config_path {
            Some(p) => a.extend(["--config".to_string(), p.to_string()]),
            None => {
                a.push(self.api_server.clone().unwrap_or_default());
                a.extend(["--token".to_string(), self.token.clone().unwrap_or_default()]);
                a.extend(["--discovery-token-ca-cert-hash".to_string(), self.ca_cert_hash.clone().unwrap_or_default()]);
            }
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

impl Kind for JoinStep {
    /// Joined already?
    type Observed = bool;

    fn needs_live_system(&self) -> bool {
        true
    }

    fn check(&self, _host: &Host) -> Result<bool> {
        Ok(self.kubelet_conf.exists())
    }

    fn plan(&self, joined: &bool) -> Vec<Change> {
        if *joined {
            return vec![];
        }
        let to = match (&self.api_server, &self.config) {
            (Some(a), _) => format!("joined to {a}"),
            _ => "joined (JoinConfiguration)".to_string(),
        };
        vec![Change::new("cluster", Some("not joined"), Some(to))]
    }

    fn apply(&self, _host: &Host, _joined: &bool, _changes: &[Change]) -> Result<()> {
        // A JoinConfiguration holds the token: a 0600 file from its first byte, removed after.
        let cfg_file = match &self.config {
            Some(c) => {
                let dir = crate::fsutil::host_path(&self.root, "/run/bootstrap")?;
                std::fs::create_dir_all(&dir)?;
                let mut f = tempfile::Builder::new().prefix("kubeadm-join-").suffix(".yaml").tempfile_in(&dir)?;
                std::io::Write::write_all(&mut f, c.as_bytes())?;
                Some(f)
            }
            None => None,
        };
        let argv = self.argv(cfg_file.as_ref().map(|f| f.path().to_str().unwrap_or_default()));
        let out = runner::run(&Cmd {
            argv: argv.clone(),
            timeout: Some(self.timeout),
            ..Default::default()
        })?;
        if out.success() {
            return Ok(());
        }
        // The token is registered as a secret: redaction covers the argv and kubeadm's output.
        let shown = crate::secrets::redact(&argv.join(" "));
        let tail = crate::secrets::redact(&out.tail(20));
        if out.timed_out {
            bail!("`{shown}` timed out after {:?}: {tail}", self.timeout);
        }
        bail!("`{shown}` {}: {tail}", out.describe())
    }
}
