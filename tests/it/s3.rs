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
