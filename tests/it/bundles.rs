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
        // Finding 13: with `s -> .` in roles/, `s/../../x` reads as the bundle root's `x` but
        // points beside the bundle root (at the other cached bundles).
        (
            "link through a link",
            raw_tarball(&[
                ("roles/s", tar::EntryType::Symlink, b"", Some(".")),
                ("roles/l", tar::EntryType::Symlink, b"", Some("s/../../x")),
            ]),
            "goes through another symlink (roles/s)",
        ),
        (
            "link through a later link",
            raw_tarball(&[
                ("roles/l", tar::EntryType::Symlink, b"", Some("s/../../x")),
                ("roles/s", tar::EntryType::Symlink, b"", Some(".")),
            ]),
            "goes through another symlink (roles/s)",
        ),
        (
            "link to a link",
            raw_tarball(&[
                ("roles/r/up", tar::EntryType::Symlink, b"", Some("..")),
                ("roles/r/l", tar::EntryType::Symlink, b"", Some("up")),
            ]),
            "goes through another symlink (roles/r/up)",
        ),
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
        .filter(|n| n.starts_with('.') && n != ".applied.json")
        .collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // Nothing of the hostile entries landed anywhere.
    assert!(!root.path().join("etc/passwd").exists() || std::fs::read_to_string(root.path().join("etc/passwd")).unwrap() != "x");
}

/// Sign a file as `bundle build --sign` does: the trusted comment binds the sha256, the
/// bundle name (the file name without .tar.gz) and a build time.
fn agent_sign(file: &Path, sk: &Path) -> String {
    let name = file.file_name().unwrap().to_str().unwrap().trim_end_matches(".tar.gz");
    sign_with_comment(file, sk, &format!("bundle sha256:{} name:{name} built:4102444800", sha256_file(file)))
}

fn sha256_file(file: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(file).unwrap()))
}

fn sign_with_comment(file: &Path, sk: &Path, comment: &str) -> String {
    let sk = minisign::SecretKeyBox::from_string(&std::fs::read_to_string(sk).unwrap())
        .unwrap()
        .into_unencrypted_secret_key()
        .unwrap();
    let bytes = std::fs::read(file).unwrap();
    minisign::sign(None, &sk, &bytes[..], Some(comment), Some("test")).unwrap().to_string()
}

/// A copy of the repository's bundle that differs by one file (a different sha256).
fn variant(tag: &str) -> tempfile::TempDir {
    let copy = bundle_copy();
    std::fs::write(copy.path().join("roles/haproxy/files/variant.txt"), tag).unwrap();
    copy
}

