//! The results cache: finished outputs, bounded in bytes, read by every session.
//!
//! Sessions read it directly (a hit never goes through the hub); only the hub
//! writes it, and it writes before it removes the wait-table entry, so a miss
//! that races a completion finds the result on the hub's re-check.
//! Failures live in a second cache with their own time to live, so the
//! default (`error_ttl_s = 0`) caches none.

use crate::config::CacheConfig;
use crate::error::EvalError;
use crate::key::Key;
use crate::protocol::{eval_error_json, FrameWriter, ReqId};
use mini_moka::sync::{Cache, ConcurrentCacheExt};
use std::sync::Arc;
use std::time::Duration;

/// Bytes counted per entry beyond its key and output: the cache's own
/// bookkeeping, so that many tiny outputs cannot exceed the bound.
const ENTRY_OVERHEAD_BYTES: usize = 96;

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

/// Outputs (and, when configured, failures) by key.
pub struct ResultCache {
    outputs: Cache<Key, Arc<Cached>>,
    failures: Option<Cache<Key, Arc<Cached>>>,
    max_bytes: u64,
}

fn weigh(_key: &Key, value: &Arc<Cached>) -> u32 {
    let bytes = 16 + ENTRY_OVERHEAD_BYTES + value.weight();
    u32::try_from(bytes).unwrap_or(u32::MAX)
}

impl ResultCache {
    pub fn new(config: &CacheConfig) -> Self {
        let mut outputs = Cache::builder()
            .max_capacity(config.max_bytes)
            .weigher(weigh);
        if config.ttl_s > 0 {
            outputs = outputs.time_to_live(Duration::from_secs(config.ttl_s));
        }
        let failures = (config.error_ttl_s > 0).then(|| {
            Cache::builder()
                .max_capacity((config.max_bytes / 16).max(1))
                .weigher(weigh)
                .time_to_live(Duration::from_secs(config.error_ttl_s))
                .build()
        });
        ResultCache {
            outputs: outputs.build(),
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
            f.invalidate(&key);
        }
        self.outputs.insert(key, Arc::new(Cached::Output(output)));
    }

    /// Keeps a failure when `error_ttl_s` asks for it; otherwise does nothing.
    pub fn insert_failure(&self, key: Key, error: EvalError) {
        if let Some(f) = &self.failures {
            f.insert(key, Arc::new(Cached::Failure(error)));
        }
    }

    /// (entries, bytes) after applying pending bookkeeping.
    pub fn usage(&self) -> (u64, u64) {
        self.outputs.sync();
        (self.outputs.entry_count(), self.outputs.weighted_size())
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}
