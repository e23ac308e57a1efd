//! `package`: OS packages through apt (Debian family) or dnf (RHEL family), chosen from
//! os-release. One batched transaction per step; the check reads the package database only,
//! so a node in sync never touches the network.

use super::{Change, Host, Kind, LoadCtx, PrepCtx};
use crate::error::ConfigError;
use crate::runner::{self, Cmd};
use anyhow::{bail, Context as _, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use toml::Spanned;

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PkgState {
    #[default]
    Present,
    Latest,
    Absent,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// `name` or `name=version`.
    pub names: Vec<Spanned<String>>,
    #[serde(default)]
    pub state: PkgState,
}

/// How long a package transaction may take, and how long it waits for a dpkg lock held by
/// another process (unattended-upgrades at first boot).
pub const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(1800);
pub const DPKG_LOCK_WAIT: Duration = Duration::from_secs(300);
/// Package lists older than this are refreshed before an install.
const LISTS_MAX_AGE: Duration = Duration::from_secs(3600);

impl super::KindSpec for Spec {
    type Step = PackageStep;

    fn identity(&self) -> Option<String> {
        Some(self.names.iter().map(|n| n.get_ref().as_str()).collect::<Vec<_>>().join(","))
    }

    fn validate(&self, cx: &LoadCtx<'_>) -> Result<(), ConfigError> {
        if self.names.is_empty() {
            return Err(ConfigError(format!("{}: a package step needs at least one name in `names`", cx.file.display())));
        }
        for n in &self.names {
            let (name, version) = split_version(n.get_ref());
            let ok = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "+-._".contains(c))
                && version.is_none_or(|v| !v.is_empty() && v.chars().all(|c| c.is_ascii_alphanumeric() || "+-.~:_".contains(c)));
            if !ok {
                return Err(cx.err(n, format!("invalid package {:?}: expected NAME or NAME=VERSION", n.get_ref())));
            }
            if version.is_some() && self.state != PkgState::Present {
                return Err(cx.err(n, "a pinned version only makes sense with state = \"present\""));
            }
        }
        Ok(())
    }

    fn prepare(&self, _cx: &PrepCtx<'_>) -> Result<PackageStep, ConfigError> {
        Ok(PackageStep {
            packages: self
                .names
                .iter()
                .map(|n| split_version(n.get_ref()))
                .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
                .collect(),
            state: self.state,
        })
    }
}

/// Whether the installed version `have` satisfies the pin `want`. apt pins the full Debian
/// version. dnf's `name-1.0` installs any release of 1.0, so a pin there is an
/// `[EPOCH:]VERSION[-RELEASE]` matched against the installed `[EPOCH:]VERSION-RELEASE` (epoch 0
/// not written) on the parts it names.
fn pin_matches(m: Manager, have: &str, want: &str) -> bool {
    match m {
        Manager::Apt => have == want,
        Manager::Dnf => {
            let split = |s: &str| -> (String, String, Option<String>) {
                let (e, rest) = match s.split_once(':') {
                    Some((e, r)) => (e.to_string(), r),
                    None => ("0".to_string(), s),
                };
                match rest.rsplit_once('-') {
                    Some((v, r)) => (e, v.to_string(), Some(r.to_string())),
                    None => (e, rest.to_string(), None),
                }
            };
            let (he, hv, hr) = split(have);
            let (we, wv, wr) = split(want);
            he == we && hv == wv && (wr.is_none() || wr == hr)
        }
    }
}

fn split_version(s: &str) -> (&str, Option<&str>) {
    match s.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (s, None),
    }
}

