//! Any text frame: parsing never panics, a rejection is a valid error
//! frame, and a caller that vouches for every valid input (as the key memo
//! does for the inputs it holds) changes nothing that is read.
#![no_main]

use herd::protocol::{parse_input, parse_request, parse_request_knowing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let read = parse_request(text);
    if let Err(rejection) = &read {
        let frame: serde_json::Value =
            serde_json::from_str(&rejection.frame()).expect("error frames are JSON");
        assert_eq!(frame["type"], "error");
    }
    let vouched = parse_request_knowing(text, |_, input| parse_input(input).is_ok());
    assert_eq!(format!("{read:?}"), format!("{vouched:?}"));
});
