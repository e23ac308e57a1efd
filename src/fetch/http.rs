//! `https://` (and `http://`, for mirrors inside a VPC and tests) bundles with reqwest/rustls:
//! a conditional GET with the cached ETag, a size cap on the body, transient errors (network,
//! timeout, 5xx, 429) told apart from refusals (403, 404, ...).

use super::s3::{FetchError, Got};
use std::io::Read;
use std::time::Duration;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(300);

fn client() -> Result<reqwest::blocking::Client, FetchError> {
    reqwest::blocking::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| FetchError::Refused(format!("building the HTTP client: {e}")))
}

pub fn get(url: &str, etag: Option<&str>, max_bytes: u64) -> Result<Got, FetchError> {
    let mut req = client()?.get(url);
    if let Some(t) = etag {
        req = req.header(reqwest::header::IF_NONE_MATCH, t);
    }
    let resp = req.send().map_err(|e| FetchError::Unavailable(format!("{url}: {e}")))?;
    let status = resp.status();
    if status.as_u16() == 304 {
        return Ok(Got::NotModified);
    }
    if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
        return Err(FetchError::Unavailable(format!("{url}: HTTP {status}")));
    }
    if !status.is_success() {
        return Err(FetchError::Refused(format!("{url}: HTTP {status}")));
    }
    let etag = resp.headers().get(reqwest::header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut bytes = Vec::new();
    resp.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::Unavailable(format!("{url}: reading body: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(FetchError::Refused(format!("{url}: bundle is larger than {max_bytes} bytes")));
    }
    Ok(Got::Body { bytes, etag })
}

/// A companion file (`.minisig`): None on 404.
pub fn get_optional(url: &str) -> Result<Option<Vec<u8>>, FetchError> {
    match get(url, None, 1024 * 1024) {
        Ok(Got::Body { bytes, .. }) => Ok(Some(bytes)),
        Ok(Got::NotModified) => Err(FetchError::Refused(format!("{url}: unexpected 304"))),
        Err(FetchError::Refused(m)) if m.ends_with("HTTP 404 Not Found") => Ok(None),
        Err(e) => Err(e),
    }
}
