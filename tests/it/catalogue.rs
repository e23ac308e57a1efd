//! The node catalogue's kinds on a booted node (`sysctl`, `kernel_module`, `line`,
//! `authorized_keys`, `hostname`): the first apply changes the node, the second changes
//! nothing, `plan` shows a drift made by hand, a bad input exits 78 with its position and
//! touches nothing. Then all five under `--root`, where only their files are managed.

use crate::harness::node::Node;
use crate::harness::support::*;

/// Apply twice: the first run changes something (exit 2), the second nothing (exit 0).
fn converges(node: &Node, role: &str) {
    let r = node.run_role("apply", role, &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "first apply of {role} changes the node\n{}", r.all());
    let r = node.run_role("apply", role, &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "second apply of {role} changes nothing\n{}", r.all());
    assert_eq!(node.report()["summary"]["changed"], 0);
}

/// `plan --json`: (step id, field) of every change; and `plan --detailed-exitcodes` says 2.
fn drift(node: &Node, role: &str) -> (Vec<(String, String)>, serde_json::Value) {
    let r = node.run_role("plan", role, &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("plan --json: {e}\n{}", r.stdout));
    let mut out = Vec::new();
    for s in doc["steps"].as_array().unwrap() {
        for c in s["changes"].as_array().into_iter().flatten() {
            out.push((s["id"].as_str().unwrap().to_string(), c["field"].as_str().unwrap().to_string()));
        }
    }
    assert_eq!(node.run_role("plan", role, &["--detailed-exitcodes"]).code, if out.is_empty() { 0 } else { 2 });
    (out, doc)
}

/// The role is refused with exit 78 and `want` (a `role.toml:line:col: …` message), and what
/// `probe` prints on the node is the same before and after.
fn refused(node: &Node, role: &str, want: &str, probe: &str) {
    let before = node.sh(probe).all();
    for verb in ["apply", "plan"] {
        let r = node.run_role(verb, role, &[]);
        assert_eq!(r.code, 78, "{verb} {role}: exit 78 expected\n{}", r.all());
        assert!(
            r.stderr.contains(&format!("/srv/bundle/roles/{role}/{want}")),
            "{verb} {role}: want {want:?} in\n{}",
            r.stderr
        );
    }
    assert_eq!(node.sh(probe).all(), before, "{role} touched the node");
}

fn changes_of<'a>(doc: &'a serde_json::Value, id: &str) -> &'a Vec<serde_json::Value> {
    let step = doc["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {doc:#}"));
    step["changes"].as_array().unwrap()
}

