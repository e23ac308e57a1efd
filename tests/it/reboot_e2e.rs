//! Coordinated reboots on two booted nodes sharing one real etcd (slots = 1).

use crate::etcd::Etcd;
use crate::node::Node;
use crate::support::*;
use std::time::Duration;

fn holders(etcd: &Etcd) -> Vec<String> {
    etcd.lock("production-web").get().unwrap().map(|(s, _)| s.holders).unwrap_or_default()
}

#[test]
fn two_nodes_one_slot_reboot_one_at_a_time() {
    let etcd = Etcd::start(1);
    let b = bundle(&[("roles/web/role.toml", "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"x\\n\"\n")]);
    let config = format!("[reboot]\nstrategy = \"etcd\"\n[reboot.etcd]\nendpoints = [\"{}\"]\nslots = 1\n", etcd.endpoints()[0]);
    let mut nodes: Vec<Node> = (0..2).map(|_| Node::boot_host_net(b.path())).collect();
    for n in &nodes {
        std::fs::create_dir_all(n.merged.join("etc/bootstrap")).unwrap();
        std::fs::write(n.merged.join("etc/bootstrap/config.toml"), &config).unwrap();
        assert!(n.sh("touch /run/reboot-required && echo ok").stdout.contains("ok"));
    }
    let id = |n: &Node| std::fs::read_to_string(n.merged.join("etc/machine-id")).unwrap().trim().to_string();
    let (a_id, b_id) = (id(&nodes[0]), id(&nodes[1]));

    // Node A takes the slot and reboots (nspawn exits 133).
    let _ = nodes[0].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(nodes[0].wait_exit(Duration::from_secs(60)), 133, "node A did not reboot");
    assert_eq!(holders(&etcd), [a_id.clone()]);
    // Node B finds no free slot: reboot pending, success, no reboot.
    let r = nodes[1].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    let rep = nodes[1].report();
    assert_eq!(rep["reboot_pending"], true, "{rep:#}");
    assert_eq!(rep["reboot"]["action"], "pending");
    assert_eq!(holders(&etcd), [a_id.clone()]);

    // A comes back, converges, is healthy: it releases its slot.
    nodes[0].boot_again();
    let r = nodes[0].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(nodes[0].report()["reboot"]["action"], "released");
    assert!(holders(&etcd).is_empty());
    assert!(!nodes[0].merged.join("var/lib/bootstrap/reboot.json").exists());

    // B's next run takes the slot and reboots.
    let _ = nodes[1].run_role("apply", "web", &["--name", "production-web"]);
    assert_eq!(nodes[1].wait_exit(Duration::from_secs(60)), 133, "node B did not reboot");
    assert_eq!(holders(&etcd), [b_id]);
}