#[derive(Debug, Clone)]
pub struct PackageStep {
    pub packages: Vec<(String, Option<String>)>,
    pub state: PkgState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Manager {
    Apt,
    Dnf,
}

impl Manager {
    pub fn for_family(family: &str, os_id: &str) -> Result<Manager> {
        match family {
            "debian" => Ok(Manager::Apt),
            "rhel" => Ok(Manager::Dnf),
            _ => bail!("package steps support the Debian and RHEL families; this OS ({os_id}) is neither"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub manager: Manager,
    /// Installed version of each package (absent: not installed).
    pub installed: BTreeMap<String, String>,
    /// Candidate versions, read only for `state = "latest"`.
    pub candidates: BTreeMap<String, String>,
}

fn command(argv: &[&str], env: &[(&str, &str)], timeout: Duration) -> Cmd {
    Cmd {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        cwd: None,
        timeout: Some(timeout),
        root: None,
    }
}

fn run(argv: &[&str], env: &[(&str, &str)], timeout: Duration) -> Result<runner::Output> {
    runner::run(&command(argv, env, timeout))
}

const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// A package-database query whose output is parsed: an output cut to the runner's tail would
/// silently lose the first packages' lines, so that is an error.
fn query(argv: &[&str]) -> Result<runner::Output> {
    let o = run(argv, &[], QUERY_TIMEOUT)?;
    if o.stdout_truncated {
        anyhow::bail!(
            "`{}` printed more than {} KiB; split the package list over several steps",
            argv[0],
            runner::OUTPUT_TAIL / 1024
        );
    }
    Ok(o)
}

fn installed_versions(m: Manager, names: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    match m {
        Manager::Apt => {
            let mut argv = vec!["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Status}\t${Version}\n", "--"];
            argv.extend(names);
            // Exit 1 just means some names are unknown to dpkg: not installed.
            let o = query(&argv)?;
            for line in o.stdout.lines() {
                let f: Vec<&str> = line.split('\t').collect();
                if f.len() == 3 && f[1] == "installed" {
                    out.insert(f[0].to_string(), f[2].to_string());
                }
            }
        }
        Manager::Dnf => {
            let mut argv = vec!["rpm", "-q", "--qf", "%{NAME}\t%{EPOCHNUM}:%{VERSION}-%{RELEASE}\n", "--"];
            argv.extend(names);
            let o = query(&argv)?;
            for line in o.stdout.lines() {
                if let Some((n, v)) = line.split_once('\t') {
                    out.insert(n.to_string(), v.trim_start_matches("0:").to_string());
                }
            }
        }
    }
    Ok(out)
}

fn candidate_versions(m: Manager, names: &[&str]) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    match m {
        Manager::Apt => {
            let mut argv = vec!["apt-cache", "policy", "--"];
            argv.extend(names);
            let o = query(&argv)?;
            let mut current = None;
            for line in o.stdout.lines() {
                if !line.starts_with(' ') && line.ends_with(':') {
                    current = Some(line.trim_end_matches(':').to_string());
                } else if let (Some(n), Some(c)) = (&current, line.trim().strip_prefix("Candidate: ")) {
                    if c != "(none)" {
                        out.insert(n.clone(), c.to_string());
                    }
                }
            }
        }
        Manager::Dnf => {
            // From dnf's metadata cache; a node without one (no dnf run yet) makes it once,
            // or a package installed by hand would never be seen as behind.
            let mut argv = vec!["dnf", "-q", "--cacheonly", "repoquery", "--latest-limit=1", "--qf", "%{name}\t%{evr}", "--"];
            argv.extend(names);
            let mut o = query(&argv)?;
            if !o.success() {
                tracing::info!("dnf makecache (no metadata cache for repoquery)");
                let m = run(&["dnf", "-q", "makecache"], &[], TRANSACTION_TIMEOUT)?;
                if !m.success() {
                    bail!("dnf makecache {}:\n{}", m.describe(), m.tail(15));
                }
                o = query(&argv)?;
                if !o.success() {
                    bail!("dnf repoquery {}:\n{}", o.describe(), o.tail(15));
                }
            }
            for line in o.stdout.lines() {
                if let Some((n, v)) = line.split_once('\t') {
                    out.insert(n.to_string(), v.trim_start_matches("0:").to_string());
                }
            }
        }
    }
    Ok(out)
}

/// Refresh apt's lists when there are none or they are old (never when everything is in sync:
/// apply only runs when the plan says something must change).
fn apt_update_if_stale(force: bool) -> Result<()> {
    let lists = std::path::Path::new("/var/lib/apt/lists");
    let newest = std::fs::read_dir(lists)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with("Packages"))
                .filter_map(|e| e.metadata().ok()?.modified().ok())
                .max()
        })
        .unwrap_or(None);
    let stale = newest.is_none_or(|t| t.elapsed().unwrap_or_default() > LISTS_MAX_AGE);
    if !(stale || force) {
        return Ok(());
    }
    tracing::info!("apt-get update");
    let o = apt(&["update"])?;
    if !o.success() {
        bail!("apt-get update {}:\n{}", o.describe(), o.tail(15));
    }
    Ok(())
}