#[test]
fn sysctl_persists_and_sets_the_live_value() {
    let b = bundle(&[
        (
            "roles/net/role.toml",
            "schema = 1\n[[step]]\nkind = \"sysctl\"\nname = \"net.ipv4.ip_forward\"\nvalue = 1\n\
             [[step]]\nkind = \"sysctl\"\nname = \"net.ipv4.ip_local_port_range\"\nvalue = \"20000 60999\"\n",
        ),
        (
            "roles/bridge/role.toml",
            "schema = 1\n[[step]]\nkind = \"sysctl\"\nname = \"net.ipv4.no_such_parameter_x\"\nvalue = 1\n",
        ),
        (
            "roles/typo/role.toml",
            "schema = 1\n[[step]]\nkind = \"sysctl\"\nname = \"net.ipv4.ip_forward\"\nvaule = 1\n",
        ),
        (
            "roles/badname/role.toml",
            "schema = 1\n[[step]]\nkind = \"sysctl\"\nname = \"net/ipv4/ip_forward\"\nvalue = 1\n",
        ),
        (
            "roles/novalue/role.toml",
            "schema = 1\n[[step]]\nkind = \"sysctl\"\nname = \"net.ipv4.ip_forward\"\nvalue = \"\"\n",
        ),
    ]);
    let mut node = Node::boot(b.path());
    let probe = "cat /proc/sys/net/ipv4/ip_forward; ls /etc/sysctl.d";
    // A node in its own network namespace starts with forwarding off.
    assert_eq!(node.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(), "0");
    refused(&node, "typo", "role.toml:5:1: unknown field `vaule`", probe);
    refused(&node, "badname", "role.toml:4:8: invalid sysctl name \"net/ipv4/ip_forward\"", probe);
    refused(&node, "novalue", "role.toml:5:9: invalid sysctl value \"\"", probe);

    converges(&node, "net");
    assert_eq!(node.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(), "1");
    assert_eq!(
        node.sh("sysctl -n net.ipv4.ip_local_port_range").stdout.split_whitespace().collect::<Vec<_>>(),
        ["20000", "60999"]
    );
    let conf = std::fs::read_to_string(node.merged.join("etc/sysctl.d/90-bootstrap-net.ipv4.ip_forward.conf")).unwrap();
    assert!(conf.ends_with("\nnet.ipv4.ip_forward = 1\n"), "{conf}");
    // The file is what sysctl itself loads at boot.
    let r = node.sh("sysctl -w net.ipv4.ip_forward=0 >/dev/null && sysctl -p /etc/sysctl.d/90-bootstrap-net.ipv4.ip_forward.conf");
    assert_eq!(r.stdout.trim(), "net.ipv4.ip_forward = 1", "{}", r.all());

    // Drift by hand: the live value, then the file.
    node.sh("sysctl -w net.ipv4.ip_forward=0");
    let (fields, doc) = drift(&node, "net");
    assert_eq!(fields, [("sysctl:net.ipv4.ip_forward".to_string(), "value".to_string())]);
    let c = &changes_of(&doc, "sysctl:net.ipv4.ip_forward")[0];
    assert_eq!((c["from"].as_str(), c["to"].as_str()), (Some("0"), Some("1")), "{c:#}");
    assert_eq!(node.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(), "0", "plan changed the live value");
    node.sh("sed -i 's/= 20000 60999/= 1024 65000/' /etc/sysctl.d/90-bootstrap-net.ipv4.ip_local_port_range.conf");
    let (fields, doc) = drift(&node, "net");
    assert_eq!(fields.len(), 2, "{fields:?}");
    let diff = changes_of(&doc, "sysctl:net.ipv4.ip_local_port_range")[0]["diff"].as_str().unwrap().to_string();
    assert!(
        diff.contains("-net.ipv4.ip_local_port_range = 1024 65000") && diff.contains("+net.ipv4.ip_local_port_range = 20000 60999"),
        "{diff}"
    );
    converges(&node, "net");
    assert_eq!(node.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(), "1");

    // A parameter that does not exist (as one whose module is not loaded yet): plan shows it, apply fails naming it.
    let (fields, doc) = drift(&node, "bridge");
    let id = "sysctl:net.ipv4.no_such_parameter_x".to_string();
    assert_eq!(fields, [(id.clone(), "content".to_string()), (id.clone(), "value".to_string())]);
    assert_eq!(changes_of(&doc, &id)[1]["from"], "(no such parameter)");
    let r = node.run_role("apply", "bridge", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("no such kernel parameter net.ipv4.no_such_parameter_x"), "{}", r.all());
    assert!(
        !node.merged.join("etc/sysctl.d/90-bootstrap-net.ipv4.no_such_parameter_x.conf").exists(),
        "a value the kernel refused was persisted"
    );

    // After a reboot (a fresh network namespace, forwarding off again) systemd-sysctl sets the
    // persisted values at boot, and the run finds nothing to do.
    reboot(&mut node);
    assert_eq!(node.sh("systemctl is-active systemd-sysctl").stdout.trim(), "active");
    assert_eq!(
        node.sh("cat /proc/sys/net/ipv4/ip_forward").stdout.trim(),
        "1",
        "{}",
        node.sh("systemctl status systemd-sysctl").all()
    );
    assert_eq!(
        node.sh("sysctl -n net.ipv4.ip_local_port_range").stdout.split_whitespace().collect::<Vec<_>>(),
        ["20000", "60999"]
    );
    assert_eq!(node.run_role("apply", "net", &["--detailed-exitcodes"]).code, 0);
}

fn reboot(node: &mut Node) {
    let before = node.boot_id();
    let _ = node.sh("systemctl reboot");
    assert_eq!(node.wait_exit(std::time::Duration::from_secs(60)), 133, "the node did not reboot");
    node.boot_again();
    assert_ne!(node.boot_id(), before, "same boot");
}

