//! `bootstrap fleet status [--group G] [--json]`: the fleet view from the node records in etcd.

use super::{FleetCmd, NamingArgs};
use crate::agent::Context;
use crate::error::ConfigError;
use std::path::Path;

pub fn run(cmd: &FleetCmd, group: Option<&str>, naming: &NamingArgs) -> anyhow::Result<u8> {
    let cx = Context::gather(Path::new("/"), &super::facts::naming(naming), false)?;
    let s = cx.rollout_tool_settings()?;
    let svc = s
        .etcd
        .as_ref()
        .ok_or_else(|| ConfigError::msg("no etcd endpoints: set [rollout.etcd] endpoints or [reboot.etcd] endpoints"))?;
    match cmd {
        FleetCmd::Status { json } => {
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
