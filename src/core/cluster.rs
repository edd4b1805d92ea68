//! What the core asks of the cluster task and what it hears back.
//!
//! The cluster task (`crate::cluster`) does the Redis I/O; these messages
//! are all the core knows of it. Every message about a job carries the
//! job's generation, so a claim is taken, kept and given up for one job,
//! never for a later job of the same key.

use crate::error::EvalError;
use crate::key::Key;
use std::sync::Arc;

use super::{Gen, Target};
use crate::outbox::SessionId;
use crate::protocol::ReqId;

/// What the core asks of the cluster task.
#[derive(Debug, Clone)]
pub enum ClusterCmd {
    /// Job `gen` of `key` starts here: find its result in Redis or claim it.
    /// A claim taken for it is renewed for at most `hold` (the job's
    /// timeout plus one lease): past that the job has ended for certain.
    Acquire {
        key: Key,
        gen: Gen,
        evaluator: usize,
        hold: std::time::Duration,
        /// A stored result older than this is passed over (and replaced).
        max_age: Option<std::time::Duration>,
    },
    /// A subscription to a key nobody evaluates here: look in Redis, now
    /// and at every re-check, until found or `Unlook`.
    Lookup { key: Key },
    /// Nobody here waits on `key` any more: stop looking it up.
    Unlook { key: Key },
    /// Job `gen` was evaluated here: store, publish, release its claim.
    /// `confirm`: its waiters wait for [`ClusterEvent::Verdict`] (its claim
    /// may have run out, and another broker's result been stored first).
    Finished {
        key: Key,
        gen: Gen,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        confirm: bool,
    },
    /// Job `gen` no longer waits on another broker: stop looking at it.
    Forget { key: Key, gen: Gen },
    /// Job `gen` ended without an outcome to share: give up its claim.
    Release { key: Key, gen: Gen },
    /// Drop `target`'s results in Redis and on every broker; answer
    /// [`ClusterEvent::Invalidated`] once no broker serves them.
    Invalidate {
        target: Target,
        session: SessionId,
        id: ReqId,
    },
}

impl ClusterCmd {
    /// The key whose commands run in order with this one (an invalidation
    /// runs beside them).
    pub fn key(&self) -> Option<Key> {
        Some(match self {
            ClusterCmd::Acquire { key, .. }
            | ClusterCmd::Lookup { key }
            | ClusterCmd::Unlook { key }
            | ClusterCmd::Finished { key, .. }
            | ClusterCmd::Forget { key, .. }
            | ClusterCmd::Release { key, .. } => *key,
            ClusterCmd::Invalidate { .. } => return None,
        })
    }

    /// Job `gen` is done with the cluster: its claim given up if it holds
    /// one, else its wait on another broker's ended.
    pub fn let_go(key: Key, gen: Gen, claimed: bool) -> ClusterCmd {
        if claimed {
            ClusterCmd::Release { key, gen }
        } else {
            ClusterCmd::Forget { key, gen }
        }
    }
}

/// What the cluster task tells the core.
#[derive(Debug, Clone)]
pub enum ClusterEvent {
    /// The result of fn `evaluator`, computed at `at_ms` (Unix ms), was in Redis.
    Found {
        key: Key,
        evaluator: usize,
        output: Arc<str>,
        at_ms: u64,
    },
    /// This broker holds the claim for job `gen` (its token is `claim`): evaluate.
    Claimed { key: Key, gen: Gen, claim: Arc<str> },
    /// Another broker holds the claim `holder`; wait for its completion.
    Waiting {
        key: Key,
        gen: Gen,
        holder: Arc<str>,
    },
    /// Redis is away: evaluate job `gen` here as a lone broker.
    Local { key: Key, gen: Gen },
    /// Job `gen`, waiting, now holds the claim `claim` (the claimant's lease expired).
    Takeover { key: Key, gen: Gen, claim: Arc<str> },
    /// A broker stored a result of `key` too large for its notice: read it
    /// from Redis if anyone here waits for it.
    Stored { key: Key },
    /// The answer to a `Finished` with `confirm`: `stored` is another
    /// broker's result, stored first, which stands instead of job `gen`'s
    /// outcome; None: job `gen`'s outcome stands (stored, or Redis could
    /// not say).
    Verdict {
        key: Key,
        gen: Gen,
        stored: Option<Result<Arc<str>, EvalError>>,
    },
    /// A broker finished `key` under the claim `claim` (published; None:
    /// evaluated without a claim, or read from the store).
    Done {
        key: Key,
        evaluator: usize,
        outcome: Result<Arc<str>, EvalError>,
        claim: Option<Arc<str>>,
        at_ms: u64,
    },
    /// Another broker dropped `target`'s results: drop them here too.
    Dropped(Target),
    /// The answer to [`ClusterCmd::Invalidate`]: `ok`, recorded in Redis
    /// and every broker has had time to drop its copies; else Redis did
    /// not answer.
    Invalidated {
        target: Target,
        session: SessionId,
        id: ReqId,
        ok: bool,
    },
}
