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
//!
//! Invalidation never scans the cache: a key's entry is removed, and a
//! whole fn's results in a namespace are dropped by raising that fn's epoch
//! there. Every entry keeps the epoch of its fn and namespace when it was
//! stored, and a read serves it only while that is still the epoch (a
//! stale entry is removed when read and otherwise evicted like any other).
//!
//! Keys carry their namespace, so namespaces share the store without
//! seeing each other's results; a namespace with a `cache_bytes` of its own
//! has a store of its own, so it neither evicts nor is evicted by others,
//! and `[namespace_defaults] cache_bytes_together` keeps the namespaces no
//! `[[namespace]]` lists in one store apart from the rest.
//!
//! In a cluster, another broker may drop a result: the cache then serves
//! nothing unless the broker has lately confirmed that it has heard every
//! such announcement (see [`ResultCache::confirm_until`]).

use crate::config::CacheConfig;
use crate::error::EvalError;
use crate::key::Key;
use crate::ns::Ns;
use crate::protocol::{eval_error_json, result_head_len, FrameWriter, ReqId};
use quick_cache::sync::Cache;
use quick_cache::{OptionsBuilder, Weighter};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
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

/// What a cached key answers with. A hit clones it: an output is one
/// allocation (its count beside its text), so a hit reads one place
/// beyond the cache's own entry.
#[derive(Debug, Clone)]
pub enum Cached {
    /// The output, as JSON text ready to be copied into frames.
    Output(Arc<str>),
    /// A failure kept for `error_ttl_s`.
    Failure(Arc<EvalError>),
}

impl Cached {
    /// The `result` frame answering a submit or subscribe from the cache,
    /// with the age of the result. Its text is allocated at its exact
    /// length, so that it becomes a WebSocket message's bytes as it is.
    pub fn result_frame(&self, id: &ReqId, key: &Key, age: Duration) -> String {
        let mut digits = itoa::Buffer::new();
        let age_ms = digits.format(age.as_millis() as u64);
        let failure;
        let (name, answer) = match self {
            Cached::Output(output) => ("output", &**output),
            Cached::Failure(error) => {
                failure = eval_error_json(error);
                ("error", failure.as_str())
            }
        };
        let len = result_head_len(id)
            + ",\"key\":\"\"".len() // and 32 hex digits
            + 32
            + ",\"\":".len()
            + name.len()
            + answer.len()
            + ",\"source\":\"cache\"".len()
            + ",\"age_ms\":".len()
            + age_ms.len()
            + "}".len();
        FrameWriter::with_capacity("result", len)
            .id(id)
            .key(key)
            .raw(name, answer)
            .str("source", "cache")
            .raw("age_ms", age_ms)
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
    cached: Cached,
    expires: Option<Instant>,
    /// When it was computed.
    at: Instant,
    /// Its fn, and that fn's epoch when it was stored.
    fn_index: usize,
    epoch: u64,
}

/// A cached answer found for a key, and how old it is.
pub struct Hit {
    pub cached: Cached,
    pub age: Duration,
}

impl Hit {
    /// The `result` frame answering a submit or subscribe with it.
    pub fn result_frame(&self, id: &ReqId, key: &Key) -> String {
        self.cached.result_frame(id, key, self.age)
    }
}

/// Weighs an entry in bytes: key, output and bookkeeping.
#[derive(Clone)]
struct Bytes;

impl Weighter<Key, Stored> for Bytes {
    fn weight(&self, _key: &Key, value: &Stored) -> u64 {
        20 + ENTRY_OVERHEAD_BYTES + value.cached.weight() as u64
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

    /// The entry of `key` unless it has expired or its fn's epoch has
    /// moved on (either is removed).
    fn get(&self, key: &Key, epochs: &Epochs, now: Instant) -> Option<Hit> {
        let stored = self.entries.get(key)?;
        let current = |s: &Stored| {
            s.expires.is_none_or(|d| now < d) && epochs.get(key.ns(), s.fn_index) == s.epoch
        };
        if !current(&stored) {
            self.entries.remove_if(key, |s| !current(s));
            return None;
        }
        Some(Hit {
            age: now.saturating_duration_since(stored.at),
            cached: stored.cached,
        })
    }

    fn insert(&self, key: Key, cached: Cached, fn_index: usize, epoch: u64, at: Instant) {
        let expires = self.ttl.map(|ttl| at + ttl);
        let stored = Stored {
            cached,
            expires,
            at,
            fn_index,
            epoch,
        };
        self.entries.insert(key, stored);
    }
}

/// Each fn's epoch in each namespace: raised to drop all its results
/// there at once. An epoch is the sum of a count raised for every
/// namespace at once and the fn's own count there (both only rise, so the
/// sum changes whenever either does).
struct Epochs {
    all: AtomicU64,
    /// The shared namespace's, by fn: read on every hit, so no map.
    shared: Box<[AtomicU64]>,
    /// Other namespaces', only once raised.
    others: dashmap::DashMap<(Ns, usize), u64, foldhash::fast::RandomState>,
}

impl Epochs {
    fn new(fns: usize) -> Epochs {
        Epochs {
            all: AtomicU64::new(0),
            shared: (0..fns).map(|_| AtomicU64::new(0)).collect(),
            others: Default::default(),
        }
    }

