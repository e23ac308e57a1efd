//! What an operator installs: metrics, man page, completions.

use crate::support::*;
use std::process::Command;

/// Parse a Prometheus text file with prometheus_client's parser (from the test venv):
/// `name{labels}` → value.
fn parse_prom(path: &std::path::Path) -> std::collections::BTreeMap<String, f64> {
    let venv = std::env::var("VENV").unwrap_or_else(|_| "/var/tmp/bootstrap-venv".into());
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let o = Command::new(format!("{venv}/bin/python")).args(["-c", script]).arg(path).output().unwrap();
    assert!(o.status.success(), "not Prometheus text format: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Show 4: the metrics file parses as Prometheus text and follows failed and successful runs,
/// including a run that fails before its steps (the bundle source is gone).
#[test]
fn metrics_follow_failed_and_successful_runs() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("etc/bootstrap")).unwrap();
    std::fs::write(
        root.path().join("etc/bootstrap/config.toml"),
        "[metrics]\ntextfile = \"/var/lib/metrics/bootstrap.prom\"\n",
    )
    .unwrap();
    let prom = root.path().join("var/lib/metrics/bootstrap.prom");
    let b = bundle(&[
        ("roles/app/role.toml", "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/a\"\ncontent = \"a\\n\"\n[[step]]\nkind = \"exec\"\ncommand = [\"false\"]\ncreates = \"/nonexistent\"\n"),
        ("roles/ok/role.toml", "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/a\"\ncontent = \"a\\n\"\n"),
    ]);
    let r = run_role("apply", root.path(), b.path(), "app", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    let m = parse_prom(&prom);
    assert_eq!(m["bootstrap_last_run_success"], 0.0, "{m:?}");
    assert_eq!(m["bootstrap_last_run_exit_code"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"changed\"}"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"failed\"}"], 1.0);
    assert_eq!(m["bootstrap_reboot_pending"], 0.0);
    assert!(m.contains_key("bootstrap_bundle_info{origin=\"directory\",role=\"app\",sha256=\"\"}"), "{m:?}");
    let t1 = m["bootstrap_last_run_timestamp_seconds"];
    assert!(t1 > 1.7e9);

    let r = run_role("apply", root.path(), b.path(), "ok", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let m = parse_prom(&prom);
    assert_eq!(m["bootstrap_last_run_success"], 1.0, "{m:?}");
    assert_eq!(m["bootstrap_resources{state=\"in_sync\"}"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"failed\"}"], 0.0);
    assert!(m["bootstrap_last_run_timestamp_seconds"] >= t1);

    // The source is gone: no report, but the metrics say the run failed.
    let r = run_role("apply", root.path(), &root.path().join("no-such-bundle"), "ok", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    let m = parse_prom(&prom);
    assert_eq!(m["bootstrap_last_run_success"], 0.0, "{m:?}");
    assert_eq!(m["bootstrap_last_run_exit_code"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"changed\"}"], 0.0);

    // Without a configured path and without node_exporter's directory: no file is written.
    let bare = tempfile::tempdir().unwrap();
    assert_eq!(run_role("apply", bare.path(), b.path(), "ok", &[]).code, 0);
    assert!(!bare.path().join("var/lib/node_exporter").exists());
}

/// Show 5: `man bootstrap` renders; bash completions load and complete subcommands.
#[test]
fn man_page_renders_and_bash_completions_load() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("bootstrap.1");
    let o = cmd(&["generate", "man"]).output().unwrap();
    assert!(o.status.success());
    std::fs::write(&page, &o.stdout).unwrap();
    let o = Command::new("man")
        .args(["-l", "-Tutf8"])
        .arg(&page)
        .env("MANWIDTH", "100")
        .output()
        .expect("man (apt-get install man-db)");
    // man overstrikes bold text (X\bX) when not on a terminal: keep the last of each pair.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&o.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("NAME bootstrap - Node bootstrap agent"), "{text}");
    assert!(text.contains("apply") && text.contains("reboot"), "{text}");

    let comp = dir.path().join("bootstrap.bash");
    std::fs::write(&comp, cmd(&["generate", "completions", "bash"]).output().unwrap().stdout).unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p bootstrap && COMP_WORDS=(bootstrap ap) COMP_CWORD=1 && _bootstrap bootstrap ap bootstrap && echo \"reply: ${{COMPREPLY[*]}}\"",
            comp.display()
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("-F _bootstrap bootstrap") && out.contains("reply: apply"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