fn apt(args: &[&str]) -> Result<runner::Output> {
    apt_tx(args, false)
}

/// `apt-get ARGS`; with `no_sync`, apt, dpkg and the maintainer scripts run without fsyncs
/// ([`runner::run_without_fsync`]).
fn apt_tx(args: &[&str], no_sync: bool) -> Result<runner::Output> {
    let lock_wait = DPKG_LOCK_WAIT.as_secs().to_string();
    let lock_opt = format!("DPkg::Lock::Timeout={lock_wait}");
    let mut argv = vec![
        "apt-get",
        "-q",
        "-y",
        "-o",
        &lock_opt,
        "-o",
        "Dpkg::Options::=--force-confdef",
        "-o",
        "Dpkg::Options::=--force-confold",
    ];
    argv.extend(args);
    let cmd = command(
        &argv,
        &[("DEBIAN_FRONTEND", "noninteractive"), ("APT_LISTCHANGES_FRONTEND", "none")],
        TRANSACTION_TIMEOUT,
    );
    if no_sync {
        runner::run_without_fsync(&cmd)
    } else {
        runner::run(&cmd)
    }
}

/// The state file that says a first-boot package transaction ran without fsyncs and was not
/// synced yet; it holds the package database's list from before that transaction.
pub const UNSYNCED: &str = "packages-unsynced";

/// dpkg's database of a live system.
const DPKG_STATUS: &str = "/var/lib/dpkg/status";

/// The installed packages of a dpkg status file, as `NAME:ARCH=VERSION` (paragraphs whose
/// `Status` ends in `installed`).
fn installed_of(status: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for para in status.split("\n\n") {
        let (mut name, mut arch, mut version, mut installed) = (None, None, None, false);
        for line in para.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Architecture: ") {
                arch = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.split_whitespace().nth(2) == Some("installed");
            }
        }
        if let (true, Some(n), Some(a), Some(v)) = (installed, name, arch, version) {
            out.insert(format!("{n}:{a}={v}"));
        }
    }
    out
}

/// The installed packages, one `NAME:ARCH=VERSION` line each.
fn installed_list() -> Result<String> {
    let status = std::fs::read_to_string(DPKG_STATUS).with_context(|| format!("reading {DPKG_STATUS}"))?;
    Ok(installed_of(&status).into_iter().map(|p| p + "\n").collect())
}

/// A first-boot apt transaction: apt, dpkg and the maintainer scripts run without fsyncs
/// (cloud-init runs apt under eatmydata for the same reason: the syncs are most of what a
/// first install waits for), then one sync of the local filesystems (`fsutil::sync_local_filesystems`) makes it all durable. Until that sync, a crash
/// of the machine could leave files that dpkg's database says are installed empty, and a
/// re-run trusts that database: so the database's list from before is written (synced) to
/// [`UNSYNCED`] first and removed after the sync, and a run that finds it redoes what the
/// transaction installed ([`recover_unsynced`]). Not used for removals, nor outside the first
/// boot: on a node in service every transaction keeps its syncs.
fn apt_first_boot(host: &Host, args: &[&str]) -> Result<runner::Output> {
    let state = crate::state::StateDir::new(&host.root);
    state.write(UNSYNCED, installed_list()?.as_bytes())?;
    tracing::info!("first boot: apt-get with its fsyncs suppressed (where the kernel takes the filter), one sync after it");
    let out = apt_tx(args, true);
    // Failed or not, what it wrote is made durable before the marker goes.
    crate::fsutil::sync_local_filesystems();
    state.remove(UNSYNCED)?;
    out
}

