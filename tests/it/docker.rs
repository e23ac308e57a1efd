//! The `container` step against a real dockerd per test, run in a booted node with the
//! engine's socket bound in.

use crate::harness::docker::Dockerd;
use crate::harness::http::{HttpServer, Response};
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

/// A minimal registry (distribution API v2, plain HTTP) serving one image by digest only,
/// inside dockerd's network namespace (dockerd treats 127.0.0.0/8 as an insecure registry).
/// Returns the server (it stops when dropped), its port, the manifest digest, and the log of
/// requests ("GET /v2/...").
fn registry(netns: &str, repo: &str) -> (HttpServer, u16, String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use sha2::Digest;
    use std::io::Write;
    let sha = |b: &[u8]| format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)));
    // One layer with one file; the container is created, never started.
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(6);
    h.set_mode(0o755);
    h.set_cksum();
    tar.append_data(&mut h, "hello", &b"hello\n"[..]).unwrap();
    let layer_tar = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&layer_tar).unwrap();
    let layer = gz.finish().unwrap();
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": { "Cmd": ["/hello"] },
        "rootfs": { "type": "layers", "diff_ids": [sha(&layer_tar)] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": { "mediaType": "application/vnd.docker.container.image.v1+json", "size": config.len(), "digest": sha(&config) },
        "layers": [{ "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": layer.len(), "digest": sha(&layer) }],
    }))
    .unwrap();
    let digest = sha(&manifest);
    let mut blobs = std::collections::HashMap::new();
    blobs.insert(format!("/v2/{repo}/blobs/{}", sha(&config)), (config, "application/octet-stream"));
    blobs.insert(format!("/v2/{repo}/blobs/{}", sha(&layer)), (layer, "application/octet-stream"));
    blobs.insert(
        format!("/v2/{repo}/manifests/{digest}"),
        (manifest, "application/vnd.docker.distribution.manifest.v2+json"),
    );
    blobs.insert("/v2/".to_string(), (b"{}".to_vec(), "application/json"));
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = crate::harness::http::bind_in_netns(&format!("/run/netns/{netns}"), "127.0.0.1:0");
    let port = listener.local_addr().unwrap().port();
    let (log2, digest2) = (log.clone(), digest.clone());
    let server = HttpServer::serve(listener, format!("http://127.0.0.1:{port}"), move |req| {
        log2.lock().unwrap().push(format!("{} {}", req.method, req.path));
        let (status, body, ctype): (u16, &[u8], &str) = match blobs.get(&req.path) {
            Some((body, ctype)) => (200, body, ctype),
            None => (
                404,
                br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#,
                "application/json",
            ),
        };
        Some(
            Response::new(status, body)
                .header("Content-Type", ctype)
                .header("Docker-Distribution-API-Version", "registry/2.0")
                .header("Docker-Content-Digest", digest2.clone())
                .header("Connection", "close"),
        )
    });
    (server, port, digest, log)
}

/// Finding 11: `image@sha256:…` pulls that digest (not `:latest`), the container is created
/// from it, and a second run (and `pull = "always"`) finds it present by digest: no change,
/// no pull. The image comes from a registry speaking the distribution API in dockerd's netns.
#[test]
fn digest_pinned_image_is_pulled_and_compared_by_digest() {
    let d = Dockerd::start();
    let (_registry, port, digest, log) = registry(&d.netns, "bt/app");
    let image = format!("127.0.0.1:{port}/bt/app@{digest}");
    let role = |pull: &str| {
        format!("schema = 1\n[[step]]\nkind = \"container\"\nname = \"pinned\"\nimage = \"{image}\"\npull = \"{pull}\"\nstate = \"stopped\"\ncommand = [\"/hello\"]\n")
    };
    let b = bundle(&[("roles/app/role.toml", &role("missing"))]);
    let node = Node::boot_with(b.path(), &[(&d.socket, "/run/docker.sock")]);
    let apply = || node.run_role("apply", "app", &["--name", "production-app", "--detailed-exitcodes"]);
    let r = apply();
    let requests = log.lock().unwrap().clone();
    assert_eq!(r.code, 2, "{}\nregistry saw: {requests:?}", r.all());
    assert!(requests.contains(&format!("GET /v2/bt/app/manifests/{digest}")), "{requests:?}");
    assert!(!requests.iter().any(|l| l.contains("manifests/latest")), "{requests:?}");
    assert_eq!(d.out(&["inspect", "-f", "{{.Config.Image}}", "pinned"]), image);
    assert!(d.out(&["image", "inspect", "-f", "{{json .RepoDigests}}", &image]).contains(&digest));

    let r = apply();
    assert_eq!(r.code, 0, "second run changes nothing: {}", r.all());
    std::fs::write(b.path().join("roles/app/role.toml"), role("always")).unwrap();
    let before = log.lock().unwrap().len();
    let r = apply();
    assert_eq!(r.code, 0, "pull = always with the digest present: {}", r.all());
    assert_eq!(log.lock().unwrap().len(), before, "no registry request: {:?}", log.lock().unwrap());
}
