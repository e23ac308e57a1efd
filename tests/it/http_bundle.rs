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
    /// (If-None-Match sent, status answered) per request.
    log: Vec<(Option<String>, u16)>,
}

fn serve(state: Arc<Mutex<Served>>) -> HttpServer {
    HttpServer::start(move |req| {
        let inm = req.header("if-none-match").map(str::to_string);
        let mut s = state.lock().unwrap();
        let path_ok = req.path == "/b.tar.gz";
        let status = match (s.force, path_ok, &inm) {
            (Some(f), _, _) => f,
            (None, false, _) => 404,
            (None, true, Some(t)) if *t == s.etag => 304,
            _ => 200,
        };
        s.log.push((inm, status));
        let body: &[u8] = if status == 200 { &s.body } else { b"" };
        Some(Response::new(status, body).header("ETag", s.etag.clone()).header("Connection", "close"))
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
