//! `filesystem` + `mount` on a booted node with loop devices bound in (TESTING.md's recipe):
//! the shipped `roles/data-node` formats its volume once (given as `ebs:vol-…`) and mounts it
//! by UUID through a systemd mount unit; a second apply changes nothing and leaves the data
//! alone; the mount comes back after a node reboot; `plan` shows an unmount made by hand; a
//! device holding another filesystem is refused with nothing changed; bad input exits 78.
//!
//! A container runs no udev, so the node gets a stand-in that makes the links udev makes on a
//! real node (`/dev/disk/by-uuid/UUID`, and the by-id link of an EBS volume's NVMe serial) for
//! the loop devices bound in.

use crate::harness::node::Node;
use crate::harness::support::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a sparse image file, detached on drop (after the node that uses it,
/// which must be declared after it, is gone), even when the test fails.
struct Loop {
    dev: String,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(size: &str) -> Loop {
        let dir = tempfile::Builder::new().prefix("vol.").tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("vol.img");
        let st = Command::new("truncate").args(["-s", size]).arg(&img).status().unwrap();
        assert!(st.success());
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().expect("losetup (util-linux)");
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _dir: dir,
        }
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(&self.dev)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.dev]).status();
    }
}

const EBS_VOL: &str = "vol-0e2e5f00d1a7a5b01";

/// The udev stand-in: at boot (before local-fs) and every 0.2 s after, a link
/// `/dev/disk/by-uuid/UUID` for each loop device holding a filesystem, and the by-id link an
/// EBS volume has on Nitro for the first one bound in.
fn udev_stand_in(node: &Node, ebs_dev: &str) {
    let script = format!(
        "#!/bin/sh\nmkdir -p /dev/disk/by-uuid /dev/disk/by-id\n\
         ln -sfn ../../{ebs} /dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_{serial}\n\
         for d in /dev/loop*; do\n  [ -b \"$d\" ] || continue\n  u=$(blkid -p -o value -s UUID \"$d\" 2>/dev/null) || continue\n  \
         [ -n \"$u\" ] && [ ! -e \"/dev/disk/by-uuid/$u\" ] && ln -sfn \"../../${{d#/dev/}}\" \"/dev/disk/by-uuid/$u\"\ndone\nexit 0\n",
        ebs = ebs_dev.trim_start_matches("/dev/"),
        serial = EBS_VOL.replace('-', ""),
    );
    let unit = "[Unit]\nDescription=udev stand-in: disk links for the loop devices\nDefaultDependencies=no\n\
                Before=local-fs-pre.target\nWants=local-fs-pre.target\n\n[Service]\nExecStartPre=/bin/sh /usr/local/sbin/disk-links\n\
                ExecStart=/bin/sh -c 'while sleep 0.2; do /bin/sh /usr/local/sbin/disk-links; done'\n\n[Install]\nWantedBy=sysinit.target\n";
    std::fs::create_dir_all(node.merged.join("usr/local/sbin")).unwrap();
    std::fs::write(node.merged.join("usr/local/sbin/disk-links"), script).unwrap();
    std::fs::write(node.merged.join("etc/systemd/system/disk-links.service"), unit).unwrap();
    let r = node.sh("systemctl daemon-reload && systemctl enable --now disk-links.service && echo ok");
    assert_eq!(r.stdout.trim().lines().last(), Some("ok"), "{}", r.all());
}

fn reboot(node: &mut Node) {
    let before = node.boot_id();
    let _ = node.sh("systemctl reboot");
    assert_eq!(node.wait_exit(std::time::Duration::from_secs(60)), 133, "the node did not reboot");
    node.boot_again();
    assert_ne!(node.boot_id(), before, "same boot");
}

fn blkid(node: &Node, dev: &str) -> String {
    node.sh(&format!("blkid -p -o export {dev} | grep -E '^(TYPE|UUID|LABEL)='")).stdout
}

