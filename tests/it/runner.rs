//! The runner on a booted node: a command that times out leaves no process behind, and the
//! run returns within its timeout plus a second (issue 14, finding 5).

use crate::harness::node::Node;
use crate::harness::support::bundle;

/// `exec` steps with a 1 s timeout: the issue's `sh -c 'sleep 100 &'` (the shell exits at
/// once, the sleep holds its output), and a setsid daemon beside a main process that runs on.
const ROLES: &[(&str, &str)] = &[
    (
        "roles/hang/role.toml",
        "schema = 1\n[[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"sleep 100 &\"]\nunless = [\"false\"]\ntimeout = \"1s\"\n",
    ),
    (
        "roles/daemon/role.toml",
        "schema = 1\n[[step]]\nkind = \"exec\"\ncommand = [\"sh\", \"-c\", \"setsid sleep 101 >/dev/null 2>&1 </dev/null & sleep 102\"]\nunless = [\"false\"]\ntimeout = \"1s\"\n",
    ),
];

#[test]
fn a_timed_out_command_leaves_no_process_on_a_booted_node() {
    let b = bundle(ROLES);
    let node = Node::boot(b.path());
    let mut problems = Vec::new();
    for (role, says) in [("hang", "held its output open until the timeout"), ("daemon", "timed out")] {
        let r = node.run_role("apply", role, &[]);
        let ps = node.sh("ps -eo pid,ppid,sid,stat,args").stdout;
        let step = node.report()["steps"][0].clone();
        let ms = step["duration_ms"].as_u64().unwrap_or(u64::MAX);
        eprintln!("{role}: exit {}, step {} in {ms} ms", r.code, step["status"]);
        if r.code != 1 || step["status"] != "failed" || !r.all().contains(says) {
            problems.push(format!("{role}: the step must fail saying {says:?}; exit {}:\n{}", r.code, r.all()));
        }
        if ms >= 2000 {
            problems.push(format!("{role}: the 1 s timeout returned after {ms} ms"));
        }
        if ps.contains("sleep 10") {
            problems.push(format!("{role}: processes of the command left running:\n{ps}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
