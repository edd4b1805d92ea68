//! The results cache: finished outputs, bounded in bytes, read by every session.
//!
//! Sessions read it directly (a hit never goes through the hub); only the hub
//! writes it, and it writes before it removes the wait-table entry, so a miss
//! that races a completion finds the result on the hub's re-check.
//! Failures live in a second cache with their own time to live, so the
//! default (`error_ttl_s = 0`) caches none.
//!
//! The store is quick_cache: bounded in bytes (every entry weighed as its
//! key, its output and a fixed overhead), evicting by S3-FIFO (a new entry
//! must be read again before it can push out entries that are read often,
//! so a scan of one-off keys does not flush the hot ones). A read is a
//! shard read lock and a reference bit, with no clock read or read log;
//! that is why it is used here (the hit path's profile showed a quarter of
//! the broker's CPU in the previous cache's per-read bookkeeping). A time
//! to live is kept as a deadline beside the entry and checked on read; an
//! expired entry is removed when it is read and otherwise counts against
//! the bound until it is evicted.

use crate::config::CacheConfig;
use crate::error::EvalError;
use crate::key::Key;
use crate::protocol::{eval_error_json, FrameWriter, ReqId};
use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes counted per entry beyond its key and output: the cache's own
/// bookkeeping, so that many tiny outputs cannot exceed the bound.
const ENTRY_OVERHEAD_BYTES: u64 = 96;

/// The size an entry is assumed to have when sizing the cache's index and
/// its memory of recently evicted keys.
const TYPICAL_ENTRY_BYTES: u64 = 256;

/// Each shard holds at least this much, so that a shard (whose capacity is
/// a fraction of the whole) can still hold a large output.
const MIN_SHARD_BYTES: u64 = 64 << 20;

/// What a cached key answers with.
#[derive(Debug)]
pub enum Cached {
    /// The output, as JSON text ready to be copied into frames.
    Output(Box<str>),
    /// A failure kept for `error_ttl_s`.
    Failure(EvalError),
}

impl Cached {
    /// The `result` frame answering a submit or subscribe from the cache.
    pub fn result_frame(&self, id: &ReqId, key: &Key) -> String {
        let capacity = 112 + id.as_deref().map_or(0, str::len) + self.weight();
        self.with_answer(
            FrameWriter::with_capacity("result", capacity)
                .id(id)
                .key(key),
        )
        .str("source", "cache")
        .finish()
    }

    /// The `status` frame answering a `get` of a cached key.
    pub fn status_frame(&self, id: &ReqId, key: &Key) -> String {
        self.with_answer(
            FrameWriter::new("status")
                .id(id)
                .key(key)
                .str("state", "done"),
        )
        .finish()
    }

    fn with_answer(&self, frame: FrameWriter) -> FrameWriter {
        match self {
            Cached::Output(output) => frame.raw("output", output),
            Cached::Failure(error) => frame.raw("error", &eval_error_json(error)),
        }
    }

    fn weight(&self) -> usize {
        match self {
            Cached::Output(o) => o.len(),
            Cached::Failure(e) => e.message().len(),
        }
    }
}

/// A cached answer and, under a time to live, when it stops being served.
#[derive(Clone)]
struct Stored {
    cached: Arc<Cached>,
    expires: Option<Instant>,
}

/// Weighs an entry in bytes: key, output and bookkeeping.
#[derive(Clone)]
struct Bytes;

impl Weighter<Key, Stored> for Bytes {
    fn weight(&self, _key: &Key, value: &Stored) -> u64 {
        16 + ENTRY_OVERHEAD_BYTES + value.cached.weight() as u64
    }
}

/// The caches' hasher: keys are already uniform, so a fast (still seeded)
/// hasher is enough.
type Hasher = foldhash::fast::RandomState;

/// One byte-bounded store with an optional time to live.
struct Store {
    entries: Cache<Key, Stored, Bytes, Hasher>,
    ttl: Option<Duration>,
}

impl Store {
    fn new(max_bytes: u64, ttl_s: u64) -> Self {
        let max_bytes = max_bytes.max(1);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let shards = (max_bytes / MIN_SHARD_BYTES).clamp(1, 4 * cores as u64) as usize;
        let options = OptionsBuilder::new()
            .weight_capacity(max_bytes)
            .estimated_items_capacity((max_bytes / TYPICAL_ENTRY_BYTES).max(1) as usize)
            .shards(shards)
            .build()
            .expect("weight capacity and estimated items are set");
        Store {
            entries: Cache::with_options(options, Bytes, Hasher::default(), Default::default()),
            ttl: (ttl_s > 0).then(|| Duration::from_secs(ttl_s)),
        }
    }

    fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        let stored = self.entries.get(key)?;
        match stored.expires {
            Some(deadline) if Instant::now() >= deadline => {
                self.entries
                    .remove_if(key, |s| s.expires.is_some_and(|d| Instant::now() >= d));
                None
            }
            _ => Some(stored.cached),
        }
    }

    fn insert(&self, key: Key, cached: Cached) {
        let expires = self.ttl.map(|ttl| Instant::now() + ttl);
        let cached = Arc::new(cached);
        self.entries.insert(key, Stored { cached, expires });
    }
}

/// Outputs (and, when configured, failures) by key.
pub struct ResultCache {
    outputs: Store,
    failures: Option<Store>,
    max_bytes: u64,
}

impl ResultCache {
    pub fn new(config: &CacheConfig) -> Self {
        let failures = (config.error_ttl_s > 0)
            .then(|| Store::new((config.max_bytes / 16).max(1), config.error_ttl_s));
        ResultCache {
            outputs: Store::new(config.max_bytes, config.ttl_s),
            failures,
            max_bytes: config.max_bytes,
        }
    }

    /// The cached answer for `key`, output or kept failure.
    pub fn get(&self, key: &Key) -> Option<Arc<Cached>> {
        self.outputs
            .get(key)
            .or_else(|| self.failures.as_ref().and_then(|f| f.get(key)))
    }

    pub fn insert_output(&self, key: Key, output: Box<str>) {
        if let Some(f) = &self.failures {
            f.entries.remove(&key);
        }
        self.outputs.insert(key, Cached::Output(output));
    }

    /// Keeps a failure when `error_ttl_s` asks for it; otherwise does nothing.
    pub fn insert_failure(&self, key: Key, error: EvalError) {
        if let Some(f) = &self.failures {
            f.insert(key, Cached::Failure(error));
        }
    }

    /// (entries, bytes) of kept outputs.
    pub fn usage(&self) -> (u64, u64) {
        let entries = &self.outputs.entries;
        (entries.len() as u64, entries.weight())
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(max_bytes: u64) -> ResultCache {
        ResultCache::new(&CacheConfig {
            max_bytes,
            ..CacheConfig::default()
        })
    }

    fn key(n: u32) -> Key {
        Key::derive("t", n.to_string().as_bytes())
    }

    fn output(bytes: usize) -> Box<str> {
        "x".repeat(bytes).into()
    }

    #[test]
    fn stays_within_its_byte_bound() {
        let cache = cache(1 << 20);
        for n in 0..10_000 {
            cache.insert_output(key(n), output(1000));
            assert!(cache.usage().1 <= 1 << 20, "over the bound at {n}");
        }
        let (entries, bytes) = cache.usage();
        assert!(
            entries < 10_000 && bytes > (1 << 20) / 2,
            "{entries} entries, {bytes} bytes"
        );
    }

    #[test]
    fn a_scan_of_new_keys_does_not_flush_keys_read_often() {
        let cache = cache(1 << 20);
        let hot: Vec<Key> = (0..100).map(key).collect();
        for k in &hot {
            cache.insert_output(*k, output(100));
        }
        for n in 1_000..20_000 {
            for k in hot.iter().skip(n as usize % 10).step_by(10) {
                assert!(cache.get(k).is_some(), "hot key evicted by the scan at {n}");
            }
            cache.insert_output(key(n), output(1000));
        }
        let scanned = (1_000..20_000)
            .filter(|n| cache.get(&key(*n)).is_some())
            .count();
        assert!(scanned < 1_000, "{scanned} scanned keys kept");
    }

    #[test]
    fn an_output_as_large_as_a_small_cache_is_kept() {
        let cache = cache(64 << 10);
        cache.insert_output(key(1), output(60 << 10));
        assert!(cache.get(&key(1)).is_some());
    }

    #[test]
    fn entries_past_their_time_to_live_are_not_served() {
        let store = Store::new(1 << 20, 60);
        store.insert(key(1), Cached::Output(output(10)));
        assert!(store.get(&key(1)).is_some());
        let mut stored = store.entries.get(&key(1)).expect("kept");
        stored.expires = Some(Instant::now());
        store.entries.insert(key(1), stored);
        assert!(store.get(&key(1)).is_none(), "expired");
        assert_eq!(store.entries.len(), 0, "removed when read");
    }
}
