//! IMDSv2 answers: the real client (token PUT, GETs with the token, tag listing) against a
//! loopback server answering with the fuzzer's bytes.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    common::answer(&common::as_http(data));
    let Ok(imds) = bootstrap::facts::imds::Imds::new(common::server(), Duration::from_millis(5)) else { return };
    let _ = imds.meta("instance-id");
    let _ = imds.tags();
    let _ = imds.get("user-data");
});
