//! herd's coordination core: the wait table, every key's lifecycle and the
//! cluster's decisions, as a state machine that does no I/O.
//!
//! This crate depends on no runtime, no socket and no clock: the broker
//! (`herd`'s hub and cluster shell) drives it, and so does the
//! deterministic simulation in `tests/sim.rs`, with the same code.
//!
//! - [`table`]: the wait table ([`Core`]), its one way in ([`Core::apply`],
//!   [`Core::handle_timeout`]) and the [`Effect`]s it asks for;
//! - [`cluster`]: what the core decides about Redis ([`cluster::Coordinator`]),
//!   owned by the table in cluster mode;
//! - [`redis`]: the commands those decisions come down to, and the scripts
//!   behind them;
//! - [`sched`]: the order in which an evaluator's queued jobs start
//!   (priority, then namespaces in turn), kept by every executor;
//! - [`key`], [`ns`], [`error`]: keys, namespaces, error codes.

pub mod cluster;
pub mod error;
pub mod key;
pub mod ns;
pub mod redis;
pub mod sched;
pub mod table;

pub use cluster::{claim_node, ClusterConfig, ClusterStatus, Link, OpId, PubsubEvent};
pub use redis::{RedisOp, RedisReply};
pub use sched::{Priority, RunQueue, DEFAULT_PRIORITY, MAX_PRIORITY};
pub use table::*;
