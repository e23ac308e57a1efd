//! An https/http bundle source answering with the fuzzer's bytes (status, headers, body):
//! the whole fetch (conditional GET, 304, errors, last-good, verify, unpack into the cache)
//! into a fresh root, twice (the second run sends If-None-Match when the first cached).
#![no_main]

#[path = "common.rs"]
mod common;

use bootstrap::source::{fetch, Source, Verify};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    common::answer(&common::as_http(data));
    let Ok(root) = tempfile::tempdir() else { return };
    let src = Source::Http(format!("{}/b.tar.gz", common::server()));
    let mut v = Verify::default();
    v.limits.max_bytes = 1024 * 1024;
    v.limits.max_entries = 256;
    for _ in 0..2 {
        let _ = fetch(&src, root.path(), &v, true);
    }
});