#[test]
fn kernel_module_files_and_loaded_state() {
    // `overlay` is loaded on this host (the node overlays are mounted with it), so the node
    // sees /sys/module/overlay; a container cannot load a module itself (no CAP_SYS_MODULE,
    // and the node image has no kmod), which the `dummy` role shows.
    assert!(std::path::Path::new("/sys/module/overlay").exists(), "the host has no overlay module loaded");
    let dummy_loaded = std::path::Path::new("/sys/module/dummy").exists();
    let b = bundle(&[
        (
            "roles/mods/role.toml",
            "schema = 1\n[[step]]\nkind = \"kernel_module\"\nname = \"overlay\"\noptions = \"metacopy=off\"\n",
        ),
        ("roles/dummy/role.toml", "schema = 1\n[[step]]\nkind = \"kernel_module\"\nname = \"dummy\"\n"),
        (
            "roles/typo/role.toml",
            "schema = 1\n[[step]]\nkind = \"kernel_module\"\nname = \"overlay\"\nparams = \"x\"\n",
        ),
        (
            "roles/badname/role.toml",
            "schema = 1\n[[step]]\nkind = \"kernel_module\"\nname = \"../../etc/x\"\n",
        ),
    ]);
    // nspawn gives a node no /sys/module; the host's, bound in, is what a real node sees.
    let node = Node::boot_with(b.path(), &[(std::path::Path::new("/sys/module"), "/sys/module")]);
    let probe = "ls /etc/modules-load.d /etc/modprobe.d";
    refused(&node, "typo", "role.toml:5:1: unknown field `params`", probe);
    refused(&node, "badname", "role.toml:4:8: invalid kernel module name \"../../etc/x\"", probe);

    converges(&node, "mods");
    assert_eq!(
        std::fs::read_to_string(node.merged.join("etc/modules-load.d/overlay.conf")).unwrap(),
        "# managed by bootstrap (step kernel_module:overlay)\noverlay\n"
    );
    assert!(std::fs::read_to_string(node.merged.join("etc/modprobe.d/overlay.conf"))
        .unwrap()
        .ends_with("\noptions overlay metacopy=off\n"));

    node.sh("rm /etc/modules-load.d/overlay.conf");
    let (fields, _) = drift(&node, "mods");
    assert_eq!(fields, [("kernel_module:overlay".to_string(), "load_file".to_string())]);
    converges(&node, "mods");

    if dummy_loaded {
        eprintln!("dummy is loaded on this host: the not-loaded path was not exercised");
        return;
    }
    // Not loaded: plan says so, and apply runs modprobe, which cannot work in this container:
    // the step fails, naming the module, and the run exits 1.
    let (fields, _) = drift(&node, "dummy");
    assert_eq!(
        fields,
        [
            ("kernel_module:dummy".into(), "load_file".into()),
            ("kernel_module:dummy".into(), "loaded".to_string())
        ]
    );
    let r = node.run_role("apply", "dummy", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("loading kernel module dummy"), "{}", r.all());
    assert_eq!(node.report()["steps"][0]["status"], "failed");
}

