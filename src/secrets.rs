//! Secrets: `secret("ssm:/path")` (SSM Parameter Store, decrypted, aws-sdk-ssm) and
//! `secret("file:/path")` in templates. Values are fetched once per run.
//!
//! Two nets keep them out of what the agent writes:
//! - structural (the one that counts): a step whose rendering called `secret()` is sensitive as
//!   a whole (`template::SecretCalls`, `role::prepare`): no content diff, redacted change
//!   values, a file it writes is 0600;
//! - textual (this module): every value is remembered and replaced by `<redacted>` in logs (the
//!   tracing writer), the report and last-run.json, error messages and command output. A
//!   multi-line value (a PEM key, a kubeconfig) is also remembered line by line, so a line that
//!   reappears alone (a diff's `+line`, an indented copy) is caught too. Values and lines shorter
//!   than [`MIN_REDACT_CHARS`] are not replaced in text: replacing `0` or `true` everywhere would
//!   corrupt every report and hide nothing (such a secret is still covered by the first net).

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
/// What `redact` replaces: every form of every value or line long enough, longest first.
static KNOWN: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Whole values too short to replace in text (`is_secret` still knows them).
static SHORT: Mutex<Vec<String>> = Mutex::new(Vec::new());
static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();

/// Shortest value (or line of a multi-line value, without its surrounding blanks) that is
/// replaced in text, in characters. Six: long enough that no number, `true`/`false`/`null`, or
/// short word of a report is taken for a secret; every token, key or password worth the name is
/// longer (GitLab refuses to mask variables under eight).
pub const MIN_REDACT_CHARS: usize = 6;

pub fn configure(s: Settings) {
    let _ = SETTINGS.set(s);
}

