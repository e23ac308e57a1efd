//! Loops and the rest of what a role author reaches for: `for_each` over a list, a table or a
//! var, `{% include %}`/`{% import %}` from the role's files/, `[defaults.<kind>]`, step `vars`.

use crate::harness::support::*;
use std::path::Path;

fn read(root: &Path, p: &str) -> String {
    std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn ids(root: &Path) -> Vec<String> {
    report(root)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

const LOOPS: &str = r#"schema = 1
[vars]
peers = ["a", "b"]
greeting = "hi"

[[step]]
kind = "directory"
path = "/etc/peerbench/conf.d"

[[step]]
kind = "file"
for_each = ["svc01", "svc02", "svc03"]
path = "/etc/peerbench/conf.d/{{ item }}.conf"
content = "name = {{ item }}\ngreeting = {{ greeting }}\n"
template = true
mode = "0640"
when = "item != 'svc02'"

[[step]]
kind = "file"
for_each = { web = 8080, api = 9090 }
path = "/etc/ports/{{ key }}"
content = "{{ key }}={{ item }}\n"
template = true

[[step]]
kind = "file"
for_each = "peers"
path = "/etc/peers/{{ item }}"
content = "{{ item }}\n"
template = true
"#;

#[test]
fn for_each_expands_lists_tables_and_vars_with_ids_per_item_and_is_idempotent() {
    let b = bundle(&[
        ("roles/loops/role.toml", LOOPS),
        ("roles/loops/env/production.toml", "[vars]\npeers = [\"x\", \"y\", \"z\"]\n"),
    ]);
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), b.path(), "loops", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let root = root.path();
    assert_eq!(read(root, "etc/peerbench/conf.d/svc01.conf"), "name = svc01\ngreeting = hi\n");
    assert_eq!(read(root, "etc/peerbench/conf.d/svc03.conf"), "name = svc03\ngreeting = hi\n");
    assert!(!root.join("etc/peerbench/conf.d/svc02.conf").exists(), "`when` is false for svc02");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(root.join("etc/peerbench/conf.d/svc01.conf")).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    assert_eq!(read(root, "etc/ports/web"), "web=8080\n");
    assert_eq!(read(root, "etc/ports/api"), "api=9090\n");
    assert_eq!(read(root, "etc/peers/a"), "a\n");
    assert_eq!(read(root, "etc/peers/b"), "b\n");
    let ids = ids(root);
    for want in [
        "file:/etc/peerbench/conf.d/svc01.conf",
        "file:/etc/peerbench/conf.d/svc02.conf",
        "file:/etc/peerbench/conf.d/svc03.conf",
        "file:/etc/ports/api",
        "file:/etc/ports/web",
        "file:/etc/peers/a",
        "file:/etc/peers/b",
    ] {
        assert!(ids.iter().any(|i| i == want), "no step {want} in {ids:?}");
    }
    let again = run_role("apply", root, b.path(), "loops", &["--detailed-exitcodes"]);
    assert_eq!(again.code, 0, "second apply changes nothing\n{}", again.all());
    assert_eq!(report(root)["summary"]["changed"], 0);

    // A var from env/<env>.toml.
    let envroot = tempfile::tempdir().unwrap();
    let r = run_role("apply", envroot.path(), b.path(), "loops", &["--env", "production"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let mut peers: Vec<String> = std::fs::read_dir(envroot.path().join("etc/peers"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    peers.sort();
    assert_eq!(peers, ["x", "y", "z"]);
}

/// Configuration mistakes in loops exit 78 before anything changes, naming the step's position.
#[test]
fn for_each_mistakes_exit_78_with_positions() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "duplicate ids after expansion",
            "schema = 1\n[[step]]\nkind = \"file\"\nfor_each = [\"a\", \"b\"]\npath = \"/etc/same\"\ncontent = \"{{ item }}\"\n",
            &["role.toml:2:1 (item 2): step `file:/etc/same` is declared twice (first at ", "role.toml:2:1 (item 1))"],
        ),
        (
            "duplicate with a plain step",
            "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/x/b\"\ncontent = \"\"\n[[step]]\nkind = \"file\"\nfor_each = [\"a\", \"b\"]\npath = \"/etc/x/{{ item }}\"\ncontent = \"\"\n",
            &["role.toml:6:1 (item 2): step `file:/etc/x/b` is declared twice (first at ", "role.toml:2:1)"],
        ),
        (
            "unknown key",
            "schema = 1\n[[step]]\nkind = \"file\"\nfor_each = [\"a\"]\npath = \"/etc/{{ item }}\"\nownr = \"root\"\n",
            &["role.toml:6:1: unknown field `ownr`"],
        ),
        (
            "not a list",
            "schema = 1\n[[step]]\nkind = \"file\"\nfor_each = 3\npath = \"/etc/{{ item }}\"\n",
            &["role.toml:4:12: `for_each` must be a list, a table, or the name of a var"],
        ),
        (
            "var not set",
            "schema = 1\n[[step]]\nkind = \"file\"\nfor_each = \"nope\"\npath = \"/etc/{{ item }}\"\n",
            &["role.toml:4:12: `for_each` names var `nope`, which is not set"],
        ),
        (
            "rendered path invalid",
            "schema = 1\n[[step]]\nkind = \"file\"\nfor_each = [\"a\"]\npath = \"etc/{{ item }}\"\n",
            &["role.toml:5:8:"],
        ),
        (
            "undefined in a templated field",
            "schema = 1\n[[step]]\nkind = \"file\"\nfor_each = [\"a\"]\npath = \"/etc/{{ nope }}\"\n",
            &["role.toml:5:8: template error", "undefined"],
        ),
    ];
    let mut failures = Vec::new();
    for (name, role, wants) in cases {
        let b = bundle(&[("roles/r/role.toml", role)]);
        let root = tempfile::tempdir().unwrap();
        let r = run_role("apply", root.path(), b.path(), "r", &[]);
        let empty = std::fs::read_dir(root.path()).unwrap().next().is_none();
        if r.code != 78 || !empty || !wants.iter().all(|w| r.stderr.contains(w)) {
            failures.push(format!(
                "{name}: exit {} (want 78), root empty: {empty}\n  want: {wants:?}\n  got:  {}",
                r.code, r.stderr
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn include_and_import_load_from_the_roles_files_only() {
    let role = "schema = 1\n[vars]\nport = 80\n[[step]]\nkind = \"file\"\npath = \"/etc/app.conf\"\nsource = \"app.j2\"\ntemplate = true\n";
    let b = bundle(&[
        ("roles/t/role.toml", role),
        (
            "roles/t/files/app.j2",
            "{% import \"macros.j2\" as m %}{% include \"parts/head.j2\" %}{{ m.listen(port) }}\n",
        ),
        ("roles/t/files/parts/head.j2", "# head\n"),
        ("roles/t/files/macros.j2", "{% macro listen(p) %}listen {{ p }}{% endmacro %}"),
        ("secret.txt", "outside\n"),
    ]);
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), b.path(), "t", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(read(root.path(), "etc/app.conf"), "# head\nlisten 80\n");

    for (name, inc) in [("dotdot", "../../../secret.txt"), ("absolute", "/etc/passwd")] {
        let b = bundle(&[
            ("roles/t/role.toml", role),
            ("roles/t/files/app.j2", &format!("ok\n{{% include \"{inc}\" %}}\n")),
            ("secret.txt", "outside\n"),
        ]);
        let root = tempfile::tempdir().unwrap();
        let r = run_role("apply", root.path(), b.path(), "t", &[]);
        assert_eq!(r.code, 78, "{name}: {}", r.all());
        assert!(
            r.stderr.contains("app.j2:2:") && r.stderr.contains("inside the role's files/"),
            "{name}: {}",
            r.stderr
        );
        assert!(!root.path().join("etc/app.conf").exists());
    }

    // An error inside an included template names that file and its line.
    let b = bundle(&[
        ("roles/t/role.toml", role),
        ("roles/t/files/app.j2", "{% include \"inc.j2\" %}\n"),
        ("roles/t/files/inc.j2", "one\n{{ nope }}\n"),
    ]);
    let r = run_role("apply", tempfile::tempdir().unwrap().path(), b.path(), "t", &[]);
    assert_eq!(r.code, 78, "{}", r.all());
    assert!(r.stderr.contains("files/inc.j2 line 2"), "{}", r.stderr);
}

#[test]
fn defaults_per_kind_apply_unless_a_step_sets_the_field() {
    let role = r#"schema = 1
[defaults.file]
mode = "0600"
content = "default\n"

[[step]]
kind = "file"
path = "/etc/a"

[[step]]
kind = "file"
path = "/etc/b"
mode = "0644"
content = "own\n"

[[step]]
kind = "file"
for_each = ["c"]
path = "/etc/{{ item }}"
"#;
    let b = bundle(&[("roles/d/role.toml", role)]);
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), b.path(), "d", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(root.path().join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!((read(root.path(), "etc/a"), mode("etc/a")), ("default\n".to_string(), 0o600));
    assert_eq!((read(root.path(), "etc/b"), mode("etc/b")), ("own\n".to_string(), 0o644));
    assert_eq!((read(root.path(), "etc/c"), mode("etc/c")), ("default\n".to_string(), 0o600));

    for (name, bad, want) in [
        (
            "unknown kind",
            "schema = 1\n[defaults.fil]\nmode = \"0600\"\n",
            "role.toml:2:11: unknown step kind `fil` in [defaults]",
        ),
        (
            "unknown key",
            "schema = 1\n[defaults.file]\nownr = \"root\"\n",
            "role.toml:3:1: unknown field `ownr`",
        ),
    ] {
        let b = bundle(&[("roles/d/role.toml", bad)]);
        let v = agent(&["validate", b.path().to_str().unwrap()]);
        assert_eq!(v.code, 78, "{name}: {}", v.all());
        assert!(v.stderr.contains(want), "{name}: want {want}\n{}", v.stderr);
    }
}

#[test]
fn step_vars_merge_over_the_roles_vars() {
    let role = r#"schema = 1
[vars]
who = "role"
other = "kept"

[[step]]
kind = "file"
path = "/etc/step"
content = "{{ who }} {{ other }}\n"
template = true
vars = { who = "step" }

[[step]]
kind = "file"
path = "/etc/plain"
content = "{{ who }}\n"
template = true

[[step]]
kind = "file"
for_each = ["x"]
vars = { dir = "/etc/loop" }
path = "{{ dir }}-{{ item }}"
content = "{{ dir }} {{ item }}\n"
template = true
"#;
    let b = bundle(&[("roles/v/role.toml", role)]);
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), b.path(), "v", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(read(root.path(), "etc/step"), "step kept\n");
    assert_eq!(read(root.path(), "etc/plain"), "role\n");
    assert_eq!(read(root.path(), "etc/loop-x"), "/etc/loop x\n");
}

/// The peer benchmark's role (`benches/lib/bench-role.sh`, its loops one `for_each` step
/// each) validates and applies into a root: 10 data directories, 40 config files, 5 units, ids
/// per item, and a second apply changes nothing. (The benchmark itself is not run: it is slow.)
#[test]
fn the_peer_benchmark_role_loops_and_converges_in_a_root() {
    let w = tempfile::tempdir().unwrap();
    // The role as the benchmarks write it (benches/lib/bench-role.sh, sourced by peer-bench and
    // first-boot).
    let lib = repo().join("benches/lib/bench-role.sh");
    let gen = format!(
        "mkdir -p '{w}/roles/bench/files' && source '{lib}' && bench_role_toml > '{w}/roles/bench/role.toml'",
        w = w.path().display(),
        lib = lib.display()
    );
    let out = std::process::Command::new("bash").args(["-c", &gen]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let role = std::fs::read_to_string(w.path().join("roles/bench/role.toml")).unwrap();
    assert_eq!(role.matches("[[step]]").count(), 8, "one step per loop:\n{role}");

    let v = agent(&["validate", w.path().to_str().unwrap()]);
    assert_eq!(v.code, 0, "{}", v.all());
    let root = tempfile::tempdir().unwrap();
    let r = run_role("apply", root.path(), w.path(), "bench", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let host: serde_json::Value = serde_json::from_str(&agent(&["facts", "--format", "json"]).stdout).unwrap();
    let host = host["hostname"].as_str().unwrap();
    for i in 1..=40 {
        let got = read(root.path(), &format!("etc/bench/conf-{i}.conf"));
        assert_eq!(got, format!("# file {i}\ngreeting = hello from the benchmark\nhost = {host}\n"));
    }
    for i in 1..=10 {
        assert!(root.path().join(format!("srv/data/d{i}")).is_dir());
    }
    for i in 1..=5 {
        let unit = read(root.path(), &format!("etc/systemd/system/bench-{i}.service"));
        assert!(unit.starts_with(&format!("[Unit]\nDescription=bench {i}\n")), "{unit}");
    }
    let ids = ids(root.path());
    assert_eq!(ids.len(), 1 + 2 + 10 + 40 + 5 + 2, "{ids:?}");
    assert!(ids.iter().any(|i| i == "file:/etc/bench/conf-7.conf"), "{ids:?}");
    let again = run_role("apply", root.path(), w.path(), "bench", &["--detailed-exitcodes"]);
    assert_eq!(again.code, 0, "{}", again.all());
}