/// Finding 7: the cache keeps `current`, `last-good` and the 3 most recently used other
/// bundles (with their kept tarballs); older ones and staging directories of dead processes go.
#[test]
fn old_bundles_and_stale_staging_are_pruned() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cache = root.path().join("var/lib/bootstrap/bundles");
    let mut shas = Vec::new();
    for i in 0..7 {
        let f = work.path().join(format!("b{i}.tar.gz"));
        assert_eq!(build(variant(&i.to_string()).path(), &f, &[]).code, 0);
        shas.push(sha256_file(&f));
        if i == 6 {
            // A staging directory of a killed run (no such process), and one of a live one.
            std::fs::create_dir_all(cache.join(format!(".staging-{}-{}", "a".repeat(64), i32::MAX))).unwrap();
            std::fs::create_dir_all(cache.join(format!(".staging-{}-1", "b".repeat(64)))).unwrap();
        }
        let r = run_role("apply", root.path(), Path::new(&format!("file://{}", f.display())), "haproxy", &[]);
        assert_eq!(r.code, 0, "{}", r.all());
    }
    let mut names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let bundles: Vec<&String> = names.iter().filter(|n| n.len() == 64).collect();
    // current = last-good = shas[6]; kept besides: shas[3..6].
    let mut want: Vec<String> = shas[3..].to_vec();
    want.sort();
    assert_eq!(bundles, want.iter().collect::<Vec<_>>(), "cache: {names:?}");
    assert!(!names.iter().any(|n| n.contains(&"a".repeat(64))), "stale staging removed: {names:?}");
    assert!(
        names.iter().any(|n| n.contains(&"b".repeat(64))),
        "a live process's staging kept (pid 1): {names:?}"
    );
    for old in &shas[..3] {
        assert!(!names.iter().any(|n| n.starts_with(old.as_str())), "{old} and its tarball removed: {names:?}");
    }
    // Runs that fail move `current` on but leave `last-good`: it is kept however many newer
    // bundles came after it.
    let good = std::fs::read_link(cache.join("last-good")).unwrap();
    std::fs::remove_dir_all(root.path().join("etc/haproxy")).unwrap();
    std::fs::write(root.path().join("etc/haproxy"), "not a directory").unwrap();
    for i in 7..12 {
        let f = work.path().join(format!("b{i}.tar.gz"));
        assert_eq!(build(variant(&i.to_string()).path(), &f, &[]).code, 0);
        let r = run_role("apply", root.path(), Path::new(&format!("file://{}", f.display())), "haproxy", &[]);
        assert_eq!(r.code, 1, "{}", r.all());
    }
    assert_eq!(std::fs::read_link(cache.join("last-good")).unwrap(), good);
    assert!(cache.join(&good).join("roles").is_dir(), "last-good kept");
    let count = std::fs::read_dir(&cache)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().len() == 64)
        .count();
    assert_eq!(count, 5, "current, last-good and 3 more");
}

/// Finding 7: every file and directory of an unpacked bundle is fsynced before the rename
/// that publishes it (seen with strace: the fsync calls on each file's and directory's fd).
#[test]
fn unpacked_bundles_are_fsynced_before_the_rename() {
    let root = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let f = work.path().join("b.tar.gz");
    assert_eq!(build(&repo(), &f, &[]).code, 0);
    let trace = work.path().join("trace");
    let st = std::process::Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=openat,fsync,fdatasync,rename,renameat,renameat2,close", "-o"])
        .arg(&trace)
        .arg(bin())
        .args(["apply", "--root", root.path().to_str().unwrap(), "--role", "haproxy", "--source"])
        .arg(format!("file://{}", f.display()))
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("strace (apt-get install strace)");
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    let text = std::fs::read_to_string(&trace).unwrap();
    // fd → path per process, and what was fsynced before the staging dir was renamed.
    let mut open: std::collections::HashMap<(String, String), String> = Default::default();
    let mut created: Vec<String> = Vec::new();
    let mut synced: std::collections::HashSet<String> = Default::default();
    let mut renamed = false;
    for line in text.lines() {
        let (pid, call) = line.split_once(' ').unwrap_or(("", line));
        let call = call.trim_start();
        if call.starts_with("openat(") && call.contains(".staging-") {
            let path = call.split('"').nth(1).unwrap_or("").to_string();
            if let Some(fd) = call.rsplit("= ").next().filter(|fd| fd.parse::<i32>().is_ok()) {
                if call.contains("O_CREAT") {
                    created.push(path.clone());
                }
                open.insert((pid.to_string(), fd.to_string()), path);
            }
        } else if call.starts_with("fsync(") || call.starts_with("fdatasync(") {
            let fd = call.split(['(', ')']).nth(1).unwrap_or("").to_string();
            if let Some(p) = open.get(&(pid.to_string(), fd)) {
                if !renamed {
                    synced.insert(p.clone());
                }
            }
        } else if call.starts_with("close(") {
            let fd = call.split(['(', ')']).nth(1).unwrap_or("").to_string();
            open.remove(&(pid.to_string(), fd));
        } else if call.starts_with("rename") && call.contains(".staging-") {
            renamed = true;
        }
    }
    assert!(renamed, "no rename of a staging directory in the trace");
    assert!(created.len() > 3, "files created in staging: {created:?}");
    let not_synced: Vec<&String> = created.iter().filter(|p| !synced.contains(*p)).collect();
    assert!(not_synced.is_empty(), "files not fsynced before the rename: {not_synced:?}");
    let staging = created[0].split("/roles/").next().unwrap().to_string();
    for dir in [staging.clone(), format!("{staging}/roles"), format!("{staging}/roles/haproxy")] {
        assert!(synced.contains(&dir), "directory {dir} not fsynced before the rename: {synced:?}");
    }
}

