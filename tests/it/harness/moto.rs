//! moto_server (S3 and EC2 APIs) on a free loopback port, from the venv scripts/setup makes.
//! It does not check signatures; each request is logged, so tests can count them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Moto {
    child: Child,
    pub url: String,
    pub log: PathBuf,
    /// The CA that signed moto's certificate, when it serves HTTPS.
    ca: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

pub fn moto_server() -> PathBuf {
    let venv = PathBuf::from(std::env::var("VENV").unwrap_or_else(|_| "/var/tmp/bootstrap-venv".into()));
    let p = venv.join("bin/moto_server");
    assert!(p.exists(), "no moto_server at {}: run scripts/setup", p.display());
    p
}

impl Moto {
    pub fn start() -> Moto {
        Moto::start_with(None)
    }

    /// moto serving HTTPS on 127.0.0.1 with the server certificate of `tls` (signed by its CA).
    pub fn start_tls(tls: &crate::harness::etcd::TlsFiles) -> Moto {
        Moto::start_with(Some(tls))
    }

    fn start_with(tls: Option<&crate::harness::etcd::TlsFiles>) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let mut c = Command::new(moto_server());
        c.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(t) = tls {
            c.args(["--ssl-cert", &t.path("server.crt"), "--ssl-key", &t.path("server.key")]);
        }
        let child = c.stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap()).spawn().unwrap();
        let url = format!("{}://127.0.0.1:{port}", if tls.is_some() { "https" } else { "http" });
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "moto_server did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            url,
            log,
            ca: tls.map(|t| t.dir.join("ca.crt")),
            _dir: dir,
        }
    }

    /// Start moto inside the network namespace of process `pid` (a node's PID 1), on
    /// 127.0.0.1:`port` there. Its log says when it listens.
    pub fn start_in_netns(pid: i32, port: u16) -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        let child = Command::new("nsenter")
            .args(["-t", &pid.to_string(), "-n"])
            .arg(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("Running on") {
            assert!(start.elapsed() < Duration::from_secs(30), "moto_server did not start in the node");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log,
            ca: None,
            _dir: dir,
        }
    }

    /// PUT from inside the node's network namespace (curl through nsenter).
    pub fn put_in_netns(&self, pid: i32, path: &str, file: Option<&std::path::Path>) {
        self.put_in_netns_with(pid, path, file, &[]);
    }

    /// The same with extra request headers (e.g. `x-amz-acl: public-read`).
    pub fn put_in_netns_with(&self, pid: i32, path: &str, file: Option<&std::path::Path>, headers: &[&str]) {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &pid.to_string(),
            "-n",
            "curl",
            "-sf",
            "-X",
            "PUT",
            "-H",
            "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request",
        ]);
        for h in headers {
            c.args(["-H", h]);
        }
        if let Some(f) = file {
            // -T: a plain PUT upload (no form content type, which moto would parse as a form).
            c.args(["-H", "Content-Type: application/octet-stream", "-T"]).arg(f);
        }
        let out = c.arg(format!("{}/{path}", self.url)).output().unwrap();
        assert!(out.status.success(), "PUT {path} in the node: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn http(&self) -> reqwest::blocking::Client {
        let mut b = reqwest::blocking::Client::builder().no_proxy();
        if let Some(ca) = &self.ca {
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap());
        }
        b.build().unwrap()
    }

    /// Raw S3 calls (moto wants some Authorization header).
    pub fn put(&self, path: &str, body: Vec<u8>) {
        let r = self
            .http()
            .put(format!("{}/{path}", self.url))
            .header("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request")
            .body(body)
            .send()
            .unwrap();
        assert!(r.status().is_success(), "PUT {path}: {}", r.status());
    }

    /// An SSM SecureString parameter.
    pub fn put_parameter(&self, name: &str, value: &str) {
        let r = self
            .http()
            .post(&self.url)
            .header("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ssm/aws4_request")
            .header("X-Amz-Target", "AmazonSSM.PutParameter")
            .header("Content-Type", "application/x-amz-json-1.1")
            .body(serde_json::json!({ "Name": name, "Value": value, "Type": "SecureString" }).to_string())
            .send()
            .unwrap();
        assert!(r.status().is_success(), "PutParameter {name}: {} {}", r.status(), r.text().unwrap_or_default());
    }

    /// Lines of moto's request log that match `needle`.
    pub fn requests(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Environment for an agent that talks to moto.
pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_REGION", "us-east-1"),
];

