//! Connections that are not serving a request: waiting for a request's
//! head, or idle between two. They cost a file descriptor each and do
//! nothing, so there are at most `limits.max_idle_connections` of them;
//! past that the one idle longest is closed. Whatever a client opens and
//! leaves silent, the broker keeps descriptors for `/healthz`, WebSocket
//! upgrades and the HTTP API (each bounded on its own).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// Every idle connection, in the order they became idle.
pub struct Idle {
    max: usize,
    state: Mutex<State>,
}

struct State {
    next: u64,
    /// By when each became idle: the token that closes it.
    idle: BTreeMap<u64, CancellationToken>,
}

impl Idle {
    pub fn new(max: usize) -> Arc<Idle> {
        Arc::new(Idle {
            max,
            state: Mutex::new(State {
                next: 0,
                idle: BTreeMap::new(),
            }),
        })
    }

    /// A new connection, idle until its first request.
    pub fn open(self: &Arc<Self>) -> Connection {
        let connection = Connection {
            idle: Arc::clone(self),
            close: CancellationToken::new(),
            place: Mutex::new(None),
        };
        connection.rest();
        connection
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many connections are idle now.
    pub fn count(&self) -> usize {
        self.state().idle.len()
    }
}

/// One connection's place among the idle ones, given back when dropped.
pub struct Connection {
    idle: Arc<Idle>,
    /// Cancelled when the connection is to be closed.
    pub close: CancellationToken,
    /// Its place while idle.
    place: Mutex<Option<u64>>,
}

impl Connection {
    /// Serving a request: not idle.
    pub fn busy(&self) {
        let place = self.place.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(place) = place {
            self.idle.state().idle.remove(&place);
        }
    }

    /// Done with a request, waiting for the next: idle, last in line to be
    /// closed; the connection idle longest is closed if there are too many.
    pub fn rest(&self) {
        let mut place = self.place.lock().unwrap_or_else(|e| e.into_inner());
        let mut state = self.idle.state();
        if let Some(old) = place.take() {
            state.idle.remove(&old);
        }
        let at = state.next;
        state.next += 1;
        state.idle.insert(at, self.close.clone());
        *place = Some(at);
        while state.idle.len() > self.idle.max {
            if let Some((_, close)) = state.idle.pop_first() {
                close.cancel();
            }
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.busy();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_bound_the_connection_idle_longest_is_closed() {
        let idle = Idle::new(2);
        let (a, b) = (idle.open(), idle.open());
        b.busy();
        let c = idle.open();
        assert_eq!(idle.count(), 2);
        // a has been idle longest: a fourth closes it, not the busy b.
        let d = idle.open();
        assert!(a.close.is_cancelled());
        assert!(!b.close.is_cancelled() && !c.close.is_cancelled());
        // b rests again: it is now the last in line; c goes next.
        b.rest();
        assert!(c.close.is_cancelled() && !d.close.is_cancelled());
        drop((a, c));
        assert_eq!(idle.count(), 2);
        drop((b, d));
        assert_eq!(idle.count(), 0);
    }
}
