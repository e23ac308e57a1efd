//! Secrets stay secret (issue 14, finding 1): a step whose rendering called `secret()` is
//! sensitive as a whole (no content diff anywhere, private files), the textual redaction is a
//! second net, and the state files that hold step details are root's alone.

use crate::harness::node::Node;
use crate::harness::support::*;

/// Two lines of a key, as `file:/etc/app/key` holds it before and after a rotation.
const OLD: [&str; 2] = [
    "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu",
    "KUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQJAIJLixBy2qpFoS4DSmoEm",
];
const NEW: [&str; 2] = [
    "o5qGH0sN1d6Bz2bVm3kYwT8xL4pRjE7uAcF9iD2hQ6nK0sZ1vW5yX3tU8rO4eP7g",
    "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6",
];

const ROLE: &str = r#"schema = 1

[[step]]
kind = "file"
path = "/etc/app/key.pem"
content = "{{ secret('file:/etc/app/key') }}"
template = true

[[step]]
kind = "file"
path = "/etc/app/app.yaml"
content = "tls:\n  key: |\n  {{ secret('file:/etc/app/key') | indent(2) }}\n"
template = true
"#;

/// A file step whose change notifies a unit that does not exist: the handler fails, so the
/// pending-notify state stays on disk to be looked at.
const PENDING_ROLE: &str = r#"schema = 1

[[step]]
kind = "file"
path = "/etc/app/notifier"
content = "x\n"
notify = ["restart:no-such-unit-9.service"]
"#;

/// Every line of the secrets, and a 16-character piece of each (a partial leak counts).
fn secret_pieces() -> Vec<&'static str> {
    OLD.iter().chain(NEW.iter()).flat_map(|l| [*l, &l[20..36]]).collect()
}

/// Where a piece of the secrets shows in `text`: one failure line each.
fn leaks(what: &str, text: &str) -> Vec<String> {
    secret_pieces()
        .into_iter()
        .filter(|p| text.contains(p))
        .map(|p| format!("{what}: secret line {p:?} leaked"))
        .collect()
}

fn set_key(node: &Node, lines: [&str; 2]) {
    let r = node.sh(&format!(
        "mkdir -p /etc/app && printf '%s\\n%s\\n' '{}' '{}' > /etc/app/key && echo ok",
        lines[0], lines[1]
    ));
    assert!(r.stdout.contains("ok"), "{}", r.all());
}

fn mode(node: &Node, path: &str) -> String {
    node.sh(&format!("stat -c %a {path}")).stdout.trim().to_string()
}