impl Moto {
    /// Start an EC2 instance in moto with these tags; returns its id.
    pub fn run_instance(&self, tags: &[(&str, &str)]) -> String {
        self.run_instance_in("us-east-1", tags)
    }

    /// Start an EC2 instance in moto in this region (the one its request is signed for).
    pub fn run_instance_in(&self, region: &str, tags: &[(&str, &str)]) -> String {
        let mut form = vec![
            ("Action".to_string(), "RunInstances".to_string()),
            ("Version".into(), "2016-11-15".into()),
            ("ImageId".into(), "ami-12c6146b".into()),
            ("MinCount".into(), "1".into()),
            ("MaxCount".into(), "1".into()),
            ("TagSpecification.1.ResourceType".into(), "instance".into()),
        ];
        for (i, (k, v)) in tags.iter().enumerate() {
            form.push((format!("TagSpecification.1.Tag.{}.Key", i + 1), k.to_string()));
            form.push((format!("TagSpecification.1.Tag.{}.Value", i + 1), v.to_string()));
        }
        let body = form.iter().map(|(k, v)| format!("{k}={}", v.replace(':', "%3A"))).collect::<Vec<_>>().join("&");
        let r = self
            .http()
            .post(&self.url)
            .header(
                "Authorization",
                format!("AWS4-HMAC-SHA256 Credential=testing/20260101/{region}/ec2/aws4_request"),
            )
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .unwrap()
            .text()
            .unwrap();
        let start = r.find("<instanceId>").expect("RunInstances answer") + "<instanceId>".len();
        r[start..start + r[start..].find('<').unwrap()].to_string()
    }
}

impl Moto {
    /// RunInstances from inside the node's network namespace (curl through nsenter).
    pub fn run_instance_in_netns(&self, pid: i32, name_tag: &str) -> String {
        let body = format!(
            "Action=RunInstances&Version=2016-11-15&ImageId=ami-12c6146b&MinCount=1&MaxCount=1&TagSpecification.1.ResourceType=instance&TagSpecification.1.Tag.1.Key=Name&TagSpecification.1.Tag.1.Value={name_tag}"
        );
        let out = Command::new("nsenter")
            .args([
                "-t",
                &pid.to_string(),
                "-n",
                "curl",
                "-sf",
                "-X",
                "POST",
                "-H",
                "Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request",
                "-d",
                &body,
                &self.url,
            ])
            .output()
            .unwrap();
        let r = String::from_utf8_lossy(&out.stdout);
        let start = r.find("<instanceId>").expect("RunInstances answer") + "<instanceId>".len();
        r[start..start + r[start..].find('<').unwrap()].to_string()
    }
}

impl Moto {
    /// TerminateInstances (raw EC2 query API).
    pub fn terminate(&self, id: &str) {
        let r = self
            .http()
            .post(&self.url)
            .header("Authorization", "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/ec2/aws4_request")
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("Action=TerminateInstances&Version=2016-11-15&InstanceId.1={id}"))
            .send()
            .unwrap();
        assert!(r.status().is_success(), "TerminateInstances: {}", r.status());
    }
}

/// One Auto Scaling API call as the proxy saw it: the action, its form parameters, when it
/// came (unix seconds) and the status it got.
#[derive(Debug, Clone)]
pub struct AsgCall {
    pub action: String,
    pub params: std::collections::BTreeMap<String, String>,
    pub at: f64,
    pub status: u16,
}

/// moto 5.2's Auto Scaling backend has groups, instances, lifecycle hooks and
/// SetInstanceHealth, but no CompleteLifecycleAction or RecordLifecycleActionHeartbeat (they
/// are not in moto/autoscaling/responses.py, and nothing records a lifecycle action). This
/// recording proxy sits in front of moto: it answers those two calls the way AWS does (the hook
/// and the instance checked against moto's state; an action completed once has no active
/// action left: a second completion or heartbeat is a ValidationError), forwards every other
/// call to moto, and records every Auto Scaling call so a test can read the outcome back.
pub struct AsgProxy {
    pub url: String,
    pub calls: std::sync::Arc<std::sync::Mutex<Vec<AsgCall>>>,
    /// Fault: refuse this many CompleteLifecycleAction calls (a ValidationError, which the
    /// SDKs do not retry).
    pub refuse_completions: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// (instance id, hook) of the lifecycle actions completed: none active any more.
    completed: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(String, String)>>>,
    _http: super::http::HttpServer,
}