    fn get(&self, ns: Ns, fn_index: usize) -> u64 {
        let own = if ns.is_shared() {
            self.shared
                .get(fn_index)
                .map_or(0, |e| e.load(Ordering::Acquire))
        } else if self.others.is_empty() {
            0
        } else {
            self.others.get(&(ns, fn_index)).map_or(0, |e| *e)
        };
        self.all.load(Ordering::Acquire) + own
    }

    fn raise(&self, ns: Ns, fn_index: usize) {
        if ns.is_shared() {
            if let Some(e) = self.shared.get(fn_index) {
                e.fetch_add(1, Ordering::AcqRel);
            }
        } else {
            *self.others.entry((ns, fn_index)).or_default() += 1;
        }
    }
}

/// Which namespaces keep their results apart from the shared store.
#[derive(Debug, Default)]
pub struct Layout {
    /// The namespaces with a store of their own, and its size in bytes.
    pub own: Vec<(Ns, u64)>,
    /// One store of this many bytes for every namespace not in `listed`
    /// (the shared one aside).
    pub together: Option<u64>,
    /// The namespaces `[[namespace]]` lists.
    pub listed: HashSet<Ns>,
}

/// A store of outputs and, when failures are kept, one of failures a
/// sixteenth of its size.
struct Apart {
    outputs: Store,
    failures: Option<Store>,
}

/// Outputs (and, when configured, failures) by key.
pub struct ResultCache {
    outputs: Store,
    /// Kept failures of the namespaces without a store of their own.
    failures: Option<Store>,
    /// The stores of namespaces with a `cache_bytes` of their own.
    own: HashMap<Ns, Apart>,
    /// The store of the unlisted namespaces together, and which are listed.
    together: Option<(Apart, HashSet<Ns>)>,
    max_bytes: u64,
    epochs: Epochs,
    /// In a cluster: results are served only until this moment.
    confirmed: Option<Confirmed>,
}

/// Until when (ms after `base`) the cache may serve.
struct Confirmed {
    base: Instant,
    until_ms: AtomicU64,
}

impl ResultCache {
    /// A cache for the results of `fns` evaluators, with the stores apart
    /// of `layout`; `clustered`: it serves only while confirmed (see
    /// [`ResultCache::confirm_until`]).
    pub fn new(config: &CacheConfig, fns: usize, layout: Layout, clustered: bool) -> Self {
        let apart = |bytes: u64| Apart {
            outputs: Store::new(bytes, config.ttl_s),
            failures: (config.error_ttl_s > 0)
                .then(|| Store::new((bytes / 16).max(1), config.error_ttl_s)),
        };
        let shared = apart(config.max_bytes);
        let apart_bytes: u64 =
            layout.own.iter().map(|(_, b)| b).sum::<u64>() + layout.together.unwrap_or(0);
        ResultCache {
            outputs: shared.outputs,
            failures: shared.failures,
            own: layout
                .own
                .iter()
                .map(|(ns, bytes)| (*ns, apart(*bytes)))
                .collect(),
            together: layout.together.map(|bytes| (apart(bytes), layout.listed)),
            max_bytes: config.max_bytes + apart_bytes,
            epochs: Epochs::new(fns),
            confirmed: clustered.then(|| Confirmed {
                base: Instant::now(),
                until_ms: AtomicU64::new(0),
            }),
        }
    }

    /// In a cluster: the broker has heard of every invalidation made up to
    /// `until` less one lease, so it may serve results until `until`.
    pub fn confirm_until(&self, until: Instant) {
        if let Some(c) = &self.confirmed {
            let ms = until.saturating_duration_since(c.base).as_millis() as u64;
            c.until_ms.fetch_max(ms, Ordering::AcqRel);
        }
    }

    /// Whether results may be served at `now` (always, for a lone broker).
    fn confirmed(&self, now: Instant) -> bool {
        self.confirmed.as_ref().is_none_or(|c| {
            let ms = now.saturating_duration_since(c.base).as_millis() as u64;
            ms < c.until_ms.load(Ordering::Acquire)
        })
    }

