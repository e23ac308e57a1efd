//! `bootstrap fleet status [--group G] [--json] [--source s3://…] [--stale D]`: the fleet view
//! from the node records in etcd, or in S3 (`[report] s3`).

use super::{FleetCmd, NamingArgs};
use crate::agent::Context;
use crate::error::ConfigError;
use std::path::Path;

pub fn run(cmd: &FleetCmd, group: Option<&str>, naming: &NamingArgs) -> anyhow::Result<u8> {
    let cx = Context::gather(Path::new("/"), &super::facts::naming(naming), false)?;
    let s = cx.rollout_tool_settings()?;
    match cmd {
        FleetCmd::Status {
            json,
            source: Some(source),
            stale,
        } => {
            let s3 = crate::rollout::fleet_s3::options(&cx.config, cx.facts.region.as_deref(), crate::rollout::fleet_s3::MAX_RECORD_BYTES);
            let view = crate::rollout::fleet_s3::view(&s3, source, group, stale.unwrap_or(s.report_ttl))?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", crate::rollout::fleet_s3::human(&view));
            }
        }
        FleetCmd::Status { json, source: None, .. } => {
            let svc = s.etcd.as_ref().ok_or_else(|| {
                ConfigError::msg("no etcd endpoints: set [rollout.etcd] endpoints or [reboot.etcd] endpoints, or read the records from S3 with --source s3://…")
            })?;
            let groups = crate::rollout::fleet::view(svc, group)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "groups": groups }))?);
            } else {
                print!("{}", crate::rollout::fleet::human(&groups));
            }
        }
    }
    Ok(0)
}