const AS_AUTH: &str = "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/autoscaling/aws4_request";

fn form_decode(s: &str) -> std::collections::BTreeMap<String, String> {
    let dec = |t: &str| -> String {
        let b = t.replace('+', " ").into_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' && i + 2 < b.len() {
                if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or(""), 16) {
                    out.push(v);
                    i += 3;
                    continue;
                }
            }
            out.push(b[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (dec(k), dec(v)),
            None => (dec(p), String::new()),
        })
        .collect()
}

fn form_encode(params: &[(&str, &str)]) -> String {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    params.iter().map(|(k, v)| format!("{}={}", enc(k), enc(v))).collect::<Vec<_>>().join("&")
}

fn now_unix() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

fn xml_values(text: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(after[..j].to_string());
        rest = &after[j..];
    }
    out
}

impl Moto {
    /// An Auto Scaling query API call to moto (from the host); the answer's text.
    pub fn autoscaling(&self, params: &[(&str, &str)]) -> String {
        let mut all = vec![("Version", "2011-01-01")];
        all.extend_from_slice(params);
        let r = self
            .http()
            .post(&self.url)
            .header("Authorization", AS_AUTH)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form_encode(&all))
            .send()
            .unwrap();
        let (status, text) = (r.status(), r.text().unwrap());
        assert!(status.is_success(), "{params:?}: {status} {text}");
        text
    }

    /// A launch configuration, group `name` of one instance, and lifecycle hooks (name,
    /// transition, heartbeat timeout in seconds); returns the group's instance id.
    pub fn create_asg(&self, name: &str, hooks: &[(&str, &str, u32)]) -> String {
        self.create_asg_of(name, hooks, 1).remove(0)
    }

    /// The same with `size` instances; returns their ids.
    pub fn create_asg_of(&self, name: &str, hooks: &[(&str, &str, u32)], size: u32) -> Vec<String> {
        let size = size.to_string();
        let lc = format!("{name}-lc");
        self.autoscaling(&[
            ("Action", "CreateLaunchConfiguration"),
            ("LaunchConfigurationName", &lc),
            ("ImageId", "ami-12c6146b"),
            ("InstanceType", "t3.small"),
        ]);
        self.autoscaling(&[
            ("Action", "CreateAutoScalingGroup"),
            ("AutoScalingGroupName", name),
            ("LaunchConfigurationName", &lc),
            ("MinSize", &size),
            ("MaxSize", &size),
            ("DesiredCapacity", &size),
            ("AvailabilityZones.member.1", "us-east-1a"),
        ]);
        for (hook, transition, timeout) in hooks {
            self.autoscaling(&[
                ("Action", "PutLifecycleHook"),
                ("AutoScalingGroupName", name),
                ("LifecycleHookName", hook),
                ("LifecycleTransition", transition),
                ("HeartbeatTimeout", &timeout.to_string()),
                ("DefaultResult", "ABANDON"),
            ]);
        }
        let text = self.autoscaling(&[("Action", "DescribeAutoScalingGroups"), ("AutoScalingGroupNames.member.1", name)]);
        let ids = xml_values(&text, "InstanceId");
        assert!(!ids.is_empty(), "no instance in the group: {text}");
        ids
    }

    /// The instance's HealthStatus in its group (DescribeAutoScalingInstances).
    pub fn asg_health(&self, instance_id: &str) -> String {
        let text = self.autoscaling(&[("Action", "DescribeAutoScalingInstances"), ("InstanceIds.member.1", instance_id)]);
        xml_values(&text, "HealthStatus").into_iter().next().expect("the instance in a group")
    }

    /// Start the recording proxy on a free loopback port.
    pub fn asg_proxy(&self) -> AsgProxy {
        let calls: std::sync::Arc<std::sync::Mutex<Vec<AsgCall>>> = Default::default();
        let (moto, rec) = (self.url.clone(), calls.clone());
        let completed: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<(String, String)>>> = Default::default();
        let actions = completed.clone();
        let refuse: std::sync::Arc<std::sync::atomic::AtomicU32> = Default::default();
        let refusing = refuse.clone();
        let http = super::http::HttpServer::start(move |req| {
            let body = String::from_utf8_lossy(&req.body).into_owned();
            let params = form_decode(&body);
            let action = params.get("Action").cloned().unwrap_or_default();
            let client = reqwest::blocking::Client::builder().no_proxy().build().unwrap();
            let ask = |p: &[(&str, &str)]| -> String {
                let mut all = vec![("Version", "2011-01-01")];
                all.extend_from_slice(p);
                client
                    .post(&moto)
                    .header("Authorization", AS_AUTH)
                    .header("Content-Type", "application/x-www-form-urlencoded")
                    .body(form_encode(&all))
                    .send()
                    .and_then(|r| r.text())
                    .unwrap_or_default()
            };
            let p = |k: &str| params.get(k).cloned().unwrap_or_default();
            let (status, text) = match action.as_str() {
                "CompleteLifecycleAction" | "RecordLifecycleActionHeartbeat" => {
                    let (group, hook, id) = (p("AutoScalingGroupName"), p("LifecycleHookName"), p("InstanceId"));
                    let hooks = ask(&[("Action", "DescribeLifecycleHooks"), ("AutoScalingGroupName", &group)]);
                    let inst = ask(&[("Action", "DescribeAutoScalingInstances"), ("InstanceIds.member.1", &id)]);
                    let result = p("LifecycleActionResult");
                    let mut done = completed.lock().unwrap();
                    let refused = action == "CompleteLifecycleAction"
                        && refusing
                            .fetch_update(std::sync::atomic::Ordering::SeqCst, std::sync::atomic::Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let valid = !refused
                        && xml_values(&hooks, "LifecycleHookName").contains(&hook)
                        && xml_values(&inst, "AutoScalingGroupName").contains(&group)
                        && !done.contains(&(id.clone(), hook.clone()))
                        && (action != "CompleteLifecycleAction" || result == "CONTINUE" || result == "ABANDON");
                    if valid {
                        if action == "CompleteLifecycleAction" {
                            done.insert((id.clone(), hook.clone()));
                        }
                        (
                            200,
                            format!(
                                "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><{action}Result/><ResponseMetadata><RequestId>proxy</RequestId></ResponseMetadata></{action}Response>"
                            ),
                        )
                    } else {
                        (
                            400,
                            format!(
                                "<ErrorResponse xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\"><Error><Type>Sender</Type><Code>ValidationError</Code><Message>No active Lifecycle Action found with instance ID {id}</Message></Error><RequestId>proxy</RequestId></ErrorResponse>"
                            ),
                        )
                    }
                }
                _ => {
                    let r = client
                        .post(&moto)
                        .header("Authorization", req.header("authorization").unwrap_or(AS_AUTH))
                        .header("Content-Type", "application/x-www-form-urlencoded")
                        .body(req.body.clone())
                        .send()
                        .unwrap();
                    (r.status().as_u16(), r.text().unwrap_or_default())
                }
            };
            rec.lock().unwrap().push(AsgCall {
                action,
                params,
                at: now_unix(),
                status,
            });
            Some(super::http::Response::new(status, text).header("Content-Type", "text/xml"))
        });
        AsgProxy {
            url: http.url.clone(),
            calls,
            refuse_completions: refuse,
            completed: actions,
            _http: http,
        }
    }
}

impl AsgProxy {
    /// A new lifecycle action of `hook` for instance `id`, as AWS starts one when a warm
    /// pool's instance is moved into service (the launch hook fires again).
    pub fn start_action(&self, id: &str, hook: &str) {
        self.completed.lock().unwrap().remove(&(id.to_string(), hook.to_string()));
    }

    /// The calls of `action` that were answered 200.
    pub fn ok_calls(&self, action: &str) -> Vec<AsgCall> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.action == action && c.status == 200)
            .cloned()
            .collect()
    }
}
