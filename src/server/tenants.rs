//! Namespaces' quotas: bounds on all of a namespace's sessions together.
//!
//! A namespace without a `[[namespace]]` entry has `[namespace_defaults]`'s
//! (the shared namespace none, unless listed); every session is also
//! bound by `[limits]`. `max_pending` is kept by
//! the core (it counts waits); the rate of submits and the number of
//! sessions are kept here, where a session is admitted and a submit read.

use crate::config::{Config, Quotas};
use crate::metrics::{Metrics, NsMetrics};
use crate::ns::Ns;
use dashmap::DashMap;
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

impl Quota {
    /// A namespace's quotas of `q`, or none if `q` bounds nothing kept here.
    fn of(q: Quotas) -> Option<Arc<Quota>> {
        let submits = q.submits_per_s.and_then(NonZeroU32::new).map(|rate| {
            let burst = q.burst.and_then(NonZeroU32::new).unwrap_or(rate);
            DefaultDirectRateLimiter::direct(Rate::per_second(rate).allow_burst(burst))
        });
        (submits.is_some() || q.max_sessions.is_some()).then(|| {
            Arc::new(Quota {
                submits,
                max_sessions: q.max_sessions,
                sessions: AtomicUsize::new(0),
            })
        })
    }
}

/// Every namespace's quotas.
pub struct Tenants {
    /// The listed namespaces' (`[[namespace]]`).
    listed: HashMap<Ns, Option<Arc<Quota>>>,
    /// `[namespace_defaults]`, for the others but the shared one.
    defaults: Quotas,
    /// The unlisted namespaces' quotas, each made when first needed (at
    /// most `auth.max_namespaces`, as namespace names are).
    unlisted: DashMap<Ns, Arc<Quota>, foldhash::fast::RandomState>,
    /// Whether any namespace has a quota kept here.
    any: bool,
    metrics: Arc<Metrics>,
    clock: DefaultClock,
}

/// A namespace's bucket of submits (if it has one), found once for a
/// session or a request rather than at every submit.
#[derive(Clone, Default)]
pub struct Allowance(Option<Arc<Quota>>);

/// A session's place in its namespace: given back when dropped.
pub struct Seat {
    quota: Option<Arc<Quota>>,
    /// Its namespace's figures (the session counts its submits there).
    pub metrics: NsMetrics,
}

impl Seat {
    /// Its namespace's submits.
    pub fn allowance(&self) -> Allowance {
        Allowance(self.quota.clone())
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        if let Some(q) = &self.quota {
            q.sessions.fetch_sub(1, Ordering::AcqRel);
        }
        self.metrics.sessions.dec();
    }
}

impl Tenants {
    /// The quotas of `config`'s namespaces (interned by the gate already).
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Tenants {
        metrics.set_namespace_labels(config.auth.namespace_labels);
        let listed: HashMap<Ns, Option<Arc<Quota>>> = config
            .namespaces
            .iter()
            .filter_map(|n| Some((Ns::find(&n.name)?, Quota::of(config.quotas(Some(n))))))
            .collect();
        let defaults = config.quotas(None);
        let any = listed.values().any(Option::is_some) || Quota::of(defaults).is_some();
        Tenants {
            listed,
            defaults,
            unlisted: DashMap::default(),
            any,
            metrics,
            clock: DefaultClock::default(),
        }
    }

    /// Namespace `ns`'s quotas, if it has any kept here.
    fn quota(&self, ns: Ns) -> Option<Arc<Quota>> {
        if !self.any {
            return None;
        }
        if let Some(q) = self.listed.get(&ns) {
            return q.clone();
        }
        if ns.is_shared() {
            return None;
        }
        if let Some(q) = self.unlisted.get(&ns) {
            return Some(Arc::clone(&q));
        }
        let q = Quota::of(self.defaults)?;
        Some(Arc::clone(&self.unlisted.entry(ns).or_insert(q)))
    }

    /// A seat in namespace `ns` for a new session, unless its
    /// `max_sessions` are all taken.
    pub fn seat(self: &Arc<Self>, ns: Ns) -> Option<Seat> {
        let quota = self.quota(ns);
        if let Some(q) = &quota {
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
        Some(Seat { quota, metrics })
    }

    /// Namespace `ns`'s submits, for an HTTP request (a session has its
    /// seat's).
    pub fn allowance(&self, ns: Ns) -> Allowance {
        Allowance(self.quota(ns))
    }

    /// Takes one submit from `allowance`'s bucket; if it is empty, how
    /// long until it holds one again.
    pub fn take_submit(&self, allowance: &Allowance) -> Result<(), Duration> {
        let Some(limiter) = allowance.0.as_ref().and_then(|q| q.submits.as_ref()) else {
            return Ok(());
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}
