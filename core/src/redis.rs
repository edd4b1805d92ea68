//! The Redis commands the cluster's decisions come down to, and what each
//! answers.
//!
//! The core chooses a [`RedisOp`] and reads its [`RedisReply`]; the
//! broker's cluster shell sends it (the scripts below, verbatim) and feeds
//! the reply back; the simulation's model Redis carries out the same
//! commands on its own maps. What a command means is written once, here:
//! the shell and the model must both do exactly that.
//!
//! A key's claim and result share the hash tag `{<key>}`, so each script
//! touches one Redis Cluster slot; an epochs hash is one key of its own.

/// One command, or a script, for Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisOp {
    /// `PING`: is Redis there (a probe while it is away, or a health
    /// check while nothing else is said).
    Ping,
    /// [`ACQUIRE`]: if the claim `waited` (a claim of the same key, under
    /// the tag it was taken with) is still `wait_for` (empty: none), that;
    /// else the result `waited_result` (under that tag) if it holds the
    /// outcome computed under `wait_for`; else the result `result` if it is
    /// stored and was computed at `since_ms` (Unix ms) or later; else the
    /// claim `claim`, set to `value` for `lease_ms` if nobody holds it;
    /// else who holds it. A result whose evaluation began before the key
    /// was last dropped (its drop marker `dropped`) is not found.
    Acquire {
        result: String,
        claim: String,
        dropped: String,
        value: String,
        lease_ms: u64,
        since_ms: u64,
        waited: String,
        waited_result: String,
        wait_for: String,
    },
    /// `MGET names` (a key's drop marker, then its results).
    Read { names: Vec<String> },
    /// [`FINISH`]: give the claim `claim` up if it is still `token`; if
    /// `keep`, store `stored` under `result` (for `ttl_s`, 0: no expiry)
    /// unless a result computed at `replace_before_ms` or later is stored
    /// (the first writer wins; a success replaces a failure) or the key was
    /// dropped (`dropped`) since the evaluation of `stored` began, or
    /// Redis lost what it knew since then (`boot` is no longer
    /// `began_under`), and publish `notice` on `channel` if it was stored,
    /// else `shared` (if not empty); without `keep`, publish `notice` only.
    /// Answers whether it was stored and, when not, the result stored
    /// instead.
    Finish {
        result: String,
        claim: String,
        /// The key's drop marker (see `Drop`).
        dropped: String,
        /// Redis's boot marker (see `Sync`; empty: not checked, as on a
        /// Redis Cluster, where it lives on another slot).
        boot: String,
        /// The boot marker's value when the evaluation began (empty:
        /// unknown, so never stored).
        began_under: String,
        token: String,
        stored: String,
        ttl_s: u64,
        keep: bool,
        replace_before_ms: u64,
        channel: String,
        notice: String,
        shared: String,
    },
    /// [`RENEW`] each `(claim, value)`: its expiry set to `lease_ms` again
    /// if it is still `value`.
    Renew {
        claims: Vec<(String, String)>,
        lease_ms: u64,
    },
    /// [`RELEASE`]: delete `claim` if it is still `value`.
    Release { claim: String, value: String },
    /// [`RAISE`]: set `field` of the hash `hash` to one more than the
    /// larger of what it holds and `at_least`, and answer it.
    Raise {
        hash: String,
        field: String,
        at_least: u64,
    },
    /// [`SYNC`] for each hash: raise each `known` field to at least its
    /// value (a Redis that restarted empty gets back what brokers know)
    /// and answer every field; and [`BOOT`]: set the boot marker `boot` to
    /// `candidate` unless it is set, and answer it. A Redis that lost its
    /// data (restarted empty) answers another boot marker from then on.
    Sync {
        hashes: Vec<(String, Vec<(String, u64)>)>,
        boot: String,
        candidate: String,
    },
    /// `PUBLISH channel message`.
    Publish { channel: String, message: String },
    /// [`DROP`]: delete each of `names` that holds a result whose
    /// evaluation began before `before_ms` (Unix ms), set the key's drop
    /// marker `dropped` to `before_ms` (for `ttl_s`, 0: no expiry): no
    /// result of an evaluation begun before then is stored for the key
    /// after; and publish `notice` (if not empty) on `channel`, in the same
    /// step.
    Drop {
        names: Vec<String>,
        dropped: String,
        before_ms: u64,
        ttl_s: u64,
        channel: String,
        notice: String,
    },
}

/// What Redis answered to a [`RedisOp`] (a command Redis did not answer in
/// time is no reply at all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisReply {
    /// `Ping`.
    Pong,
    /// `Acquire`.
    Acquired(Acquired),
    /// `Read`: each name's value.
    Values(Vec<Option<String>>),
    /// `Finish`: stored, or not and what is stored instead (None: nothing,
    /// for an outcome that was not to be kept); `dropped`: not stored
    /// because the key was dropped after it was computed.
    Finished {
        stored: bool,
        current: Option<String>,
        dropped: bool,
    },
    /// `Renew`: for each claim, whether it was still ours.
    Renewed(Vec<bool>),
    /// `Raise`: the new value.
    Raised(u64),
    /// `Sync`: each hash's fields, in the order asked, and the boot marker.
    Epochs {
        hashes: Vec<Vec<(String, u64)>>,
        boot: String,
    },
    /// `Release`, `Publish`, `Drop`.
    Done,
}

