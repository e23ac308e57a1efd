//! Bundle unpacking: the fuzzer's bytes as the tarball (gzip-wrapped first when the first
//! byte is even, so that it reaches the tar parser), unpacked with small limits.
#![no_main]

use bootstrap::source::bundle::{unpack, Limits};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode % 2 == 0 {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        if gz.write_all(rest).is_err() {
            return;
        }
        match gz.finish() {
            Ok(b) => b,
            Err(_) => return,
        }
    } else {
        rest.to_vec()
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let dest = dir.path().join("bundle");
    let limits = Limits {
        max_bytes: 1024 * 1024,
        max_entries: 256,
    };
    if unpack(&bytes, &dest, limits).is_ok() {
        // Whatever unpacked stays inside dest: no entry of dir but dest.
        let names: Vec<_> = std::fs::read_dir(dir.path()).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
        assert_eq!(names, vec![std::ffi::OsString::from("bundle")], "unpack wrote beside the bundle");
    } else {
        assert!(!dest.exists(), "a failed unpack leaves nothing");
    }
});
