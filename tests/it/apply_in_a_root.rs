//! The walking skeleton against a temp root: golden tree, idempotence, plan, malformed
//! inputs, sensitive redaction, SIGKILL mid-run, concurrent runs.

use crate::harness::support::*;
use std::time::{Duration, Instant};

fn hostname() -> String {
    let facts: serde_json::Value = serde_json::from_str(&agent(&["facts", "--format", "json"]).stdout).unwrap();
    facts["hostname"].as_str().unwrap().to_string()
}

#[test]
fn apply_haproxy_on_empty_root_golden_and_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), &repo(), "haproxy", &["--detailed-exitcodes", "--env", "production"]);
    assert_eq!(r.code, 2, "first apply changes the host\n{}", r.all());
    golden("haproxy-tree.txt", &listing(root.path()));
    let motd = std::fs::read_to_string(root.path().join("etc/motd")).unwrap().replace(&hostname(), "HOSTNAME");
    golden("haproxy-motd.txt", &motd);
    golden("haproxy.cfg", &std::fs::read_to_string(root.path().join("etc/haproxy/haproxy.cfg")).unwrap());
    let first = report(root.path());
    assert_eq!(first["status"], "ok");
    assert_eq!(first["summary"]["changed"], 11, "{first:#}");
    assert_eq!(first["summary"]["skipped"], 1, "the package step needs the live system");

    let before = snapshot(root.path());
    let r = run_role("apply", root.path(), &repo(), "haproxy", &["--detailed-exitcodes", "--env", "production"]);
    assert_eq!(r.code, 0, "second apply changes nothing\n{}", r.all());
    let second = report(root.path());
    assert_eq!(second["summary"]["changed"], 0, "{second:#}");
    assert_eq!(second["summary"]["in_sync"], 11);
    let mut after = snapshot(root.path());
    // Only the run's own bookkeeping may differ.
    for k in ["/var/lib/bootstrap/last-run.json", "/run/bootstrap/lock"] {
        after.insert(k.into(), before[k].clone());
    }
    assert_eq!(before, after);

    // Without --detailed-exitcodes success is 0 either way.
    let fresh = tempfile::tempdir().unwrap();
    assert_eq!(run_role("apply", fresh.path(), &repo(), "haproxy", &[]).code, 0);
}

#[test]
fn plan_shows_only_the_hand_edited_file_and_changes_nothing() {
    let root = tempfile::tempdir().unwrap();
    assert_eq!(run_role("apply", root.path(), &repo(), "haproxy", &[]).code, 0);
    let cfg = root.path().join("etc/haproxy/haproxy.cfg");
    let good = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, good.replace("maxconn 4096", "maxconn 1")).unwrap();
    let before = snapshot(root.path());

    let r = run_role("plan", root.path(), &repo(), "haproxy", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "plan with drift exits 2 under --detailed-exitcodes\n{}", r.all());
    assert_eq!(snapshot(root.path()), before, "plan changed the host");
    let changed: Vec<&str> = r.stdout.lines().filter(|l| l.contains("would change")).collect();
    assert_eq!(changed, ["  would change  file:/etc/haproxy/haproxy.cfg"], "\n{}", r.stdout);
    assert!(
        r.stdout.contains("-    maxconn 1\n") && r.stdout.contains("+    maxconn 4096\n"),
        "unified diff expected:\n{}",
        r.stdout
    );
    assert!(r.stdout.contains("--- /etc/haproxy/haproxy.cfg (on host)"), "{}", r.stdout);

    let json: serde_json::Value = serde_json::from_str(&run_role("plan", root.path(), &repo(), "haproxy", &["--json"]).stdout).unwrap();
    let would = changed_ids(&json);
    assert_eq!(would, ["file:/etc/haproxy/haproxy.cfg"]);

    let r = run_role("apply", root.path(), &repo(), "haproxy", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(std::fs::read_to_string(&cfg).unwrap(), good);
    assert_eq!(run_role("plan", root.path(), &repo(), "haproxy", &["--detailed-exitcodes"]).code, 0);
}