/// What [`ACQUIRE`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// A stored result.
    Found(String),
    /// The claim is now ours.
    Claimed,
    /// Another broker holds the claim: its value.
    Held(String),
}

/// `KEYS[1]` result, `KEYS[2]` claim, `KEYS[3]` the claim waited on,
/// `KEYS[4]` the result under its tag, `KEYS[5]` the drop marker; `ARGV[1]`
/// claim value, `ARGV[2]` lease ms, `ARGV[3]` since ms, `ARGV[4]` the value
/// waited on ('' for none), `ARGV[5]` how a result computed under it names
/// it. A stored value holds its `at_ms` and `began_ms`; one that began at or
/// before the drop marker is passed over. Returns `{1, stored}`, `{2, ''}`
/// (claimed) or `{3, holder}`.
pub const ACQUIRE: &str = "local d = tonumber(redis.call('GET', KEYS[5]) or '0') or 0 local function kept(v) return d == 0 or (tonumber(string.match(v, '\"began_ms\":(%d+)')) or 0) > d end if ARGV[4] ~= '' then if redis.call('GET', KEYS[3]) == ARGV[4] then return {3, ARGV[4]} end local w = redis.call('GET', KEYS[4]) if w and string.find(w, ARGV[5], 1, true) and kept(w) then return {1, w} end end local r = redis.call('GET', KEYS[1]) if r and (tonumber(string.match(r, '\"at_ms\":(%d+)')) or 0) >= tonumber(ARGV[3]) and kept(r) then return {1, r} end if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end return {3, redis.call('GET', KEYS[2]) or ''}";

/// `KEYS[1]` result, `KEYS[2]` claim, `KEYS[3]` drop marker, `KEYS[4]` (if
/// given) the boot marker; `ARGV[1]` token ('' for none), `ARGV[2]` value,
/// `ARGV[3]` ttl s, `ARGV[4]` keep ('1' or '0'), `ARGV[5]` channel,
/// `ARGV[6]` notice, `ARGV[7]` shared notice ('' for none), `ARGV[8]`
/// replace before ms, `ARGV[9]` the boot marker when the evaluation began.
/// A stored value begins `{"at_ms":<ms>,"ok":<bool>,"began_ms":<ms>`.
/// A stored result that began at or before the drop marker counts as
/// none. Returns `{1, ''}` (stored), `{0, current}`, or `{2, ''}` (the key
/// was dropped after it was computed, or Redis may have forgotten that it
/// was).
pub const FINISH: &str = "if ARGV[1] ~= '' and redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end if ARGV[4] == '0' then redis.call('PUBLISH', ARGV[5], ARGV[6]) return {0, ''} end local d = tonumber(redis.call('GET', KEYS[3]) or '0') or 0 local function began(v) return tonumber(string.match(v, '\"began_ms\":(%d+)')) or 0 end if began(ARGV[2]) <= d or (KEYS[4] and redis.call('GET', KEYS[4]) ~= ARGV[9]) then if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[7]) end return {2, ''} end local r = redis.call('GET', KEYS[1]) if (not r) or (d > 0 and began(r) <= d) or (tonumber(string.match(r, '\"at_ms\":(%d+)')) or 0) < tonumber(ARGV[8]) or (string.match(r, '^{\"at_ms\":%d+,\"ok\":false') and string.match(ARGV[2], '^{\"at_ms\":%d+,\"ok\":true')) then if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) else redis.call('SET', KEYS[1], ARGV[2]) end redis.call('PUBLISH', ARGV[5], ARGV[6]) return {1, ''} end if ARGV[7] ~= '' then redis.call('PUBLISH', ARGV[5], ARGV[7]) end return {0, r}";

/// `KEYS[1]` claim; `ARGV[1]` value, `ARGV[2]` lease ms. Returns 1 if renewed.
pub const RENEW: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";

/// `KEYS[1]` claim; `ARGV[1]` value.
pub const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";

/// `KEYS[1]` hash; `ARGV[1]` field, `ARGV[2]` at least. Returns the new value.
pub const RAISE: &str = "local e = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0') local floor = tonumber(ARGV[2]) if e < floor then e = floor end e = e + 1 redis.call('HSET', KEYS[1], ARGV[1], e) return e";

/// `KEYS[1]` hash; `ARGV` field, value pairs. Returns `HGETALL`.
pub const SYNC: &str = "for i = 1, #ARGV, 2 do local have = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') if have < tonumber(ARGV[i + 1]) then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end end return redis.call('HGETALL', KEYS[1])";

/// `KEYS[1]` the boot marker; `ARGV[1]` its value if it is not set.
/// Returns its value.
pub const BOOT: &str =
    "redis.call('SET', KEYS[1], ARGV[1], 'NX') return redis.call('GET', KEYS[1])";

/// `KEYS[1]` the drop marker, then the results of one key (one slot);
/// `ARGV[1]` before ms, `ARGV[2]` the marker's ttl s, `ARGV[3]` channel,
/// `ARGV[4]` notice ('' for none).
pub const DROP: &str = "local before = tonumber(ARGV[1]) for i = 2, #KEYS do local r = redis.call('GET', KEYS[i]) if r and (tonumber(string.match(r, '\"began_ms\":(%d+)')) or 0) < before then redis.call('DEL', KEYS[i]) end end if before > (tonumber(redis.call('GET', KEYS[1]) or '0') or 0) then if tonumber(ARGV[2]) > 0 then redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) else redis.call('SET', KEYS[1], ARGV[1]) end end if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end return 0";
