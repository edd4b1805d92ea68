//! Keys: the identity of a computation.
//!
//! A key is the first 16 bytes of BLAKE3(`fn` bytes, 0x00, canonical JSON of
//! the input), shown as 32 lowercase hex characters; the broker writes the
//! canonical JSON (`herd::key::canonical_json`).

use crate::ns::Ns;
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

#[cfg(test)]
mod tests {
    use super::Key;

    #[test]
    fn parse_roundtrip_and_rejects() {
        let k = Key::derive("f", b"1");
        assert_eq!(Key::parse(&k.to_hex()), Some(k));
        assert_eq!(Key::parse("abc"), None);
        assert_eq!(Key::parse(&k.to_hex().to_uppercase()), None);
        assert_eq!(Key::parse(&"g".repeat(32)), None);
    }

    #[test]
    fn a_key_shows_its_bytes_and_namespace() {
        let mut bytes = [0u8; 16];
        bytes[0] = 2;
        bytes[15] = 0xab;
        let k = Key::from_bytes(bytes);
        assert_eq!(k.bytes(), &bytes);
        assert_eq!(k.seed(), 2);
        assert_eq!(k.to_string(), "020000000000000000000000000000ab");
        assert_eq!(format!("{k:?}"), "Key(020000000000000000000000000000ab)");
        let team = crate::ns::Ns::intern("key-team", 16).unwrap();
        assert_eq!(
            format!("{:?}", k.in_ns(team)),
            "Key(key-team/020000000000000000000000000000ab)"
        );
    }

    #[test]
    fn a_key_hashes_apart_from_itself_in_another_namespace() {
        use std::hash::{BuildHasher, RandomState};
        let team = crate::ns::Ns::intern("hash-team", 1024).expect("a name");
        let hashes = RandomState::new();
        for bytes in [[0; 16], [0xff; 16]] {
            let key = Key::from_bytes(bytes);
            assert_ne!(
                hashes.hash_one(key),
                hashes.hash_one(key.in_ns(team)),
                "{key:?}"
            );
        }
    }
}
