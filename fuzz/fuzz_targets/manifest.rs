//! Arbitrary text through the manifest parser (YAML and JSON): errors are fine, panics
//! are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = verge_api::parse_manifests(text);
    }
});
