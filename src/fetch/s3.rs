//! S3 bundles with aws-sdk-s3: the default credential chain, an endpoint override for tests,
//! a conditional GET with the cached ETag (an unchanged bundle costs one request and no body),
//! and a streaming sha256 with a size cap.

use super::sha256_hex;
use anyhow::{anyhow, Result};
use aws_sdk_s3::error::SdkError;
use sha2::{Digest, Sha256};

/// How a fetch failed: the caller falls back to `last-good` only when the source is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Network error, timeout, 5xx, throttling.
    #[error("{0}")]
    Unavailable(String),
    /// 403, 404, bad request: waiting does not help.
    #[error("{0}")]
    Refused(String),
}

impl FetchError {
    pub fn is_transient(&self) -> bool {
        matches!(self, FetchError::Unavailable(_))
    }
}

pub enum Got {
    Body { bytes: Vec<u8>, etag: Option<String> },
    NotModified,
}

#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub max_bytes: u64,
}

fn client(o: &S3Options) -> aws_sdk_s3::Client {
    let shared = crate::aws::sdk_config(o.region.as_deref());
    let mut b = aws_sdk_s3::config::Builder::from(&shared);
    if let Some(e) = &o.endpoint {
        b = b.endpoint_url(e).force_path_style(true);
    }
    aws_sdk_s3::Client::from_conf(b.build())
}

use crate::aws::runtime;

fn classify<E: std::fmt::Debug + std::error::Error + 'static>(url: &str, e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> FetchError {
    match &e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let msg = format!("{url}: HTTP {status} ({})", aws_sdk_s3::error::DisplayErrorContext(&e));
            if status >= 500 || status == 429 || status == 408 {
                FetchError::Unavailable(msg)
            } else {
                FetchError::Refused(msg)
            }
        }
        SdkError::ResponseError(r) if r.raw().status().as_u16() >= 500 => FetchError::Unavailable(format!("{url}: HTTP {}", r.raw().status().as_u16())),
        SdkError::ConstructionFailure(_) => FetchError::Refused(format!("{url}: {}", aws_sdk_s3::error::DisplayErrorContext(&e))),
        _ => FetchError::Unavailable(format!("{url}: {}", aws_sdk_s3::error::DisplayErrorContext(&e))),
    }
}

/// GET s3://bucket/key, conditional on `etag` when given.
pub fn get(o: &S3Options, bucket: &str, key: &str, etag: Option<&str>) -> Result<Got, FetchError> {
    let url = format!("s3://{bucket}/{key}");
    let c = client(o);
    runtime().block_on(async {
        let mut req = c.get_object().bucket(bucket).key(key);
        if let Some(t) = etag {
            req = req.if_none_match(t);
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                if let SdkError::ServiceError(se) = &e {
                    if se.raw().status().as_u16() == 304 {
                        return Ok(Got::NotModified);
                    }
                }
                return Err(classify(&url, e));
            }
        };
        let etag = resp.e_tag().map(str::to_string);
        let mut body = resp.body;
        let mut bytes = Vec::new();
        let mut hasher = Sha256::new();
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| FetchError::Unavailable(format!("{url}: reading body: {e}")))?
        {
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
            if bytes.len() as u64 > o.max_bytes {
                return Err(FetchError::Refused(format!("{url}: bundle is larger than {} bytes", o.max_bytes)));
            }
        }
        debug_assert_eq!(hex::encode(hasher.finalize()), sha256_hex(&bytes));
        Ok(Got::Body { bytes, etag })
    })
}