/// Show 2 (first reproduction): a two-line secret in `file:` form, rendered as is and through
/// `indent(2)`, applied, then rotated. plan, apply -vv, --json, last-run.json and the journal
/// (the agent run as a systemd service, as the timer runs it) hold no line of the old or the new
/// key; the files are 0600; last-run.json is 0600 in a 0700 /var/lib/bootstrap (tightened from
/// an older agent's 0755), and so is pending-notify.json.
#[test]
fn a_multi_line_secret_never_leaks_before_or_after_a_change() {
    let b = bundle(&[("roles/app/role.toml", ROLE), ("roles/pend/role.toml", PENDING_ROLE)]);
    let node = Node::boot(b.path());
    // An older agent left the state directory world-readable.
    assert!(node.sh("mkdir -p -m 0755 /var/lib/bootstrap && echo ok").stdout.contains("ok"));
    set_key(&node, OLD);
    let mut seen: Vec<(String, String)> = Vec::new();
    let args = |verb: &'static str, extra: &[&'static str]| {
        let mut a = vec![verb, "--source", "/srv/bundle", "--role", "app", "--name", "production-app"];
        a.extend_from_slice(extra);
        a
    };

    let r = node.agent(&args("apply", &["-vv"]));
    assert_eq!(r.code, 0, "{}", r.all());
    seen.push(("first apply -vv".into(), r.all()));
    seen.push((
        "last-run.json after the first apply".into(),
        std::fs::read_to_string(node.merged.join("var/lib/bootstrap/last-run.json")).unwrap(),
    ));
    // The test can see the secret where it belongs, so a leak would be found.
    let pem = std::fs::read_to_string(node.merged.join("etc/app/key.pem")).unwrap();
    assert_eq!(pem, format!("{}\n{}", OLD[0], OLD[1]));
    let yaml = std::fs::read_to_string(node.merged.join("etc/app/app.yaml")).unwrap();
    assert_eq!(yaml, format!("tls:\n  key: |\n  {}\n  {}\n", OLD[0], OLD[1]));

    // Rotate the key: every output now has a diff to show, and must not show it.
    set_key(&node, NEW);
    let plan = node.agent(&args("plan", &["-vv", "--detailed-exitcodes"]));
    assert_eq!(plan.code, 2, "{}", plan.all());
    let plan_text = plan.stdout.clone();
    seen.push(("plan -vv".into(), plan.all()));
    let plan = node.agent(&args("plan", &["--json"]));
    assert_eq!(plan.code, 0, "{}", plan.all());
    let doc: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap_or_else(|e| panic!("plan --json is JSON: {e}\n{}", plan.stdout));
    assert_eq!(doc["steps"][0]["changes"][0]["field"], "content", "{doc:#}");
    seen.push(("plan --json".into(), plan.all()));
    let r = node.agent(&args("apply", &["-vv", "--json"]));
    assert_eq!(r.code, 0, "{}", r.all());
    serde_json::from_str::<serde_json::Value>(&r.stdout).unwrap_or_else(|e| panic!("apply --json is JSON: {e}\n{}", r.stdout));
    seen.push(("apply -vv --json".into(), r.all()));
    seen.push((
        "last-run.json after the rotation".into(),
        std::fs::read_to_string(node.merged.join("var/lib/bootstrap/last-run.json")).unwrap(),
    ));
    assert!(std::fs::read_to_string(node.merged.join("etc/app/key.pem")).unwrap().contains(NEW[1]));

    // Back to the old key, with the agent run as a service: its output goes to the journal.
    set_key(&node, OLD);
    for verb in ["plan", "apply"] {
        let cmd = format!(
            "systemd-run --quiet --wait --collect --unit=bootstrap-{verb}-secret -p StandardOutput=journal -p StandardError=journal \
             /usr/local/bin/bootstrap {verb} -vv --source /srv/bundle --role app --name production-app; echo rc=$?"
        );
        let r = node.sh(&cmd);
        assert!(r.stdout.contains("rc=0"), "{verb} as a service: {}", r.all());
    }
    assert_eq!(
        std::fs::read_to_string(node.merged.join("etc/app/key.pem")).unwrap(),
        pem,
        "the service run applied"
    );
    let journal = node.sh("journalctl --no-pager -o verbose").stdout;
    assert!(
        journal.contains("would change  file:/etc/app/key.pem") && journal.contains("changed  file:/etc/app/app.yaml"),
        "the service runs' output is in the journal:\n{journal}"
    );
    seen.push(("the journal".into(), journal.clone()));
    seen.push((
        "last-run.json after the service run".into(),
        std::fs::read_to_string(node.merged.join("var/lib/bootstrap/last-run.json")).unwrap(),
    ));

    let mut failures: Vec<String> = seen.iter().flat_map(|(what, text)| leaks(what, text)).collect();
    // What is shown instead: that the content changed.
    if plan_text.matches("content changed, sha256 ").count() != 2 {
        failures.push(format!("plan does not summarise each file's change:\n{plan_text}"));
    }
    if !journal.contains("content changed, sha256 ") {
        failures.push("the journal (plan as a service) has no change summary".into());
    }
    // The files hold a secret and name no mode: private. So is the agent's state.
    for (path, want) in [
        ("/etc/app/key.pem", "600"),
        ("/etc/app/app.yaml", "600"),
        ("/var/lib/bootstrap", "700"),
        ("/var/lib/bootstrap/last-run.json", "600"),
    ] {
        let got = mode(&node, path);
        if got != want {
            failures.push(format!("{path} is {got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // pending-notify.json: a notify handler that fails keeps it.
    let r = node.agent(&["apply", "--source", "/srv/bundle", "--role", "pend", "--name", "production-pend"]);
    assert_eq!(r.code, 1, "the handler of a missing unit fails:\n{}", r.all());
    assert_eq!(mode(&node, "/var/lib/bootstrap/pending-notify.json"), "600");
}

/// Finding 13: a secret as short as `0` is not replaced in the report's text (which made
/// last-run.json and --json invalid JSON), and the step that used it is still sensitive as a
/// whole: no diff shows it, its file is 0600.
#[test]
fn a_short_secret_keeps_the_report_valid_and_the_step_sensitive() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pin");
    std::fs::write(&secret, "0\n").unwrap();
    let role = format!(
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/app/pin\"\ncontent = \"pin={{{{ secret('file:{}') }}}}\\n\"\ntemplate = true\n",
        secret.display()
    );
    let b = bundle(&[("roles/short/role.toml", &role)]);
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), b.path(), "short", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let out: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("--json is not JSON ({e}):\n{}", r.stdout));
    assert_eq!(out["summary"]["changed"], 1, "{out:#}");
    let text = std::fs::read_to_string(root.path().join("var/lib/bootstrap/last-run.json")).unwrap();
    let rep: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("last-run.json is not JSON ({e}):\n{text}"));
    assert_eq!(rep["summary"]["in_sync"], 0, "{rep:#}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(root.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("etc/app/pin"), 0o600, "a file rendered with secret() is private");
    assert_eq!(mode("var/lib/bootstrap"), 0o700);
    assert_eq!(mode("var/lib/bootstrap/last-run.json"), 0o600);

    // Changed: the plan shows that the content changes, not the content.
    std::fs::write(&secret, "1\n").unwrap();
    let plan = run_role("plan", root.path(), b.path(), "short", &[]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    assert!(plan.stdout.contains("content changed, sha256 "), "{}", plan.stdout);
    assert!(!plan.stdout.contains("pin=0") && !plan.stdout.contains("pin=1"), "{}", plan.stdout);
    let plan = run_role("plan", root.path(), b.path(), "short", &["--json"]);
    let doc: serde_json::Value = serde_json::from_str(&plan.stdout).unwrap_or_else(|e| panic!("plan --json is not JSON ({e}):\n{}", plan.stdout));
    let change = &doc["steps"][0]["changes"][0];
    assert_eq!(change["field"], "content", "{doc:#}");
    assert!(change["diff"].as_str().unwrap().starts_with("content changed, sha256 "), "{doc:#}");
}

/// The structural rule does not depend on finding the value in the text: a secret reshaped by a
/// filter (`upper`, `replace`), in a `source` template or a unit's drop-in, cannot be matched
/// by any redaction, and still never shows: the steps that rendered it are sensitive as a
/// whole (a content summary instead of a diff, every file they write 0600).
#[test]
fn a_secret_reshaped_by_a_filter_is_still_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "lower-secret-value-x1\n").unwrap();
    let s = secret.display();
    let role = format!(
        "schema = 1\n\
         [[step]]\nkind = \"file\"\npath = \"/etc/app/upper.conf\"\nsource = \"upper.conf.j2\"\ntemplate = true\n\
         [[step]]\nkind = \"unit\"\nname = \"app.service\"\ncontent = \"[Service]\\nExecStart=/bin/true\\n\"\ntemplate = true\n\
         [step.dropins]\n\"10-env.conf\" = \"[Service]\\nEnvironment=KEY={{{{ secret('file:{s}') | replace('-', '_') }}}}\\n\"\n\
         [[step]]\nkind = \"file\"\npath = \"/etc/app/public.conf\"\ncontent = \"public-line\\n\"\n"
    );
    let b = bundle(&[
        ("roles/f/role.toml", &role),
        ("roles/f/files/upper.conf.j2", &format!("KEY={{{{ secret('file:{s}') | upper }}}}\n")),
    ]);
    let root = tempfile::tempdir().unwrap();
    let mut seen = String::new();
    let r = run_role("apply", root.path(), b.path(), "f", &["-vv"]);
    assert_eq!(r.code, 0, "{}", r.all());
    seen += &r.all();
    seen += &std::fs::read_to_string(root.path().join("var/lib/bootstrap/last-run.json")).unwrap();
    let upper = std::fs::read_to_string(root.path().join("etc/app/upper.conf")).unwrap();
    assert_eq!(upper, "KEY=LOWER-SECRET-VALUE-X1\n", "the test can see the reshaped secret");

    std::fs::write(&secret, "other-secret-value-y2\n").unwrap();
    let plan = run_role("plan", root.path(), b.path(), "f", &["-vv"]);
    assert_eq!(plan.code, 0, "{}", plan.all());
    let plan_text = plan.stdout.clone();
    seen += &plan.all();
    seen += &run_role("plan", root.path(), b.path(), "f", &["--json"]).all();
    let r = run_role("apply", root.path(), b.path(), "f", &["-vv", "--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    seen += &r.all();
    seen += &std::fs::read_to_string(root.path().join("var/lib/bootstrap/last-run.json")).unwrap();
    let leaked: Vec<&str> = [
        "LOWER-SECRET-VALUE-X1",
        "lower_secret_value_x1",
        "OTHER-SECRET-VALUE-Y2",
        "other_secret_value_y2",
    ]
    .into_iter()
    .filter(|v| seen.contains(v))
    .collect();
    assert!(leaked.is_empty(), "leaked: {leaked:?}\n{seen}");
    assert_eq!(plan_text.matches("content changed, sha256 ").count(), 2, "{plan_text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(root.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("etc/app/upper.conf"), 0o600);
    assert_eq!(mode("etc/systemd/system/app.service.d/10-env.conf"), 0o600);
    assert_eq!(mode("etc/systemd/system/app.service"), 0o600, "the whole unit step is sensitive");
    assert_eq!(mode("etc/app/public.conf"), 0o644, "a step without a secret is not");
}

/// Review of the trust fixes: a sensitive unit's drop-in that already holds its content but was
/// written 0644 (before the unit held a secret) is made 0600, and then nothing is left to do.
#[test]
fn a_sensitive_units_existing_readable_file_is_made_private() {
    let root = tempfile::tempdir().unwrap();
    let dropin = root.path().join("etc/systemd/system/app.service.d/10-env.conf");
    std::fs::create_dir_all(dropin.parent().unwrap()).unwrap();
    std::fs::write(&dropin, "[Service]\nEnvironment=TOKEN=abcdef123456\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dropin, std::fs::Permissions::from_mode(0o644)).unwrap();
    let b = bundle(&[(
        "roles/u/role.toml",
        "schema = 1\n[[step]]\nkind = \"unit\"\nname = \"app.service\"\nsensitive = true\n[step.dropins]\n\"10-env.conf\" = \"[Service]\\nEnvironment=TOKEN=abcdef123456\\n\"\n",
    )]);
    let r = run_role("apply", root.path(), b.path(), "u", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(std::fs::metadata(&dropin).unwrap().permissions().mode() & 0o777, 0o600);
    let r = run_role("apply", root.path(), b.path(), "u", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(!r.all().contains("abcdef123456"));
}
