//! Bundle tarballs: reproducible builds, hostile tarballs, integrity checks, the cache.

use crate::harness::support::*;
use std::path::Path;

fn build(dir: &Path, out: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["bundle", "build", dir.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    agent(&args)
}

#[test]
fn bundle_build_is_reproducible_and_validates() {
    let out = tempfile::tempdir().unwrap();
    let (a, b) = (out.path().join("a.tar.gz"), out.path().join("b.tar.gz"));
    assert_eq!(build(&repo(), &a, &[]).code, 0);
    // A copy with fresh mtimes and another path gives the same bytes.
    let copy = bundle_copy();
    assert_eq!(build(copy.path(), &b, &[]).code, 0);
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "bundle build is not reproducible");
    let sha = std::fs::read_to_string(out.path().join("a.tar.gz.sha256")).unwrap();
    let r = agent(&["validate", a.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert!(sha.ends_with("  a.tar.gz\n") && sha.len() == 64 + 2 + 8 + 1, "{sha:?}");
    // A broken role makes build fail as a config error, and nothing is written.
    std::fs::write(copy.path().join("roles/base/role.toml"), "schema = 1\nbogus = 1\n").unwrap();
    let r = build(copy.path(), &out.path().join("c.tar.gz"), &[]);
    assert_eq!(r.code, 78, "{}", r.all());
    assert!(!out.path().join("c.tar.gz").exists());
}

/// A tarball with raw entries, written without the tar crate's path checks.
fn raw_tarball(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let good_role = b"schema = 1\n[[step]]\nkind = \"file\"\npath = \"/x\"\ncontent = \"x\"\n";
    let mut all: Vec<(&str, tar::EntryType, &[u8], Option<&str>)> = vec![("roles/r/role.toml", tar::EntryType::Regular, good_role, None)];
    all.extend_from_slice(entries);
    for (name, kind, data, link) in all {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        h.as_gnu_mut().unwrap().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        if let Some(l) = link {
            let lb = l.as_bytes();
            h.as_gnu_mut().unwrap().linkname[..lb.len()].copy_from_slice(lb);
        }
        if kind == tar::EntryType::Char {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// An entry claiming 8 MiB of zeros: a few KiB compressed.
fn bomb() -> Vec<u8> {
    let zeros = vec![0u8; 8 * 1024 * 1024];
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let mut b = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(zeros.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "roles/r/files/big", &zeros[..]).unwrap();
    b.into_inner().unwrap().finish().unwrap()
}

#[test]
fn hostile_and_unverified_bundles_are_rejected_and_current_stays() {
    let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let keys = tempfile::tempdir().unwrap();
    let sk_path = keys.path().join("bundle.key");
    std::fs::write(&sk_path, kp.sk.to_box(None).unwrap().to_string()).unwrap();
    let pk_line = kp.pk.to_box().unwrap().to_string().lines().last().unwrap().to_string();
    let other = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let other_sk = keys.path().join("other.key");
    std::fs::write(&other_sk, other.sk.to_box(None).unwrap().to_string()).unwrap();

    let root = tempfile::tempdir().unwrap();
    let write_cfg = |extra: &str| write_config(root.path(), &format!("[bundle]\nmax_bytes = 1048576\n{extra}"));
    write_cfg(&format!("public_key = \"{pk_line}\"\n"));

    let work = tempfile::tempdir().unwrap();
    let good = work.path().join("good.tar.gz");
    let r = build(&repo(), &good, &["--sign", sk_path.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.all());
    let apply = |file: &Path| run_role("apply", root.path(), Path::new(&format!("file://{}", file.display())), "haproxy", &[]);
    let r = apply(&good);
    assert_eq!(r.code, 0, "{}", r.all());
    let current = || std::fs::read_link(root.path().join("var/lib/bootstrap/bundles/current")).unwrap();
    let good_sha = current();
    assert_eq!(std::fs::read_link(root.path().join("var/lib/bootstrap/bundles/last-good")).unwrap(), good_sha);
    assert_eq!(report(root.path())["bundle"]["origin"], "source");
    let r = run_role("apply", root.path(), Path::new(&format!("file://{}", good.display())), "haproxy", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            raw_tarball(&[("roles/../../etc/passwd", tar::EntryType::Regular, b"x", None)]),
            "`..` in path",
        ),
        (
            "absolute",
            raw_tarball(&[("/etc/passwd", tar::EntryType::Regular, b"x", None)]),
            "absolute path",
        ),
        (
            "symlink out",
            raw_tarball(&[
                ("roles/r/etc", tar::EntryType::Symlink, b"", Some("/etc")),
                ("roles/r/etc/evil", tar::EntryType::Regular, b"x", None),
            ]),
            "symlink to /etc leaves the bundle",
        ),
        (
            "relative symlink out",
            raw_tarball(&[("roles/r/up", tar::EntryType::Symlink, b"", Some("../../../etc"))]),
            "leaves the bundle",
        ),
        (
            "through a symlink",
            raw_tarball(&[
                ("roles/r/in", tar::EntryType::Symlink, b"", Some("files")),
                ("roles/r/in/x", tar::EntryType::Regular, b"x", None),
            ]),
            "path goes through a symlink",
        ),
        (
            "hard link out",
            raw_tarball(&[("roles/r/h", tar::EntryType::Link, b"", Some("/etc/shadow"))]),
            "hard link target: absolute path",
        ),
        (
            "device",
            raw_tarball(&[("roles/r/null", tar::EntryType::Char, b"", None)]),
            "entry type Char is not allowed",
        ),
        ("gzip bomb", bomb(), "larger than the limit of 1048576 bytes"),
    ];
    let mut failures = Vec::new();
    for (name, bytes, want) in &cases {
        let f = work.path().join(format!("{}.tar.gz", name.replace(' ', "-")));
        std::fs::write(&f, bytes).unwrap();
        // Signed with the right key: only the unpack can reject these.
        let sig = agent_sign(&f, &sk_path);
        std::fs::write(format!("{}.minisig", f.display()), sig).unwrap();
        let r = apply(&f);
        if r.code != 1 || !r.stderr.contains(want) || current() != good_sha {
            failures.push(format!("{name}: exit {}, current {:?}\n  want: {want}\n  got: {}", r.code, current(), r.stderr));
        }
    }
    // Integrity: wrong pinned sha256, wrong signer, no signature.
    let bad_sig = work.path().join("badsig.tar.gz");
    assert_eq!(build(&repo(), &bad_sig, &["--sign", other_sk.to_str().unwrap()]).code, 0);
    let no_sig = work.path().join("nosig.tar.gz");
    assert_eq!(build(&repo(), &no_sig, &[]).code, 0);
    for (name, file, want) in [
        ("wrong signature", &bad_sig, "signature does not verify"),
        ("missing signature", &no_sig, "has no signature"),
    ] {
        let r = apply(file);
        if r.code != 1 || !r.stderr.contains(want) || current() != good_sha {
            failures.push(format!("{name}: exit {}\n  want: {want}\n  got: {}", r.code, r.stderr));
        }
    }
    write_cfg(&format!("sha256 = \"{}\"\n", "0".repeat(64)));
    let r = apply(&no_sig);
    if r.code != 1
        || !r
            .stderr
            .contains("but 0000000000000000000000000000000000000000000000000000000000000000 is pinned")
        || current() != good_sha
    {
        failures.push(format!("wrong sha256: exit {}\n  got: {}", r.code, r.stderr));
    }
    let leftovers: Vec<String> = std::fs::read_dir(root.path().join("var/lib/bootstrap/bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Nothing of the hostile entries landed anywhere.
    assert!(!root.path().join("etc/passwd").exists() || std::fs::read_to_string(root.path().join("etc/passwd")).unwrap() != "x");
}

/// Sign a file with the library (as `bundle build --sign` does).
fn agent_sign(file: &Path, sk: &Path) -> String {
    bootstrap::source::bundle::sign(&std::fs::read(file).unwrap(), sk).unwrap()
}
