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
//! Modules, in the order a request meets them:
//! - [`server`]: the port (HTTP routes, WebSocket upgrade) and shutdown;
//! - [`session`]: one connection's reader and writer;
//! - [`protocol`]: request parsing and frame writing;
//! - [`key`]: canonical JSON and key derivation; [`memo`]: raw inputs to keys;
//! - [`cache`]: the bounded results cache;
//! - [`hub`]: the wait table, owned by one task;
//! - [`pool`], [`eval`] and [`process`]: evaluator threads, the builtin
//!   evaluators, and programs plugged in as evaluators;
//! - [`remote`]: worker sessions as the pool of `remote` evaluators;
//! - [`cluster`]: brokers sharing one Redis (claims, a second cache level,
//!   completions over pub/sub);
//! - [`outbox`]: a session's outbound queue, byte budget and close signal;
//! - [`snapshot`]: dashboard snapshots, rendered once per tick for every watcher;
//! - [`broker`]: the state every part shares; [`metrics`]: its figures;
//! - [`auth`]: tokens, roles and the origin check;
//! - [`config`] and [`error`];
//! - the client side: [`client`] (a Rust client), [`cli`] (the `herd`
//!   client subcommands) and [`bench`] (the benchmark scenarios);
//! - the worker side: [`worker`] (serve a remote fn from Rust) and [`work`]
//!   (`herd work`: any JSON-lines program as a remote worker).

pub mod cache;
pub mod client;
pub mod cluster;
pub mod config;
pub mod core;
pub mod error;
pub mod exec;
pub mod hub;
pub mod key;
pub mod memo;
pub mod metrics;
pub mod outbox;
pub mod protocol;
pub mod server;

pub use config::Config;
pub use error::HerdError;
pub use key::Key;
