//! `bootstrap init` on a booted node: IMDS on 169.254.169.254 and moto (S3) in the node's
//! network namespace, the bundle named by the user-data config and fetched from S3 with the
//! instance role's credentials (served by IMDS), the role applied, the agent's units
//! installed, firstboot.done written after success only.

use crate::harness::imds::ImdsServer;
use crate::harness::moto::Moto;
use crate::harness::node::Node;
use crate::harness::support::*;

/// roles-production.tar.gz of this repository's roles. The IMDS test server holds
/// 169.254.169.254:80 inside the node (on EC2 it is off-host), so haproxy listens on loopback.
fn production_bundle() -> (tempfile::TempDir, std::path::PathBuf) {
    let bundles = tempfile::tempdir().unwrap();
    let tarball = bundles.path().join("roles-production.tar.gz");
    let b = bundle_copy();
    let role = b.path().join("roles/haproxy/role.toml");
    std::fs::write(
        &role,
        std::fs::read_to_string(&role)
            .unwrap()
            .replace("frontend_bind = \"*:80\"", "frontend_bind = \"127.0.0.1:80\""),
    )
    .unwrap();
    let r = agent(&["bundle", "build", b.path().to_str().unwrap(), "-o", tarball.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    (bundles, tarball)
}

#[test]
fn init_on_a_booted_node_from_imds_and_user_data() {
    let (_bundles, tarball) = production_bundle();
    let node = Node::boot(&repo());
    node.write_config("[imds]\nenabled = true\n");
    let r = node.sh("ip addr add 169.254.169.254/32 dev lo && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let mut st = ImdsServer::instance("production-haproxy");
    st.user_data = Some("#bootstrap-config\n[bundle]\nsource = \"s3://roles/roles-${env}.tar.gz\"\ns3_endpoint = \"http://127.0.0.1:5000\"\n".into());
    st.meta.insert("placement/region".into(), "us-east-1".into());
    let _imds = ImdsServer::start_in_netns(node.leader, st);
    let moto = Moto::start_in_netns(node.leader, 5000);
    moto.put_in_netns(node.leader, "roles", None);

    // A bundle that is not there yet: init fails, and no marker is written.
    let r = node.agent(&["init"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("s3://roles/roles-production.tar.gz: HTTP 404"), "{}", r.stderr);
    assert!(!node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    moto.put_in_netns(node.leader, "roles/roles-production.tar.gz", Some(&tarball));

    let r = node.agent(&["init"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    assert_eq!(node.sh("systemctl is-active haproxy").stdout.trim(), "active");
    assert_eq!(
        node.sh("systemctl is-enabled bootstrap.timer bootstrap-firstboot.service").stdout,
        "enabled\nenabled\n"
    );
    assert_eq!(node.sh("systemctl is-active bootstrap.timer").stdout.trim(), "active");
    let unit = std::fs::read_to_string(node.merged.join("etc/systemd/system/bootstrap.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/bootstrap apply"), "{unit}");
    let rep = node.report();
    assert_eq!(rep["name"], "production-haproxy");
    assert!(rep["bundle"]["sha256"].as_str().unwrap().len() == 64);
    let f: serde_json::Value = serde_json::from_str(&node.agent(&["facts", "--format", "json"]).stdout).unwrap();
    assert_eq!(
        (f["env"].as_str(), f["service"].as_str(), f["name_source"].as_str()),
        (Some("production"), Some("haproxy"), Some("tag:Name"))
    );
    assert_eq!(f["instance_id"], "i-0123456789abcdef0");

    // init again is a no-op apply: one S3 request, answered 304.
    let before = moto.requests("GET /roles/roles-production.tar.gz").len();
    let r = node.agent(&["init", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let new = moto.requests("GET /roles/roles-production.tar.gz")[before..].to_vec();
    assert!(new.len() == 1 && new[0].ends_with("\" 304 -"), "{new:?}");
    assert_eq!(node.report()["summary"]["changed"], 0);
    assert_eq!(node.report()["bundle"]["origin"], "cache");
    // The service the timer runs converges the same way under systemd.
    let r = node.sh("systemctl start bootstrap.service; systemctl is-failed bootstrap.service; journalctl -u bootstrap.service -o cat --no-pager | tail -3");
    assert!(r.stdout.contains("haproxy: 0 changed"), "{}", r.all());
}

/// The same first boot on an instance whose metadata has no tags: the Name tag comes from
/// ec2:DescribeTags (moto), with the instance role's credentials from IMDS.
#[test]
fn init_names_the_node_from_describe_tags_when_metadata_has_no_tags() {
    let (_bundles, tarball) = production_bundle();
    let node = Node::boot(&repo());
    node.write_config("[imds]\nenabled = true\n[aws]\nec2_endpoint = \"http://127.0.0.1:5000\"\n");
    let r = node.sh("ip addr add 169.254.169.254/32 dev lo && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let moto = Moto::start_in_netns(node.leader, 5000);
    let id = moto.run_instance_in_netns(node.leader, "production-haproxy");
    let mut st = ImdsServer::instance("ignored");
    st.tags = None;
    st.meta.insert("instance-id".into(), id.clone());
    st.meta.insert("placement/region".into(), "us-east-1".into());
    st.user_data = Some("#bootstrap-config\n[bundle]\nsource = \"s3://roles/roles-${env}.tar.gz\"\ns3_endpoint = \"http://127.0.0.1:5000\"\n".into());
    let _imds = ImdsServer::start_in_netns(node.leader, st);
    moto.put_in_netns(node.leader, "roles", None);
    moto.put_in_netns(node.leader, "roles/roles-production.tar.gz", Some(&tarball));
    let r = node.agent(&["init"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.sh("systemctl is-active haproxy").stdout.trim(), "active");
    let f: serde_json::Value = serde_json::from_str(&node.agent(&["facts", "--format", "json"]).stdout).unwrap();
    assert_eq!(
        (f["name"].as_str(), f["name_source"].as_str(), f["instance_id"].as_str()),
        (Some("production-haproxy"), Some("tag:Name"), Some(id.as_str()))
    );
}

/// Issue 7, Show 3: the user_data script, run with dash inside a booted node, downloads the
/// agent (from S3 over HTTP here: moto in the node's network namespace), checks its pinned
/// sha256, installs it and runs `bootstrap init` against the IMDS and S3 test servers: the role
/// ends up applied. A wrong sha256 installs nothing.
#[test]
fn user_data_script_installs_the_agent_and_converges_the_node() {
    let (_bundles, tarball) = production_bundle();
    let script = repo().join("packaging/user-data.sh");
    assert!(std::fs::metadata(&script).unwrap().len() < 16 * 1024, "user_data must stay under 16 KB");
    let node = crate::harness::node::Node::boot_with(&repo(), &[(&repo().join("packaging"), "/srv/packaging")]);
    assert_eq!(node.sh("ip addr add 169.254.169.254/32 dev lo && echo ok").stdout.trim(), "ok");
    let mut st = ImdsServer::instance("production-haproxy");
    st.meta.insert("placement/region".into(), "us-east-1".into());
    let _imds = ImdsServer::start_in_netns(node.leader, st);
    let moto = Moto::start_in_netns(node.leader, 5000);
    moto.put_in_netns(node.leader, "roles", None);
    moto.put_in_netns(node.leader, "roles/roles-production.tar.gz", Some(&tarball));
    moto.put_in_netns(node.leader, "dist", None);
    moto.put_in_netns(node.leader, "fleet", None);
    // A public object, as a release bucket (or a presigned URL) would serve it.
    moto.put_in_netns_with(node.leader, "dist/bootstrap", Some(std::path::Path::new(bin())), &["x-amz-acl: public-read"]);
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(bin()).unwrap()))
    };
    let env = |sha: &str| {
        format!(
            "BOOTSTRAP_URL=http://127.0.0.1:5000/dist/bootstrap BOOTSTRAP_SHA256={sha} BOOTSTRAP_BIN=/usr/local/sbin/bootstrap \
             BOOTSTRAP_BUNDLE='s3://roles/roles-${{env}}.tar.gz' \
             BOOTSTRAP_REPORT_S3='s3://fleet/nodes/${{env}}/${{service}}/${{instance_id}}.json' \
             BOOTSTRAP_CONFIG='[imds]\nenabled = true' "
        )
    };
    // The bundle's S3 endpoint is the test server (on EC2 the default endpoint is right).
    node.write_config("[bundle]\ns3_endpoint = \"http://127.0.0.1:5000\"\n");

    let bad = "0".repeat(64);
    let r = node.sh(&format!("{} sh /srv/packaging/user-data.sh", env(&bad)));
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("sha256 mismatch") && r.stderr.contains("not installing"), "{}", r.all());
    assert!(!node.merged.join("usr/local/sbin/bootstrap").exists(), "nothing installed");

    let r = node.sh(&format!("{} sh /srv/packaging/user-data.sh", env(&sha)));
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("haproxy: "), "{}", r.all());
    assert!(node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    assert_eq!(node.sh("systemctl is-active haproxy").stdout.trim(), "active");
    let unit = std::fs::read_to_string(node.merged.join("etc/systemd/system/bootstrap.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/sbin/bootstrap apply"),
        "units name the installed binary: {unit}"
    );
    assert_eq!(node.report()["name"], "production-haproxy");
    // init put the node's record in S3 ([report] s3 from the script), with the instance
    // role's credentials (IMDS); `fleet status --source` reads it back.
    let id = "i-0123456789abcdef0";
    let key = format!("/fleet/nodes/production/haproxy/{id}.json");
    assert_eq!(moto.requests(&format!("PUT {key}")).len(), 1, "{:?}", moto.requests("PUT /fleet"));
    let r = node.agent(&["fleet", "status", "--source", "s3://fleet/nodes/", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let j: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout));
    let g = &j["groups"][0];
    assert_eq!(g["group"], "production-haproxy", "{j:#}");
    assert_eq!(g["nodes"][id]["status"], "ok", "{j:#}");
    assert_eq!(g["nodes"][id]["instance_id"], id, "{j:#}");
}

/// Issue 14, finding 6: a reboot is needed at first boot (and allowed). `init` installs the
/// agent's units and writes firstboot.done before it reboots, so the node comes back with its
/// timer, skips the firstboot unit, and its next apply releases the reboot slot.
#[test]
fn init_installs_its_units_before_a_first_boot_reboot() {
    let etcd = crate::harness::etcd::Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    let id = node.machine_id();
    node.write_config(&format!(
        "[bundle]\nsource = \"/srv/bundle\"\n[naming]\nname = \"production-web\"\n[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n",
        etcd.endpoints()[0]
    ));
    assert!(node.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    let _ = node.agent(&["init"]);
    assert_eq!(node.wait_exit(std::time::Duration::from_secs(60)), 133, "init rebooted");
    let holders = || etcd.holders("production-web");
    assert_eq!(holders(), std::slice::from_ref(&id));
    for f in [
        "etc/systemd/system/bootstrap.timer",
        "etc/systemd/system/bootstrap.service",
        "etc/systemd/system/bootstrap-firstboot.service",
        "var/lib/bootstrap/firstboot.done",
    ] {
        assert!(node.merged.join(f).exists(), "rebooted before {f} was written");
    }
    node.boot_again();
    assert_eq!(
        node.sh("systemctl is-enabled bootstrap.timer bootstrap-firstboot.service; systemctl is-active bootstrap.timer")
            .stdout,
        "enabled\nenabled\nactive\n"
    );
    // The timer's service releases the slot after the healthy boot.
    let r = node.sh("systemctl start bootstrap.service && echo ok");
    assert!(
        r.stdout.contains("ok"),
        "{}",
        node.sh("journalctl -u bootstrap.service -o cat --no-pager").stdout
    );
    assert_eq!(node.report()["reboot"]["action"], "released");
    assert!(holders().is_empty());
}

/// Review of the trust fixes: when `init` cannot install its units, it must not have taken a
/// reboot slot and drained the node first (nothing would run `apply` to give the slot back).
/// Here the timer's unit file cannot be written (a directory holds its name): the run fails,
/// no pre-reboot hook ran, no slot is held, no reboot.
#[test]
fn init_that_cannot_install_its_units_takes_no_slot_and_runs_no_hook() {
    let etcd = crate::harness::etcd::Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n")]);
    let mut node = Node::boot_host_net(b.path());
    node.write_config(&format!(
        "[bundle]\nsource = \"/srv/bundle\"\n[naming]\nname = \"production-web\"\n[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\n[[reboot.pre_hook]]\ncommand = [\"touch\", \"/hook-ran\"]\n",
        etcd.endpoints()[0]
    ));
    let s = node.sh("touch /run/reboot-required && mkdir -p /etc/systemd/system/bootstrap.timer && echo ok");
    assert!(s.stdout.contains("ok"), "{}", s.all());
    let boot = node.boot_id();
    let r = node.agent(&["init"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("bootstrap.timer"), "the error names the unit\n{}", r.all());
    assert!(!node.merged.join("hook-ran").exists(), "the node was drained before its units were installed");
    assert!(etcd.holders("production-web").is_empty(), "a slot was taken");
    assert!(!node.merged.join("var/lib/bootstrap/firstboot.done").exists());
    assert!(node.still_up(&boot), "the node rebooted");
}

/// Issue 18: the report of an `init` run says `init` (it said `apply`), in last-run.json and
/// on stdout; an `apply` after it says `apply`.
#[test]
fn init_report_says_init() {
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"x\\n\"\n",
    )]);
    let node = Node::boot(b.path());
    node.write_config("[bundle]\nsource = \"/srv/bundle\"\n[naming]\nname = \"production-web\"\n");
    let r = node.agent(&["init", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let shown: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(shown["command"], "init", "{}", r.stdout);
    let rep = node.report();
    assert_eq!(rep["command"], "init", "{rep}");
    assert_eq!(rep["summary"]["changed"], 1, "{rep}");
    let r = node.agent(&["apply", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.report()["command"], "apply");
}

/// Issue 18: at first boot, apt, dpkg and the maintainer scripts run without fsyncs (one
/// seccomp filter more, seen by dpkg's own hook), synced once after; runs after the first boot
/// keep their syncs. A machine that went down before that sync (the marker left with the list
/// from before, a program and a conffile of the packages empty, another conffile gone) is
/// repaired by the next run: what the transaction installed is reinstalled, its conffiles put
/// back, and the run after that changes nothing. A lost package database fails the run.
#[test]
fn first_boot_installs_packages_without_fsyncs_and_a_crash_before_the_sync_is_redone() {
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"package\"\nnames = [\"hello\", \"haproxy\"]\n",
    )]);
    let node = Node::boot(b.path());
    node.write_config("[bundle]\nsource = \"/srv/bundle\"\n[naming]\nname = \"production-web\"\n");
    let r = node.sh(
        "echo 'DPkg::Pre-Invoke {\"sed -n s/^Seccomp_filters:[[:space:]]*//p /proc/self/status >> /filters.log\";};' > /etc/apt/apt.conf.d/99filters && echo ok",
    );
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let filters = || -> Vec<u32> {
        std::fs::read_to_string(node.merged.join("filters.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().unwrap())
            .collect()
    };
    let marker = node.merged.join("var/lib/bootstrap/packages-unsynced");
    let installed = "dpkg-query -W -f '${db:Status-Status} ${Package}:${Architecture}=${Version}\\n' | awk '$1 == \"installed\" {print $2}'";
    let before = node.sh(installed).stdout;
    assert!(before.contains("libc6:"), "{before}");

    let r = node.agent(&["init"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.sh("hello").stdout, "Hello, world!\n");
    assert!(!marker.exists());
    let first = filters();
    assert_eq!(first.len(), 1, "{first:?}");

    // After the first boot: the same install keeps its syncs.
    let r = node.sh("apt-get remove -y -q hello >/dev/null 2>&1 && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    std::fs::remove_file(node.merged.join("filters.log")).unwrap();
    let r = node.agent(&["apply"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let later = filters();
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(later[0] + 1, first[0], "the first boot's dpkg had one filter more: {first:?} {later:?}");

    // The machine went down during a first boot before the sync: the marker holds the packages
    // from before, hello's program and one of haproxy's conffiles are empty, another is gone.
    let default = node.merged.join("etc/default/haproxy");
    let want_default = std::fs::read(&default).unwrap();
    std::fs::write(&marker, &before).unwrap();
    let r = node.sh(": > /usr/bin/hello && : > /etc/default/haproxy && rm /etc/logrotate.d/haproxy && rm /var/lib/bootstrap/firstboot.done && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    assert_ne!(node.sh("hello").stdout, "Hello, world!\n");
    let r = node.agent(&["init"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("reinstalling") && r.all().contains("hello:amd64=2.10-3"), "{}", r.all());
    assert_eq!(node.sh("hello").stdout, "Hello, world!\n");
    assert_eq!(std::fs::read(&default).unwrap(), want_default, "the emptied conffile is the package's again");
    assert!(node.merged.join("etc/logrotate.d/haproxy").exists());
    assert_eq!(node.sh("dpkg --verify hello haproxy").stdout, "");
    assert!(!marker.exists());
    assert_eq!(node.report()["summary"]["changed"], 0, "{}", node.report());
    let r = node.agent(&["apply", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());

    // A crash that lost the database's record of the transaction but not its renames: the
    // list from before is the list now, and hello's program is empty. The repair finds the
    // emptied file in every package's hashes and reinstalls its package.
    let now = node.sh(installed).stdout;
    std::fs::write(&marker, &now).unwrap();
    let r = node.sh(": > /usr/bin/hello && rm /var/lib/bootstrap/firstboot.done && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let r = node.agent(&["init"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(node.sh("hello").stdout, "Hello, world!\n", "{}", r.all());
    assert!(!marker.exists());

    // A crash that lost dpkg's database (its status file empty): the run fails, naming the
    // marker, which stays for the operator.
    std::fs::write(&marker, &before).unwrap();
    std::fs::write(node.merged.join("var/lib/dpkg/status"), "").unwrap();
    let r = node.agent(&["apply"]);
    assert_ne!(r.code, 0, "{}", r.all());
    assert!(r.all().contains("packages-unsynced"), "the error names the marker\n{}", r.all());
    assert!(r.all().contains("dpkg's database was lost"), "{}", r.all());
    assert!(marker.exists(), "{}", r.all());
}

/// Whether the temp file of `name` (`.NAME.bootstrap-tmp…`, created with O_CREAT) was fsynced
/// before its descriptor was used for another open; None when the trace has no such temp file.
fn temp_fsynced(trace: &str, name: &str) -> Option<bool> {
    let lines: Vec<&str> = trace.lines().collect();
    let tmp = format!(".{name}.bootstrap-tmp");
    let at = lines.iter().position(|l| l.contains("openat(") && l.contains(&tmp) && l.contains("O_CREAT"))?;
    let (pid, fd) = (lines[at].split_whitespace().next()?, lines[at].rsplit("= ").next()?.trim());
    let mine = lines[at + 1..].iter().filter(|l| l.split_whitespace().next() == Some(pid));
    for l in mine {
        if l.contains(&format!("fsync({fd})")) {
            return Some(true);
        }
        if l.contains("openat(") && l.rsplit("= ").next().map(str::trim) == Some(fd) {
            break;
        }
    }
    Some(false)
}

/// Issue 18: at first boot, a file the role owns is written without fsyncs and the run makes
/// it durable with one sync (syncfs of the local filesystems) before `firstboot.done`; a file the role only edits (`line`)
/// keeps its fsync; after the first boot every write fsyncs again.
#[test]
fn first_boot_writes_owned_files_without_fsyncs_and_syncs_once() {
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web/app.conf\"\ncontent = \"one\\n\"\n\
         [[step]]\nkind = \"line\"\npath = \"/etc/web/edited.conf\"\nline = \"x = 1\"\n",
    )]);
    let node = Node::boot(b.path());
    node.write_config("[bundle]\nsource = \"/srv/bundle\"\n[naming]\nname = \"production-web\"\n");
    let r = node.sh("mkdir -p /etc/web && echo 'keep = 1' > /etc/web/edited.conf && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("strace.log");
    let trace = &["openat", "fsync", "fdatasync", "sync", "syncfs"];

    let r = node.agent_traced(&["init"], &[], trace, &log);
    assert_eq!(r.code, 0, "{}", r.all());
    let t = std::fs::read_to_string(&log).unwrap();
    assert_eq!(temp_fsynced(&t, "app.conf"), Some(false), "{t}");
    assert_eq!(temp_fsynced(&t, "edited.conf"), Some(true), "{t}");
    // One sync of the local filesystems (syncfs, not sync(), which would wait for NFS too).
    assert_eq!(t.lines().filter(|l| l.contains(" sync()")).count(), 0, "{t}");
    assert!(t.lines().any(|l| l.contains(" syncfs(")), "{t}");
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/web/app.conf")).unwrap(), "one\n");
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/web/edited.conf")).unwrap(), "keep = 1\nx = 1\n");
    assert!(node.merged.join("var/lib/bootstrap/firstboot.done").exists());

    // After the first boot: the same writes fsync, and no sync() is needed.
    let r = node.sh("echo drift > /etc/web/app.conf && echo 'keep = 1' > /etc/web/edited.conf && echo ok");
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let r = node.agent_traced(&["apply"], &[], trace, &log);
    assert_eq!(r.code, 0, "{}", r.all());
    let t = std::fs::read_to_string(&log).unwrap();
    assert_eq!(temp_fsynced(&t, "app.conf"), Some(true), "{t}");
    assert_eq!(temp_fsynced(&t, "edited.conf"), Some(true), "{t}");
    assert_eq!(t.lines().filter(|l| l.contains(" sync()") || l.contains(" syncfs(")).count(), 0, "{t}");
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/web/app.conf")).unwrap(), "one\n");
}
