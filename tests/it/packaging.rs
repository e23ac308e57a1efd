//! What an operator installs: metrics, man page, completions.

use crate::harness::support::*;
use std::process::Command;

/// Parse a Prometheus text file with prometheus_client's parser (from the test venv):
/// `name{labels}` → value.
fn parse_prom(path: &std::path::Path) -> std::collections::BTreeMap<String, f64> {
    let venv = std::env::var("VENV").unwrap_or_else(|_| "/var/tmp/bootstrap-venv".into());
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps(out))
"#;
    let o = Command::new(format!("{venv}/bin/python")).args(["-c", script]).arg(path).output().unwrap();
    assert!(o.status.success(), "not Prometheus text format: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Show 4: the metrics file parses as Prometheus text and follows failed and successful runs,
/// including a run that fails before its steps (the bundle source is gone).
#[test]
fn metrics_follow_failed_and_successful_runs() {
    let root = shell_root(); // its exec step runs chrooted into it
    write_config(root.path(), "[metrics]\ntextfile = \"/var/lib/metrics/bootstrap.prom\"\n");
    let prom = root.path().join("var/lib/metrics/bootstrap.prom");
    let b = bundle(&[
        ("roles/app/role.toml", "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/a\"\ncontent = \"a\\n\"\n[[step]]\nkind = \"exec\"\ncommand = [\"false\"]\ncreates = \"/nonexistent\"\n"),
        ("roles/ok/role.toml", "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/a\"\ncontent = \"a\\n\"\n"),
    ]);
    let r = run_role("apply", root.path(), b.path(), "app", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    let m = parse_prom(&prom);
    assert_eq!(m["bootstrap_last_run_success"], 0.0, "{m:?}");
    assert_eq!(m["bootstrap_last_run_exit_code"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"changed\"}"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"failed\"}"], 1.0);
    assert_eq!(m["bootstrap_reboot_pending"], 0.0);
    assert!(m.contains_key("bootstrap_bundle_info{origin=\"directory\",role=\"app\",sha256=\"\"}"), "{m:?}");
    let t1 = m["bootstrap_last_run_timestamp_seconds"];
    assert!(t1 > 1.7e9);

    let r = run_role("apply", root.path(), b.path(), "ok", &[]);
    assert_eq!(r.code, 0, "{}", r.all());
    let m = parse_prom(&prom);
    assert_eq!(m["bootstrap_last_run_success"], 1.0, "{m:?}");
    assert_eq!(m["bootstrap_resources{state=\"in_sync\"}"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"failed\"}"], 0.0);
    assert!(m["bootstrap_last_run_timestamp_seconds"] >= t1);

    // The source is gone: no report, but the metrics say the run failed.
    let r = run_role("apply", root.path(), &root.path().join("no-such-bundle"), "ok", &[]);
    assert_eq!(r.code, 1, "{}", r.all());
    let m = parse_prom(&prom);
    assert_eq!(m["bootstrap_last_run_success"], 0.0, "{m:?}");
    assert_eq!(m["bootstrap_last_run_exit_code"], 1.0);
    assert_eq!(m["bootstrap_resources{state=\"changed\"}"], 0.0);

    // Without a configured path and without node_exporter's directory: no file is written.
    let bare = tempfile::tempdir().unwrap();
    assert_eq!(run_role("apply", bare.path(), b.path(), "ok", &[]).code, 0);
    assert!(!bare.path().join("var/lib/node_exporter").exists());
}

/// Show 5: `man bootstrap` renders; bash completions load and complete subcommands.
#[test]
fn man_page_renders_and_bash_completions_load() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("bootstrap.1");
    let o = cmd(&["generate", "man"]).output().unwrap();
    assert!(o.status.success());
    std::fs::write(&page, &o.stdout).unwrap();
    let o = Command::new("man")
        .args(["-l", "-Tutf8"])
        .arg(&page)
        .env("MANWIDTH", "100")
        .output()
        .expect("man (apt-get install man-db)");
    // man overstrikes bold text (X\bX) when not on a terminal: keep the last of each pair.
    let mut text = String::new();
    for c in String::from_utf8_lossy(&o.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains("NAME bootstrap - Node bootstrap agent"), "{text}");
    assert!(text.contains("apply") && text.contains("reboot"), "{text}");

    let comp = dir.path().join("bootstrap.bash");
    std::fs::write(&comp, cmd(&["generate", "completions", "bash"]).output().unwrap().stdout).unwrap();
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p bootstrap && COMP_WORDS=(bootstrap ap) COMP_CWORD=1 && _bootstrap bootstrap ap bootstrap && echo \"reply: ${{COMPREPLY[*]}}\"",
            comp.display()
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("-F _bootstrap bootstrap") && out.contains("reply: apply"),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Show 2: the .deb on a booted node: install, boot again, the firstboot unit runs init; the
/// timer is active; a drift made by hand is corrected by the next timer run (the test shortens
/// the timer with a drop-in), and the journal shows that run.
#[test]
fn deb_on_a_booted_node_firstboot_then_timer_corrects_drift() {
    let pkgs = tempfile::tempdir().unwrap();
    let o = Command::new(repo().join("packaging/build-deb")).arg(bin()).arg(pkgs.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let deb = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let deb_name = std::path::Path::new(&deb).file_name().unwrap().to_string_lossy().to_string();
    let b = bundle(&[(
        "roles/web/role.toml",
        "schema = 1\n[[step]]\nkind = \"file\"\npath = \"/etc/web.conf\"\ncontent = \"managed\\n\"\n",
    )]);
    let mut node = crate::harness::node::Node::boot_with(b.path(), &[(pkgs.path(), "/srv/pkg")]);
    let r = node.sh(&format!(
        "dpkg -i /srv/pkg/{deb_name} >&2 && printf '[bundle]\\nsource = \"/srv/bundle\"\\n[naming]\\nname = \"production-web\"\\n' > /etc/bootstrap/config.d/50-site.toml && systemctl is-enabled bootstrap-firstboot.service bootstrap.timer"
    ));
    assert_eq!(r.code, 0, "{}", r.all());
    assert_eq!(r.stdout, "enabled\nenabled\n", "{}", r.all());
    assert!(node.merged.join("usr/share/man/man1/bootstrap.1.gz").exists());
    assert!(!node.merged.join("var/lib/bootstrap/firstboot.done").exists());

    // Boot again: the firstboot unit runs init before the boot counts as finished.
    let _ = node.sh("systemctl reboot");
    assert_eq!(node.wait_exit(std::time::Duration::from_secs(60)), 133);
    node.boot_again();
    let start = std::time::Instant::now();
    while !node.merged.join("var/lib/bootstrap/firstboot.done").exists() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "firstboot did not finish: {}",
            node.sh("systemctl status bootstrap-firstboot.service; journalctl -b -u bootstrap-firstboot.service --no-pager")
                .stdout
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(std::fs::read_to_string(node.merged.join("etc/web.conf")).unwrap(), "managed\n");
    let fb = node.sh("journalctl -b -u bootstrap-firstboot.service -o cat --no-pager").stdout;
    assert!(fb.contains("web: 1 changed"), "the firstboot unit ran init: {fb}");
    let timers = node.sh("systemctl list-timers --all --no-pager bootstrap.timer").stdout;
    assert!(timers.contains("bootstrap.timer") && timers.contains("bootstrap.service"), "{timers}");
    assert_eq!(node.sh("systemctl is-active bootstrap.timer").stdout.trim(), "active");
    // The scale-in watcher is installed and enabled; off EC2 (in no Auto Scaling group) it
    // exits at once, cleanly.
    let w = node.sh("systemctl is-enabled bootstrap-watch.service; systemctl show -p Result --value bootstrap-watch.service");
    assert_eq!(w.stdout, "enabled\nsuccess\n", "{}", w.all());
    // firstboot does not run again on later boots (its condition).
    assert!(node.sh("systemctl show -p ConditionResult --value bootstrap-firstboot.service").stdout.trim() == "yes");

    // Drift by hand; the next timer run corrects it.
    let cursor = node.journal_cursor();
    std::fs::write(node.merged.join("etc/web.conf"), "hand edit\n").unwrap();
    let r = node.sh(
        "mkdir -p /etc/systemd/system/bootstrap.timer.d && printf '[Timer]\\nOnActiveSec=1s\\nRandomizedDelaySec=0\\nFixedRandomDelay=false\\n' > /etc/systemd/system/bootstrap.timer.d/soon.conf && systemctl daemon-reload && systemctl restart bootstrap.timer && echo ok",
    );
    assert!(r.stdout.contains("ok"), "{}", r.all());
    let start = std::time::Instant::now();
    while std::fs::read_to_string(node.merged.join("etc/web.conf")).unwrap() != "managed\n" {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "the timer run did not correct the drift");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let j = node.journal_since(&cursor, "bootstrap.service");
    assert!(j.contains("web: 1 changed"), "the journal shows the timer's run: {j}");
}

/// The Terraform example, parsed with python-hcl2 (terraform cannot be installed here): a
/// launch template with IMDSv2 required and the user_data script, an autoscaling group, and an
/// instance role allowed exactly what the agent needs.
#[test]
fn terraform_example_parses_and_grants_what_the_agent_needs() {
    let venv = std::env::var("VENV").unwrap_or_else(|_| "/var/tmp/bootstrap-venv".into());
    let parse = |f: &str| -> serde_json::Value {
        let o = Command::new(format!("{venv}/bin/python"))
            .args(["-c", "import hcl2, json, sys; print(json.dumps(hcl2.load(open(sys.argv[1]))))"])
            .arg(repo().join("packaging/terraform").join(f))
            .output()
            .unwrap();
        assert!(o.status.success(), "{f} does not parse: {}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let main = parse("main.tf");
    let vars = parse("variables.tf");
    let text = main.to_string();
    let resources: Vec<String> = main["resource"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
        .collect();
    for want in [
        "aws_launch_template",
        "aws_autoscaling_group",
        "aws_iam_role",
        "aws_iam_role_policy",
        "aws_iam_instance_profile",
    ] {
        assert!(resources.iter().any(|r| r == want), "{want} missing: {resources:?}");
    }
    for action in [
        "s3:GetObject",
        "ec2:DescribeTags",
        "ec2:DescribeInstanceStatus",
        "ec2:DescribeRegions",
        "ssm:GetParameter",
        "kms:Decrypt",
        "autoscaling:CompleteLifecycleAction",
        "autoscaling:RecordLifecycleActionHeartbeat",
        "autoscaling:SetInstanceHealth",
        "autoscaling:DescribeLifecycleHooks",
        "s3:PutObject",
    ] {
        assert!(text.contains(action), "the instance role lacks {action}");
    }
    // The operators' policy for the fleet view in S3.
    for action in ["s3:ListBucket", "s3:GetObject"] {
        let reader = main["data"].to_string();
        assert!(reader.contains("fleet_view") && reader.contains(action), "the fleet view policy lacks {action}");
    }
    assert!(
        text.contains(r#""http_tokens":"required""#) && text.contains(r#""instance_metadata_tags":"enabled""#),
        "IMDSv2 with tags"
    );
    assert!(text.contains("user-data.sh"), "the launch template uses packaging/user-data.sh");
    for t in ["autoscaling:EC2_INSTANCE_LAUNCHING", "autoscaling:EC2_INSTANCE_TERMINATING"] {
        assert!(text.contains(t), "the group has no {t} lifecycle hook");
    }
    // Every variable main.tf uses is declared.
    let declared: Vec<String> = vars["variable"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|v| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>())
        .collect();
    let src = std::fs::read_to_string(repo().join("packaging/terraform/main.tf")).unwrap();
    for used in src
        .split("var.")
        .skip(1)
        .map(|s| s.split(|c: char| !(c.is_alphanumeric() || c == '_')).next().unwrap())
    {
        assert!(declared.iter().any(|d| d == used), "var.{used} is not declared");
    }
    // The placeholders main.tf fills are the script's, and the rendered user_data fits EC2's 16 KB.
    let script = std::fs::read_to_string(repo().join("packaging/user-data.sh")).unwrap();
    for p in [
        "@BOOTSTRAP_URL@",
        "@BOOTSTRAP_SHA256@",
        "@BOOTSTRAP_BUNDLE@",
        "@BOOTSTRAP_ASG@",
        "@BOOTSTRAP_REPORT_S3@",
    ] {
        assert!(src.contains(p) && script.contains(p), "{p}");
    }
    let rendered = script
        .replace(
            "@BOOTSTRAP_URL@",
            "https://releases.example.com/bootstrap/0.1.0/bootstrap-x86_64-unknown-linux-musl",
        )
        .replace("@BOOTSTRAP_SHA256@", &"0".repeat(64))
        .replace("@BOOTSTRAP_BUNDLE@", "s3://example-roles/roles-${env}.tar.gz")
        .replace("@BOOTSTRAP_ASG@", "true")
        .replace(
            "@BOOTSTRAP_REPORT_S3@",
            "s3://example-fleet-reports/nodes/${env}/${service}/${instance_id}.json",
        );
    assert!(rendered.len() < 16 * 1024);
}

/// The .rpm carries the same files, units under /usr/lib/systemd/system naming /usr/bin/bootstrap.
/// (No RHEL-family node can boot here, so it is inspected, not installed.)
#[test]
fn rpm_carries_the_agent_units_config_and_docs() {
    let out = tempfile::tempdir().unwrap();
    let o = Command::new(repo().join("packaging/build-rpm")).arg(bin()).arg(out.path()).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rpm = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let list = String::from_utf8_lossy(&Command::new("rpm").args(["-qlp", &rpm]).output().unwrap().stdout).to_string();
    for f in [
        "/usr/bin/bootstrap",
        "/usr/lib/systemd/system/bootstrap.service",
        "/usr/lib/systemd/system/bootstrap.timer",
        "/usr/lib/systemd/system/bootstrap-firstboot.service",
        "/usr/lib/systemd/system/bootstrap-watch.service",
        "/etc/bootstrap/config.d/00-defaults.toml",
        "/usr/lib/tmpfiles.d/bootstrap.conf",
        "/usr/share/man/man1/bootstrap.1.gz",
        "/usr/share/bash-completion/completions/bootstrap",
    ] {
        assert!(list.lines().any(|l| l == f), "{f} missing from the rpm:\n{list}");
    }
    let cfg = String::from_utf8_lossy(&Command::new("rpm").args(["-qcp", &rpm]).output().unwrap().stdout).to_string();
    assert_eq!(cfg.trim(), "/etc/bootstrap/config.d/00-defaults.toml", "the config fragment is a config file");
    let x = tempfile::tempdir().unwrap();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!("rpm2cpio {rpm} | cpio -idm --quiet"))
        .current_dir(x.path())
        .status()
        .unwrap();
    assert!(st.success());
    let unit = std::fs::read_to_string(x.path().join("usr/lib/systemd/system/bootstrap.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/bootstrap apply"), "{unit}");
}

/// `readelf -SW` of `bin`: section name → (address, size).
fn sections(bin: &std::path::Path) -> std::collections::BTreeMap<String, (u64, u64)> {
    let o = Command::new("readelf").arg("-SW").arg(bin).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut out = std::collections::BTreeMap::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        // "  [10] .text.hot  PROGBITS  0000000000003040 003040 18f067 00  AX  0   0 64"
        let Some((_, rest)) = line.split_once("] ") else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() >= 5 {
            let hex = |s: &str| u64::from_str_radix(s, 16).ok();
            if let (Some(addr), Some(size)) = (hex(f[2]), hex(f[4])) {
                out.insert(f[0].to_string(), (addr, size));
            }
        }
    }
    out
}

/// The release binary's linker scripts (build.rs links them into the static musl build, which
/// CI does not make: here GNU ld links them into a small C program): functions in sections that
/// packaging/text-order.ld names come before the rest of the code, in `.text.hot`, those it
/// does not name (plain `.text` among them) stay in `.text`, and the unwind tables are gone
/// but the C runtime's (packaging/no-unwind-tables.ld).
#[test]
fn release_link_scripts_put_listed_code_first_and_drop_unwind_tables() {
    let order = std::fs::read_to_string(repo().join("packaging/text-order.ld")).unwrap();
    // Section names the script lists (its wildcards filled in), that the assembler takes as is.
    let listed: Vec<String> = order
        .lines()
        .filter_map(|l| l.trim().strip_prefix("*(")?.strip_suffix(')'))
        .filter(|p| p.chars().all(|c| c.is_ascii_alphanumeric() || "_.*".contains(c)))
        .map(|p| p.replace('*', "x"))
        .collect();
    assert!(listed.len() > 100, "{} plain names in text-order.ld", listed.len());
    let (first, last) = (&listed[0], &listed[listed.len() - 1]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("p.c");
    std::fs::write(
        &src,
        format!(
            "#include <stdio.h>\n\
             __attribute__((noinline, section(\".text.not_listed\"))) int cold(int x) {{ return x * 3; }}\n\
             __attribute__((noinline, section(\".text\"))) int plain(int x) {{ return x * 5; }}\n\
             __attribute__((noinline, section(\"{first}\"))) int hot1(int x) {{ return x + 1; }}\n\
             __attribute__((noinline, section(\"{last}\"))) int hot2(int x) {{ return x + 2; }}\n\
             int main(int argc, char **argv) {{ printf(\"%d\\n\", hot1(argc) + hot2(argc) + cold(argc) + plain(argc)); return 0; }}\n"
        ),
    )
    .unwrap();
    let link = |out: &str, scripts: bool| {
        let mut c = Command::new("gcc");
        c.args(["-O1", "-static-pie", "-o"]).arg(dir.path().join(out)).arg(&src);
        if scripts {
            for s in ["no-unwind-tables.ld", "text-order.ld"] {
                c.arg(format!("-Wl,-T,{}", repo().join("packaging").join(s).display()));
            }
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "gcc {out}: {}", String::from_utf8_lossy(&o.stderr));
        dir.path().join(out)
    };
    let plain = link("plain", false);
    let linked = link("linked", true);

    let o = Command::new(&linked).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "13\n", "{o:?}");
    let secs = sections(&linked);
    let hot = secs.get(".text.hot").unwrap_or_else(|| panic!("no .text.hot in {secs:?}"));
    let text = secs[".text"];
    assert!(hot.0 < text.0, "{secs:?}");
    let nm = Command::new("nm").arg(&linked).output().unwrap();
    let addr = |name: &str| {
        String::from_utf8_lossy(&nm.stdout)
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[2] == name).then(|| u64::from_str_radix(f[0], 16).unwrap())
            })
            .unwrap_or_else(|| panic!("no {name} in nm"))
    };
    for f in ["hot1", "hot2"] {
        assert!((hot.0..hot.0 + hot.1).contains(&addr(f)), "{f} at {:#x}, {secs:?}", addr(f));
    }
    // Code in sections the script does not single out stays in .text: plain `.text` (what
    // assembly and C name their code) is listed only per archive member.
    for f in ["cold", "plain"] {
        assert!((text.0..text.0 + text.1).contains(&addr(f)), "{f} at {:#x}, {secs:?}", addr(f));
    }
    // The program's own unwind tables are dropped; the C runtime's stay.
    let eh = |s: &std::collections::BTreeMap<String, (u64, u64)>| s.get(".eh_frame").map_or(0, |e| e.1);
    let (before, after) = (eh(&sections(&plain)), eh(&secs));
    assert!(after < before / 2, ".eh_frame {before} bytes without the script, {after} with it");
}
