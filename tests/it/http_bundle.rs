//! `http(s)://` bundles against a small HTTP server that honours ETag / If-None-Match:
//! conditional GET, 503 → last-good, 403 → failure.

use crate::harness::http::{HttpServer, Response};
use crate::harness::support::*;
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Served {
    body: Vec<u8>,
    etag: String,
    /// Answer every request with this status instead.
    force: Option<u16>,
    /// Served at /b.tar.gz.minisig (404 when None).
    sig: Option<Vec<u8>>,
    /// (If-None-Match sent, status answered) per request.
    log: Vec<(Option<String>, u16)>,
}

fn serve(state: Arc<Mutex<Served>>) -> HttpServer {
    HttpServer::start(move |req| {
        let inm = req.header("if-none-match").map(str::to_string);
        let mut s = state.lock().unwrap();
        let path_ok = req.path == "/b.tar.gz";
        let sig = req.path == "/b.tar.gz.minisig";
        let status = match (s.force, path_ok, &inm) {
            (Some(f), _, _) => f,
            (None, false, _) if sig && s.sig.is_some() => 200,
            (None, false, _) => 404,
            (None, true, Some(t)) if *t == s.etag => 304,
            _ => 200,
        };
        if !sig {
            s.log.push((inm, status));
        }
        let body: Vec<u8> = match status {
            200 if sig => s.sig.clone().unwrap_or_default(),
            200 => s.body.clone(),
            _ => vec![],
        };
        Some(Response::new(status, &body[..]).header("ETag", s.etag.clone()).header("Connection", "close"))
    })
}

