//! `repository`: a package repository with its signing key.
//!
//! apt (Debian family): `/etc/apt/sources.list.d/NAME.sources` in deb822 form with
//! `Signed-By: /etc/apt/keyrings/NAME.asc`, and the key (ASCII-armored) in that file. dnf (RHEL
//! family): `/etc/yum.repos.d/NAME.repo` with `gpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-NAME`.
//! In sync when the files match. The key comes from the role's `files/` (`key`) or from
//! `key_url`, pinned by `key_sha256`: a key on disk whose sha256 is the pinned one is in sync
//! without a download, so a node in sync never touches the network; a download is checked
//! against the pin before anything is written. A change sets [`Host::refresh_lists`]: the next
//! package step of the run that installs refreshes its lists first.

use super::{content_diff, Change, Host, Kind, LoadCtx, PrepCtx, State};
use crate::error::ConfigError;
use crate::fetch::sha256_hex;
use crate::step::package::Manager;
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: Spanned<String>,
    pub url: Option<Spanned<String>>,
    #[serde(default)]
    pub suites: Vec<String>,
    #[serde(default)]
    pub components: Vec<String>,
    pub key: Option<Spanned<String>>,
    pub key_url: Option<Spanned<String>>,
    pub key_sha256: Option<Spanned<String>>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default)]
    pub state: State,
}

fn yes() -> bool {
    true
}

/// The largest key a `key_url` may serve.
const MAX_KEY_BYTES: u64 = 1024 * 1024;
const ARMOR: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----";

/// Letters, digits, `_`, `-` and `.`, not starting with `.`.
pub fn check_name(n: &str) -> std::result::Result<(), String> {
    if n.is_empty() || n.len() > 100 || n.starts_with('.') || !n.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(format!("invalid repository name {n:?}: letters, digits, '_', '-' and '.' (it is a file name)"));
    }
    Ok(())
}

fn one_word(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())
}

impl super::KindSpec for Spec {
    type Step = RepositoryStep;

    fn identity(&self) -> Option<String> {
        Some(self.name.get_ref().clone())
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        check_name(self.name.get_ref()).map_err(|e| cx.err(&self.name, e))?;
        if self.state == State::Absent {
            if let Some(f) = [&self.url, &self.key, &self.key_url, &self.key_sha256].into_iter().flatten().next() {
                return Err(cx.err(f, "state = \"absent\" needs only `name`"));
            }
            return Ok(());
        }
        let url = self.url.as_ref().ok_or_else(|| cx.err(&self.name, "a repository step needs `url`"))?;
        let u = url.get_ref();
        if !one_word(u) || !["https://", "http://", "file:", "s3://"].iter().any(|p| u.starts_with(p)) {
            return Err(cx.err(url, format!("invalid repository url {u:?}: expected one https://, http:// or file: URL")));
        }
        if let Some(bad) = self.suites.iter().chain(&self.components).find(|s| !one_word(s)) {
            return Err(cx.err(url, format!("invalid suite or component {bad:?}: one word each")));
        }
        match (&self.key, &self.key_url, &self.key_sha256) {
            (Some(k), None, None) => {
                let p = cx.source_path(k)?;
                let text = std::fs::read(&p).map_err(|e| cx.err(k, format!("reading {}: {e}", p.display())))?;
                if !String::from_utf8_lossy(&text).trim_start().starts_with(ARMOR) {
                    return Err(cx.err(k, format!("key {} is not an ASCII-armored public key ({ARMOR})", p.display())));
                }
            }
            (None, Some(ku), Some(sha)) => {
                let k = ku.get_ref();
                if !one_word(k) || !(k.starts_with("https://") || k.starts_with("http://")) {
                    return Err(cx.err(ku, format!("invalid key_url {k:?}: expected an https:// or http:// URL")));
                }
                if !is_sha256(sha.get_ref()) {
                    return Err(cx.err(sha, "key_sha256 must be 64 hex digits"));
                }
            }
            (None, Some(ku), None) => return Err(cx.err(ku, "`key_url` needs `key_sha256` (the key's pinned sha256)")),
            (None, None, Some(s)) => return Err(cx.err(s, "`key_sha256` goes with `key_url`")),
            (Some(k), Some(_), _) | (Some(k), _, Some(_)) => return Err(cx.err(k, "give `key` or `key_url` + `key_sha256`, not both")),
            (None, None, None) => return Err(cx.err(&self.name, "a repository step needs `key` (a file in files/) or `key_url` + `key_sha256`")),
        }
        Ok(())
    }

