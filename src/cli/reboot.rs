//! `bootstrap reboot [--check|--request|--wait]` (see `agent::reboot`).

use super::NamingArgs;
use crate::agent::{self, Context};
use std::path::Path;

pub fn run(check: bool, request: bool, wait: bool, lock_timeout: std::time::Duration, naming: &NamingArgs) -> anyhow::Result<u8> {
    let root = Path::new("/");
    if request {
        agent::reboot::request(root)?;
        println!("reboot requested: the next run takes a slot and reboots");
        return Ok(0);
    }
    let cx = Context::gather(root, &super::facts::naming(naming), false)?;
    if check {
        match agent::reboot::check(&cx)? {
            Some(why) => println!("reboot needed: {why}"),
            None => println!("no reboot needed"),
        }
        return Ok(0);
    }
    let c = agent::reboot::coordinate(&cx, wait, lock_timeout)?;
    println!("{}", serde_json::to_string_pretty(&c.outcome)?);
    c.finish()
}
