//! The `container` step against a real dockerd per test, run in a booted node with the
//! engine's socket bound in.

use crate::harness::docker::Dockerd;
use crate::harness::node::Node;
use crate::harness::support::*;

fn role(step: &str) -> String {
    format!("schema = 1\n[[step]]\nkind = \"container\"\nname = \"web\"\nimage = \"bt-test:1\"\npull = \"never\"\ncommand = [\"sleep\", \"infinity\"]\n{step}")
}

/// Show 1: create and start; a second apply changes nothing (same container id); a changed env
/// var recreates it exactly once, and `plan` shows the configuration diff first; `absent`
/// removes it. Also: a missing image with pull = "never", and a host port already taken.
#[test]
fn container_lifecycle_on_a_real_dockerd() {
    let d = Dockerd::start();
    d.import_rootfs("bt-test:1");
    let b = bundle(&[(
        "roles/app/role.toml",
        &role("env = { A = \"1\" }\nports = [\"18080:80\"]\nrestart = \"unless-stopped\"\nlabels = { team = \"edge\" }\n"),
    )]);
    let node = Node::boot_with(b.path(), &[(&d.socket, "/run/docker.sock")]);
    let role_path = b.path().join("roles/app/role.toml");

    let r = node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let id1 = d.out(&["inspect", "-f", "{{.Id}}", "web"]);
    assert_eq!(
        d.out(&[
            "inspect",
            "-f",
            "{{.State.Running}} {{.HostConfig.RestartPolicy.Name}} {{index .Config.Labels \"team\"}}",
            "web"
        ]),
        "true unless-stopped edge"
    );
    assert!(d.out(&["inspect", "-f", "{{json .Config.Env}}", "web"]).contains("\"A=1\""));

    let r = node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "second apply changes nothing: {}", r.all());
    assert_eq!(node.report()["summary"]["changed"], 0);
    assert_eq!(d.out(&["inspect", "-f", "{{.Id}}", "web"]), id1, "not recreated");

    std::fs::write(
        &role_path,
        role("env = { A = \"2\" }\nports = [\"18080:80\"]\nrestart = \"unless-stopped\"\nlabels = { team = \"edge\" }\n"),
    )
    .unwrap();
    let r = node.run_role("plan", "app", &["--name", "production-app"]);
    assert!(
        r.stdout.contains("-    \"A\": \"1\"") && r.stdout.contains("+    \"A\": \"2\""),
        "plan shows the config diff: {}",
        r.all()
    );
    assert_eq!(d.out(&["inspect", "-f", "{{.Id}}", "web"]), id1, "plan changes nothing");
    let r = node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    let id2 = d.out(&["inspect", "-f", "{{.Id}}", "web"]);
    assert_ne!(id2, id1, "recreated");
    assert!(d.out(&["inspect", "-f", "{{json .Config.Env}}", "web"]).contains("\"A=2\""));
    let r = node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(d.out(&["inspect", "-f", "{{.Id}}", "web"]), id2, "recreated exactly once");
    assert_eq!(d.out(&["ps", "-aq"]).lines().count(), 1, "the old container is gone");

    // A second container wanting the same host port: a clear error naming the port.
    std::fs::write(
        &role_path,
        format!(
            "{}[[step]]\nkind = \"container\"\nname = \"web2\"\nimage = \"bt-test:1\"\npull = \"never\"\ncommand = [\"sleep\", \"infinity\"]\nports = [\"18080:80\"]\n",
            role("env = { A = \"2\" }\nports = [\"18080:80\"]\nrestart = \"unless-stopped\"\nlabels = { team = \"edge\" }\n")
        ),
    )
    .unwrap();
    let r = node.run_role("apply", "app", &["--name", "production-app"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("a host port is taken") && r.all().contains("18080:80"), "{}", r.all());

    // A missing image with pull = "never".
    std::fs::write(
        &role_path,
        "schema = 1\n[[step]]\nkind = \"container\"\nname = \"ghost\"\nimage = \"nope:1\"\npull = \"never\"\n",
    )
    .unwrap();
    let r = node.run_role("apply", "app", &["--name", "production-app"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("image nope:1 is not present and pull = \"never\""), "{}", r.all());

    // Absent: removed; then nothing to do.
    std::fs::write(&role_path, "schema = 1\n[[step]]\nkind = \"container\"\nname = \"web\"\nstate = \"absent\"\n").unwrap();
    let r = node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(!d.docker(&["inspect", "web"]).status.success(), "web is gone");
    let r = node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
}

/// Show 2: no engine → the step fails naming the socket, the run exits 1, later steps do not run.
#[test]
fn engine_not_running_fails_the_step_naming_the_socket() {
    let b = bundle(&[(
        "roles/app/role.toml",
        &format!("{}[[step]]\nkind = \"file\"\npath = \"/etc/after\"\ncontent = \"x\\n\"\n", role("")),
    )]);
    let node = Node::boot(b.path());
    let r = node.run_role("apply", "app", &["--name", "production-app"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("the Docker engine is not reachable at /var/run/docker.sock"), "{}", r.all());
    let rep = node.report();
    let steps = rep["steps"].as_array().unwrap();
    assert_eq!(steps[0]["status"], "failed", "{rep:#}");
    assert_eq!(steps[1]["status"], "not_run", "{rep:#}");
    assert!(!node.merged.join("etc/after").exists());
}