    fn prepare(&self, cx: &PrepCtx<'_>) -> Result<RepositoryStep, ConfigError> {
        let key = match &self.key {
            Some(k) => {
                let p = cx.load.source_path(k)?;
                Key::Bytes(std::fs::read(&p).map_err(|e| cx.load.err(k, format!("reading {}: {e}", p.display())))?)
            }
            None => match (&self.key_url, &self.key_sha256) {
                (Some(u), Some(s)) => Key::Url {
                    url: u.get_ref().clone(),
                    sha256: s.get_ref().to_ascii_lowercase(),
                },
                _ => Key::None,
            },
        };
        Ok(RepositoryStep {
            name: self.name.get_ref().clone(),
            url: self.url.as_ref().map(|u| u.get_ref().clone()).unwrap_or_default(),
            suites: self.suites.clone(),
            components: self.components.clone(),
            key,
            enabled: self.enabled,
            state: self.state,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// From the role's files/.
    Bytes(Vec<u8>),
    /// Downloaded on apply, pinned.
    Url { url: String, sha256: String },
    /// `absent`.
    None,
}

#[derive(Debug, Clone)]
pub struct RepositoryStep {
    pub name: String,
    pub url: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    pub key: Key,
    pub enabled: bool,
    pub state: State,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub manager: Manager,
    /// The `.sources`/`.repo` file.
    pub list: Option<Vec<u8>>,
    pub key: Option<Vec<u8>>,
}

impl RepositoryStep {
    /// (the source file, the key file) for a manager.
    pub fn paths(&self, m: Manager) -> (String, String) {
        let n = &self.name;
        match m {
            Manager::Apt => (format!("/etc/apt/sources.list.d/{n}.sources"), format!("/etc/apt/keyrings/{n}.asc")),
            Manager::Dnf => (format!("/etc/yum.repos.d/{n}.repo"), format!("/etc/pki/rpm-gpg/RPM-GPG-KEY-{n}")),
        }
    }

    pub fn list_content(&self, m: Manager) -> Vec<u8> {
        let (_, key) = self.paths(m);
        let n = &self.name;
        match m {
            Manager::Apt => {
                let mut s = format!("# managed by bootstrap (step repository:{n})\nTypes: deb\nURIs: {}\nSuites: {}\n", self.url, self.suites.join(" "));
                if !self.components.is_empty() {
                    s += &format!("Components: {}\n", self.components.join(" "));
                }
                s += &format!("Enabled: {}\nSigned-By: {key}\n", if self.enabled { "yes" } else { "no" });
                s.into_bytes()
            }
            Manager::Dnf => format!(
                "# managed by bootstrap (step repository:{n})\n[{n}]\nname={n}\nbaseurl={}\nenabled={}\ngpgcheck=1\ngpgkey=file://{key}\n",
                self.url,
                u8::from(self.enabled)
            )
            .into_bytes(),
        }
    }

    /// The key on disk is the wanted one.
    fn key_in_sync(&self, have: Option<&[u8]>) -> bool {
        match (&self.key, have) {
            (Key::Bytes(b), Some(h)) => b == h,
            (Key::Url { sha256, .. }, Some(h)) => &sha256_hex(h) == sha256,
            _ => false,
        }
    }

    /// The key's bytes: from the role, or downloaded and checked against the pin.
    fn key_bytes(&self) -> Result<Vec<u8>> {
        match &self.key {
            Key::Bytes(b) => Ok(b.clone()),
            Key::Url { url, sha256 } => {
                let bytes = crate::step::archive::fetch_bytes(url, MAX_KEY_BYTES).with_context(|| format!("downloading the key of repository {}", self.name))?;
                let got = sha256_hex(&bytes);
                if &got != sha256 {
                    bail!("repository {}: the key from {url} has sha256 {got}, but {sha256} is pinned (key_sha256); nothing written", self.name);
                }
                if !String::from_utf8_lossy(&bytes).trim_start().starts_with(ARMOR) {
                    bail!("repository {}: the key from {url} is not an ASCII-armored public key ({ARMOR})", self.name);
                }
                Ok(bytes)
            }
            Key::None => bail!("repository {}: no key", self.name),
        }
    }
}

impl Kind for RepositoryStep {
    type Observed = Observed;

    fn check(&self, host: &Host) -> Result<Observed> {
        let manager = Manager::for_family(&host.facts.os.family, &host.facts.os.id)?;
        if manager == Manager::Apt && self.state == State::Present && self.suites.is_empty() {
            bail!("repository {}: an apt repository needs `suites`", self.name);
        }
        let (list, key) = self.paths(manager);
        let fs = host.fs()?;
        Ok(Observed {
            manager,
            list: fs.read(&list)?,
            key: fs.read(&key)?,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let (list, key) = self.paths(o.manager);
        let mut c = Vec::new();
        if self.state == State::Absent {
            if o.list.is_some() {
                c.push(Change::new("file", Some(&list), None::<&str>));
            }
            if o.key.is_some() {
                c.push(Change::new("key", Some(&key), None::<&str>));
            }
            return c;
        }
        let want = self.list_content(o.manager);
        if o.list.as_deref() != Some(want.as_slice()) {
            c.push(Change {
                diff: Some(content_diff(&list, o.list.as_deref().unwrap_or_default(), &want)),
                ..Change::new::<&str, &str>("content", None, None)
            });
        }
        if !self.key_in_sync(o.key.as_deref()) {
            let to = match &self.key {
                Key::Bytes(b) => sha256_hex(b),
                Key::Url { sha256, .. } => sha256.clone(),
                Key::None => String::new(),
            };
            let from = o.key.as_deref().map(sha256_hex).unwrap_or_else(|| "(none)".into());
            c.push(Change::new("key", Some(format!("{key} sha256 {from}")), Some(format!("sha256 {to}"))));
        }
        c
    }

    fn apply(&self, host: &Host, o: &Observed, changes: &[Change]) -> Result<()> {
        let (list, key) = self.paths(o.manager);
        let fs = host.fs()?;
        let has = |f: &str| changes.iter().any(|c| c.field == f);
        if self.state == State::Absent {
            for p in [&list, &key] {
                if let Some(at) = fs.parent(p, false)? {
                    if at.lstat()?.is_some() {
                        at.remove_file()?;
                    }
                }
            }
        } else {
            // The key first (downloaded and checked before anything is written), then the
            // source that names it.
            if has("key") {
                let bytes = self.key_bytes()?;
                fs.write(&key, &bytes, 0o644, Some((0, 0)))?;
            }
            if has("content") {
                fs.write(&list, &self.list_content(o.manager), 0o644, Some((0, 0)))?;
            }
        }
        host.refresh_lists.set(true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(key: Key) -> RepositoryStep {
        RepositoryStep {
            name: "kubernetes".into(),
            url: "https://pkgs.k8s.io/core:/stable:/v1.31/deb/".into(),
            suites: vec!["/".into()],
            components: vec![],
            key,
            enabled: true,
            state: State::Present,
        }
    }

    #[test]
    fn files_of_both_managers() {
        let s = step(Key::Bytes(b"k".to_vec()));
        assert_eq!(
            String::from_utf8(s.list_content(Manager::Apt)).unwrap(),
            "# managed by bootstrap (step repository:kubernetes)\nTypes: deb\nURIs: https://pkgs.k8s.io/core:/stable:/v1.31/deb/\nSuites: /\nEnabled: yes\nSigned-By: /etc/apt/keyrings/kubernetes.asc\n"
        );
        let repo = String::from_utf8(s.list_content(Manager::Dnf)).unwrap();
        assert!(repo.contains("[kubernetes]\n") && repo.contains("baseurl=https://pkgs.k8s.io/") && repo.contains("enabled=1\ngpgcheck=1\ngpgkey=file:///etc/pki/rpm-gpg/RPM-GPG-KEY-kubernetes\n"), "{repo}");
        assert!(check_name("kubernetes").is_ok() && check_name("../x").is_err() && check_name(".x").is_err() && check_name("a b").is_err());
    }

    #[test]
    fn plan_table() {
        let fields = |s: &RepositoryStep, o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        let s = step(Key::Bytes(b"k".to_vec()));
        let o = |list: Option<Vec<u8>>, key: Option<&[u8]>| Observed {
            manager: Manager::Apt,
            list,
            key: key.map(<[u8]>::to_vec),
        };
        let list = Some(s.list_content(Manager::Apt));
        assert!(fields(&s, &o(list.clone(), Some(b"k"))).is_empty());
        assert_eq!(fields(&s, &o(None, None)), ["content", "key"]);
        assert_eq!(fields(&s, &o(list.clone(), Some(b"other"))), ["key"]);
        assert_eq!(fields(&s, &o(Some(b"Types: deb\n".to_vec()), Some(b"k"))), ["content"]);
        // a pinned key_url: the key on disk with the pinned sha256 is in sync (no download)
        let u = step(Key::Url {
            url: "https://example.com/k.asc".into(),
            sha256: sha256_hex(b"k"),
        });
        assert!(fields(&u, &o(list.clone(), Some(b"k"))).is_empty());
        assert_eq!(fields(&u, &o(list, Some(b"x"))), ["key"]);
        let mut a = step(Key::None);
        a.state = State::Absent;
        assert!(fields(&a, &o(None, None)).is_empty());
        assert_eq!(fields(&a, &o(Some(vec![]), Some(b"k"))), ["file", "key"]);
    }
}
