//! Keys: the identity of a computation.
//!
//! A key is the first 16 bytes of BLAKE3(`fn` bytes, 0x00, canonical JSON of
//! the input), shown as 32 lowercase hex characters. Canonical JSON is
//! written here rather than relying on `serde_json::Map` ordering, so the key
//! cannot change if some dependency turns on serde_json's `preserve_order`.

use crate::ns::Ns;
use serde_json::Value;
use std::fmt;

/// The 16-byte identity of (`fn`, input), in a namespace. Clients see the
/// 16 bytes only; the namespace is the session's, so two namespaces'
/// identical inputs are two keys everywhere inside the broker.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    bytes: [u8; 16],
    ns: Ns,
}

/// A key is already a uniform hash: it feeds a map's hasher as one integer,
/// not as a slice with a length prefix.
impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(u128::from_le_bytes(self.bytes) ^ u128::from(self.ns.id()));
    }
}

impl Key {
    /// Derives the key of `canonical_input` (already canonical JSON) under `fn_name`.
    pub fn derive(fn_name: &str, canonical_input: &[u8]) -> Key {
        let mut hasher = blake3::Hasher::new();
        hasher.update(fn_name.as_bytes());
        hasher.update(&[0u8]);
        hasher.update(canonical_input);
        let mut out = [0u8; 16];
        out.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        Key::from_bytes(out)
    }

    /// The key of these 16 bytes in the shared namespace.
    pub const fn from_bytes(bytes: [u8; 16]) -> Key {
        Key {
            bytes,
            ns: Ns::SHARED,
        }
    }

    /// The same key in namespace `ns`.
    pub fn in_ns(self, ns: Ns) -> Key {
        Key { ns, ..self }
    }

    /// Its namespace.
    pub fn ns(&self) -> Ns {
        self.ns
    }

    /// The 16 bytes clients know it by.
    pub fn bytes(&self) -> &[u8; 16] {
        &self.bytes
    }

    /// Parses the 32-character lowercase hex form clients send.
    pub fn parse(text: &str) -> Option<Key> {
        if text.len() != 32 || text.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        let mut out = [0u8; 16];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(Key::from_bytes(out))
    }

    /// The 32-character lowercase hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// A number derived from the key, stable across runs (builtin evaluators use it).
    pub fn seed(&self) -> u64 {
        u64::from_le_bytes(self.bytes[..8].try_into().expect("8 bytes"))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ns.is_shared() {
            write!(f, "Key({})", self.to_hex())
        } else {
            write!(f, "Key({}/{})", self.ns, self.to_hex())
        }
    }
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

    #[test]
    fn parse_roundtrip_and_rejects() {
        let k = Key::derive("f", b"1");
        assert_eq!(Key::parse(&k.to_hex()), Some(k));
        assert_eq!(Key::parse("abc"), None);
        assert_eq!(Key::parse(&k.to_hex().to_uppercase()), None);
        assert_eq!(Key::parse(&"g".repeat(32)), None);
    }

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