    /// The cached answer for `key`, output or kept failure.
    pub fn get(&self, key: &Key) -> Option<Hit> {
        self.get_at(key, Instant::now())
    }

    /// The cached answer for `key` to a request that arrived at `arrived`
    /// (a time to live and an age are reckoned from it). Whether the
    /// cache is confirmed is read from the clock itself, as it is now.
    pub fn get_at(&self, key: &Key, arrived: Instant) -> Option<Hit> {
        if self.confirmed.is_some() && !self.confirmed(Instant::now()) {
            return None;
        }
        self.store(key).get(key, &self.epochs, arrived).or_else(|| {
            self.failure_store(key)
                .and_then(|f| f.get(key, &self.epochs, arrived))
        })
    }

    /// The cached answer for `key` if it is no older than `max_age`.
    pub fn get_fresh(&self, key: &Key, max_age: Option<Duration>) -> Option<Hit> {
        self.get_fresh_at(key, max_age, Instant::now())
    }

    /// [`ResultCache::get_fresh`] for a request that arrived at `arrived`.
    pub fn get_fresh_at(
        &self,
        key: &Key,
        max_age: Option<Duration>,
        arrived: Instant,
    ) -> Option<Hit> {
        self.get_at(key, arrived)
            .filter(|hit| max_age.is_none_or(|max| hit.age <= max))
    }

    /// Keeps the output of fn `fn_index` for `key`, computed at `at`.
    pub fn insert_output(&self, key: Key, fn_index: usize, output: Box<str>, at: Instant) {
        if let Some(f) = self.failure_store(&key) {
            f.entries.remove(&key);
        }
        let epoch = self.epochs.get(key.ns(), fn_index);
        self.store(&key)
            .insert(key, Cached::Output(output.into()), fn_index, epoch, at);
    }

    /// Keeps a failure when `error_ttl_s` asks for it; otherwise does nothing.
    pub fn insert_failure(&self, key: Key, fn_index: usize, error: EvalError) {
        if let Some(f) = self.failure_store(&key) {
            let epoch = self.epochs.get(key.ns(), fn_index);
            f.insert(
                key,
                Cached::Failure(Arc::new(error)),
                fn_index,
                epoch,
                Instant::now(),
            );
        }
    }

    /// Where a failure of `key` is kept (None when failures are not kept).
    fn failure_store(&self, key: &Key) -> Option<&Store> {
        match self.apart(key.ns()) {
            Some(apart) => apart.failures.as_ref(),
            None => self.failures.as_ref(),
        }
    }

    /// Drops what is kept for `key`.
    pub fn remove(&self, key: &Key) {
        self.store(key).entries.remove(key);
        if let Some(f) = self.failure_store(key) {
            f.entries.remove(key);
        }
    }

    /// Drops every result of fn `fn_index` in namespace `ns` (none is
    /// read again; each leaves when it is read or evicted).
    pub fn drop_fn(&self, ns: Ns, fn_index: usize) {
        self.epochs.raise(ns, fn_index);
    }

    /// Drops every result of every fn in every namespace.
    pub fn drop_all(&self) {
        self.epochs.all.fetch_add(1, Ordering::AcqRel);
    }

    /// The store that keeps `key`'s output.
    fn store(&self, key: &Key) -> &Store {
        self.apart(key.ns())
            .map_or(&self.outputs, |apart| &apart.outputs)
    }

    /// The stores apart from the shared ones that keep namespace `ns`'s
    /// results, if any do.
    fn apart(&self, ns: Ns) -> Option<&Apart> {
        if ns.is_shared() || (self.own.is_empty() && self.together.is_none()) {
            return None;
        }
        if let Some(apart) = self.own.get(&ns) {
            return Some(apart);
        }
        let (together, listed) = self.together.as_ref()?;
        (!listed.contains(&ns)).then_some(together)
    }

    /// (entries, bytes) of kept outputs.
    pub fn usage(&self) -> (u64, u64) {
        std::iter::once(&self.outputs)
            .chain(self.own.values().map(|a| &a.outputs))
            .chain(self.together.iter().map(|(a, _)| &a.outputs))
            .map(|s| (s.entries.len() as u64, s.entries.weight()))
            .fold((0, 0), |(e, b), (e2, b2)| (e + e2, b + b2))
    }

