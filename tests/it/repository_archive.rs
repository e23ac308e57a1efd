//! `repository` and `archive`. The archives under `--root` from the harness HTTP server and
//! `file://` (strip_components, a second apply changes nothing, a wrong sha256 and a hostile
//! archive refused with nothing written); the repository key from a pinned URL refused on a bad
//! sha256; unknown keys exit 78; then on a booted node a deb822 repository signed with a key
//! made here, and a package installed from it.

use crate::harness::http::{HttpServer, Response};
use crate::harness::node::{aptrepo, Node};
use crate::harness::support::*;
use std::path::Path;
use std::process::Command;

fn sha256(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// A `.tar.gz` of (path, content) regular files, names written raw (a `..` is kept as is).
fn tarball(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        let bytes = name.as_bytes();
        h.as_gnu_mut().unwrap().name[..bytes.len()].copy_from_slice(bytes);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(if name.contains("bin/") { 0o755 } else { 0o644 });
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap()
}

/// A deflated `.zip` of (path, content, unix mode).
fn zipfile(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    use std::io::Write;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, mode) in entries {
        let o = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .unix_permissions(*mode);
        w.start_file(*name, o).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// `.tar.gz` bytes recompressed as `.tar.xz`.
fn xz(tar_gz: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(tar_gz), &mut tar).unwrap();
    let mut out = Vec::new();
    lzma_rs::xz_compress(&mut std::io::BufReader::new(tar.as_slice()), &mut out).unwrap();
    out
}

fn archive_role(url: &str, sha: &str, dest: &str, extra: &str) -> String {
    format!("schema = 1\n[[step]]\nkind = \"archive\"\nurl = \"{url}\"\nsha256 = \"{sha}\"\ndest = \"{dest}\"\n{extra}")
}

#[test]
fn archives_are_checked_unpacked_and_recorded() {
    let good = tarball(&[("exporter-1.0/bin/exporter", b"#!/bin/sh\necho 1\n"), ("exporter-1.0/LICENSE", b"MIT\n")]);
    let v2 = tarball(&[("exporter-2.0/bin/exporter", b"#!/bin/sh\necho 2\n")]);
    let hostile = tarball(&[("x/ok", b"ok"), ("x/../../../etc/evil", b"evil")]);
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("v2.tar.gz"), &v2).unwrap();
    std::fs::write(files.path().join("tool"), b"binary").unwrap();
    let txz = xz(&tarball(&[("tool-3/bin/tool", b"xz\n"), ("tool-3/share/doc", b"doc\n")]));
    std::fs::write(files.path().join("tool-3.tar.xz"), &txz).unwrap();
    let zip = zipfile(&[("app/bin/run", b"#!/bin/sh\n", 0o755), ("app/README", b"readme\n", 0o644)]);
    std::fs::write(files.path().join("app.zip"), &zip).unwrap();
    let evil_zip = zipfile(&[("ok", b"ok", 0o644), ("../evil", b"evil", 0o644)]);
    std::fs::write(files.path().join("evil.zip"), &evil_zip).unwrap();
    let file = |n: &str| format!("file://{}", files.path().join(n).display());
    let (g, h) = (good.clone(), hostile.clone());
    let srv = HttpServer::start(move |req| match req.path.as_str() {
        "/exporter-1.0.tar.gz" => Some(Response::new(200, g.clone())),
        "/hostile.tar.gz" => Some(Response::new(200, h.clone())),
        _ => None,
    });
    let http = format!("{}/exporter-1.0.tar.gz", srv.url);
    let file_v2 = format!("file://{}", files.path().join("v2.tar.gz").display());
    let file_tool = format!("file://{}", files.path().join("tool").display());
    let b = bundle(&[
        (
            "roles/http/role.toml",
            &archive_role(&http, &sha256(&good), "/opt/exporter", "strip_components = 1\n"),
        ),
        (
            "roles/v2/role.toml",
            &archive_role(&file_v2, &sha256(&v2), "/opt/exporter", "strip_components = 1\n"),
        ),
        (
            "roles/single/role.toml",
            &archive_role(&file_tool, &sha256(b"binary"), "/usr/local/bin/tool", "mode = \"0755\"\n"),
        ),
        (
            "roles/wrongsha/role.toml",
            &archive_role(&http, &"0".repeat(64), "/opt/other", "strip_components = 1\n"),
        ),
        (
            "roles/hostile/role.toml",
            &archive_role(&format!("{}/hostile.tar.gz", srv.url), &sha256(&hostile), "/opt/hostile", ""),
        ),
        ("roles/typo/role.toml", &archive_role(&http, &sha256(&good), "/opt/x", "strip_component = 1\n")),
        (
            "roles/rar/role.toml",
            &archive_role("https://example.com/x.rar", &sha256(&good), "/opt/x", "extract = \"rar\"\n"),
        ),
        (
            "roles/txz/role.toml",
            &archive_role(&file("tool-3.tar.xz"), &sha256(&txz), "/opt/tool", "strip_components = 1\n"),
        ),
        (
            "roles/zip/role.toml",
            &archive_role(&file("app.zip"), &sha256(&zip), "/opt/app", "strip_components = 1\nowner = \"deploy\"\n"),
        ),
        ("roles/evilzip/role.toml", &archive_role(&file("evil.zip"), &sha256(&evil_zip), "/opt/evil", "")),
    ]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let apply = |role: &str| run_role("apply", r, b.path(), role, &["--detailed-exitcodes"]);

    // Refusals first: nothing is written.
    let t = apply("typo");
    assert_eq!(t.code, 78, "{}", t.all());
    assert!(t.stderr.contains("roles/typo/role.toml:7:1: unknown field `strip_component`"), "{}", t.stderr);
    let z = apply("rar");
    assert_eq!(z.code, 78, "{}", z.all());
    assert!(z.stderr.contains("invalid extract \"rar\""), "{}", z.stderr);
    let w = apply("wrongsha");
    assert_eq!(w.code, 4, "{}", w.all());
    assert!(w.all().contains(&format!("archive {http}: sha256 is {}", sha256(&good))), "{}", w.all());
    assert!(!r.join("opt/other").exists());
    let hz = apply("hostile");
    assert_eq!(hz.code, 4, "{}", hz.all());
    assert!(hz.all().contains("`..` in path"), "{}", hz.all());
    assert!(!r.join("opt/hostile").exists() && !r.join("etc/evil").exists() && !r.join("opt/etc/evil").exists());
    let ez = apply("evilzip");
    assert_eq!(ez.code, 4, "{}", ez.all());
    assert!(ez.all().contains("entry \"../evil\" rejected: `..` in path"), "{}", ez.all());
    assert!(!r.join("opt/evil").exists() && !r.join("evil").exists());
    let leftovers: Vec<_> = std::fs::read_dir(r.join("opt"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "temp files left in /opt: {leftovers:?}");

    // Over HTTP with strip_components; the second apply changes nothing (and downloads nothing).
    assert_eq!(apply("http").code, 2);
    assert_eq!(std::fs::read_to_string(r.join("opt/exporter/bin/exporter")).unwrap(), "#!/bin/sh\necho 1\n");
    assert_eq!(std::fs::read_to_string(r.join("opt/exporter/LICENSE")).unwrap(), "MIT\n");
    let snap = snapshot(r);
    assert!(snap["/opt/exporter/bin/exporter"].starts_with("file 0755 0:0"), "{snap:#?}");
    let second = apply("http");
    assert_eq!(second.code, 0, "{}", second.all());
    // A new version from file:// replaces the tree whole (LICENSE is gone).
    assert_eq!(apply("v2").code, 2);
    assert_eq!(std::fs::read_to_string(r.join("opt/exporter/bin/exporter")).unwrap(), "#!/bin/sh\necho 2\n");
    assert!(!r.join("opt/exporter/LICENSE").exists());
    assert_eq!(apply("v2").code, 0);
    // A removed tree is put back (the record alone is not enough).
    std::fs::remove_dir_all(r.join("opt/exporter")).unwrap();
    let p = run_role("plan", r, b.path(), "v2", &["--detailed-exitcodes"]);
    assert_eq!(p.code, 2, "{}", p.all());
    assert_eq!(apply("v2").code, 2);
    // .tar.xz and .zip (deflated; an owner from the root's passwd).
    let x = apply("txz");
    assert_eq!(x.code, 2, "{}", x.all());
    assert_eq!(std::fs::read_to_string(r.join("opt/tool/bin/tool")).unwrap(), "xz\n");
    assert_eq!(apply("txz").code, 0);
    std::fs::write(
        r.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ndeploy:x:1000:1000::/home/deploy:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(r.join("etc/group"), "root:x:0:\ndeploy:x:1000:\n").unwrap();
    let zr = apply("zip");
    assert_eq!(zr.code, 2, "{}", zr.all());
    let snap = snapshot(r);
    assert!(snap["/opt/app/bin/run"].starts_with("file 0755 1000:0"), "{snap:#?}");
    assert!(snap["/opt/app/README"].starts_with("file 0644 1000:0"), "{snap:#?}");
    assert_eq!(apply("zip").code, 0);
    // A single file with a mode.
    assert_eq!(apply("single").code, 2);
    assert!(snapshot(r)["/usr/local/bin/tool"].starts_with("file 0755 0:0"));
    assert_eq!(apply("single").code, 0);
}

const KEY: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmDMEZtest\n-----END PGP PUBLIC KEY BLOCK-----\n";

#[test]
fn repository_files_in_a_root_and_a_pinned_key_url() {
    let srv = HttpServer::start(|req| (req.path == "/key.asc").then(|| Response::new(200, KEY)));
    let key_url = format!("{}/key.asc", srv.url);
    let repo = |extra: &str| {
        format!(
            "schema = 1\n[[step]]\nkind = \"repository\"\nname = \"k8s\"\nurl = \"https://pkgs.k8s.io/core:/stable:/v1.31/deb/\"\nsuites = [\"/\"]\n{extra}"
        )
    };
    let b = bundle(&[
        (
            "roles/url/role.toml",
            &repo(&format!("key_url = \"{key_url}\"\nkey_sha256 = \"{}\"\n", sha256(KEY.as_bytes()))),
        ),
        (
            "roles/badsha/role.toml",
            &repo(&format!("key_url = \"{key_url}\"\nkey_sha256 = \"{}\"\n", "1".repeat(64))),
        ),
        ("roles/typo/role.toml", &repo("key = \"k.asc\"\nsuite = [\"x\"]\n")),
        ("roles/typo/files/k.asc", KEY),
        ("roles/nokey/role.toml", &repo("")),
    ]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let apply = |role: &str| run_role("apply", r, b.path(), role, &["--detailed-exitcodes"]);
    let t = apply("typo");
    assert_eq!(t.code, 78, "{}", t.all());
    assert!(t.stderr.contains("roles/typo/role.toml:8:1: unknown field `suite`"), "{}", t.stderr);
    let n = apply("nokey");
    assert_eq!(n.code, 78, "{}", n.all());
    assert!(n.stderr.contains("needs `key`"), "{}", n.stderr);
    let bad = apply("badsha");
    assert_eq!(bad.code, 4, "{}", bad.all());
    assert!(bad.all().contains(&format!("the key from {key_url} has sha256")), "{}", bad.all());
    assert!(!r.join("etc/apt").exists(), "a refused key wrote something");
    assert_eq!(apply("url").code, 2);
    assert_eq!(std::fs::read_to_string(r.join("etc/apt/keyrings/k8s.asc")).unwrap(), KEY);
    let sources = std::fs::read_to_string(r.join("etc/apt/sources.list.d/k8s.sources")).unwrap();
    assert!(
        sources.contains("Suites: /\n") && sources.contains("Signed-By: /etc/apt/keyrings/k8s.asc\n"),
        "{sources}"
    );
    // In sync without a download: the server is gone.
    drop(srv);
    assert_eq!(apply("url").code, 0);
}

fn sh(script: &str, dir: &Path) {
    let o = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(
        o.status.success(),
        "{script}\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A copy of the test apt repository with a Release file signed by a key made here (InRelease);
/// returns (the repository copy, the armored public key).
fn signed_repo(tmp: &Path) -> (std::path::PathBuf, String) {
    let repo = tmp.join("repo");
    copy_dir(&aptrepo(), &repo);
    let gnupg = tmp.join("gnupg");
    std::fs::create_dir_all(&gnupg).unwrap();
    std::fs::set_permissions(&gnupg, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let g = format!("gpg --batch --homedir {} ", gnupg.display());
    sh(
        &format!("{g} --passphrase '' --quick-gen-key 'bootstrap test <test@example.com>' ed25519 sign never"),
        tmp,
    );
    // A flat repository's Release: the indexes' sizes and sha256.
    sh(
        "{ echo 'Origin: bootstrap-test'; echo 'Label: bootstrap-test'; echo \"Date: $(date -Ru)\"; echo 'SHA256:';\
           for f in Packages Packages.gz; do echo \" $(sha256sum $f | cut -d' ' -f1) $(stat -c %s $f) $f\"; done; } > Release",
        &repo,
    );
    sh(&format!("{g} --clearsign -o InRelease Release"), &repo);
    let out = Command::new("sh").arg("-c").arg(format!("{g} --armor --export")).output().unwrap();
    (repo, String::from_utf8(out.stdout).unwrap())
}

#[test]
fn a_signed_repository_on_a_node_then_a_package_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, key) = signed_repo(tmp.path());
    assert!(key.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"), "{key}");
    let role = "schema = 1\n[[step]]\nkind = \"repository\"\nname = \"signed\"\nurl = \"file:/srv/signedrepo\"\nsuites = [\"./\"]\nkey = \"signed.asc\"\n\
                [[step]]\nkind = \"package\"\nnames = [\"hello\"]\n";
    let b = bundle(&[
        ("roles/repo/role.toml", role),
        ("roles/repo/files/signed.asc", &key),
        ("roles/typo/role.toml", "schema = 1\n[[step]]\nkind = \"repository\"\nname = \"signed\"\nurl = \"file:/srv/signedrepo\"\nsuites = [\"./\"]\nkey = \"signed.asc\"\nenable = true\n"),
        ("roles/typo/files/signed.asc", &key),
    ]);
    let node = Node::boot_with(b.path(), &[(&repo, "/srv/signedrepo")]);
    // Only the signed repository: the node's unsigned test source goes, its lists are fresh.
    let r = node.sh("rm -f /etc/apt/sources.list.d/*.list && apt-get -q update >/dev/null && ! apt-cache show hello >/dev/null 2>&1");
    assert_eq!(r.code, 0, "{}", r.all());

    let t = node.run_role("apply", "typo", &[]);
    assert_eq!(t.code, 78, "{}", t.all());
    assert!(
        t.stderr.contains("/srv/bundle/roles/typo/role.toml:8:1: unknown field `enable`"),
        "{}",
        t.stderr
    );
    assert!(!node.merged.join("etc/apt/sources.list.d/signed.sources").exists());

    let first = node.run_role("apply", "repo", &["--detailed-exitcodes"]);
    assert_eq!(first.code, 2, "{}", first.all());
    assert_eq!(node.sh("dpkg-query -W -f '${Status}' hello").stdout, "install ok installed");
    // apt verified the signature with the key the step wrote.
    let policy = node.sh("apt-cache policy hello").stdout;
    assert!(policy.contains("file:/srv/signedrepo ./"), "{policy}");
    let lists = node.sh("ls /var/lib/apt/lists").stdout;
    assert!(lists.contains("signedrepo_._InRelease"), "the signed InRelease was not used: {lists}");
    let second = node.run_role("apply", "repo", &["--detailed-exitcodes"]);
    assert_eq!(second.code, 0, "{}", second.all());

    // A hand edit shows in plan as a content diff.
    node.sh("sed -i 's/^Enabled: yes/Enabled: no/' /etc/apt/sources.list.d/signed.sources");
    let p = node.run_role("plan", "repo", &["--json"]);
    let doc: serde_json::Value = serde_json::from_str(&p.stdout).unwrap_or_else(|e| panic!("{e}\n{}", p.all()));
    let step = doc["steps"].as_array().unwrap().iter().find(|s| s["id"] == "repository:signed").unwrap();
    let c = &step["changes"][0];
    assert_eq!(c["field"], "content", "{step:#}");
    assert!(c["diff"].as_str().unwrap().contains("+Enabled: yes"), "{c:#}");
}

/// An archive's `dest` is resolved through the root like every host path: in an image whose
/// `/opt` is the absolute link `/srv/NAME`, the tree lands in the image's `/srv/NAME`, and the
/// host's `/srv/NAME` is never made.
#[test]
fn an_archive_behind_an_absolute_link_stays_in_the_image() {
    let root = tempfile::tempdir().unwrap();
    let name = format!("bootstrap-archive-image-{}", std::process::id());
    std::fs::create_dir_all(root.path().join("srv").join(&name)).unwrap();
    std::os::unix::fs::symlink(format!("/srv/{name}"), root.path().join("opt")).unwrap();
    let files = tempfile::tempdir().unwrap();
    let tgz = tarball(&[("tool-1.0/bin/tool", b"#!/bin/sh\n")]);
    std::fs::write(files.path().join("t.tar.gz"), &tgz).unwrap();
    let url = format!("file://{}", files.path().join("t.tar.gz").display());
    let b = bundle(&[("roles/a/role.toml", &archive_role(&url, &sha256(&tgz), "/opt/tool", "strip_components = 1\n"))]);
    let r = run_role("apply", root.path(), b.path(), "a", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(!Path::new(&format!("/srv/{name}")).exists(), "the archive was unpacked on the HOST");
    assert!(root.path().join(format!("srv/{name}/tool/bin/tool")).is_file());
    let r = run_role("apply", root.path(), b.path(), "a", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "{}", r.all());
}
