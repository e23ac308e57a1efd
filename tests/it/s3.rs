//! S3 bundles on moto: fetch, conditional GET (one request, 304), last-good when S3 is down,
//! a missing object is a failure.

use crate::harness::moto::{Moto, AWS_ENV};
use crate::harness::support::*;

fn apply(root: &std::path::Path, extra: &[&str]) -> Run {
    let mut args = vec!["apply", "--root", root.to_str().unwrap(), "--name", "production-haproxy"];
    args.extend_from_slice(extra);
    cmd(&args).envs(AWS_ENV).output().unwrap().into()
}

#[test]
fn s3_bundle_conditional_get_and_last_good() {
    let mut moto = Moto::start();
    let out = tempfile::tempdir().unwrap();
    let tarball = out.path().join("roles-production.tar.gz");
    assert_eq!(agent(&["bundle", "build", repo().to_str().unwrap(), "-o", tarball.to_str().unwrap()]).code, 0);
    moto.put("roles", vec![]);
    moto.put("roles/roles-production.tar.gz", std::fs::read(&tarball).unwrap());

    let root = tempfile::tempdir().unwrap();
    write_config(
        root.path(),
        &format!(
            "[bundle]\nsource = \"s3://roles/roles-${{env}}.tar.gz\"\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\n",
            moto.url
        ),
    );
    let r = apply(root.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = report(root.path());
    assert_eq!(rep["bundle"]["origin"], "source");
    assert_eq!(rep["source"], "s3://roles/roles-production.tar.gz");

    // Unchanged bundle: exactly one request, answered 304, and nothing to change.
    let before = moto.requests("/roles/roles-production.tar.gz").len();
    let r = apply(root.path(), &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let new: Vec<String> = moto.requests("/roles/roles-production.tar.gz")[before..].to_vec();
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].contains("GET /roles/roles-production.tar.gz") && new[0].ends_with("\" 304 -"), "{new:?}");
    assert_eq!(report(root.path())["bundle"]["origin"], "cache");

    // A missing object is a failure (not a fallback): exit 1, nothing applied.
    let missing = tempfile::tempdir().unwrap();
    write_config(
        missing.path(),
        &format!("[bundle]\nsource = \"s3://roles/roles-nope.tar.gz\"\ns3_endpoint = \"{}\"\n", moto.url),
    );
    let r = apply(missing.path(), &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("s3://roles/roles-nope.tar.gz: HTTP 404"), "{}", r.stderr);
    assert!(!missing.path().join("etc/motd").exists());

    // S3 down: the last good bundle is applied and the report says so.
    moto.stop();
    let r = apply(root.path(), &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = report(root.path());
    assert_eq!(rep["bundle"]["origin"], "last-good", "{rep:#}");
    assert!(r.stderr.contains("bundle source unavailable"), "{}", r.stderr);
}

/// The SDKs speak TLS through the binary's one crypto stack (rustls on ring, see src/aws.rs) and
/// verify the server against the system's trust store, which `SSL_CERT_FILE` points at the test
/// CA here; without it the same fetch is refused, so the certificate is really checked.
#[test]
fn s3_over_https_is_verified_against_the_system_roots() {
    let certs = tempfile::tempdir().unwrap();
    let tls = crate::harness::etcd::TlsFiles::make(certs.path());
    let moto = Moto::start_tls(&tls);
    assert!(moto.url.starts_with("https://"), "{}", moto.url);
    let out = tempfile::tempdir().unwrap();
    let tarball = out.path().join("roles-production.tar.gz");
    assert_eq!(agent(&["bundle", "build", repo().to_str().unwrap(), "-o", tarball.to_str().unwrap()]).code, 0);
    moto.put("roles", vec![]);
    moto.put("roles/roles-production.tar.gz", std::fs::read(&tarball).unwrap());
    let config = format!(
        "[bundle]\nsource = \"s3://roles/roles-${{env}}.tar.gz\"\ns3_endpoint = \"{}\"\ns3_region = \"us-east-1\"\n",
        moto.url
    );

    let untrusted = tempfile::tempdir().unwrap();
    write_config(untrusted.path(), &config);
    let r: Run = cmd(&["apply", "--root", untrusted.path().to_str().unwrap(), "--name", "production-haproxy"])
        .envs(AWS_ENV)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.stderr.contains("s3://roles/roles-production.tar.gz"), "{}", r.stderr);
    assert!(r.stderr.contains("invalid peer certificate: UnknownIssuer"), "{}", r.stderr);
    assert!(!untrusted.path().join("etc/motd").exists());

    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), &config);
    let r: Run = cmd(&["apply", "--root", root.path().to_str().unwrap(), "--name", "production-haproxy"])
        .envs(AWS_ENV)
        .env("SSL_CERT_FILE", tls.path("ca.crt"))
        .output()
        .unwrap()
        .into();
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = report(root.path());
    assert_eq!(rep["bundle"]["origin"], "source", "{rep:#}");
    assert!(!moto.requests("GET /roles/roles-production.tar.gz").is_empty());
}
