//! A small Docker Engine API client on the unix socket: blocking HTTP/1.0 exchanges (one
//! request per connection, body until EOF), which is all the `container` step needs: inspect,
//! pull, create, start, stop, remove. See README for why not bollard.

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Engine API version: Docker 20.10 (Debian 12's docker.io) speaks 1.41; later engines accept it.
const API: &str = "/v1.41";
const TIMEOUT: Duration = Duration::from_secs(120);
/// Pulls and image imports can take long on a slow registry.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(900);

#[derive(Debug, Clone)]
pub struct Docker {
    pub socket: PathBuf,
}

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> Result<Value> {
        if self.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&self.body).with_context(|| format!("Docker answered HTTP {} with a body that is not JSON", self.status))
    }

    /// The engine's error message (`{"message": …}`), else the raw body.
    pub fn message(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

impl Docker {
    /// `DOCKER_HOST=unix:///path` when set, else /var/run/docker.sock.
    pub fn from_env() -> Docker {
        let socket = std::env::var("DOCKER_HOST")
            .ok()
            .and_then(|h| h.strip_prefix("unix://").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/run/docker.sock"));
        Docker { socket }
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&Value>, timeout: Duration) -> Result<Response> {
        let mut s = UnixStream::connect(&self.socket)
            .map_err(|e| anyhow!("the Docker engine is not reachable at {}: {e} (is dockerd running?)", self.socket.display()))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        let body = body.map(|b| serde_json::to_vec(b).expect("JSON")).unwrap_or_default();
        let head = format!(
            "{method} {API}{path} HTTP/1.0\r\nHost: docker\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(&body)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .with_context(|| format!("reading Docker's answer to {method} {path} from {}", self.socket.display()))?;
        parse_response(&raw).with_context(|| format!("Docker's answer to {method} {path}"))
    }

    /// GET a JSON document; None on 404.
    pub fn get(&self, path: &str) -> Result<Option<Value>> {
        let r = self.request("GET", path, None, TIMEOUT)?;
        match r.status {
            200 => Ok(Some(r.json()?)),
            404 => Ok(None),
            s => bail!("Docker GET {path}: HTTP {s}: {}", r.message()),
        }
    }

    /// Pull `image` (`name[:tag]` or `name@sha256:…`, exactly that manifest); the progress
    /// stream's first error fails the pull.
    pub fn pull(&self, image: &str) -> Result<()> {
        let (name, tag) = pull_params(image);
        let r = self.request("POST", &format!("/images/create?fromImage={}&tag={}", enc(name), enc(tag)), None, PULL_TIMEOUT)?;
        if r.status != 200 {
            bail!("pulling image {image}: HTTP {}: {}", r.status, r.message());
        }
        for msg in serde_json::Deserializer::from_slice(&r.body).into_iter::<Value>() {
            if let Some(e) = msg.ok().and_then(|m| m["error"].as_str().map(str::to_string)) {
                bail!("pulling image {image}: {e}");
            }
        }
        Ok(())
    }
}

/// An image reference `[registry[:port]/]path[:tag][@algo:hex]`, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageRef<'a> {
    pub name: &'a str,
    pub tag: Option<&'a str>,
    /// `sha256:…`: the manifest digest the reference is pinned to.
    pub digest: Option<&'a str>,
}

pub fn parse_ref(image: &str) -> ImageRef<'_> {
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (image, None),
    };
    let (name, tag) = match rest.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (rest, None),
    };
    ImageRef { name, tag, digest }
}

/// The Engine API's `fromImage` and `tag` for a pull: a digest pulls that manifest (the tag
/// beside it is ignored, as docker does), else the tag, else `latest`.
pub fn pull_params(image: &str) -> (&str, &str) {
    let r = parse_ref(image);
    (r.name, r.digest.or(r.tag).unwrap_or("latest"))
}

/// Split a raw HTTP/1.0 answer (status line, headers, body until EOF; chunked or not).
pub fn parse_response(raw: &[u8]) -> Result<Response> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no header end"))?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line"))?;
    let mut body = raw[split + 4..].to_vec();
    if headers.lines().any(|l| l.to_ascii_lowercase().replace(' ', "") == "transfer-encoding:chunked") {
        body = dechunk(&body)?;
    }
    Ok(Response { status, body })
}

/// Percent-encode a query value.
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("bad chunked body"))?;
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).split(';').next().unwrap_or("").trim(), 16).map_err(|_| anyhow!("bad chunk size"))?;
        b = &b[nl + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len().saturating_sub(2) < size {
            bail!("truncated chunked body");
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names_and_chunks() {
        assert_eq!(pull_params("haproxy:2.6"), ("haproxy", "2.6"));
        assert_eq!(pull_params("haproxy"), ("haproxy", "latest"));
        assert_eq!(pull_params("registry:5000/team/app"), ("registry:5000/team/app", "latest"));
        assert_eq!(pull_params("registry:5000/team/app:v1"), ("registry:5000/team/app", "v1"));
        assert_eq!(enc("a/b:c"), "a%2Fb%3Ac");
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(), b"abcde");
    }

    /// Found by benches/fuzz (docker_answers): a chunk size near usize::MAX overflowed
    /// `size + 2` (a panic in debug builds, an out-of-bounds slice panic in release).
    #[test]
    fn huge_chunk_sizes_are_errors() {
        assert!(dechunk(b"ffffffffffffffff\r\nab").is_err());
        assert!(dechunk(b"fffffffffffffffe\r\nab").is_err());
        assert!(parse_response(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nab").is_err());
    }

    /// Finding 11: a digest-pinned reference pulls that digest, never `latest`.
    #[test]
    fn digest_references_pull_by_digest() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(pull_params(&format!("app@{d}")), ("app", d));
        assert_eq!(pull_params(&format!("registry:5000/team/app@{d}")), ("registry:5000/team/app", d));
        assert_eq!(pull_params(&format!("registry:5000/team/app:v1@{d}")), ("registry:5000/team/app", d));
        assert_eq!(
            parse_ref(&format!("registry:5000/team/app:v1@{d}")),
            ImageRef {
                name: "registry:5000/team/app",
                tag: Some("v1"),
                digest: Some(d)
            }
        );
    }
}