/// GET an optional companion object (`.minisig`): None on 404.
pub fn get_optional(o: &S3Options, bucket: &str, key: &str) -> Result<Option<Vec<u8>>, FetchError> {
    match get(o, bucket, key, None) {
        Ok(Got::Body { bytes, .. }) => Ok(Some(bytes)),
        Ok(Got::NotModified) => Err(FetchError::Refused(anyhow!("unexpected 304").to_string())),
        Err(FetchError::Refused(m)) if m.contains("HTTP 404") => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn parse_url(s: &str) -> Result<(String, String)> {
    let rest = s.strip_prefix("s3://").ok_or_else(|| anyhow!("not an s3:// URL"))?;
    match rest.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok((b.to_string(), k.to_string())),
        _ => Err(anyhow!("{s}: expected s3://BUCKET/KEY")),
    }
}

/// PUT `body` at s3://bucket/key (`content_type`), within `timeout` overall (credentials,
/// connect, retries): a best-effort writer never waits longer.
pub fn put(o: &S3Options, bucket: &str, key: &str, body: Vec<u8>, content_type: &str, timeout: std::time::Duration) -> Result<(), FetchError> {
    let url = format!("s3://{bucket}/{key}");
    let c = client(o);
    runtime().block_on(async {
        let req = c
            .put_object()
            .bucket(bucket)
            .key(key)
            .content_type(content_type)
            .body(aws_sdk_s3::primitives::ByteStream::from(body))
            .send();
        match tokio::time::timeout(timeout, req).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(classify(&url, e)),
            Err(_) => Err(FetchError::Unavailable(format!(
                "{url}: no answer within {}",
                humantime::format_duration(timeout)
            ))),
        }
    })
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: String,
    pub size: u64,
}

/// The objects under `prefix` (ListObjectsV2, page by page), at most `limit`; the bool says
/// whether more were left out.
pub fn list(o: &S3Options, bucket: &str, prefix: &str, limit: usize) -> Result<(Vec<Listed>, bool), FetchError> {
    let url = format!("s3://{bucket}/{prefix}");
    let c = client(o);
    runtime().block_on(async {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = c
                .list_objects_v2()
                .bucket(bucket)
                .prefix(prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify(&url, e))?;
            for obj in resp.contents() {
                if out.len() >= limit {
                    return Ok((out, true));
                }
                if let Some(k) = obj.key() {
                    out.push(Listed {
                        key: k.to_string(),
                        size: obj.size().unwrap_or(0).max(0) as u64,
                    });
                }
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok((out, false)),
            }
        }
    })
}

/// GET each of `keys` in `bucket`, `parallel` at a time, each at most `o.max_bytes` (larger is
/// an error, the body is not read further): the answers in the order of `keys`.
pub fn get_many(o: &S3Options, bucket: &str, keys: &[String], parallel: usize) -> Vec<Result<Vec<u8>, FetchError>> {
    let c = client(o);
    let max = o.max_bytes;
    runtime().block_on(async {
        let mut results: Vec<Option<Result<Vec<u8>, FetchError>>> = keys.iter().map(|_| None).collect();
        let mut set = tokio::task::JoinSet::new();
        let mut next = 0;
        loop {
            while next < keys.len() && set.len() < parallel.max(1) {
                let (c, bucket, key, i) = (c.clone(), bucket.to_string(), keys[next].clone(), next);
                set.spawn(async move { (i, get_capped(&c, &bucket, &key, max).await) });
                next += 1;
            }
            match set.join_next().await {
                Some(Ok((i, r))) => results[i] = Some(r),
                Some(Err(e)) => tracing::warn!("s3://{bucket}: a read task ended: {e}"),
                None => break,
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(FetchError::Unavailable("not read".into()))))
            .collect()
    })
}

async fn get_capped(c: &aws_sdk_s3::Client, bucket: &str, key: &str, max: u64) -> Result<Vec<u8>, FetchError> {
    let url = format!("s3://{bucket}/{key}");
    let resp = c.get_object().bucket(bucket).key(key).send().await.map_err(|e| classify(&url, e))?;
    let mut body = resp.body;
    let mut bytes = Vec::new();
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|e| FetchError::Unavailable(format!("{url}: reading body: {e}")))?
    {
        bytes.extend_from_slice(&chunk);
        if bytes.len() as u64 > max {
            return Err(FetchError::Refused(format!("{url}: larger than {max} bytes")));
        }
    }
    Ok(bytes)
}