fn lock<T>(m: &'static Mutex<T>) -> std::sync::MutexGuard<'static, T> {
    // A panic while holding the lock cannot leave the lists half-changed: use them as they are.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Remember `v` as secret: the value, and each line of a multi-line value, as written and
/// JSON-escaped (as they appear inside JSON strings).
pub fn register(v: &str) {
    if v.trim().is_empty() {
        return;
    }
    let mut pieces: Vec<&str> = vec![v];
    if v.contains('\n') {
        pieces.extend(v.lines().map(str::trim));
    }
    let mut k = lock(&KNOWN);
    let mut added = false;
    for piece in pieces {
        if piece.trim().chars().count() < MIN_REDACT_CHARS {
            continue;
        }
        let escaped = serde_json::to_string(piece).unwrap_or_default();
        for form in [piece, escaped.trim_matches('"')] {
            if !form.is_empty() && !k.iter().any(|x| x == form) {
                k.push(form.to_string());
                added = true;
            }
        }
    }
    if added {
        // Longest first, so a secret that contains another is replaced whole.
        k.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }
    drop(k);
    if v.trim().chars().count() < MIN_REDACT_CHARS {
        let mut short = lock(&SHORT);
        if !short.iter().any(|x| x == v) {
            short.push(v.to_string());
        }
    }
}

/// `s` with every known secret replaced by `<redacted>`.
pub fn redact(s: &str) -> String {
    let k = lock(&KNOWN);
    let mut out = s.to_string();
    for v in k.iter() {
        if out.contains(v.as_str()) {
            out = out.replace(v.as_str(), REDACTED);
        }
    }
    out
}

/// Redact inside the strings of a JSON text (keys and values), never its structure: numbers,
/// booleans, nulls and punctuation stay what they are, so the document stays valid (and in its
/// order) whatever the secrets. `json` is what serde_json wrote.
pub fn redact_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let mut rest = json;
    while let Some(open) = rest.find('"') {
        out.push_str(&rest[..=open]);
        let body = &rest[open + 1..];
        // The closing quote: the first one not escaped by a backslash.
        let mut end = None;
        let mut escaped = false;
        for (i, c) in body.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            // Not JSON after all: fall back to redacting the rest as text.
            out.push_str(&redact(body));
            return out;
        };
        // Redact the string's text, not its escaped form, so a replacement can never cut an
        // escape sequence in two; written back escaped.
        let token = &rest[open..open + end + 2];
        match serde_json::from_str::<String>(token) {
            Ok(text) => {
                let shown = redact(&text);
                if shown == text {
                    out.push_str(&token[1..]);
                } else {
                    let escaped = serde_json::to_string(&shown).unwrap_or_else(|_| format!("\"{REDACTED}\""));
                    out.push_str(&escaped[1..]);
                }
            }
            // Not a JSON string after all: redact it as text.
            Err(_) => out.push_str(&redact(&token[1..])),
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

/// Does `s` contain a secret (or equal a short one)?
pub fn is_secret(s: &str) -> bool {
    lock(&KNOWN).iter().any(|v| s.contains(v.as_str())) || lock(&SHORT).iter().any(|v| v == s)
}

/// Resolve `ssm:/path` or `file:/path` (the error names the reference, never a value).
pub fn resolve(uri: &str) -> anyhow::Result<String> {
    let cache = CACHE.get_or_init(Default::default);
    if let Some(v) = lock(cache).get(uri) {
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
    lock(cache).insert(uri.to_string(), value.clone());
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

    /// A two-line secret (a key) changed: the diff shows each old and new line on its own, after
    /// `-`/`+`, or indented by a filter. No line survives, while lines too short to be anything
    /// but noise (and blank ones) are left alone.
    #[test]
    fn multi_line_secrets_are_redacted_line_by_line() {
        let old = "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzv";
        let new = "-----BEGIN KEY-----\nQm9vdHN0cmFwIHNlY3JldCBuZXcgbGluZQ\n\nend\n";
        register(old);
        register(new);
        let diff = "--- /etc/app/key (on host)\n+++ /etc/app/key (from role)\n@@ -1,2 +1,4 @@\n\
                    -MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\n-KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzv\n\
                    +-----BEGIN KEY-----\n+Qm9vdHN0cmFwIHNlY3JldCBuZXcgbGluZQ\n+\n+end\n";
        let shown = redact(diff);
        for line in old.lines().chain(new.lines()).filter(|l| l.len() >= MIN_REDACT_CHARS) {
            assert!(!shown.contains(line), "{line:?} leaked:\n{shown}");
        }
        assert!(shown.contains("+end\n") && shown.contains("--- /etc/app/key (on host)"), "{shown}");
        let indented = "key: |\n  MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\n  KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzv\n";
        assert_eq!(redact(indented), "key: |\n  <redacted>\n  <redacted>\n");
        // Inside JSON (a report holding the diff) as well.
        let json = serde_json::to_string(&serde_json::json!({ "diff": diff })).unwrap();
        assert!(!redact(&json).contains("KUpRKfFLfRYC9AIKjbJTWit"), "{}", redact(&json));
    }

    /// A secret as short as `0` is not replaced in text: the report (numbers, times) stays
    /// readable and valid JSON. (The step that used it is sensitive as a whole all the same.)
    #[test]
    fn a_short_secret_does_not_corrupt_text() {
        register("0");
        register("true");
        let report = r#"{"duration_ms": 10, "ok": true, "at": "2026-11-30T20:00:00Z"}"#;
        assert_eq!(redact(report), report);
        assert!(serde_json::from_str::<serde_json::Value>(&redact(report)).is_ok());
    }

    #[test]
    fn json_is_redacted_inside_strings_only() {
        register("db-pass\"word-77");
        let doc = serde_json::json!({ "a": "x db-pass\"word-77 y", "db-pass\"word-77": [1, "db-pass\"word-77"] });
        let text = serde_json::to_string_pretty(&doc).unwrap();
        let shown = redact_json(&text);
        assert!(!shown.contains("word-77"), "{shown}");
        let back: serde_json::Value = serde_json::from_str(&shown).unwrap();
        assert_eq!(back["a"], "x <redacted> y");
        assert_eq!(back["<redacted>"][1], "<redacted>");
        assert_eq!(redact_json("[1, \"open"), "[1, \"open");
        // A secret with a backslash: its replacement never leaves half an escape behind.
        register("back\\slash-9k");
        let text = serde_json::to_string(&serde_json::json!({ "a": "x back\\slash-9k\\\\ \\ y\"" })).unwrap();
        let shown = redact_json(&text);
        let back: serde_json::Value = serde_json::from_str(&shown).unwrap_or_else(|e| panic!("{e}: {shown}"));
        assert_eq!(back["a"], "x <redacted>\\\\ \\ y\"");
    }
}