#[test]
fn line_replaces_the_matching_line_and_keeps_mode_and_owner() {
    let b = bundle(&[
        (
            "roles/ssh/role.toml",
            "schema = 1\n[[step]]\nkind = \"line\"\npath = \"/etc/demo/sshd_config\"\nline = \"PermitRootLogin no\"\nmatch = '^#?\\s*PermitRootLogin\\b'\n\
             [[step]]\nkind = \"line\"\npath = \"/etc/demo/sshd_config\"\nmatch = '^X11Forwarding'\nstate = \"absent\"\n",
        ),
        (
            "roles/typo/role.toml",
            "schema = 1\n[[step]]\nkind = \"line\"\npath = \"/etc/demo/sshd_config\"\nline = \"x\"\nregexp = \"x\"\n",
        ),
        (
            "roles/badre/role.toml",
            "schema = 1\n[[step]]\nkind = \"line\"\npath = \"/etc/demo/sshd_config\"\nline = \"x\"\nmatch = \"(x\"\n",
        ),
    ]);
    let node = Node::boot(b.path());
    let r = node.sh(
        "mkdir -p /etc/demo && printf 'Port 22\\n#PermitRootLogin prohibit-password\\nX11Forwarding yes\\nUsePAM yes\\n' > /etc/demo/sshd_config \
         && chown root:adm /etc/demo/sshd_config && chmod 0640 /etc/demo/sshd_config && echo ok",
    );
    assert_eq!(r.stdout.trim(), "ok", "{}", r.all());
    let probe = "stat -c '%a %U:%G' /etc/demo/sshd_config; md5sum /etc/demo/sshd_config";
    refused(&node, "typo", "role.toml:6:1: unknown field `regexp`", probe);
    refused(&node, "badre", "role.toml:6:9: invalid regular expression \"(x\"", probe);

    converges(&node, "ssh");
    assert_eq!(
        std::fs::read_to_string(node.merged.join("etc/demo/sshd_config")).unwrap(),
        "Port 22\nPermitRootLogin no\nUsePAM yes\n"
    );
    assert_eq!(node.sh("stat -c '%a %U:%G' /etc/demo/sshd_config").stdout.trim(), "640 root:adm");

    node.sh("echo 'PermitRootLogin yes' >> /etc/demo/sshd_config");
    let (fields, doc) = drift(&node, "ssh");
    let id = r"line:/etc/demo/sshd_config:^#?\s*PermitRootLogin\b";
    assert_eq!(fields, [(id.to_string(), "content".to_string())]);
    let diff = changes_of(&doc, id)[0]["diff"].as_str().unwrap().to_string();
    assert!(diff.contains("-PermitRootLogin yes"), "{diff}");
    converges(&node, "ssh");
    assert_eq!(
        std::fs::read_to_string(node.merged.join("etc/demo/sshd_config")).unwrap(),
        "Port 22\nPermitRootLogin no\nUsePAM yes\n"
    );
    assert_eq!(node.sh("stat -c '%a %U:%G' /etc/demo/sshd_config").stdout.trim(), "640 root:adm");
}

const KEY_A: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa alice@laptop";
const KEY_B: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb bob";
const KEY_C: &str = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCcccccccccccccccc carol-by-hand";

#[test]
fn authorized_keys_of_a_user() {
    let user = "schema = 1\n[[step]]\nkind = \"user\"\nname = \"deploy\"\nhome = \"/home/deploy\"\n\
                [[step]]\nkind = \"directory\"\npath = \"/home/deploy\"\nowner = \"deploy\"\nmode = \"0750\"\n";
    let keys = |exclusive: bool| {
        format!("{user}[[step]]\nkind = \"authorized_keys\"\nuser = \"deploy\"\nkeys = [\"{KEY_A}\", \"{KEY_B}\"]\nexclusive = {exclusive}\n")
    };
    let b = bundle(&[
        ("roles/keys/role.toml", &keys(false)),
        ("roles/only/role.toml", &keys(true)),
        (
            "roles/typo/role.toml",
            "schema = 1\n[[step]]\nkind = \"authorized_keys\"\nuser = \"deploy\"\nkeys = []\nexclusiv = true\n",
        ),
        (
            "roles/badkey/role.toml",
            "schema = 1\n[[step]]\nkind = \"authorized_keys\"\nuser = \"deploy\"\nkeys = [\"ssh-ed25519\"]\n",
        ),
    ]);
    let node = Node::boot(b.path());
    let probe = "ls -la /home; getent passwd deploy";
    refused(&node, "typo", "role.toml:6:1: unknown field `exclusiv`", probe);
    refused(&node, "badkey", "role.toml:5:9: not an ssh public key", probe);

    converges(&node, "keys");
    let r = node.sh("stat -c '%a %U:%G %n' /home/deploy/.ssh /home/deploy/.ssh/authorized_keys");
    assert_eq!(
        r.stdout,
        "700 deploy:deploy /home/deploy/.ssh\n600 deploy:deploy /home/deploy/.ssh/authorized_keys\n",
        "{}",
        r.all()
    );
    let file = node.merged.join("home/deploy/.ssh/authorized_keys");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{KEY_A}\n{KEY_B}\n"));

    // A key added by hand stays (not exclusive); one of the role's removed by hand is drift.
    node.sh(&format!("echo '{KEY_C}' >> /home/deploy/.ssh/authorized_keys"));
    assert_eq!(drift(&node, "keys").0, []);
    node.sh("sed -i '/bob$/d' /home/deploy/.ssh/authorized_keys && chmod 0644 /home/deploy/.ssh/authorized_keys");
    let (fields, doc) = drift(&node, "keys");
    assert_eq!(
        fields,
        [
            ("authorized_keys:deploy".to_string(), "content".to_string()),
            ("authorized_keys:deploy".into(), "mode".into())
        ]
    );
    let diff = changes_of(&doc, "authorized_keys:deploy")[0]["diff"].as_str().unwrap().to_string();
    assert!(diff.contains(&format!("+{KEY_B}")), "{diff}");
    converges(&node, "keys");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{KEY_A}\n{KEY_C}\n{KEY_B}\n"));

    // exclusive: only the role's keys.
    converges(&node, "only");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{KEY_A}\n{KEY_B}\n"));
    let r = node.sh("stat -c '%a %U:%G' /home/deploy/.ssh/authorized_keys");
    assert_eq!(r.stdout.trim(), "600 deploy:deploy");
}

