//! Secrets: `secret("ssm:/path")` (SSM Parameter Store, decrypted, aws-sdk-ssm) and
//! `secret("file:/path")` in templates. Every value fetched is remembered for this process and
//! replaced by `<redacted>` wherever the agent writes text: logs (the tracing writer), the
//! report and last-run.json, error messages, plan diffs. Values are fetched once per run.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

pub const REDACTED: &str = "<redacted>";

/// Where SSM is (agent config `[aws] ssm_endpoint`, the instance's region).
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub ssm_endpoint: Option<String>,
    pub region: Option<String>,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();
static KNOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();

pub fn configure(s: Settings) {
    let _ = SETTINGS.set(s);
}

/// Remember `v` as secret (and its JSON-escaped form, as it appears inside JSON strings).
pub fn register(v: &str) {
    if v.is_empty() {
        return;
    }
    let mut k = KNOWN.lock().expect("secrets lock");
    for form in [v.to_string(), serde_json::to_string(v).expect("JSON").trim_matches('"').to_string()] {
        if !k.contains(&form) {
            k.push(form);
        }
    }
    // Longest first, so a secret that contains another is replaced whole.
    k.sort_by_key(|s| std::cmp::Reverse(s.len()));
}

/// `s` with every known secret replaced by `<redacted>`.
pub fn redact(s: &str) -> String {
    let k = KNOWN.lock().expect("secrets lock");
    let mut out = s.to_string();
    for v in k.iter() {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), REDACTED);
        }
    }
    out
}

/// Does `s` contain a secret?
pub fn is_secret(s: &str) -> bool {
    KNOWN.lock().expect("secrets lock").iter().any(|v| s.contains(v.as_str()))
}

/// Resolve `ssm:/path` or `file:/path` (the error names the reference, never a value).
pub fn resolve(uri: &str) -> anyhow::Result<String> {
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = cache.lock().expect("cache").get(uri) {
        return Ok(v.clone());
    }
    let value = if let Some(path) = uri.strip_prefix("file:") {
        let v = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("secret {uri:?}: {e}"))?;
        v.strip_suffix('\n').map(str::to_string).unwrap_or(v)
    } else if let Some(name) = uri.strip_prefix("ssm:") {
        ssm_get(name).map_err(|e| anyhow::anyhow!("secret {uri:?}: {e:#}"))?
    } else {
        anyhow::bail!("secret {uri:?}: use ssm:/path or file:/path");
    };
    register(&value);
    cache.lock().expect("cache").insert(uri.to_string(), value.clone());
    Ok(value)
}

fn ssm_get(name: &str) -> anyhow::Result<String> {
    let s = SETTINGS.get().cloned().unwrap_or_default();
    let sdk = crate::aws::sdk_config(s.region.as_deref());
    let mut b = aws_sdk_ssm::config::Builder::from(&sdk);
    if let Some(e) = &s.ssm_endpoint {
        b = b.endpoint_url(e);
    }
    let client = aws_sdk_ssm::Client::from_conf(b.build());
    let out = crate::aws::runtime()
        .block_on(client.get_parameter().name(name).with_decryption(true).send())
        .map_err(|e| anyhow::anyhow!("SSM GetParameter: {}", aws_sdk_ssm::error::DisplayErrorContext(&e)))?;
    out.parameter
        .and_then(|p| p.value)
        .ok_or_else(|| anyhow::anyhow!("SSM GetParameter returned no value"))
}

/// A `Write` that redacts secrets from what passes through (the log writer).
pub struct Redacting<W: std::io::Write>(pub W);

impl<W: std::io::Write> std::io::Write for Redacting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        register("s3cr\"et-token");
        assert_eq!(redact("token=s3cr\"et-token!"), "token=<redacted>!");
        let json = serde_json::to_string(&serde_json::json!({ "t": "s3cr\"et-token" })).unwrap();
        assert!(!redact(&json).contains("et-token"), "{json}");
        assert!(is_secret("x s3cr\"et-token"));
        assert!(!is_secret("nothing"));
    }
}
