//! Issue 18, part 5: unit steps that change unit files owe one daemon-reload, done once before
//! the first systemd job or step that needs it (a start, an `exec` step) or at the end of the
//! run, even a failed one. Counted on a booted node from systemd's own journal ("Reloading.").

use crate::harness::node::Node;
use crate::harness::support::*;
use std::time::{Duration, Instant};

/// Five unit files (enabled), a file, then `extra` steps, then a target that wants the five
/// and is started.
fn role(rev: u32, extra: &str) -> String {
    format!(
        "schema = 1\n[vars]\nrev = \"{rev}\"\n\
         [[step]]\nkind = \"unit\"\nfor_each = [1, 2, 3, 4, 5]\nname = \"bench-{{{{ item }}}}.service\"\n\
         content = \"[Unit]\\nDescription=bench {{{{ item }}}} rev {{{{ rev }}}}\\n[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n\"\n\
         template = true\nenabled = true\n\
         [[step]]\nkind = \"file\"\npath = \"/etc/bench.conf\"\ncontent = \"bench\\n\"\n\
         {extra}\
         [[step]]\nkind = \"unit\"\nname = \"bench.target\"\n\
         content = \"[Unit]\\nDescription=all bench\\nWants=bench-1.service bench-2.service bench-3.service bench-4.service bench-5.service\\n\"\n\
         active = true\n"
    )
}

/// systemd's "Reloading." lines since `cursor`, read once a marker sent after the run (to the
/// same journal socket as PID 1's messages) is in the journal: none can be still in flight.
fn reloads_since(node: &Node, cursor: &str, n: u32) -> usize {
    let mark = format!("cinit-mark-{n}");
    let r = node.sh(&format!(
        "printf 'MESSAGE={mark}\\nSYSLOG_IDENTIFIER=cinit-mark\\n' | logger --journald && echo ok"
    ));
    assert!(r.stdout.contains("ok"), "{}", r.all());
    let start = Instant::now();
    loop {
        let out = node
            .sh(&format!(
                "journalctl --no-pager -o cat --after-cursor='{cursor}' _PID=1 + SYSLOG_IDENTIFIER=cinit-mark"
            ))
            .stdout;
        if out.lines().any(|l| l == mark) {
            return out.lines().filter(|l| *l == "Reloading.").count();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "marker not in the journal:\n{out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn need_reload(node: &Node) -> String {
    node.sh("systemctl show -p NeedDaemonReload --value bench-1.service bench-2.service bench-3.service bench-4.service bench-5.service | grep . | sort -u")
        .stdout
}

#[test]
fn changed_unit_steps_share_one_daemon_reload() {
    let b = bundle(&[("roles/bench/role.toml", &role(1, ""))]);
    let write = |text: String| std::fs::write(b.path().join("roles/bench/role.toml"), text).unwrap();
    let node = Node::boot(b.path());
    let apply = |n: u32, code: i32| {
        let cursor = node.journal_cursor();
        let r = node.run_role("apply", "bench", &["--detailed-exitcodes"]);
        assert_eq!(r.code, code, "{}", r.all());
        reloads_since(&node, &cursor, n)
    };

    // Five new unit files and enablements, a file, a new target started: one reload, before
    // the start, and the start saw every file.
    assert_eq!(apply(1, 2), 1, "one daemon-reload for six changed unit steps");
    assert_eq!(node.report()["summary"]["changed"], 7);
    assert_eq!(
        node.sh("systemctl is-active bench.target bench-1.service bench-2.service bench-3.service bench-4.service bench-5.service")
            .stdout,
        "active\n".repeat(6)
    );
    assert_eq!(
        node.sh("systemctl is-enabled bench-1.service bench-2.service bench-3.service bench-4.service bench-5.service")
            .stdout,
        "enabled\n".repeat(5)
    );
    assert_eq!(need_reload(&node), "no\n");
    let pids = node.main_pid("bench-3.service");

    assert_eq!(apply(2, 0), 0, "a no-op run reloads nothing");
    assert_eq!(node.report()["summary"]["changed"], 0);

    // Five changed files and no job after them: the reload owed is done at the end of the run.
    write(role(2, ""));
    assert_eq!(apply(3, 2), 1);
    assert_eq!(node.report()["summary"]["changed"], 5);
    assert_eq!(need_reload(&node), "no\n", "systemd kept the old unit files");
    assert_eq!(node.main_pid("bench-3.service"), pids, "a changed unit file restarted its unit");

    // An exec step after changed unit files sees them loaded (it checks with systemctl).
    let check = "[[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"for u in 1 2 3 4 5; do test \\\"$(systemctl show -p NeedDaemonReload --value bench-$u.service)\\\" = no || exit 1; done; touch /run/bench-checked-3\"]\ncreates = \"/run/bench-checked-3\"\n";
    write(role(3, check));
    assert_eq!(apply(4, 2), 1);
    let rep = node.report();
    assert_eq!(rep["summary"]["changed"], 6, "{rep:#}");
    assert_eq!(node.sh("test -e /run/bench-checked-3 && echo y").stdout, "y\n", "the exec step did not run");
    assert_eq!(apply(5, 0), 0, "again: nothing to do, nothing reloaded");

    // A step that fails after changed unit files: the run fails, and the reload still happens.
    let broken = "[[step]]\nkind = \"file\"\npath = \"/etc/bench.conf/x\"\ncontent = \"x\\n\"\n";
    write(role(4, broken));
    assert_eq!(apply(6, 6), 1);
    assert_eq!(node.report()["summary"]["failed"], 1);
    assert_eq!(need_reload(&node), "no\n");
}
