//! The key memo: raw input bytes to key, so that a byte-identical repeated
//! input skips parsing, canonical JSON and BLAKE3.
//!
//! `limits.key_memo_entries` entries in sets of [`WAYS`], each entry one
//! (fn, raw input, key). A fast hash of the raw bytes picks the set, and a
//! new entry replaces one not read since a clock hand last passed it (as
//! a page cache does). So two inputs that land in one set
//! do not push each other out, as they would in a table of single slots
//! (where, with the table half full, nearly half the inputs share a slot).
//! A hit compares the raw bytes in full (after the hash), so a collision
//! can only miss, never give a wrong key. Inputs longer than
//! `limits.key_memo_max_input_bytes` are not kept, which bounds the memory
//! to entries times that size.
//!
//! Only inputs that were read whole and parsed are kept, so an input found
//! here is valid JSON: a frame that ends in one is not read past the
//! input's start ([`crate::members::Members::scan_knowing`]).

use crate::key::Key;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

/// Entries per set.
pub const WAYS: usize = 4;

struct Entry {
    evaluator: usize,
    raw: Box<[u8]>,
    key: Key,
}

/// One set: its entries' hashes first, so that a lookup reads only the
/// entry whose hash matches.
#[derive(Default)]
struct Set {
    /// Each entry's hash (an empty entry's is 0, and it holds nothing).
    hashes: [u64; WAYS],
    entries: [Option<Entry>; WAYS],
    /// The entries read since the hand last passed them.
    used: [bool; WAYS],
    /// Where the next new entry starts looking for one to replace.
    hand: usize,
}

/// Raw inputs to keys, bounded in entries and bytes.
pub struct KeyMemo {
    sets: Box<[Mutex<Set>]>,
    max_input: usize,
    hasher: foldhash::fast::FixedState,
}

impl KeyMemo {
    /// A memo of about `entries` entries (0: none; rounded up to whole
    /// sets) for inputs of at most `max_input` bytes.
    pub fn new(entries: usize, max_input: usize) -> Self {
        KeyMemo {
            sets: (0..entries.div_ceil(WAYS))
                .map(|_| Mutex::new(Set::default()))
                .collect(),
            max_input,
            hasher: foldhash::fast::FixedState::with_seed(0x6865_7264),
        }
    }

    /// The set that `raw` under `evaluator` belongs to, and its hash.
    fn set(&self, evaluator: usize, raw: &[u8]) -> Option<(&Mutex<Set>, u64)> {
        if self.sets.is_empty() || raw.len() > self.max_input {
            return None;
        }
        let mut h = self.hasher.build_hasher();
        h.write_usize(evaluator);
        h.write(raw);
        let hash = h.finish();
        let index = (hash % self.sets.len() as u64) as usize;
        Some((self.sets.get(index)?, hash))
    }

    /// The key of `raw` under evaluator `evaluator`, if memoized.
    pub fn get(&self, evaluator: usize, raw: &[u8]) -> Option<Key> {
        let (set, hash) = self.set(evaluator, raw)?;
        let mut set = set.lock().ok()?;
        let at = (0..WAYS).find(|&at| {
            set.hashes[at] == hash
                && set.entries[at]
                    .as_ref()
                    .is_some_and(|e| e.evaluator == evaluator && *e.raw == *raw)
        })?;
        set.used[at] = true;
        set.entries[at].as_ref().map(|e| e.key)
    }

    /// Remembers that `raw` under `evaluator` has key `key`, in place of
    /// an entry not read since the hand last passed it (a clock).
    pub fn insert(&self, evaluator: usize, raw: &[u8], key: Key) {
        let Some((set, hash)) = self.set(evaluator, raw) else {
            return;
        };
        let Ok(mut set) = set.lock() else {
            return;
        };
        let at = loop {
            let at = set.hand;
            set.hand = (at + 1) % WAYS;
            if set.entries[at].is_none() || !set.used[at] {
                break at;
            }
            set.used[at] = false;
        };
        set.hashes[at] = hash;
        set.used[at] = false;
        set.entries[at] = Some(Entry {
            evaluator,
            raw: raw.into(),
            key,
        });
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
        let longest = vec![b'x'; 64];
        memo.insert(0, &longest, key);
        assert_eq!(memo.get(0, &longest), Some(key), "as long as may be kept");
        let long = vec![b'x'; 65];
        memo.insert(0, &long, key);
        assert_eq!(memo.get(0, &long), None, "too long to keep");
        assert_eq!(KeyMemo::new(0, 64).get(0, b"1"), None, "disabled");
    }

    #[test]
    fn a_full_set_forgets_an_input_not_read_since_it_came() {
        // One set: every input shares it.
        let memo = KeyMemo::new(WAYS, 64);
        let input = |i: usize| format!("{{\"i\":{i}}}");
        let key = |i: usize| Key::derive("f", input(i).as_bytes());
        for i in 0..WAYS {
            memo.insert(0, input(i).as_bytes(), key(i));
        }
        assert_eq!(memo.get(0, input(0).as_bytes()), Some(key(0)), "all kept");
        memo.insert(0, input(WAYS).as_bytes(), key(WAYS));
        assert_eq!(memo.get(0, input(1).as_bytes()), None, "not read");
        for i in [0, 2, 3, WAYS] {
            assert_eq!(memo.get(0, input(i).as_bytes()), Some(key(i)), "{i} kept");
        }
    }

    #[test]
    fn inputs_that_fill_a_quarter_of_the_memo_are_nearly_all_kept() {
        let entries = 4096;
        let memo = KeyMemo::new(entries, 64);
        let inputs: Vec<String> = (0..entries / 4).map(|i| format!("[{i}]")).collect();
        for input in &inputs {
            memo.insert(0, input.as_bytes(), Key::derive("f", input.as_bytes()));
        }
        let kept = inputs
            .iter()
            .filter(|i| memo.get(0, i.as_bytes()).is_some())
            .count();
        // Single slots would keep 88 % of them.
        assert!(
            kept * 100 >= inputs.len() * 98,
            "{kept} of {}",
            inputs.len()
        );
    }
}
