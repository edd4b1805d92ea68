//! Any JSON input: canonical JSON is stable under re-parsing, so the key of
//! a value does not depend on how it was written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let canonical = herd::key::canonical_json(&value);
    let reparsed: serde_json::Value = serde_json::from_str(&canonical).expect("canonical is JSON");
    assert_eq!(herd::key::canonical_json(&reparsed), canonical);
    let key = herd::Key::derive("fuzz", canonical.as_bytes());
    assert_eq!(herd::Key::parse(&key.to_hex()), Some(key));
});
