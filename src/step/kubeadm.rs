//! `kubeadm_join`: join this node to a Kubernetes cluster once. A node with
//! `/etc/kubernetes/kubelet.conf` is joined and never joined again. The token is always treated
//! as a secret: it never appears in a log, report, error or argv. kubeadm always reads it from
//! a JoinConfiguration file (mode 0600, removed after the join), never from its command line,
//! which any local user can read in `ps` while the join runs.

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
/// The JoinConfiguration kubeadm reads (0600, removed after the join; the run lock makes one
/// fixed name safe, and a name that does not change keeps the argv golden).
pub const JOIN_CONFIG: &str = "/run/bootstrap/kubeadm-join.yaml";
/// kubeadm join's flags that it accepts beside `--config` (kubeadm's `isAllowedFlag`, 1.30),
/// and every `--skip-*`. Any other must go into the JoinConfiguration (and `--config` is ours).
const MIXABLE_FLAGS: &[&str] = &[
    "ignore-preflight-errors",
    "dry-run",
    "kubeconfig",
    "node-name",
    "upload-certs",
    "print-join-command",
    "rootfs",
    "v",
    "log-file",
];

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
            if let Some(flag) = a.get_ref().strip_prefix('-').filter(|_| !a.get_ref().contains("{{")) {
                let name = flag.trim_start_matches('-').split('=').next().unwrap_or_default();
                if !MIXABLE_FLAGS.contains(&name) && !name.starts_with("skip-") {
                    return Err(cx.err(
                        a,
                        format!(
                            "kubeadm join does not take `{}` beside --config, and the join token is always passed in a \
                             JoinConfiguration (never on the command line, where `ps` shows it): set it in `config` \
                             instead; extra_args may hold {}, --skip-*",
                            a.get_ref(),
                            MIXABLE_FLAGS.iter().map(|f| format!("--{f}")).collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
            }
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
}

impl JoinStep {
    /// The JoinConfiguration kubeadm reads: the role's `config`, or one made from
    /// `api_server`, `token` and `ca_cert_hash` (values quoted as JSON strings, which YAML reads
    /// as they are, whatever they hold).
    pub fn join_config(&self) -> String {
        if let Some(c) = &self.config {
            return c.clone();
        }
        let q = |v: &Option<String>| serde_json::to_string(v.as_deref().unwrap_or_default()).unwrap_or_default();
        format!(
            "apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\ndiscovery:\n  bootstrapToken:\n    \
             apiServerEndpoint: {}\n    token: {}\n    caCertHashes:\n      - {}\n",
            q(&self.api_server),
            q(&self.token),
            q(&self.ca_cert_hash)
        )
    }

    /// kubeadm's argv: the JoinConfiguration file and the extra arguments, never the token.
    pub fn argv(&self, config_path: &str) -> Vec<String> {
        let mut a = vec!["kubeadm".to_string(), "join".to_string(), "--config".to_string(), config_path.to_string()];
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// Removes the JoinConfiguration when the join is over, whatever its outcome.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Kind for JoinStep {
    /// Joined already?
    type Observed = bool;

    fn needs_live_system(&self) -> bool {
        true
    }

    fn check(&self, host: &Host) -> Result<bool> {
        host.fs()?.exists(KUBELET_CONF)
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

    fn apply(&self, host: &Host, _joined: &bool, _changes: &[Change]) -> Result<()> {
        // The JoinConfiguration holds the token: a 0600 file from its first byte, removed after.
        // (A live-system step: the root is `/`, so the path kubeadm is given is the path written.)
        let path = crate::fsutil::host_path(&host.root, JOIN_CONFIG)?;
        let _remove = RemoveOnDrop(path.clone());
        host.fs()?.write(JOIN_CONFIG, self.join_config().as_bytes(), 0o600, None)?;
        let argv = self.argv(&path.to_string_lossy());
        let out = runner::run(&Cmd {
            argv: argv.clone(),
            timeout: Some(self.timeout),
            ..Default::default()
        })?;
        if out.success() {
            return Ok(());
        }
        // The token is registered as a secret: redaction covers kubeadm's output.
        let shown = crate::secrets::redact(&argv.join(" "));
        let tail = crate::secrets::redact(&out.tail(20));
        if out.timed_out {
            bail!("`{shown}` timed out after {:?}: {tail}", self.timeout);
        }
        bail!("`{shown}` {}: {tail}", out.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::step::KindSpec;

    #[test]
    fn the_token_goes_into_the_join_configuration_never_the_argv() {
        let step = JoinStep {
            api_server: Some("10.0.0.10:6443".into()),
            token: Some("abcdef.0123456789abcdef".into()),
            ca_cert_hash: Some("sha256:00ff".into()),
            config: None,
            extra_args: vec!["--node-name".into(), "node-1".into()],
            timeout: DEFAULT_TIMEOUT,
        };
        let argv = step.argv(JOIN_CONFIG);
        assert_eq!(argv, ["kubeadm", "join", "--config", JOIN_CONFIG, "--node-name", "node-1"]);
        let cfg = step.join_config();
        assert_eq!(
            cfg,
            "apiVersion: kubeadm.k8s.io/v1beta3\nkind: JoinConfiguration\ndiscovery:\n  bootstrapToken:\n    \
             apiServerEndpoint: \"10.0.0.10:6443\"\n    token: \"abcdef.0123456789abcdef\"\n    caCertHashes:\n      - \"sha256:00ff\"\n"
        );
        // A role's own JoinConfiguration is passed as written.
        let own = JoinStep {
            config: Some("kind: JoinConfiguration\n".into()),
            ..step
        };
        assert_eq!(own.join_config(), "kind: JoinConfiguration\n");
    }

    /// kubeadm refuses most flags beside `--config`, which it now always gets: a role that
    /// passes one is a config error at load (exit 78), not a failed join.
    #[test]
    fn extra_args_kubeadm_refuses_beside_config_are_config_errors() {
        let env = crate::template::environment();
        let check = |extra: &str| {
            let src = format!("api_server = \"a:6443\"\ntoken = \"t\"\nca_cert_hash = \"sha256:00\"\nextra_args = {extra}\n");
            let spec: Spec = toml::from_str(&src).unwrap();
            let cx = LoadCtx {
                file: std::path::Path::new("role.toml"),
                src: &src,
                role_dir: std::path::Path::new("."),
                env: &env,
            };
            spec.validate(&cx).map_err(|e| e.to_string())
        };
        assert!(check(r#"["--node-name", "{{ facts.hostname }}", "--v=5", "--skip-phases=preflight", "--ignore-preflight-errors", "all"]"#).is_ok());
        for bad in ["--cri-socket", "--config", "--token"] {
            let err = check(&format!("[\"{bad}\", \"x\"]")).unwrap_err();
            assert!(
                err.starts_with("role.toml:4:") && err.contains(&format!("`{bad}`")) && err.contains("--node-name"),
                "{err}"
            );
        }
    }
}
