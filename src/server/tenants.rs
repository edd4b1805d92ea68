//! Namespaces' quotas: bounds on all of a namespace's sessions together.
//!
//! A namespace without a `[[namespace]]` entry has none; its sessions are
//! bound by `[limits]` alone, as every session is. `max_pending` is kept by
//! the core (it counts waits); the rate of submits and the number of
//! sessions are kept here, where a session is admitted and a submit read.

use crate::config::Config;
use crate::metrics::{Metrics, NsMetrics};
use crate::ns::Ns;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota as Rate};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One namespace's quotas.
struct Quota {
    /// `submits_per_s` and `burst`.
    submits: Option<DefaultDirectRateLimiter>,
    max_sessions: Option<usize>,
    sessions: AtomicUsize,
}

/// Every configured namespace's quotas.
pub struct Tenants {
    quotas: HashMap<Ns, Quota>,
    metrics: Arc<Metrics>,
    clock: DefaultClock,
}

/// A session's place in its namespace: given back when dropped.
pub struct Seat {
    tenants: Arc<Tenants>,
    ns: Ns,
    /// Its namespace's figures (the session counts its submits there).
    pub metrics: NsMetrics,
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(q) = self.tenants.quotas.get(&self.ns) {
            q.sessions.fetch_sub(1, Ordering::AcqRel);
        }
        self.metrics.sessions.dec();
    }
}

impl Tenants {
    /// The quotas of `config`'s namespaces (interned by the gate already).
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Tenants {
        metrics.set_namespace_labels(config.auth.namespace_labels);
        let quotas = config
            .namespaces
            .iter()
            .filter_map(|n| {
                let ns = Ns::find(&n.name)?;
                let submits = n.submits_per_s.and_then(NonZeroU32::new).map(|rate| {
                    let burst = n.burst.and_then(NonZeroU32::new).unwrap_or(rate);
                    DefaultDirectRateLimiter::direct(Rate::per_second(rate).allow_burst(burst))
                });
                let quota = Quota {
                    submits,
                    max_sessions: n.max_sessions,
                    sessions: AtomicUsize::new(0),
                };
                Some((ns, quota))
            })
            .collect();
        Tenants {
            quotas,
            metrics,
            clock: DefaultClock::default(),
        }
    }

    /// A seat in namespace `ns` for a new session, unless its
    /// `max_sessions` are all taken.
    pub fn seat(self: &Arc<Self>, ns: Ns) -> Option<Seat> {
        if let Some(q) = self.quotas.get(&ns) {
            let before = q.sessions.fetch_add(1, Ordering::AcqRel);
            if q.max_sessions.is_some_and(|max| before >= max) {
                q.sessions.fetch_sub(1, Ordering::AcqRel);
                self.metrics
                    .ns_refused_sessions
                    .get_or_create(&self.metrics.ns_label(ns))
                    .inc();
                return None;
            }
        }
        let metrics = self.metrics.for_ns(ns);
        metrics.sessions.inc();
        Some(Seat {
            tenants: Arc::clone(self),
            ns,
            metrics,
        })
    }

    /// Takes one submit from namespace `ns`'s bucket; if it is empty, how
    /// long until it holds one again.
    pub fn take_submit(&self, ns: Ns) -> Result<(), Duration> {
        if self.quotas.is_empty() {
            return Ok(());
        }
        let Some(limiter) = self.quotas.get(&ns).and_then(|q| q.submits.as_ref()) else {
            return Ok(());
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}