#[test]
fn data_node_formats_once_mounts_by_uuid_and_survives_a_reboot() {
    // Declared before the node: dropped (detached) after it.
    let vol = Loop::new("64M");
    let other = Loop::new("16M");
    let st = Command::new("mkfs.ext2")
        .args(["-q", "-F", "-L", "old"])
        .arg(&other.dev)
        .status()
        .expect("mkfs.ext2 (e2fsprogs)");
    assert!(st.success());

    let b = bundle_copy();
    std::fs::create_dir_all(b.path().join("roles/data-node/env")).unwrap();
    std::fs::write(b.path().join("roles/data-node/env/test.toml"), format!("[vars]\nvolume = \"ebs:{EBS_VOL}\"\n")).unwrap();
    let dev_role = |dev: &str, fstype: &str| {
        format!(
            "schema = 1\n[[step]]\nkind = \"filesystem\"\ndevice = \"{dev}\"\nfstype = \"{fstype}\"\n\
             [[step]]\nkind = \"mount\"\npath = \"/srv/old\"\ndevice = \"{dev}\"\nfstype = \"{fstype}\"\n"
        )
    };
    let roles = [
        ("roles/other/role.toml", dev_role(&other.dev, "ext4")),
        (
            "roles/typo/role.toml",
            "schema = 1\n[[step]]\nkind = \"filesystem\"\ndevice = \"/dev/loop0\"\nfstype = \"ext4\"\nfs_type = \"xfs\"\n".to_string(),
        ),
        (
            "roles/baddev/role.toml",
            "schema = 1\n[[step]]\nkind = \"mount\"\npath = \"/srv/x\"\ndevice = \"/etc/passwd\"\nfstype = \"ext4\"\n".to_string(),
        ),
        (
            "roles/bylabel/role.toml",
            "schema = 1\n[[step]]\nkind = \"mount\"\npath = \"/srv/by-label\"\ndevice = \"LABEL=data\"\nfstype = \"ext4\"\noptions = \"nodev\"\n".to_string(),
        ),
        (
            "roles/unmount/role.toml",
            "schema = 1\n[[step]]\nkind = \"mount\"\npath = \"/srv/data\"\nstate = \"absent\"\n".to_string(),
        ),
        (
            "roles/nodevice/role.toml",
            "schema = 1\n[[step]]\nkind = \"mount\"\npath = \"/srv/x\"\nfstype = \"ext4\"\n".to_string(),
        ),
        (
            "roles/badpath/role.toml",
            "schema = 1\n[[step]]\nkind = \"mount\"\npath = \"/srv/../etc\"\ndevice = \"UUID=0a-1b\"\nfstype = \"ext4\"\n".to_string(),
        ),
    ];
    for (p, c) in &roles {
        let path = b.path().join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, c).unwrap();
    }
    let mut node = Node::boot_with_devices(b.path(), &[&vol.path(), &other.path()]);
    udev_stand_in(&node, &vol.dev);
    let data = |node: &Node, verb: &str, extra: &[&str]| {
        let mut args = vec!["--env", "test"];
        args.extend_from_slice(extra);
        node.run_role(verb, "data-node", &args)
    };
    let probe = |node: &Node| {
        node.sh(&format!(
            "blkid -p -o export {} {}; ls /etc/systemd/system; findmnt -rn -o TARGET,SOURCE | grep -E '^/srv' || true",
            vol.dev, other.dev
        ))
        .all()
    };

    // Bad input: exit 78 with the position, nothing touched.
    let before = probe(&node);
    for (role, want) in [
        ("typo", "role.toml:6:1: unknown field `fs_type`"),
        ("baddev", "role.toml:5:10: invalid device \"/etc/passwd\""),
        ("badpath", "role.toml:4:8: invalid mount path \"/srv/../etc\""),
        ("nodevice", "role.toml:4:8: a mount step with state = \"mounted\" needs `device` and `fstype`"),
    ] {
        for verb in ["apply", "plan"] {
            let r = node.run_role(verb, role, &[]);
            assert_eq!(r.code, 78, "{verb} {role}: exit 78 expected\n{}", r.all());
            assert!(
                r.stderr.contains(&format!("/srv/bundle/roles/{role}/{want}")),
                "{verb} {role}: want {want:?} in\n{}",
                r.stderr
            );
        }
    }
    assert_eq!(probe(&node), before, "bad input touched the node");

    // plan on the fresh node: format and mount, nothing done.
    let r = data(&node, "plan", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(blkid(&node, &vol.dev), "", "plan formatted the device");

    // First apply: formats once and mounts by UUID.
    let r = data(&node, "apply", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "first apply\n{}", r.all());
    let ids = blkid(&node, &vol.dev);
    assert!(ids.contains("TYPE=ext4") && ids.contains("LABEL=data"), "{ids}");
    let uuid = ids.lines().find_map(|l| l.strip_prefix("UUID=")).unwrap().to_string();
    let unit = std::fs::read_to_string(node.merged.join("etc/systemd/system/srv-data.mount")).unwrap();
    for want in [
        format!("What=/dev/disk/by-uuid/{uuid}\n"),
        "Where=/srv/data\n".into(),
        "Type=ext4\n".into(),
        "Options=noatime,nofail\n".into(),
        "WantedBy=local-fs.target\n".into(),
    ] {
        assert!(unit.contains(&want), "{want:?} in\n{unit}");
    }
    let r = node.sh("findmnt -rn -o SOURCE,FSTYPE,OPTIONS /srv/data; systemctl is-enabled srv-data.mount; systemctl is-active srv-data.mount");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.all());
    assert!(
        lines[0].starts_with(&format!("{} ext4 ", vol.dev)) && lines[0].contains("noatime"),
        "{}",
        r.all()
    );
    assert_eq!(&lines[1..], ["enabled", "active"]);

    // Data written into it survives a second apply (0 changes, no mkfs).
    let r = node.sh("echo keep-me > /srv/data/keep && sync && cat /srv/data/keep");
    assert_eq!(r.stdout.trim(), "keep-me", "{}", r.all());
    let r = data(&node, "apply", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 0, "second apply changes nothing\n{}", r.all());
    assert_eq!(node.report()["summary"]["changed"], 0);
    assert_eq!(node.sh("cat /srv/data/keep").stdout.trim(), "keep-me");
    assert!(blkid(&node, &vol.dev).contains(&format!("UUID={uuid}")), "the device was reformatted");

    // Drift by hand: unmounted. plan shows it and changes nothing; apply mounts it again.
    node.sh("umount /srv/data");
    let r = data(&node, "plan", &["--json"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let doc: serde_json::Value = serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}\n{}", r.stdout));
    let mut fields = Vec::new();
    for s in doc["steps"].as_array().unwrap() {
        for c in s["changes"].as_array().into_iter().flatten() {
            fields.push((
                s["id"].as_str().unwrap().to_string(),
                c["field"].as_str().unwrap().to_string(),
                c["from"].clone(),
            ));
        }
    }
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert_eq!((fields[0].0.as_str(), fields[0].1.as_str()), ("mount:/srv/data", "mounted"));
    assert_eq!(fields[0].2, "(not mounted)");
    assert_eq!(data(&node, "plan", &["--detailed-exitcodes"]).code, 2);
    assert_eq!(node.sh("findmnt -rn /srv/data").code, 1, "plan mounted it");
    assert_eq!(data(&node, "apply", &["--detailed-exitcodes"]).code, 2);
    assert_eq!(data(&node, "apply", &["--detailed-exitcodes"]).code, 0);
    assert_eq!(node.sh("cat /srv/data/keep").stdout.trim(), "keep-me");

    // A node reboot: the mount unit brings the volume back, the run finds nothing to do.
    reboot(&mut node);
    let r = node.sh("findmnt -rn -o SOURCE,FSTYPE /srv/data; cat /srv/data/keep");
    assert_eq!(
        r.stdout,
        format!("{} ext4\nkeep-me\n", vol.dev),
        "{}\n{}",
        r.all(),
        node.sh("systemctl status srv-data.mount disk-links").all()
    );
    assert_eq!(data(&node, "apply", &["--detailed-exitcodes"]).code, 0);

    // A device holding another filesystem with another fstype: refused, nothing changed.
    let before = probe(&node);
    for verb in ["apply", "plan"] {
        let r = node.run_role(verb, "other", &[]);
        assert_eq!(r.code, 1, "{verb}: exit 1 expected\n{}", r.all());
        let msg = r.all();
        assert!(
            msg.contains(&format!("device {}", other.dev)) && msg.contains("holds a filesystem of type ext2") && msg.contains("refusing to format it"),
            "{verb}: {msg}"
        );
    }
    assert_eq!(probe(&node), before, "the refused device or the node changed");
    assert!(blkid(&node, &other.dev).contains("LABEL=old"));
    assert!(!Path::new(&node.merged.join("etc/systemd/system/srv-old.mount")).exists());

    // absent: unmounted, the unit disabled and removed; the data stays on the device.
    let r = node.run_role("apply", "unmount", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(node.run_role("apply", "unmount", &["--detailed-exitcodes"]).code, 0);
    assert_eq!(node.sh("findmnt -rn /srv/data").code, 1, "still mounted");
    assert!(!node.merged.join("etc/systemd/system/srv-data.mount").exists());
    assert!(!node.merged.join("etc/systemd/system/local-fs.target.wants/srv-data.mount").exists());
    let r = node.sh(&format!("mount {} /mnt && cat /mnt/keep; umount /mnt", vol.dev));
    assert_eq!(r.stdout.trim(), "keep-me", "{}", r.all());
    // and the role brings it back, without a mkfs.
    assert_eq!(data(&node, "apply", &["--detailed-exitcodes"]).code, 2);
    assert_eq!(node.sh("cat /srv/data/keep").stdout.trim(), "keep-me");
    assert!(blkid(&node, &vol.dev).contains(&format!("UUID={uuid}")));

    // The same filesystem found by its label (blkid -t), with other options, in a unit of its own.
    let r = node.run_role("apply", "bylabel", &["--detailed-exitcodes"]);
    assert_eq!(r.code, 2, "{}", r.all());
    assert_eq!(node.run_role("apply", "bylabel", &["--detailed-exitcodes"]).code, 0);
    let unit = std::fs::read_to_string(node.merged.join("etc/systemd/system/srv-by\\x2dlabel.mount")).unwrap();
    assert!(unit.contains(&format!("What=/dev/disk/by-uuid/{uuid}\n")), "{unit}");
    let r = node.sh("findmnt -rn -o OPTIONS /srv/by-label; cat /srv/by-label/keep");
    assert!(
        r.stdout.lines().next().unwrap_or_default().split(',').any(|o| o == "nodev") && r.stdout.ends_with("keep-me\n"),
        "{}",
        r.all()
    );
}