/// A run on the running system that finds [`UNSYNCED`] (the machine went down during a
/// first-boot package transaction, before its sync): finish what dpkg left half done
/// (`dpkg --configure -a`) and reinstall every package installed or changed since the list in
/// it, whose files may be empty; then sync and remove the marker. A failure fails the run
/// (the marker stays): a node whose package database cannot be trusted is not converged.
pub fn recover_unsynced(host: &Host) -> Result<()> {
    if !host.is_live() {
        return Ok(());
    }
    let state = crate::state::StateDir::new(&host.root);
    let Some(before) = state.read(UNSYNCED)? else {
        return Ok(());
    };
    let marker = state.path(UNSYNCED);
    redo_unsynced(&before, &marker)
        .with_context(|| format!("{}: repairing a first boot cut short before its packages were synced", marker.display()))?;
    state.remove(UNSYNCED)
}

fn redo_unsynced(before: &[u8], marker: &std::path::Path) -> Result<()> {
    tracing::warn!(
        "{}: a first-boot package transaction was cut short before it was synced; reinstalling what it installed",
        marker.display()
    );
    dpkg_waiting_for_lock(&["dpkg", "--force-confdef", "--force-confold", "--configure", "-a"])?;
    let before = String::from_utf8_lossy(before);
    let before: std::collections::BTreeSet<&str> = before.lines().collect();
    let now = installed_list()?;
    if now.is_empty() && !before.is_empty() {
        bail!(
            "{DPKG_STATUS} lists no installed package (it listed {} before the transaction): dpkg's database was lost; this node cannot be repaired in place",
            before.len()
        );
    }
    let mut redo: Vec<&str> = now.lines().filter(|p| !before.contains(p)).collect();
    // The crash may also have lost the database's record of the transaction and kept its
    // renames: a package the list does not show as changed, with files left empty. Every
    // package's files are checked against their hashes for that signature (an empty regular
    // file that differs from its package's; a file an image build changed is not empty).
    let emptied: Vec<String> = verify(&[])?.into_iter().filter(|b| !b.conffile && !b.missing && is_empty_file(&b.path)).map(|b| b.path).collect();
    if !emptied.is_empty() {
        tracing::warn!("files left empty: {}", emptied.join(", "));
        for owner in owners(&emptied)? {
            let known = now.lines().find(|p| p.starts_with(&format!("{owner}=")) || p.starts_with(&format!("{owner}:")));
            match known {
                Some(p) if !redo.contains(&p) => redo.push(p),
                Some(_) => {}
                None => bail!("{owner} owns a file left empty but is not installed"),
            }
        }
    }
    if redo.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = redo.iter().map(|p| p.split_once('=').map_or(*p, |(n, _)| n)).collect();
    // A reinstall of the same version keeps a conffile that differs from the package's (dpkg
    // takes it for the admin's): remove the ones the crash may have emptied, and the reinstall
    // puts the package's back (--force-confmiss). A role's own content for them is written
    // again by its steps, which run after this.
    for bad in verify(&names)?.into_iter().filter(|b| b.conffile && !b.missing) {
        let p = std::path::Path::new(&bad.path);
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(p).with_context(|| format!("removing {} (a conffile that differs from its package's)", bad.path))?;
        }
    }
    tracing::warn!("reinstalling {}", redo.join(" "));
    let args = [&["-o", "Dpkg::Options::=--force-confmiss", "install", "--reinstall", "--"][..], &redo].concat();
    let o = apt(&args)?;
    // apt says so and exits 0 when a version cannot be downloaded any more.
    if !o.success() || o.stdout.contains("is not possible, it cannot be downloaded") || o.stderr.contains("is not possible, it cannot be downloaded") {
        bail!("apt-get install --reinstall {} {}:\n{}", redo.join(" "), o.describe(), o.tail(15));
    }
    // What a crash leaves is an empty file; a file a maintainer script changed is not one.
    let left: Vec<String> = verify(&names)?.into_iter().filter(|b| !b.conffile && !b.missing && is_empty_file(&b.path)).map(|b| b.path).collect();
    if !left.is_empty() {
        bail!("after the reinstall these files are still empty and differ from their packages: {}", left.join(", "));
    }
    crate::fsutil::sync_local_filesystems();
    Ok(())
}

