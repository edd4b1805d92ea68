//! The key memo: raw input bytes to key, so that a byte-identical repeated
//! input skips parsing, canonical JSON and BLAKE3.
//!
//! A fixed number of slots (`limits.key_memo_entries`), each holding one
//! (fn, raw input, key), chosen by a fast hash of the raw bytes; a new entry
//! replaces whatever held its slot. A hit compares the raw bytes in full, so
//! a hash collision can only miss, never give a wrong key. Inputs longer than
//! `limits.key_memo_max_input_bytes` are not kept, which bounds the memory
//! to entries times that size.

use crate::key::Key;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

struct Slot {
    evaluator: usize,
    raw: Box<[u8]>,
    key: Key,
}

/// Raw inputs to keys, bounded in entries and bytes.
pub struct KeyMemo {
    slots: Box<[Mutex<Option<Slot>>]>,
    max_input: usize,
    hasher: foldhash::fast::FixedState,
}

impl KeyMemo {
    /// A memo of `entries` slots (0: none) for inputs of at most `max_input` bytes.
    pub fn new(entries: usize, max_input: usize) -> Self {
        KeyMemo {
            slots: (0..entries).map(|_| Mutex::new(None)).collect(),
            max_input,
            hasher: foldhash::fast::FixedState::with_seed(0x6865_7264),
        }
    }

    fn slot(&self, evaluator: usize, raw: &[u8]) -> Option<&Mutex<Option<Slot>>> {
        if self.slots.is_empty() || raw.len() > self.max_input {
            return None;
        }
        let mut h = self.hasher.build_hasher();
        h.write_usize(evaluator);
        h.write(raw);
        let index = (h.finish() % self.slots.len() as u64) as usize;
        self.slots.get(index)
    }

    /// The key of `raw` under evaluator `evaluator`, if memoized.
    pub fn get(&self, evaluator: usize, raw: &[u8]) -> Option<Key> {
        let slot = self.slot(evaluator, raw)?.lock().ok()?;
        slot.as_ref()
            .filter(|s| s.evaluator == evaluator && *s.raw == *raw)
            .map(|s| s.key)
    }

    /// Remembers that `raw` under `evaluator` has key `key`.
    pub fn insert(&self, evaluator: usize, raw: &[u8], key: Key) {
        if let Some(Ok(mut slot)) = self.slot(evaluator, raw).map(Mutex::lock) {
            *slot = Some(Slot {
                evaluator,
                raw: raw.into(),
                key,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_only_byte_identical_inputs_of_the_same_fn() {
        let memo = KeyMemo::new(8, 64);
        let key = Key::derive("f", b"{\"a\":1}");
        memo.insert(0, b"{\"a\": 1}", key);
        assert_eq!(memo.get(0, b"{\"a\": 1}"), Some(key));
        assert_eq!(memo.get(0, b"{\"a\":1}"), None, "other bytes");
        assert_eq!(memo.get(1, b"{\"a\": 1}"), None, "other fn");
        let long = vec![b'x'; 65];
        memo.insert(0, &long, key);
        assert_eq!(memo.get(0, &long), None, "too long to keep");
        assert_eq!(KeyMemo::new(0, 64).get(0, b"1"), None, "disabled");
    }
}
