//! The Docker engine's answers on its socket: the raw HTTP/1.0 answer parser (chunked or
//! not), its JSON and error message, and image references.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = bootstrap::docker::parse_response(data) {
        let _ = r.json();
        let _ = r.message();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = bootstrap::docker::pull_params(s);
    }
});
