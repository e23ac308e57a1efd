//! `--root` contains every write, and a symlink in a directory not owned by root is not
//! followed on the live system (issue: trust, finding 2).

use crate::harness::node::Node;
use crate::harness::support::*;

/// An image root whose `/var/run` is the absolute link `/run` (every Debian image has one):
/// the steps write into the image's `/run`, never into the host's.
#[test]
fn root_with_absolute_var_run_link_writes_inside_the_root() {
    let root = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(root.path().join("run")).unwrap();
    std::fs::create_dir_all(root.path().join("var")).unwrap();
    std::os::unix::fs::symlink("/run", root.path().join("var/run")).unwrap();
    // A name of this test's own on the host, so that the check below cannot see another's file.
    let name = format!("bootstrap-root-test-{}", std::process::id());
    let role = format!(
        "schema = 1\n\
         [[step]]\nkind = \"file\"\npath = \"/var/run/{name}.conf\"\ncontent = \"x\\n\"\n\
         [[step]]\nkind = \"directory\"\npath = \"/var/run/{name}.d\"\n\
         [[step]]\nkind = \"link\"\npath = \"/var/run/{name}.link\"\ntarget = \"/etc/hostname\"\n\
         [[step]]\nkind = \"unit\"\nname = \"{name}.service\"\ncontent = \"[Service]\\nExecStart=/bin/true\\n\"\n"
    );
    // The image's /etc/systemd/system is a link to its /run too: unit files follow it inside.
    std::fs::create_dir_all(root.path().join("etc/systemd")).unwrap();
    std::fs::create_dir_all(root.path().join("run/units")).unwrap();
    std::os::unix::fs::symlink("/run/units", root.path().join("etc/systemd/system")).unwrap();
    let b = bundle(&[("roles/r/role.toml", &role)]);
    let host_paths = [
        format!("/run/{name}.conf"),
        format!("/run/{name}.d"),
        format!("/run/{name}.link"),
        format!("/run/units/{name}.service"),
    ];
    let r = run_role("apply", root.path(), b.path(), "r", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    for p in &host_paths {
        assert!(std::fs::symlink_metadata(p).is_err(), "{p} was written on the HOST by an apply under --root");
    }
    assert_eq!(std::fs::read_to_string(root.path().join(format!("run/{name}.conf"))).unwrap(), "x\n");
    assert!(root.path().join(format!("run/{name}.d")).is_dir());
    assert_eq!(
        std::fs::read_link(root.path().join(format!("run/{name}.link"))).unwrap(),
        std::path::Path::new("/etc/hostname")
    );
    assert!(root.path().join(format!("run/units/{name}.service")).is_file());
    // The link itself is untouched, and a second run finds everything in sync.
    assert_eq!(std::fs::read_link(root.path().join("var/run")).unwrap(), std::path::Path::new("/run"));
    let r = run_role("apply", root.path(), b.path(), "r", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "second apply changes nothing\n{}", r.all());
}

/// On a booted node, `/srv/app` belongs to an unprivileged user who made `conf -> /etc`: a
/// file step for `/srv/app/conf/evil.conf` is refused and nothing is written.
#[test]
fn symlink_in_a_user_owned_directory_is_refused_on_a_booted_node() {
    let b = bundle(&[(
        "roles/app/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/srv/app/conf/evil.conf\"\ncontent = \"owned\\n\"\n\
         [[step]]\nkind = \"directory\"\npath = \"/srv/app/conf/evil.d\"\n",
    )]);
    let node = Node::boot(b.path());
    let s = node.sh("mkdir -p /srv/app && chown 1000:1000 /srv/app && setpriv --reuid 1000 --regid 1000 --clear-groups ln -s /etc /srv/app/conf && stat -c %u /srv/app/conf");
    assert_eq!(s.stdout.trim(), "1000", "{}", s.all());
    let r = node.run_role("apply", "app", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("unsafe path transition"), "{}", r.all());
    assert!(r.all().contains("/srv/app/conf/evil.conf"), "the error names the path\n{}", r.all());
    assert!(!node.merged.join("etc/evil.conf").exists(), "the step wrote through the user's link");
    assert!(!node.merged.join("etc/evil.d").exists());
    let rep = node.report();
    assert_eq!(rep["steps"][0]["status"], "failed", "{rep:#}");
    assert_eq!(rep["steps"][1]["status"], "not_run", "{rep:#}");
}

/// Under `--root`, an `exec` step and its guards run chrooted into the root: the file its
/// command writes to `/` lands in the image, `creates` and `cwd` resolve inside it, and a
/// program the image does not have is a clear error.
#[test]
fn exec_under_root_runs_chrooted() {
    let root = shell_root();
    let name = format!("bootstrap-chroot-test-{}", std::process::id());
    std::fs::create_dir_all(root.path().join("work")).unwrap();
    let role = format!(
        "schema = 1\n\
         [[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"pwd > /{name}; test -e /bin/sh\"]\ncwd = \"/work\"\ncreates = \"/{name}\"\n\
         [[step]]\nkind = \"exec\"\ncommand = [\"touch\", \"/{name}.guarded\"]\nunless = [\"test\", \"-e\", \"/{name}.guarded\"]\n"
    );
    let b = bundle(&[("roles/r/role.toml", &role)]);
    let r = run_role("apply", root.path(), b.path(), "r", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(!std::path::Path::new(&format!("/{name}")).exists(), "the command wrote on the HOST");
    assert!(!std::path::Path::new(&format!("/{name}.guarded")).exists(), "the command wrote on the HOST");
    assert_eq!(std::fs::read_to_string(root.path().join(&name)).unwrap(), "/work\n", "cwd inside the root");
    assert!(root.path().join(format!("{name}.guarded")).exists());
    let r = run_role("apply", root.path(), b.path(), "r", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "guards see the root: nothing to do\n{}", r.all());

    let missing = bundle(&[(
        "roles/m/role.toml",
        "schema = 1\n[[step]]\nkind = \"exec\"\ncommand = [\"/usr/bin/no-such-tool\"]\ncreates = \"/never\"\n",
    )]);
    let r = run_role("apply", root.path(), missing.path(), "m", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    assert!(r.all().contains("chrooted into"), "{}", r.all());
}

/// An image whose `/etc` is the absolute link `/srv/image-etc`: a group step under `--root`
/// edits the image's account files (shadow-utils run with `--root`, chrooted), never a host
/// path that the link names.
#[test]
fn account_files_behind_an_absolute_link_stay_in_the_image() {
    let root = tempfile::tempdir().unwrap();
    let name = format!("bootstrap-image-etc-{}", std::process::id());
    let inside = root.path().join("srv").join(&name);
    std::fs::create_dir_all(&inside).unwrap();
    std::os::unix::fs::symlink(format!("/srv/{name}"), root.path().join("etc")).unwrap();
    let b = bundle(&[("roles/g/role.toml", "schema = 1\n[[step]]\nkind = \"group\"\nname = \"imggroup\"\ngid = 4321\n")]);
    let r = run_role("apply", root.path(), b.path(), "g", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(!std::path::Path::new(&format!("/srv/{name}")).exists(), "account files written on the HOST");
    let group = std::fs::read_to_string(inside.join("group")).unwrap();
    assert!(group.contains("imggroup:x:4321:"), "{group}");
    let r = run_role("apply", root.path(), b.path(), "g", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "second apply changes nothing\n{}", r.all());
}

/// Review of the trust fixes: the agent's own state under `--root` goes through the root too.
/// An image whose `/var/lib` and `/run` are absolute links into its `/srv`: the state directory
/// (0700, with the report) and the run lock land in the image, the host's `/srv` is untouched.
#[test]
fn state_and_run_lock_behind_absolute_links_stay_in_the_image() {
    let root = tempfile::tempdir().unwrap();
    let name = format!("bootstrap-image-state-{}", std::process::id());
    for d in ["var", &format!("srv/{name}/lib"), &format!("srv/{name}/run")] {
        std::fs::create_dir_all(root.path().join(d)).unwrap();
    }
    std::os::unix::fs::symlink(format!("/srv/{name}/lib"), root.path().join("var/lib")).unwrap();
    std::os::unix::fs::symlink(format!("/srv/{name}/run"), root.path().join("run")).unwrap();
    let b = bundle(&[(
        "roles/r/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/x\"\ncontent = \"x\\n\"\n",
    )]);
    let r = run_role("apply", root.path(), b.path(), "r", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert!(!std::path::Path::new(&format!("/srv/{name}")).exists(), "state written on the HOST");
    let state = root.path().join(format!("srv/{name}/lib/bootstrap"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&state).unwrap().permissions().mode() & 0o7777, 0o700);
    assert!(state.join("last-run.json").is_file());
    assert!(root.path().join(format!("srv/{name}/run/bootstrap/lock")).is_file());
}