    /// (entries, bytes) of the outputs kept in the store of namespace
    /// `ns`'s own, if it has one.
    pub fn usage_of(&self, ns: Ns) -> Option<(u64, u64)> {
        let store = &self.own.get(&ns)?.outputs;
        Some((store.entries.len() as u64, store.entries.weight()))
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_result_frame_is_allocated_at_its_exact_length() {
        let key = Key::derive("f", b"1");
        let failure = Cached::Failure(Arc::new(EvalError::Failed("line\none \"quoted\"".into())));
        for cached in [Cached::Output("{\"a\":[1,2]}".into()), failure] {
            for id in [
                None,
                Some("7".into()),
                Some("\"a-longer-request-id-than-24\"".into()),
            ] {
                for age in [0, 9, 10, 123_456_789] {
                    let frame = cached.result_frame(&id, &key, Duration::from_millis(age));
                    assert_eq!(frame.len(), frame.capacity(), "{frame}");
                    serde_json::from_str::<serde_json::Value>(&frame).expect("JSON");
                }
            }
        }
    }

    fn cache(max_bytes: u64) -> ResultCache {
        ResultCache::new(
            &CacheConfig {
                max_bytes,
                ..CacheConfig::default()
            },
            2,
            Layout::default(),
            false,
        )
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
            cache.insert_output(key(n), 0, output(1000), Instant::now());
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
            cache.insert_output(*k, 0, output(100), Instant::now());
        }
        for n in 1_000..20_000 {
            for k in hot.iter().skip(n as usize % 10).step_by(10) {
                assert!(cache.get(k).is_some(), "hot key evicted by the scan at {n}");
            }
            cache.insert_output(key(n), 0, output(1000), Instant::now());
        }
        let scanned = (1_000..20_000)
            .filter(|n| cache.get(&key(*n)).is_some())
            .count();
        assert!(scanned < 1_000, "{scanned} scanned keys kept");
    }

    #[test]
    fn an_output_as_large_as_a_small_cache_is_kept() {
        let cache = cache(64 << 10);
        cache.insert_output(key(1), 0, output(60 << 10), Instant::now());
        assert!(cache.get(&key(1)).is_some());
    }

    #[test]
    fn entries_past_their_time_to_live_are_not_served() {
        let store = Store::new(1 << 20, 60);
        let epochs = Epochs::new(1);
        store.insert(
            key(1),
            Cached::Output(output(10).into()),
            0,
            0,
            Instant::now(),
        );
        assert!(store.get(&key(1), &epochs, Instant::now()).is_some());
        let mut stored = store.entries.get(&key(1)).expect("kept");
        stored.expires = Some(Instant::now());
        store.entries.insert(key(1), stored);
        assert!(
            store.get(&key(1), &epochs, Instant::now()).is_none(),
            "expired"
        );
        assert_eq!(store.entries.len(), 0, "removed when read");
    }

    #[test]
    fn dropping_a_fn_drops_its_results_and_no_other() {
        let cache = cache(1 << 20);
        cache.insert_output(key(1), 0, output(10), Instant::now());
        cache.insert_output(key(2), 1, output(10), Instant::now());
        cache.drop_fn(Ns::SHARED, 0);
        assert!(cache.get(&key(1)).is_none(), "fn 0's result dropped");
        assert!(cache.get(&key(2)).is_some(), "fn 1's result kept");
        cache.insert_output(key(1), 0, output(10), Instant::now());
        assert!(
            cache.get(&key(1)).is_some(),
            "stored again under the new epoch"
        );
        cache.remove(&key(2));
        assert!(cache.get(&key(2)).is_none());
    }

    #[test]
    fn a_clustered_cache_serves_only_while_confirmed() {
        let cache = ResultCache::new(&CacheConfig::default(), 1, Layout::default(), true);
        cache.insert_output(key(1), 0, output(10), Instant::now());
        assert!(cache.get(&key(1)).is_none(), "not confirmed yet");
        cache.confirm_until(Instant::now() + Duration::from_secs(60));
        assert!(cache.get(&key(1)).is_some());
        cache.drop_all();
        assert!(cache.get(&key(1)).is_none());
    }

    #[test]
    fn a_hit_says_how_old_it_is_and_max_age_refuses_older_ones() {
        let cache = cache(1 << 20);
        let at = Instant::now() - Duration::from_secs(5);
        cache.insert_output(key(1), 0, output(10), at);
        let hit = cache.get(&key(1)).expect("kept");
        assert!(hit.age >= Duration::from_secs(5), "{:?}", hit.age);
        assert!(cache
            .get_fresh(&key(1), Some(Duration::from_secs(1)))
            .is_none());
        assert!(cache
            .get_fresh(&key(1), Some(Duration::from_secs(60)))
            .is_some());
    }
}