fn is_empty_file(path: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0)
}

/// The packages that own `paths` (`dpkg -S`), as dpkg names them (`name` or `name:arch`).
fn owners(paths: &[String]) -> Result<Vec<String>> {
    let argv: Vec<&str> = ["dpkg", "-S", "--"].into_iter().chain(paths.iter().map(String::as_str)).collect();
    let o = query(&argv)?;
    if !o.success() {
        bail!("dpkg -S {} {}:\n{}", paths.join(" "), o.describe(), o.tail(15));
    }
    Ok(parse_owners(&o.stdout))
}

/// `dpkg -S` lines: `pkg[, pkg...]: /path`; diversion lines are not ownership.
fn parse_owners(out: &str) -> Vec<String> {
    let mut owners = std::collections::BTreeSet::new();
    for line in out.lines().filter(|l| !l.starts_with("diversion by ")) {
        if let Some((pkgs, _path)) = line.split_once(": /") {
            owners.extend(pkgs.split(", ").map(|p| p.trim().to_string()).filter(|p| !p.is_empty()));
        }
    }
    owners.into_iter().collect()
}

/// A file `dpkg --verify` reports.
struct Mismatch {
    path: String,
    conffile: bool,
    missing: bool,
}

/// `dpkg --verify PACKAGES`: the files that differ from the package database's hashes (its
/// lines are `FLAGS(9) ATTR PATH`, `missing   c PATH`).
fn verify(names: &[&str]) -> Result<Vec<Mismatch>> {
    let argv = [&["dpkg", "--verify", "--"][..], names].concat();
    let o = query(&argv)?;
    if !matches!(o.code, Some(0 | 1)) || o.timed_out {
        bail!("dpkg --verify {}:\n{}", o.describe(), o.tail(15));
    }
    Ok(o.stdout.lines().filter_map(parse_verify_line).collect())
}

fn parse_verify_line(line: &str) -> Option<Mismatch> {
    let (flags, rest) = (line.get(..9)?, line.get(9..)?);
    let rest = rest.strip_prefix(' ')?;
    let (attr, path) = (rest.get(..1)?, rest.get(1..)?.strip_prefix(' ')?);
    let missing = flags.starts_with("missing");
    // A missing file's line ends with the error in parentheses.
    let path = if missing { path.rsplit_once(" (").map_or(path, |(p, _)| p) } else { path };
    Some(Mismatch {
        path: path.to_string(),
        conffile: attr == "c",
        missing,
    })
}

/// Run a dpkg command, waiting up to [`DPKG_LOCK_WAIT`] for a lock another process holds
/// (dpkg itself does not wait: it exits 2 at once).
fn dpkg_waiting_for_lock(argv: &[&str]) -> Result<()> {
    let env = [("DEBIAN_FRONTEND", "noninteractive"), ("APT_LISTCHANGES_FRONTEND", "none")];
    let deadline = std::time::Instant::now() + DPKG_LOCK_WAIT;
    loop {
        let o = run(argv, &env, TRANSACTION_TIMEOUT)?;
        if o.success() {
            return Ok(());
        }
        if o.code == Some(2) && o.stderr.contains("lock") && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_secs(1));
            continue;
        }
        bail!("{} {}:\n{}", argv.join(" "), o.describe(), o.tail(15));
    }
}

impl Kind for PackageStep {
    type Observed = Observed;

    fn needs_live_system(&self) -> bool {
        true
    }

    fn check(&self, host: &Host) -> Result<Observed> {
        let manager = Manager::for_family(&host.facts.os.family, &host.facts.os.id)?;
        let names: Vec<&str> = self.packages.iter().map(|(n, _)| n.as_str()).collect();
        let installed = installed_versions(manager, &names)?;
        let candidates = if self.state == PkgState::Latest {
            candidate_versions(manager, &names)?
        } else {
            BTreeMap::new()
        };
        Ok(Observed {
            manager,
            installed,
            candidates,
        })
    }

