//! IMDSv2 client: a session token from `PUT /latest/api/token`, GETs with the token header, a
//! 401 refreshes the token once, 404 means absent, and transient failures (connect, timeout,
//! 5xx, 429) retry with capped exponential backoff and jitter inside an overall deadline.

use anyhow::{anyhow, bail, Context, Result};
use rand::Rng;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub const DEFAULT_BASE_URL: &str = "http://169.254.169.254";
pub const TOKEN_TTL_SECS: u32 = 21600;
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// First boot waits longer for the metadata service than a timer run does.
pub const FIRST_BOOT_DEADLINE: Duration = Duration::from_secs(120);
pub const TIMER_DEADLINE: Duration = Duration::from_secs(10);
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

pub struct Imds {
    base: String,
    client: reqwest::blocking::Client,
    token: RefCell<Option<String>>,
    deadline: Instant,
    budget: Duration,
}

enum Retry {
    Transient(String),
    Fatal(anyhow::Error),
}

enum Attempt {
    Done(Option<String>),
    Unauthorized,
    Transient(String),
}

impl Imds {
    pub fn new(base_url: &str, budget: Duration) -> Result<Imds> {
        let client = reqwest::blocking::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            // Instance metadata is plain HTTP: no trust store to read from disk on every run.
            .tls_built_in_root_certs(!base_url.starts_with("http://"))
            .build()
            .context("building the IMDS HTTP client")?;
        Ok(Imds {
            base: base_url.trim_end_matches('/').to_string(),
            client,
            token: RefCell::new(None),
            deadline: Instant::now() + budget,
            budget,
        })
    }

    /// Run `f` until it is done, retrying transient failures until the deadline.
    fn retry<T>(&self, what: &str, mut f: impl FnMut() -> Result<T, Retry>) -> Result<T> {
        let mut delay = BACKOFF_START;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(Retry::Fatal(e)) => return Err(e),
                Err(Retry::Transient(why)) => {
                    let now = Instant::now();
                    if now >= self.deadline {
                        bail!(
                            "instance metadata service at {} did not answer {what} within {}s: {why}",
                            self.base,
                            self.budget.as_secs()
                        );
                    }
                    let jitter = rand::rng().random_range(0..=delay.as_millis() as u64 / 2);
                    let sleep = (delay + Duration::from_millis(jitter)).min(self.deadline - now);
                    tracing::debug!("IMDS {what}: {why}; retrying in {sleep:?}");
                    std::thread::sleep(sleep);
                    delay = (delay * 2).min(BACKOFF_CAP);
                }
            }
        }
    }

    fn fetch_token(&self) -> Result<String> {
        let url = format!("{}/latest/api/token", self.base);
        self.retry("the token request", || {
            let resp = self
                .client
                .put(&url)
                .header("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL_SECS.to_string())
                .send()
                .map_err(|e| Retry::Transient(e.to_string()))?;
            let status = resp.status();
            if status.is_success() {
                return resp.text().map_err(|e| Retry::Transient(e.to_string()));
            }
            if status.is_server_error() || status.as_u16() == 429 {
                return Err(Retry::Transient(format!("HTTP {status}")));
            }
            // 403 (IMDS disabled) and the like do not get better by waiting.
            Err(Retry::Fatal(anyhow!("PUT {url}: HTTP {status}")))
        })
    }

    fn token(&self, refresh: bool) -> Result<String> {
        if refresh || self.token.borrow().is_none() {
            let t = self.fetch_token()?;
            *self.token.borrow_mut() = Some(t);
        }
        Ok(self.token.borrow().clone().expect("set above"))
    }

    fn attempt(&self, url: &str, token: &str) -> Attempt {
        let resp = match self.client.get(url).header("X-aws-ec2-metadata-token", token).send() {
            Ok(r) => r,
            Err(e) => return Attempt::Transient(e.to_string()),
        };
        let status = resp.status();
        match status.as_u16() {
            200..=299 => match resp.text() {
                Ok(t) => Attempt::Done(Some(t)),
                Err(e) => Attempt::Transient(e.to_string()),
            },
            404 => Attempt::Done(None),
            401 => Attempt::Unauthorized,
            429 | 500..=599 => Attempt::Transient(format!("HTTP {status}")),
            _ => Attempt::Transient(format!("unexpected HTTP {status}")),
        }
    }

    /// GET `/latest/<path>`; `None` when the service says 404.
    pub fn get(&self, path: &str) -> Result<Option<String>> {
        let url = format!("{}/latest/{}", self.base, path.trim_start_matches('/'));
        let mut refreshed = false;
        let mut token = self.token(false)?;
        loop {
            let r = self.retry(path, || match self.attempt(&url, &token) {
                Attempt::Done(v) => Ok(Some(v)),
                Attempt::Unauthorized => Ok(None),
                Attempt::Transient(why) => Err(Retry::Transient(why)),
            })?;
            match r {
                Some(v) => return Ok(v),
                // 401: the token expired; one refresh, then it is an error.
                None if !refreshed => {
                    refreshed = true;
                    token = self.token(true)?;
                }
                None => bail!("GET {url}: HTTP 401 even with a fresh token"),
            }
        }
    }

    pub fn meta(&self, path: &str) -> Result<Option<String>> {
        Ok(self.get(&format!("meta-data/{path}"))?.map(|s| s.trim().to_string()))
    }

    /// Instance tags from instance metadata, when the instance allows tags in metadata.
    pub fn tags(&self) -> Result<Option<BTreeMap<String, String>>> {
        let Some(keys) = self.meta("tags/instance")? else { return Ok(None) };
        let mut tags = BTreeMap::new();
        for k in keys.lines().map(str::trim).filter(|k| !k.is_empty()) {
            if let Some(v) = self.meta(&format!("tags/instance/{k}"))? {
                tags.insert(k.to_string(), v);
            }
        }
        Ok(Some(tags))
    }
}