#[test]
fn hostname_through_hostnamed() {
    let b = bundle(&[
        (
            "roles/host/role.toml",
            "schema = 1\n[vars]\nprefix = \"web\"\n[[step]]\nkind = \"hostname\"\nname = \"{{ prefix }}-{{ facts.machine_id[:8] }}\"\n",
        ),
        (
            "roles/typo/role.toml",
            "schema = 1\n[[step]]\nkind = \"hostname\"\nname = \"web\"\nfqdn = \"web.example\"\n",
        ),
        ("roles/badname/role.toml", "schema = 1\n[[step]]\nkind = \"hostname\"\nname = \"web_01\"\n"),
        (
            "roles/badrender/role.toml",
            "schema = 1\n[[step]]\nkind = \"hostname\"\nname = \"{{ 'a b' }}\"\n",
        ),
    ]);
    let mut node = Node::boot(b.path());
    let want = format!("web-{}", &node.machine_id()[..8]);
    let probe = "hostname; cat /etc/hostname";
    refused(&node, "typo", "role.toml:5:1: unknown field `fqdn`", probe);
    refused(&node, "badname", "role.toml:4:8: invalid hostname \"web_01\"", probe);
    refused(&node, "badrender", "role.toml:4:8: invalid hostname \"a b\"", probe);

    converges(&node, "host");
    assert_eq!(node.sh("hostname").stdout.trim(), want);
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/hostname")).unwrap().trim(), want);
    let r = node.sh("busctl get-property org.freedesktop.hostname1 /org/freedesktop/hostname1 org.freedesktop.hostname1 StaticHostname");
    assert_eq!(r.stdout.trim(), format!("s \"{want}\""), "{}", r.all());

    // The transient name changed by hand.
    node.sh("hostname drifted");
    let (fields, doc) = drift(&node, "host");
    assert_eq!(fields, [("hostname".to_string(), "transient".to_string())]);
    assert_eq!(changes_of(&doc, "hostname")[0]["from"], "drifted");
    converges(&node, "host");
    assert_eq!(node.sh("hostname").stdout.trim(), want);

    // The static name holds across a reboot.
    reboot(&mut node);
    assert_eq!(node.sh("hostname").stdout.trim(), want);
    assert_eq!(node.run_role("apply", "host", &["--detailed-exitcodes"]).code, 0);
}

