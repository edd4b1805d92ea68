//! Failed logins by address: a token bucket per source address, so that
//! credentials cannot be guessed at the speed of the network.
//!
//! Every wrong credential takes one from its address's bucket
//! (`limits.failed_logins_per_min`, with a burst of as many). An address
//! whose bucket is empty is refused (HTTP 429, with when to try again)
//! before any credential it presents is looked at, right or wrong, until
//! the bucket holds one again. An IPv6 address counts as its /64, the
//! block one host is usually given. At most
//! `limits.failed_login_addresses` addresses are tracked; past that,
//! those no longer failing are forgotten, and a new one is not counted.

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::{Duration, Instant};
use tracing::warn;

/// How long an empty bucket takes to fill again (its burst is a minute's
/// worth): an address that has not failed for this long is as good as new.
const REFILL: Duration = Duration::from_secs(60);

pub struct Logins {
    /// None: no throttle (`failed_logins_per_min = 0`).
    quota: Option<Quota>,
    failures: DashMap<IpAddr, Failures, foldhash::fast::RandomState>,
    /// The addresses refused, and until when.
    refused: DashMap<IpAddr, Instant, foldhash::fast::RandomState>,
    max_addresses: usize,
    clock: DefaultClock,
}

/// One address's failures.
struct Failures {
    bucket: DefaultDirectRateLimiter,
    last: Instant,
}

impl Logins {
    pub fn new(per_min: u32, max_addresses: usize) -> Logins {
        Logins {
            quota: NonZeroU32::new(per_min).map(Quota::per_minute),
            failures: DashMap::default(),
            refused: DashMap::default(),
            max_addresses,
            clock: DefaultClock::default(),
        }
    }

    /// How long `peer` must wait before its credentials are looked at
    /// again, if it must.
    pub fn refused(&self, peer: IpAddr) -> Option<Duration> {
        if self.refused.is_empty() {
            return None;
        }
        let source = source(peer);
        let until = *self.refused.get(&source)?;
        let wait = until.saturating_duration_since(Instant::now());
        if wait.is_zero() {
            self.refused.remove_if(&source, |_, u| *u <= until);
            return None;
        }
        Some(wait)
    }

    /// Counts a wrong credential from `peer`; if that is one too many,
    /// how long `peer` is refused.
    pub fn failed(&self, peer: IpAddr) -> Option<Duration> {
        let quota = self.quota?;
        let source = source(peer);
        let now = Instant::now();
        if !self.failures.contains_key(&source) && self.failures.len() >= self.max_addresses {
            self.failures
                .retain(|_, f| now.saturating_duration_since(f.last) < REFILL);
            self.refused.retain(|_, until| *until > now);
            if self.failures.len() >= self.max_addresses {
                return None;
            }
        }
        let mut failures = self.failures.entry(source).or_insert_with(|| Failures {
            bucket: DefaultDirectRateLimiter::direct(quota),
            last: now,
        });
        failures.last = now;
        let not_until = failures.bucket.check().err()?;
        drop(failures);
        let wait = not_until.wait_time_from(self.clock.now());
        self.refused.insert(source, now + wait);
        warn!(
            %source,
            wait_ms = wait.as_millis() as u64,
            "too many wrong credentials from this address: refused for a while (limits.failed_logins_per_min)"
        );
        Some(wait)
    }
}

/// The address a failure counts against: an IPv4 address (also when
/// mapped into IPv6) or an IPv6 address's /64.
fn source(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_past_its_failures_and_its_neighbours_are_not() {
        let logins = Logins::new(3, 100);
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_64: IpAddr = "2001:db8::ffff:2".parse().unwrap();
        let other_64: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(logins.refused(a), None);
            assert_eq!(logins.failed(a), None);
        }
        assert_eq!(logins.refused(a), None, "three failures are the burst");
        let wait = logins.failed(same_64).expect("one too many");
        assert!(logins.refused(a).expect("its /64 is refused") <= wait);
        assert!(wait <= Duration::from_secs(20), "{wait:?}");
        assert!(logins.refused(other_64).is_none());
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(source(mapped), v4);
    }

    #[test]
    fn past_its_bound_a_new_address_is_not_tracked_and_none_is_without_a_rate() {
        let logins = Logins::new(1, 1);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        assert_eq!(logins.failed(a), None);
        assert_eq!(logins.failed(b), None);
        assert_eq!(logins.failed(b), None, "not tracked");
        assert!(logins.refused(b).is_none());
        assert!(logins.failed(a).is_some());
        assert!(logins.refused(a).is_some());
        let none = Logins::new(0, 1);
        for _ in 0..10 {
            assert_eq!(none.failed(a), None);
        }
        assert!(none.refused(a).is_none());
    }
}