/// A one-role bundle whose role.toml is `role` (plus a template file for source cases).
fn one_role(role: &str) -> tempfile::TempDir {
    bundle(&[
        ("roles/r/role.toml", role),
        ("roles/r/files/t.j2", "line one\nvalue {{ nope }}\n"),
        ("roles/other/role.toml", "schema = 1\ninclude = [\"r\"]\n"),
    ])
}

#[test]
fn malformed_inputs_exit_78_with_position_and_touch_nothing() {
    let cases: &[(&str, &str, &str)] = &[
        ("toml syntax", "schema = 1\n[[step]]\nkind = \"file\"\npath \"/a\"\n", "roles/r/role.toml:4:"),
        (
            "unknown key file",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"x\"\nmdoe = \"0644\"\n",
            "roles/r/role.toml:6:1: unknown field `mdoe`",
        ),
        (
            "unknown key directory",
            "schema = 1\n[[step]]\nkind = \"directory\"\npath = \"/a\"\nrecurse = true\n",
            "roles/r/role.toml:5:1: unknown field `recurse`",
        ),
        (
            "unknown key link",
            "schema = 1\n[[step]]\nkind = \"link\"\npath = \"/a\"\ntarget = \"/b\"\nforce = true\n",
            "roles/r/role.toml:6:1: unknown field `force`",
        ),
        (
            "unknown key user",
            "schema = 1\n[[step]]\nkind = \"user\"\nname = \"u\"\npassword = \"x\"\n",
            "roles/r/role.toml:5:1: unknown field `password`",
        ),
        (
            "unknown key group",
            "schema = 1\n[[step]]\nkind = \"group\"\nname = \"g\"\nmembers = []\n",
            "roles/r/role.toml:5:1: unknown field `members`",
        ),
        (
            "unknown key exec",
            "schema = 1\n[[step]]\nkind = \"exec\"\ncommand = [\"true\"]\ncreates = \"/x\"\nshell = true\n",
            "roles/r/role.toml:6:1: unknown field `shell`",
        ),
        (
            "unknown key sysctl",
            "schema = 1\n[[step]]\nkind = \"sysctl\"\nname = \"vm.swappiness\"\nvalue = 10\npersist = true\n",
            "roles/r/role.toml:6:1: unknown field `persist`",
        ),
        (
            "unknown key kernel_module",
            "schema = 1\n[[step]]\nkind = \"kernel_module\"\nname = \"loop\"\nparams = \"max_loop=8\"\n",
            "roles/r/role.toml:5:1: unknown field `params`",
        ),
        (
            "unknown key line",
            "schema = 1\n[[step]]\nkind = \"line\"\npath = \"/a\"\nline = \"x\"\nregexp = \"^x\"\n",
            "roles/r/role.toml:6:1: unknown field `regexp`",
        ),
        (
            "unknown key authorized_keys",
            "schema = 1\n[[step]]\nkind = \"authorized_keys\"\nuser = \"u\"\nkeys = []\nexclusive = true\nmanage_dir = true\n",
            "roles/r/role.toml:7:1: unknown field `manage_dir`",
        ),
        (
            "unknown key hostname",
            "schema = 1\n[[step]]\nkind = \"hostname\"\nname = \"web\"\nfqdn = \"web.example\"\n",
            "roles/r/role.toml:5:1: unknown field `fqdn`",
        ),
        (
            "bad line regex",
            "schema = 1\n[[step]]\nkind = \"line\"\npath = \"/a\"\nline = \"x\"\nmatch = \"(x\"\n",
            "roles/r/role.toml:6:9: invalid regular expression",
        ),
        (
            "unknown common key",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"x\"\nnotfy = []\n",
            "roles/r/role.toml:6:1: unknown field `notfy`",
        ),
        (
            "unknown top key",
            "schema = 1\nvariables = {}\n",
            "roles/r/role.toml:2:1: unknown field `variables`",
        ),
        (
            "include cycle",
            "schema = 1\ninclude = [\"other\"]\n",
            "roles/other/role.toml:2:12: include cycle: r -> other -> r",
        ),
        (
            "missing include",
            "schema = 1\ninclude = [\"nope\"]\n",
            "roles/r/role.toml:2:12: included role `nope` not found",
        ),
        (
            "undefined variable inline",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ntemplate = true\ncontent = \"x {{ nope }}\"\n",
            "roles/r/role.toml:6:11: template error: undefined value",
        ),
        (
            "undefined variable file",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ntemplate = true\nsource = \"t.j2\"\n",
            "roles/r/files/t.j2:2:10: template error: undefined value",
        ),
        (
            "exec without guard",
            "schema = 1\n[[step]]\nkind = \"exec\"\ncommand = [\"touch\", \"/x\"]\n",
            "roles/r/role.toml:4:11: an exec step needs a guard",
        ),
        (
            "bad mode",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"x\"\nmode = \"rw-r--r--\"\n",
            "roles/r/role.toml:6:8: invalid mode \"rw-r--r--\"",
        ),
        (
            "mode as integer",
            "schema = 1\n[[step]]\nkind = \"directory\"\npath = \"/a\"\nmode = 755\n",
            "roles/r/role.toml:5:8: invalid type: integer `755`, expected a string",
        ),
        (
            "mode with leading zero",
            "schema = 1\n[[step]]\nkind = \"directory\"\npath = \"/a\"\nmode = 0755\n",
            "roles/r/role.toml:5:8: unexpected leading zero",
        ),
        (
            "missing source",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\nsource = \"nope.conf\"\n",
            "roles/r/role.toml:5:10: source file",
        ),
        (
            "relative path",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"etc/a\"\ncontent = \"x\"\n",
            "roles/r/role.toml:4:8: path \"etc/a\" is not absolute",
        ),
        (
            "container without image",
            "schema = 1\n[[step]]\nkind = \"container\"\nname = \"x\"\n",
            "roles/r/role.toml:4:8: a container step needs `image`",
        ),
        (
            "container with a bad port",
            "schema = 1\n[[step]]\nkind = \"container\"\nname = \"x\"\nimage = \"i\"\nports = [\"80\"]\n",
            "roles/r/role.toml:6:10: port \"80\": expected HOST:CONTAINER",
        ),
        (
            "kubeadm_join without a token",
            "schema = 1\n[[step]]\nkind = \"kubeadm_join\"\napi_server = \"10.0.0.1:6443\"\nca_cert_hash = \"sha256:00\"\n",
            "roles/r/role.toml:4:14: a kubeadm_join step needs `api_server`, `token` and `ca_cert_hash`",
        ),
        (
            "unknown kind",
            "schema = 1\n[[step]]\nkind = \"fiel\"\n",
            "roles/r/role.toml:3:8: unknown step kind `fiel`",
        ),
        (
            "bad notify",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"x\"\nnotify = [\"bounce:x.service\"]\n",
            "roles/r/role.toml:6:11: invalid notify target",
        ),
        (
            "bad when",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"x\"\nwhen = \"facts.nope == 1\"\n",
            "roles/r/role.toml:6:8: `when` expression",
        ),
        ("wrong schema", "schema = 2\n", "roles/r/role.toml:1:10: unsupported schema 2"),
        (
            "duplicate step",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"x\"\n[[step]]\nkind = \"file\"\npath = \"/a\"\ncontent = \"y\"\n",
            "roles/r/role.toml:6:1: step `file:/a` is declared twice (first at",
        ),
    ];
    let mut failures = Vec::new();
    for (name, role, want) in cases {
        let b = one_role(role);
        let root = tempfile::tempdir().unwrap();
        let r = run_role("apply", root.path(), b.path(), "r", &[]);
        let stderr = r.stderr.replace(&format!("{}/", b.path().display()), "");
        let empty = std::fs::read_dir(root.path()).unwrap().next().is_none();
        if r.code != 78 || !stderr.contains(want) || !empty {
            failures.push(format!(
                "{name}: exit {} (want 78), root empty: {empty}\n  want: {want}\n  got:  {stderr}",
                r.code
            ));
        }
        // validate finds the same problem offline, except what needs facts to see (rendering).
        // It visits roles in name order, so a cycle may be reported from the other role.
        let v = agent(&["validate", b.path().to_str().unwrap()]);
        let vs = v.stderr.replace(&format!("{}/", b.path().display()), "");
        let needs_facts = name.contains("variable") || name.contains("bad when");
        let phrase = want.splitn(4, ':').nth(3).unwrap_or(want);
        let phrase = if name == &"include cycle" { " include cycle: " } else { phrase };
        if !needs_facts && (v.code != 78 || !vs.contains(phrase) || !vs.contains("role.toml:")) {
            failures.push(format!("{name}: validate exit {} (want 78)\n  want: {phrase}\n  got:  {vs}", v.code));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn validate_accepts_the_example_roles() {
    let r = agent(&["validate", repo().to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(r.stdout.contains("roles OK (base, data-node, haproxy"), "{}", r.stdout);
}

const SECRET: &str = "s3cr3t-Value-9f2c";

#[test]
fn sensitive_content_never_reaches_output_or_report() {
    let role = format!(
        "schema = 1\n[vars]\ntoken = \"{SECRET}\"\n\n[[step]]\nkind = \"file\"\npath = \"/etc/app/token\"\ncontent = \"token={{{{ token }}}}\\n\"\ntemplate = true\nmode = \"0600\"\nsensitive = true\n\n[[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"echo {SECRET}; echo {SECRET} >&2; exit 3\"]\nonlyif = [\"test\", \"-e\", \"/nonexistent-{SECRET}\"]\nsensitive = true\n"
    );
    let b = bundle(&[("roles/s/role.toml", &role)]);
    let root = shell_root(); // exec steps run chrooted into it
    let mut seen = String::new();
    let r = run_role("apply", root.path(), b.path(), "s", &["-vv"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let token = root.path().join("etc/app/token");
    assert_eq!(std::fs::read_to_string(&token).unwrap(), format!("token={SECRET}\n"));
    seen += &r.all();
    seen += &std::fs::read_to_string(root.path().join("var/lib/bootstrap/last-run.json")).unwrap();

    // Drift: plan and apply both have a diff to show, and must not show it.
    std::fs::write(&token, "token=old-value\n").unwrap();
    for verb in ["plan", "apply"] {
        for extra in [&["-vv"][..], &["--json"][..]] {
            let r = run_role(verb, root.path(), b.path(), "s", extra);
            assert_eq!(r.code, 0, "{}", r.all());
            seen += &r.all();
        }
    }
    let rep = report(root.path());
    let step = &rep["steps"][0];
    assert_eq!(step["id"], "file:/etc/app/token");
    seen += &rep.to_string();
    assert!(!seen.contains(SECRET) && !seen.contains("old-value"), "secret leaked:\n{seen}");
    assert!(seen.contains("<redacted>"), "redaction marker expected");

    // A failing sensitive exec: its argv and output stay out of the error too.
    let failing = role.replace(&format!("onlyif = [\"test\", \"-e\", \"/nonexistent-{SECRET}\"]"), "onlyif = [\"true\"]");
    let b2 = bundle(&[("roles/s/role.toml", &failing)]);
    let r = run_role("apply", root.path(), b2.path(), "s", &["-vv"]);
    assert_eq!(r.code, 1, "{}", r.all());
    let all = r.all() + &std::fs::read_to_string(root.path().join("var/lib/bootstrap/last-run.json")).unwrap();
    assert!(all.contains("exited with status 3"), "{all}");
    assert!(!all.contains(SECRET), "secret leaked from a failing step:\n{all}");
}

/// Many big files rewritten by a run that is killed at various points: every file is old
/// or new, never partial, and the next run converges.
#[test]
fn sigkill_mid_run_leaves_no_partial_file() {
    const N: usize = 120;
    let body = |tag: &str, i: usize| format!("{tag}-{i}\n").repeat(20_000);
    let mut role = String::from("schema = 1\n");
    for i in 0..N {
        role += &format!("[[step]]\nkind = \"file\"\npath = \"/data/f{i}\"\nsource = \"f{i}\"\n");
    }
    let mut files: Vec<(String, String)> = vec![("roles/k/role.toml".into(), role)];
    for i in 0..N {
        files.push((format!("roles/k/files/f{i}"), body("new", i)));
    }
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let b = bundle(&refs);
    let root = tempfile::tempdir().unwrap();
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64;
    let mut rng = seed | 1;
    let mut kills_mid_run = 0;
    for round in 0..8 {
        std::fs::create_dir_all(root.path().join("data")).unwrap();
        for i in 0..N {
            std::fs::write(root.path().join(format!("data/f{i}")), body("old", i)).unwrap();
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // Killed a random while after its first write (a fixed delay from the start lands
        // before the first write on a loaded machine, and after the last on an idle one).
        let delay = Duration::from_millis(rng % 120);
        let mut child = cmd(&[
            "apply",
            "--root",
            root.path().to_str().unwrap(),
            "--source",
            b.path().to_str().unwrap(),
            "--role",
            "k",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
        let first = root.path().join("data/f0");
        let t = Instant::now();
        while !std::fs::read(&first).unwrap_or_default().starts_with(b"new") && child.try_wait().unwrap().is_none() {
            assert!(t.elapsed() < Duration::from_secs(60), "the run never wrote its first file");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let status = child.wait().unwrap();
        let mut new = 0;
        for i in 0..N {
            let c = std::fs::read_to_string(root.path().join(format!("data/f{i}"))).unwrap();
            assert!(
                c == body("old", i) || c == body("new", i),
                "round {round} (seed {seed}, kill after {delay:?}): data/f{i} is partial ({} bytes)",
                c.len()
            );
            new += (c == body("new", i)) as usize;
        }
        if status.code().is_none() && new > 0 && new < N {
            kills_mid_run += 1;
        }
    }
    // The next run converges and cleans up any temp file a killed write left.
    let r = run_role("apply", root.path(), b.path(), "k", &["--detailed-exitcodes"]);
    assert!(r.code == 0 || r.code == 2, "{}", r.all());
    for i in 0..N {
        assert_eq!(std::fs::read_to_string(root.path().join(format!("data/f{i}"))).unwrap(), body("new", i));
    }
    let leftovers: Vec<_> = std::fs::read_dir(root.path().join("data"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('f'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    assert!(
        kills_mid_run > 0,
        "no kill landed in the middle of a run (seed {seed}); the test proved nothing"
    );
}

#[test]
fn concurrent_applies_wait_for_each_other() {
    // Each run appends start/end around a sleep to a log; interleaving would show.
    let role = "schema = 1\n[[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"echo start $$ >> \\\"$BOOTSTRAP_ROOT/log\\\"; sleep 1.5; echo end $$ >> \\\"$BOOTSTRAP_ROOT/log\\\"\"]\nonlyif = [\"true\"]\n";
    let b = bundle(&[("roles/c/role.toml", role)]);
    let root = shell_root(); // exec steps run chrooted into it
    let args = |extra: &'static [&'static str]| {
        let mut a: Vec<String> = [
            "apply",
            "--root",
            root.path().to_str().unwrap(),
            "--source",
            b.path().to_str().unwrap(),
            "--role",
            "c",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let spawn = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        cmd(&refs)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let first = spawn(args(&[]));
    // Wait until the first run holds the lock (its exec has started).
    let log = root.path().join("log");
    let t = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("start") {
        assert!(t.elapsed() < Duration::from_secs(30), "first run never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A run with a short lock timeout gives up and names the holder.
    let impatient: Run = spawn(args(&["--lock-timeout", "200ms"])).wait_with_output().unwrap().into();
    assert_eq!(impatient.code, 1, "{}", impatient.all());
    assert!(
        impatient.stderr.contains(&format!("another bootstrap run (pid {}) holds", first.id())),
        "{}",
        impatient.stderr
    );
    // A patient one waits, then runs after the first.
    let second = spawn(args(&[]));
    let a: Run = first.wait_with_output().unwrap().into();
    let b2: Run = second.wait_with_output().unwrap().into();
    assert_eq!((a.code, b2.code), (0, 0), "{}\n{}", a.all(), b2.all());
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(lines, ["start", "end", "start", "end"], "runs interleaved");
}

#[test]
fn when_conditions_and_env_overlays() {
    let b = bundle(&[
        ("roles/w/role.toml", "schema = 1\n[vars]\nsize = 1\n[[step]]\nkind = \"file\"\npath = \"/size\"\ncontent = \"{{ size }}\"\ntemplate = true\n[[step]]\nkind = \"file\"\npath = \"/debian-only\"\ncontent = \"x\"\nwhen = \"facts.os.family == 'debian' and size > 5\"\n"),
        ("roles/w/env/prod.toml", "[vars]\nsize = 10\n"),
    ]);
    let root = tempfile::tempdir().unwrap();
    assert_eq!(run_role("apply", root.path(), b.path(), "w", &["--env", "staging"]).code, 0);
    assert_eq!(std::fs::read_to_string(root.path().join("size")).unwrap(), "1");
    assert!(!root.path().join("debian-only").exists());
    assert_eq!(report(root.path())["steps"][1]["status"], "skipped");
    assert_eq!(run_role("apply", root.path(), b.path(), "w", &["--env", "prod"]).code, 0);
    assert_eq!(std::fs::read_to_string(root.path().join("size")).unwrap(), "10");
    assert!(root.path().join("debian-only").exists(), "host is Debian: the when holds in prod");
    let bad = bundle(&[("roles/w/env/prod.toml", "vars = 1\nextra = 2\n"), ("roles/w/role.toml", "schema = 1\n")]);
    let r = run_role("apply", root.path(), bad.path(), "w", &["--env", "prod"]);
    assert_eq!(r.code, 78);
    assert!(r.stderr.contains("roles/w/env/prod.toml:2:1: unknown field `extra`"), "{}", r.stderr);
}

#[test]
fn failed_step_stops_the_run_and_reports_it() {
    let b = bundle(&[(
        "roles/f/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/one\"\ncontent = \"1\"\n[[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"echo boom >&2; exit 7\"]\ncreates = \"/never\"\n[[step]]\nkind = \"file\"\npath = \"/three\"\ncontent = \"3\"\n",
    )]);
    let root = shell_root(); // exec steps run chrooted into it
    let r = run_role("apply", root.path(), b.path(), "f", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 6, "changes and failures\n{}", r.all());
    assert!(!root.path().join("three").exists(), "a step after the failure ran");
    let rep = report(root.path());
    let statuses: Vec<&str> = rep["steps"].as_array().unwrap().iter().map(|s| s["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["changed", "failed", "not_run"]);
    let err = rep["steps"][1]["error"].as_str().unwrap();
    assert!(
        err.contains("roles/f/role.toml:6:1") && err.contains("exited with status 7") && err.contains("boom"),
        "{err}"
    );
    let r = run_role("apply", root.path(), b.path(), "f", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 4, "failure only\n{}", r.all());
    assert_eq!(run_role("apply", root.path(), b.path(), "f", &[]).code, 1);
}
