//! Keys computed here equal the shared test vectors (tests/vectors/keys.json),
//! which the Python package's tests check too: the same input gives the same
//! key in every language (unicode, escapes, floats, big integers, key order).

#[test]
fn keys_match_the_shared_vectors() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/vectors/keys.json");
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let fn_name = case["fn"].as_str().unwrap();
        let canonical = herd::key::canonical_json(&case["input"]);
        assert_eq!(canonical, case["canonical"].as_str().unwrap());
        let key = herd::Key::derive(fn_name, canonical.as_bytes()).to_hex();
        assert_eq!(key, case["key"].as_str().unwrap(), "{case}");
    }
}