    fn plan(&self, o: &Observed) -> Vec<Change> {
        let mut c = Vec::new();
        for (name, version) in &self.packages {
            let have = o.installed.get(name);
            let field = format!("package:{name}");
            match self.state {
                PkgState::Absent => {
                    if let Some(v) = have {
                        c.push(Change::new(&field, Some(v), Some("absent")));
                    }
                }
                PkgState::Present => match (have, version) {
                    (None, v) => c.push(Change::new(&field, Some("absent"), Some(v.as_deref().unwrap_or("present")))),
                    (Some(h), Some(v)) if !pin_matches(o.manager, h, v) => c.push(Change::new(&field, Some(h), Some(v))),
                    _ => {}
                },
                PkgState::Latest => match (have, o.candidates.get(name)) {
                    (None, cand) => c.push(Change::new(&field, Some("absent"), Some(cand.map(String::as_str).unwrap_or("latest")))),
                    (Some(h), Some(cand)) if h != cand => c.push(Change::new(&field, Some(h), Some(cand))),
                    _ => {}
                },
            }
        }
        c
    }

    fn apply(&self, host: &Host, o: &Observed, changes: &[Change]) -> Result<()> {
        // A repository step of this run changed a source: refresh the lists once, here.
        let refresh = self.state != PkgState::Absent && host.refresh_lists.replace(false);
        let targets: Vec<String> = self
            .packages
            .iter()
            .filter(|(n, _)| changes.iter().any(|c| c.field == format!("package:{n}")))
            .map(|(n, v)| match (o.manager, v) {
                (Manager::Apt, Some(v)) => format!("{n}={v}"),
                (Manager::Dnf, Some(v)) => format!("{n}-{v}"),
                // dnf's `install name-EVR` installs or upgrades to the candidate the plan named
                // (`upgrade` refuses a package not installed).
                (Manager::Dnf, None) if self.state == PkgState::Latest => match o.candidates.get(n) {
                    Some(c) => format!("{n}-{c}"),
                    None => n.clone(),
                },
                (_, None) => n.clone(),
            })
            .collect();
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        match o.manager {
            Manager::Apt => {
                let verb = if self.state == PkgState::Absent { "remove" } else { "install" };
                if verb == "install" {
                    apt_update_if_stale(refresh)?;
                }
                let args = |verb| [&[verb, "--"][..], &targets].concat();
                let tx = |args: &[&str]| {
                    if host.first_boot && verb == "install" && host.is_live() {
                        apt_first_boot(host, args)
                    } else {
                        apt(args)
                    }
                };
                let mut out = tx(&args(verb))?;
                // A package unknown to old lists: refresh once and retry.
                if !out.success()
                    && verb == "install"
                    && (out.stderr.contains("Unable to locate package") || out.stderr.contains("has no installation candidate"))
                {
                    apt_update_if_stale(true)?;
                    out = tx(&args(verb))?;
                }
                if !out.success() {
                    bail!("apt-get {verb} {} {}:\n{}", targets.join(" "), out.describe(), out.tail(15));
                }
            }
            Manager::Dnf => {
                let verb = match self.state {
                    PkgState::Absent => "remove",
                    PkgState::Latest | PkgState::Present => "install",
                };
                let mut argv = vec!["dnf", "-y", "-q"];
                if refresh {
                    argv.push("--refresh");
                }
                argv.extend([verb, "--"]);
                argv.extend(&targets);
                let out = run(&argv, &[], TRANSACTION_TIMEOUT)?;
                if !out.success() {
                    bail!("dnf {verb} {} {}:\n{}", targets.join(" "), out.describe(), out.tail(15));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_cut_to_the_output_tail_is_an_error() {
        let big = query(&["sh", "-c", "yes 'pkg\tinstalled\t1.0' | head -c 70000"]).unwrap_err().to_string();
        assert!(big.contains("more than 64 KiB"), "{big}");
        assert_eq!(query(&["printf", "a\tinstalled\t1\n"]).unwrap().stdout, "a\tinstalled\t1\n");
    }

    fn obs(installed: &[(&str, &str)], cand: &[(&str, &str)]) -> Observed {
        let m = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        Observed {
            manager: Manager::Apt,
            installed: m(installed),
            candidates: m(cand),
        }
    }

    #[test]
    fn dpkg_search_owners() {
        let out = "hello: /usr/bin/hello\nlibc6:amd64: /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                   diversion by dash from: /bin/sh\nbase-files, dpkg: /etc\n";
        assert_eq!(parse_owners(out), ["base-files", "dpkg", "hello", "libc6:amd64"]);
    }

    #[test]
    fn dpkg_verify_lines() {
        let m = parse_verify_line("??5?????? c /etc/default/haproxy").unwrap();
        assert_eq!((m.path.as_str(), m.conffile, m.missing), ("/etc/default/haproxy", true, false));
        let m = parse_verify_line("missing   c /etc/logrotate.d/haproxy (No such file or directory)").unwrap();
        assert_eq!((m.path.as_str(), m.conffile, m.missing), ("/etc/logrotate.d/haproxy", true, true));
        let m = parse_verify_line("??5??????   /usr/bin/with space").unwrap();
        assert_eq!((m.path.as_str(), m.conffile, m.missing), ("/usr/bin/with space", false, false));
        assert!(parse_verify_line("short").is_none());
    }

    #[test]
    fn installed_packages_from_the_dpkg_status_file() {
        let status = "Package: hello\nStatus: install ok installed\nPriority: optional\nArchitecture: amd64\nVersion: 2.10-3\nDescription: x\n y\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n\n\
                      Package: half\nStatus: install ok unpacked\nArchitecture: all\nVersion: 2\n\n\
                      Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nVersion: 2.36-9+deb12u14\n";
        let got: Vec<String> = installed_of(status).into_iter().collect();
        assert_eq!(got, ["hello:amd64=2.10-3", "libc6:amd64=2.36-9+deb12u14"]);
    }

    #[test]
    fn plan_table() {
        let step = |state, pk: &[(&str, Option<&str>)]| PackageStep {
            state,
            packages: pk.iter().map(|(n, v)| (n.to_string(), v.map(str::to_string))).collect(),
        };
        let fields = |s: &PackageStep, o: &Observed| s.plan(o).into_iter().map(|c| c.field).collect::<Vec<_>>();
        let present = step(PkgState::Present, &[("a", None), ("b", Some("2"))]);
        assert!(fields(&present, &obs(&[("a", "1"), ("b", "2")], &[])).is_empty());
        assert_eq!(fields(&present, &obs(&[("b", "1")], &[])), ["package:a", "package:b"]);
        let latest = step(PkgState::Latest, &[("a", None)]);
        assert!(fields(&latest, &obs(&[("a", "2")], &[("a", "2")])).is_empty());
        assert_eq!(fields(&latest, &obs(&[("a", "1")], &[("a", "2")])), ["package:a"]);
        let absent = step(PkgState::Absent, &[("a", None)]);
        assert!(fields(&absent, &obs(&[], &[])).is_empty());
        assert_eq!(fields(&absent, &obs(&[("a", "1")], &[])), ["package:a"]);
        assert!(Manager::for_family("arch", "arch").is_err());
    }

    #[test]
    fn dnf_pins_match_on_the_parts_they_name() {
        let d = |h, w| pin_matches(Manager::Dnf, h, w);
        assert!(d("1.0-1", "1.0") && d("1.0-1", "1.0-1") && d("1.0-1", "0:1.0-1"));
        assert!(!d("1.0-1", "1.0-2") && !d("2.0-1", "1.0") && !d("1.0.1-1", "1.0"));
        assert!(d("2:1.0-1.el9", "2:1.0") && !d("2:1.0-1.el9", "1.0"));
        assert!(!pin_matches(Manager::Apt, "1.0-1", "1.0"));
    }
}
