//! Keys: the identity of a computation.
//!
//! A key is the first 16 bytes of BLAKE3(`fn` bytes, 0x00, canonical JSON of
//! the input), shown as 32 lowercase hex characters ([`Key`], in the core).
//! Canonical JSON is written here rather than relying on `serde_json::Map`
//! ordering, so the key cannot change if some dependency turns on
//! serde_json's `preserve_order`.

pub use herd_core::key::Key;
use serde_json::Value;

/// The key a broker derives for a submit of `input` to fn `fn_name`, as
/// 32 hex characters.
pub fn key_hex(fn_name: &str, input: &Value) -> String {
    Key::derive(fn_name, canonical_json(input).as_bytes()).to_hex()
}

/// Canonical JSON: no insignificant whitespace, object members sorted by key
/// (byte order), strings and numbers as serde_json writes them.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    String::from_utf8(out).expect("serde_json writes UTF-8")
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            out.push(b'{');
            // serde_json's map iterates in key order unless `preserve_order`
            // is on somewhere in the build; sort only when it is not sorted.
            if map.keys().is_sorted_by(|a, b| a.as_bytes() <= b.as_bytes()) {
                write_members(map.iter(), out);
            } else {
                let mut members: Vec<(&String, &Value)> = map.iter().collect();
                members.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
                write_members(members.into_iter(), out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        scalar => write_json(scalar, out),
    }
}

fn write_members<'a>(members: impl Iterator<Item = (&'a String, &'a Value)>, out: &mut Vec<u8>) {
    for (i, (name, member)) in members.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_json(name, out);
        out.push(b':');
        write_canonical(member, out);
    }
}

fn write_json<T: serde::Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Strings, numbers, booleans and null serialize without fail.
    serde_json::to_writer(out, value).expect("scalar JSON serializes");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_sorts_members_and_strips_whitespace() {
        let v: Value =
            serde_json::from_str(r#"{ "b": [1, {"z":1,"a":2}], "a": "x\"y", "é": 1.5 }"#).unwrap();
        assert_eq!(
            canonical_json(&v),
            r#"{"a":"x\"y","b":[1,{"a":2,"z":1}],"é":1.5}"#
        );
    }

    #[test]
    fn known_vectors() {
        // Computed independently with the reference `blake3` Python package over
        // b"<fn>\x00" + json.dumps(input, sort_keys=True, separators=(",", ":")).
        assert_eq!(
            Key::derive("default", canonical_json(&json!({"x": 1})).as_bytes()).to_hex(),
            KEY_DEFAULT_X1
        );
        assert_eq!(
            Key::derive(
                "echo",
                canonical_json(&json!({"b": [1, 2], "a": "hi"})).as_bytes()
            )
            .to_hex(),
            KEY_ECHO_AB
        );
    }

    const KEY_DEFAULT_X1: &str = "6163f43cc4cc9528022c17d1080f8b6f";
    const KEY_ECHO_AB: &str = "cd0e2525f1f40969c08f2ffa4a70c6b5";

    proptest::proptest! {
        #[test]
        fn canonical_is_stable_under_reparse(s in "\\PC{0,64}", n in proptest::num::i64::ANY, f in -1e12f64..1e12) {
            let v = json!({"s": s, "n": n, "f": f, "nested": {"k": [s.clone(), n]}});
            let c = canonical_json(&v);
            let reparsed: Value = serde_json::from_str(&c).unwrap();
            proptest::prop_assert_eq!(canonical_json(&reparsed), c);
        }
    }
}