/// Under `--root` the five kinds manage only their files: no live value, no modprobe, no
/// hostnamed.
#[test]
fn catalogue_kinds_under_a_root_manage_only_files() {
    let role = format!(
        "schema = 1\n\
         [[step]]\nkind = \"sysctl\"\nname = \"net.ipv4.ip_forward\"\nvalue = 1\n\
         [[step]]\nkind = \"kernel_module\"\nname = \"no_such_module_x\"\noptions = \"a=1\"\n\
         [[step]]\nkind = \"line\"\npath = \"/etc/demo.conf\"\nline = \"b = 2\"\nmatch = \"^b\\\\s*=\"\n\
         [[step]]\nkind = \"authorized_keys\"\nuser = \"deploy\"\nkeys = [\"{KEY_A}\"]\n\
         [[step]]\nkind = \"hostname\"\nname = \"img-{{{{ facts.machine_id[:4] }}}}\"\n"
    );
    let b = bundle(&[("roles/img/role.toml", &role)]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::create_dir_all(r.join("home/deploy")).unwrap();
    std::os::unix::fs::chown(r.join("home/deploy"), Some(1000), Some(1000)).unwrap();
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ndeploy:x:1000:1000::/home/deploy:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\ndeploy:x:1000:\n").unwrap();
    std::fs::write(r.join("etc/machine-id"), "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::write(r.join("etc/demo.conf"), "a = 1\nb = 1\n").unwrap();
    let run = run_role("apply", r, b.path(), "img", &["--detailed-exitcodes"]);
    assert_eq!(run.code, 2, "{}", run.all());
    let run = run_role("apply", r, b.path(), "img", &["--detailed-exitcodes"]);
    assert_eq!(run.code, 0, "{}", run.all());
    let read = |p: &str| std::fs::read_to_string(r.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert!(read("etc/sysctl.d/90-bootstrap-net.ipv4.ip_forward.conf").ends_with("net.ipv4.ip_forward = 1\n"));
    assert!(read("etc/modules-load.d/no_such_module_x.conf").ends_with("\nno_such_module_x\n"));
    assert!(read("etc/modprobe.d/no_such_module_x.conf").ends_with("\noptions no_such_module_x a=1\n"));
    assert_eq!(read("etc/demo.conf"), "a = 1\nb = 2\n");
    assert_eq!(read("home/deploy/.ssh/authorized_keys"), format!("{KEY_A}\n"));
    assert_eq!(read("etc/hostname"), "img-0123\n");
    let snap = snapshot(r);
    assert!(snap["/home/deploy/.ssh"].starts_with("dir 0700 1000:1000"), "{snap:#?}");
    assert!(snap["/home/deploy/.ssh/authorized_keys"].starts_with("file 0600 1000:1000"), "{snap:#?}");
    assert!(!r.join("proc").exists(), "a live value was written into the root");
}

/// `~/.ssh` belongs to the user: a hard link to root's file put there is replaced, never
/// chowned (which would hand the user that file), and a symlink `~/.ssh` is refused.
#[test]
fn authorized_keys_never_hands_a_linked_file_to_the_user() {
    use std::os::unix::fs::MetadataExt;
    let role = format!("schema = 1\n[[step]]\nkind = \"authorized_keys\"\nuser = \"deploy\"\nkeys = [\"{KEY_A}\"]\n");
    let b = bundle(&[("roles/k/role.toml", &role)]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    std::fs::create_dir_all(r.join("home/deploy/.ssh")).unwrap();
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ndeploy:x:1000:1000::/home/deploy:/bin/sh\n",
    )
    .unwrap();
    // A root file whose content the user could shape (a log, say): already the wanted keys, so
    // only its mode and owner differ from what the step wants.
    std::fs::write(r.join("etc/shadow"), format!("{KEY_A}\n")).unwrap();
    std::fs::set_permissions(r.join("etc/shadow"), std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    for d in ["home/deploy", "home/deploy/.ssh"] {
        std::os::unix::fs::chown(r.join(d), Some(1000), Some(1000)).unwrap();
    }
    std::fs::hard_link(r.join("etc/shadow"), r.join("home/deploy/.ssh/authorized_keys")).unwrap();
    let run = run_role("apply", r, b.path(), "k", &["--detailed-exitcodes"]);
    assert_eq!(run.code, 2, "{}", run.all());
    let shadow = std::fs::metadata(r.join("etc/shadow")).unwrap();
    assert_eq!((shadow.uid(), shadow.mode() & 0o7777, shadow.nlink()), (0, 0o640, 1), "root's file was changed");
    assert_eq!(std::fs::read_to_string(r.join("etc/shadow")).unwrap(), format!("{KEY_A}\n"));
    let keys = std::fs::metadata(r.join("home/deploy/.ssh/authorized_keys")).unwrap();
    assert_eq!((keys.uid(), keys.mode() & 0o7777), (1000, 0o600));

    // ~/.ssh a symlink to /etc: refused, nothing written there.
    std::fs::remove_dir_all(r.join("home/deploy/.ssh")).unwrap();
    std::os::unix::fs::symlink("/etc", r.join("home/deploy/.ssh")).unwrap();
    let run = run_role("apply", r, b.path(), "k", &[]);
    assert_eq!(run.code, 1, "{}", run.all());
    assert!(run.all().contains("/home/deploy/.ssh is a symlink, not a directory"), "{}", run.all());
    assert!(!r.join("etc/authorized_keys").exists());
}
