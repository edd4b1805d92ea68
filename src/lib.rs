//! herd: a WebSocket pub/sub result broker.
//!
//! Agents hold long-lived WebSocket sessions and submit inputs; identical
//! inputs are evaluated once, and the result is pushed to every requester at
//! the same moment and kept in a bounded cache for the next one.
//!
//! ```text
//! agent ──ws──▶ session reader ──hit──▶ cache ──▶ reply (hub never touched)
//!                    │ miss
//!                    ▼
//!               hub: ONE task, owns the wait table      (singular update queue)
//!               key → {waiters, job}
//!                    │ first waiter: job                 ▲ done(key, result)
//!                    ▼                                   │
//!               evaluator pool: dedicated OS threads ────┘
//!               hub on done: insert cache, encode the result once,
//!               push it to every waiter's outbound queue, remove the entry
//!                    ▼
//!               session writer ──ws──▶ agent             (one writer per session)
//! ```
//!
//! Folders, in the order a request meets them:
//! - [`server`]: the port (HTTP routes, WebSocket upgrade, the HTTP API
//!   [`server::http`]), auth and namespaces' quotas, shutdown,
//!   the state every part shares ([`server::broker`]), one connection's
//!   reader and writer ([`server::session`]) and dashboard snapshots;
//! - [`protocol`]: request parsing (a frame's members read in one pass,
//!   [`members`]) and frame writing; [`outbox`]: a
//!   session's outbound queue, byte budget and close signal;
//! - [`key`]: canonical JSON and key derivation (a key carries its
//!   namespace, [`ns`]); [`memo`]: raw inputs to keys;
//! - [`cache`]: the bounded results cache;
//! - [`core`] (the `herd-core` crate): the wait table, every key's
//!   lifecycle and the cluster's decisions, a state machine that does no
//!   I/O; [`hub`]: the one task that drives it and performs its effects;
//! - [`exec`]: one executor boundary for evaluator threads (builtin and
//!   process evaluators) and remote worker sessions;
//! - [`cluster`]: the shell that sends the core's commands to the Redis of
//!   brokers sharing one (claims, a second cache level, completions over
//!   pub/sub) and brings back the replies;
//! - [`metrics`], [`config`] and [`error`];
//! - [`client`]: the client side: a Rust client, the `herd` client
//!   subcommands, the benchmark scenarios, a worker API and `herd work`.

pub mod cache;
pub mod client;
pub mod cluster;
pub mod config;
pub mod error;
pub mod exec;
pub mod hub;
pub mod key;
pub mod members;
pub mod memo;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod server;

/// The coordination core, a crate of its own (`herd-core`): no runtime,
/// no I/O.
pub use herd_core as core;
pub use herd_core::ns;

pub use config::Config;
pub use error::HerdError;
pub use key::Key;