/// Finding 13: a signature binds the bundle's name (so a staging or dev bundle signed with the
/// same key cannot be served as production) and its build time (so an older build cannot be
/// served again: rollback protection). A signature of an older agent (`bundle sha256:…` only)
/// is still accepted, until a bound one of that bundle was applied.
#[test]
fn signatures_bind_bundle_name_and_build_time() {
    let keys = tempfile::tempdir().unwrap();
    let (sk, pk) = signing_key(keys.path(), "bundle.key");
    let root = tempfile::tempdir().unwrap();
    write_config(root.path(), &format!("[bundle]\npublic_key = \"{pk}\"\n"));
    let serve = tempfile::tempdir().unwrap();
    let served = serve.path().join("roles-production.tar.gz");
    let apply = || run_role("apply", root.path(), Path::new(&format!("file://{}", served.display())), "haproxy", &[]);
    // Build DIR into `name` (its name goes into the signature) at time `t`, serve it as production.
    let publish = |dir: &Path, name: &str, t: &str| {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join(name);
        build_signed(dir, &out, &sk, t);
        std::fs::copy(&out, &served).unwrap();
        std::fs::copy(format!("{}.minisig", out.display()), format!("{}.minisig", served.display())).unwrap();
    };
    let sig = || std::fs::read_to_string(format!("{}.minisig", served.display())).unwrap();

    // An older agent's signature on a fresh node: accepted (compatibility).
    publish(&repo(), "roles-production.tar.gz", "1000");
    std::fs::write(
        format!("{}.minisig", served.display()),
        sign_with_comment(&served, &sk, &format!("bundle sha256:{}", sha256_file(&served))),
    )
    .unwrap();
    let r = apply();
    assert_eq!(r.code, 0, "legacy signature accepted while nothing bound was applied: {}", r.all());

    publish(&repo(), "roles-production.tar.gz", "2000");
    assert!(sig().contains("name:roles-production built:2000"), "{}", sig());
    let r = apply();
    assert_eq!(r.code, 0, "{}", r.all());

    let mut failures = Vec::new();
    let mut refused = |what: &str, want: &str| {
        let r = apply();
        if r.code != 1 || !r.stderr.contains(want) {
            failures.push(format!("{what}: exit {}\n  want: {want}\n  got: {}", r.code, r.all()));
        }
    };
    // A staging bundle (other content, newer) signed with the same key, served as production.
    publish(variant("staging").path(), "roles-staging.tar.gz", "3000");
    refused(
        "staging served as production",
        "the signature is for bundle \"roles-staging\", not \"roles-production\"",
    );
    // An older build of production (other content), served again.
    publish(variant("old").path(), "roles-production.tar.gz", "1500");
    refused("rollback to an older build", "rollback refused");
    // The same older build re-signed the old way (no build time).
    std::fs::write(
        format!("{}.minisig", served.display()),
        sign_with_comment(&served, &sk, &format!("bundle sha256:{}", sha256_file(&served))),
    )
    .unwrap();
    refused("unbound signature after a bound one", "names no build time");
    // A trusted comment naming another bundle's sha256.
    std::fs::write(
        format!("{}.minisig", served.display()),
        sign_with_comment(&served, &sk, &format!("bundle sha256:{} name:roles-production built:9000", "0".repeat(64))),
    )
    .unwrap();
    refused("trusted comment of another sha256", "not this bundle's");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // A newer build goes through; the same build again too.
    publish(variant("new").path(), "roles-production.tar.gz", "4000");
    assert_eq!(apply().code, 0);
    assert_eq!(apply().code, 0);
}