#[test]
fn http_bundle_conditional_get_last_good_and_refusal() {
    let out = tempfile::tempdir().unwrap();
    let tarball = out.path().join("b.tar.gz");
    assert_eq!(agent(&["bundle", "build", repo().to_str().unwrap(), "-o", tarball.to_str().unwrap()]).code, 0);
    let st = Arc::new(Mutex::new(Served {
        body: std::fs::read(&tarball).unwrap(),
        etag: "\"v1\"".into(),
        ..Default::default()
    }));
    let server = serve(st.clone());
    let url = format!("{}/b.tar.gz", server.url);
    let root = tempfile::tempdir().unwrap();
    let apply = |extra: &[&str]| {
        let mut a = vec!["apply", "--root", root.path().to_str().unwrap(), "--source", url.as_str(), "--role", "haproxy"];
        a.extend_from_slice(extra);
        agent(&a)
    };
    let r = apply(&[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "source");
    let r = apply(&["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "cache");
    assert_eq!(
        st.lock().unwrap().log,
        vec![(None, 200), (Some("\"v1\"".to_string()), 304)],
        "one request, answered 304"
    );

    st.lock().unwrap().force = Some(503);
    let r = apply(&[]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "last-good");

    st.lock().unwrap().force = Some(403);
    std::fs::write(root.path().join("etc/motd"), "edited").unwrap();
    let r = apply(&[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("HTTP 403"), "{}", r.stderr);
    assert_eq!(
        std::fs::read_to_string(root.path().join("etc/motd")).unwrap(),
        "edited",
        "nothing is applied after a 403"
    );
}

/// Finding 9: a server answering 304 to a request that carried no If-None-Match (nothing is
/// cached yet) is an error naming the URL, not a panic (the release build aborted, exit 134).
#[test]
fn http_304_without_if_none_match_is_an_error_not_a_panic() {
    let st = Arc::new(Mutex::new(Served {
        etag: "\"v1\"".into(),
        force: Some(304),
        ..Default::default()
    }));
    let server = serve(st.clone());
    let url = format!("{}/b.tar.gz", server.url);
    let root = tempfile::tempdir().unwrap();
    let r = agent(&["apply", "--root", root.path().to_str().unwrap(), "--source", url.as_str(), "--role", "haproxy"]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
    assert!(
        r.stderr
            .contains(&format!("{url} answered 304 Not Modified to a request without If-None-Match")),
        "{}",
        r.stderr
    );
    assert_eq!(st.lock().unwrap().log, vec![(None, 304)]);
    assert!(!root.path().join("etc/motd").exists(), "nothing applied");
}

/// Finding 7: the bundle applied after a 304 (unchanged, reused from the cache) or from the
/// last-good fallback (source down) is checked against the sha256 pin and the minisign key
/// configured NOW, exactly like a fresh download.
#[test]
fn cached_bundles_are_checked_against_the_current_pin_and_key() {
    let out = tempfile::tempdir().unwrap();
    let tarball = out.path().join("b.tar.gz");
    assert_eq!(agent(&["bundle", "build", repo().to_str().unwrap(), "-o", tarball.to_str().unwrap()]).code, 0);
    let sha = std::fs::read_to_string(out.path().join("b.tar.gz.sha256")).unwrap()[..64].to_string();
    let st = Arc::new(Mutex::new(Served {
        body: std::fs::read(&tarball).unwrap(),
        etag: "\"v1\"".into(),
        ..Default::default()
    }));
    let server = serve(st.clone());
    let url = format!("{}/b.tar.gz", server.url);
    let root = tempfile::tempdir().unwrap();
    let apply = || agent(&["apply", "--root", root.path().to_str().unwrap(), "--source", url.as_str(), "--role", "haproxy"]);
    let r = apply();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "source");

    // A pin added since: the unchanged (304) bundle is not the pinned one.
    let zeros = "0".repeat(64);
    write_config(root.path(), &format!("[bundle]\nsha256 = \"{zeros}\"\n"));
    let mut failures = Vec::new();
    let mut expect_fail = |what: &str, want: &str| {
        let r = apply();
        if r.code != 1 || !r.stderr.contains(want) || r.stderr.contains("panicked") {
            failures.push(format!("{what}: exit {}\n  want: {want}\n  got: {}", r.code, r.all()));
        }
    };
    expect_fail("304 with a new pin", &format!("but {zeros} is pinned"));
    // The source down: last-good is not the pinned one either.
    st.lock().unwrap().force = Some(503);
    expect_fail("last-good with a new pin", &format!("but {zeros} is pinned"));

    // A key added since: the cached bundle was never signed.
    let (sk, pk) = signing_key(out.path(), "k.key");
    write_config(root.path(), &format!("[bundle]\npublic_key = \"{pk}\"\n"));
    expect_fail("last-good with a new key", "signature");
    st.lock().unwrap().force = None;
    expect_fail("304 with a new key and no signature served", "has no signature");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Signed now (same bytes, reproducible build): the 304 bundle verifies, and so does
    // last-good with the signature kept from that run.
    let signed = tempfile::tempdir().unwrap();
    let r = agent(&[
        "bundle",
        "build",
        repo().to_str().unwrap(),
        "-o",
        signed.path().join("b.tar.gz").to_str().unwrap(),
        "--sign",
        sk.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(std::fs::read(signed.path().join("b.tar.gz")).unwrap(), std::fs::read(&tarball).unwrap());
    st.lock().unwrap().sig = Some(std::fs::read(signed.path().join("b.tar.gz.minisig")).unwrap());
    let r = apply();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "cache");
    assert_eq!(report(root.path())["bundle"]["sha256"], sha.as_str());
    st.lock().unwrap().force = Some(503);
    let r = apply();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "last-good");
    // And the pin, when it is the right one.
    write_config(root.path(), &format!("[bundle]\npublic_key = \"{pk}\"\nsha256 = \"{sha}\"\n"));
    st.lock().unwrap().force = None;
    let r = apply();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "cache");
}

/// Rollback protection does not block the last-good fallback: a newer signed build that failed
/// leaves last-good on an older build, and with the source down that older build is applied.
#[test]
fn last_good_fallback_is_not_refused_as_a_rollback() {
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = signing_key(keys.path(), "k.key");
    let build = |dir: &std::path::Path, t: &str| -> (Vec<u8>, Vec<u8>) {
        let out = tempfile::tempdir().unwrap();
        let f = out.path().join("b.tar.gz");
        build_signed(dir, &f, &sk, t);
        (std::fs::read(&f).unwrap(), std::fs::read(format!("{}.minisig", f.display())).unwrap())
    };
    let (v1, s1) = build(&repo(), "1000");
    let st = Arc::new(Mutex::new(Served {
        body: v1,
        sig: Some(s1),
        etag: "\"v1\"".into(),
        ..Default::default()
    }));
    let server = serve(st.clone());
    let url = format!("{}/b.tar.gz", server.url);
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), &format!("[bundle]\npublic_key = \"{pk}\"\n"));
    let apply = || agent(&["apply", "--root", root.path().to_str().unwrap(), "--source", url.as_str(), "--role", "haproxy"]);
    assert_eq!(apply().code, 0);
    let good = std::fs::read_link(root.path().join("var/lib/bootstrap/bundles/last-good")).unwrap();

    // A newer build whose run fails (a file where the role wants a directory).
    let copy = bundle_copy();
    std::fs::write(copy.path().join("roles/haproxy/files/variant.txt"), "v2").unwrap();
    let (v2, s2) = build(copy.path(), "2000");
    *st.lock().unwrap() = Served {
        body: v2,
        sig: Some(s2),
        etag: "\"v2\"".into(),
        ..Default::default()
    };
    std::fs::remove_dir_all(root.path().join("etc/haproxy")).unwrap();
    std::fs::write(root.path().join("etc/haproxy"), "not a directory").unwrap();
    assert_eq!(apply().code, 1);
    assert_eq!(std::fs::read_link(root.path().join("var/lib/bootstrap/bundles/last-good")).unwrap(), good);

    // The source down: the older last-good build is applied, not refused.
    std::fs::remove_file(root.path().join("etc/haproxy")).unwrap();
    st.lock().unwrap().force = Some(503);
    let r = apply();
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(report(root.path())["bundle"]["origin"], "last-good");
}
