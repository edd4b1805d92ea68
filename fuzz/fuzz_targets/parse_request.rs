//! Any text frame: parsing never panics, and a rejection is a valid error frame.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(rejection) = herd::protocol::parse_request(text) {
        let frame: serde_json::Value =
            serde_json::from_str(&rejection.frame()).expect("error frames are JSON");
        assert_eq!(frame["type"], "error");
    }
});
