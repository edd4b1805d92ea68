//! The order in which an evaluator's queued jobs start.
//!
//! Highest priority first. At equal priority, namespaces take turns
//! (round-robin), so one namespace's flood delays another's job by at most
//! one job per namespace waiting at that priority. Within a namespace, in
//! arrival order. A job's priority may rise while it waits (a later
//! waiter asked for more), which moves it to its new level in its arrival
//! place.
//!
//! [`RunQueue`] is a plain data structure: the threads' queue and the
//! remote workers' queue (in the broker) and the model executors (in the
//! simulation) all keep their jobs in one, so every executor starts jobs in
//! the same order.

use crate::ns::Ns;
use crate::table::Gen;
use std::collections::{HashMap, VecDeque};

/// A job's priority: 0 (lowest) to 9.
pub type Priority = u8;
/// The highest priority.
pub const MAX_PRIORITY: Priority = 9;
/// A submit's priority when it names none.
pub const DEFAULT_PRIORITY: Priority = 5;

/// One priority's jobs: per namespace in arrival order, and the turn of
/// each namespace that has some.
#[derive(Default)]
struct Level {
    turns: VecDeque<Ns>,
    by_ns: HashMap<Ns, VecDeque<(u64, Gen)>>,
}

impl Level {
    fn insert(&mut self, ns: Ns, seq: u64, gen: Gen, front_turn: bool) {
        let line = self.by_ns.entry(ns).or_default();
        if line.is_empty() {
            if front_turn {
                self.turns.push_front(ns);
            } else {
                self.turns.push_back(ns);
            }
        }
        let at = line.partition_point(|(s, _)| *s < seq);
        line.insert(at, (seq, gen));
    }

    fn remove(&mut self, ns: Ns, gen: Gen) {
        let Some(line) = self.by_ns.get_mut(&ns) else {
            return;
        };
        line.retain(|(_, g)| *g != gen);
        if line.is_empty() {
            self.by_ns.remove(&ns);
            self.turns.retain(|n| *n != ns);
        }
    }

    /// The first job of the first namespace in turn that `may` take; that
    /// namespace's turn goes to the back.
    fn take(&mut self, may: &mut impl FnMut(Ns) -> bool) -> Option<(u64, Gen)> {
        let at = self.turns.iter().position(|ns| may(*ns))?;
        let ns = self.turns.remove(at).expect("a turn");
        let line = self
            .by_ns
            .get_mut(&ns)
            .expect("a namespace in turn has jobs");
        let first = line.pop_front().expect("a namespace in turn has jobs");
        if line.is_empty() {
            self.by_ns.remove(&ns);
        } else {
            self.turns.push_back(ns);
        }
        Some(first)
    }
}

struct Place<T> {
    ns: Ns,
    priority: Priority,
    seq: u64,
    item: T,
}

/// A job taken from a [`RunQueue`].
pub struct Taken<T> {
    pub gen: Gen,
    pub priority: Priority,
    /// Its place in arrival order, to put it back where it was
    /// ([`RunQueue::requeue`]).
    pub seq: u64,
    pub item: T,
}

/// Queued jobs in the order they start; see the module doc.
pub struct RunQueue<T> {
    levels: Vec<Level>,
    jobs: HashMap<Gen, Place<T>>,
    next_seq: u64,
}

impl<T> Default for RunQueue<T> {
    fn default() -> Self {
        RunQueue {
            levels: (0..=MAX_PRIORITY).map(|_| Level::default()).collect(),
            jobs: HashMap::new(),
            next_seq: 0,
        }
    }
}

impl<T> RunQueue<T> {
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    pub fn contains(&self, gen: Gen) -> bool {
        self.jobs.contains_key(&gen)
    }

    /// Queues job `gen` of namespace `ns` last among its priority's.
    pub fn push(&mut self, gen: Gen, ns: Ns, priority: Priority, item: T) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.put(gen, ns, priority.min(MAX_PRIORITY), seq, item, false);
    }

    /// Puts back a job taken from this queue (its worker went away): in its
    /// arrival place, and its namespace's turn comes first.
    pub fn requeue(&mut self, gen: Gen, ns: Ns, priority: Priority, seq: u64, item: T) {
        self.put(gen, ns, priority.min(MAX_PRIORITY), seq, item, true);
    }

    fn put(&mut self, gen: Gen, ns: Ns, priority: Priority, seq: u64, item: T, front: bool) {
        if let Some(old) = self.jobs.remove(&gen) {
            self.levels[usize::from(old.priority)].remove(old.ns, gen);
        }
        self.levels[usize::from(priority)].insert(ns, seq, gen, front);
        let place = Place {
            ns,
            priority,
            seq,
            item,
        };
        self.jobs.insert(gen, place);
    }

    /// Raises job `gen` to `priority` (never lowers it); whether it moved.
    pub fn raise(&mut self, gen: Gen, priority: Priority) -> bool {
        let priority = priority.min(MAX_PRIORITY);
        let Some(place) = self.jobs.get_mut(&gen) else {
            return false;
        };
        if priority <= place.priority {
            return false;
        }
        self.levels[usize::from(place.priority)].remove(place.ns, gen);
        place.priority = priority;
        self.levels[usize::from(priority)].insert(place.ns, place.seq, gen, false);
        true
    }

    /// Takes job `gen` out, wherever it waits.
    pub fn remove(&mut self, gen: Gen) -> Option<T> {
        let place = self.jobs.remove(&gen)?;
        self.levels[usize::from(place.priority)].remove(place.ns, gen);
        Some(place.item)
    }

    /// Takes the job to start next.
    pub fn pop(&mut self) -> Option<Taken<T>> {
        self.pop_where(|_| true)
    }

    /// Takes the job to start next among the namespaces `may` allows (a
    /// worker that serves one namespace).
    pub fn pop_where(&mut self, mut may: impl FnMut(Ns) -> bool) -> Option<Taken<T>> {
        for priority in (0..=MAX_PRIORITY).rev() {
            if let Some((seq, gen)) = self.levels[usize::from(priority)].take(&mut may) {
                let place = self.jobs.remove(&gen).expect("a queued job");
                return Some(Taken {
                    gen,
                    priority,
                    seq,
                    item: place.item,
                });
            }
        }
        None
    }

    /// The next job `pop_where(may)` would take, left in place.
    pub fn peek_where(&self, mut may: impl FnMut(Ns) -> bool) -> Option<(Gen, &T)> {
        for level in self.levels.iter().rev() {
            if let Some(ns) = level.turns.iter().find(|ns| may(**ns)) {
                let (_, gen) = level.by_ns[ns][0];
                return Some((gen, &self.jobs[&gen].item));
            }
        }
        None
    }

    /// Every queued job, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (Gen, &T)> {
        self.jobs.iter().map(|(gen, place)| (*gen, &place.item))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str) -> Ns {
        Ns::intern(name, 16).expect("a valid name")
    }

    fn order<T>(q: &mut RunQueue<T>) -> Vec<Gen> {
        std::iter::from_fn(|| q.pop().map(|t| t.gen)).collect()
    }

    #[test]
    fn higher_priorities_start_first_then_arrival_order() {
        let mut q = RunQueue::default();
        for (gen, priority) in [(0, 5), (1, 1), (2, 9), (3, 5), (4, 9)] {
            q.push(gen, Ns::SHARED, priority, ());
        }
        assert_eq!(q.len(), 5);
        assert!(!q.is_empty());
        assert_eq!(order(&mut q), vec![2, 4, 0, 3, 1]);
        assert!(q.is_empty());
    }

    #[test]
    fn namespaces_take_turns_at_equal_priority() {
        let (a, b, c) = (ns("sched-a"), ns("sched-b"), ns("sched-c"));
        let mut q = RunQueue::default();
        for gen in 0..4 {
            q.push(gen, a, 5, ());
        }
        q.push(10, b, 5, ());
        q.push(11, b, 5, ());
        q.push(20, c, 5, ());
        assert_eq!(order(&mut q), vec![0, 10, 20, 1, 11, 2, 3]);
    }

    #[test]
    fn a_raised_job_moves_up_in_its_arrival_place() {
        let mut q = RunQueue::default();
        for gen in 0..4 {
            q.push(gen, Ns::SHARED, 3, ());
        }
        q.push(4, Ns::SHARED, 7, ());
        assert!(q.raise(2, 7));
        assert!(!q.raise(2, 6), "never lowered");
        assert!(!q.raise(2, 7), "already there");
        assert!(!q.raise(99, 9), "unknown");
        assert!(q.raise(3, 200), "capped at the highest");
        assert_eq!(order(&mut q), vec![3, 2, 4, 0, 1]);
    }

    #[test]
    fn removed_and_requeued_jobs_keep_the_order() {
        let (a, b) = (ns("sched-d"), ns("sched-e"));
        let mut q = RunQueue::default();
        q.push(0, a, 5, "a0");
        q.push(1, a, 5, "a1");
        q.push(2, b, 5, "b2");
        assert_eq!(q.remove(1), Some("a1"));
        assert_eq!(q.remove(1), None);
        assert!(!q.contains(1));
        let first = q.pop().expect("a job");
        assert_eq!((first.gen, first.item, first.priority), (0, "a0", 5));
        // Its worker went away: it goes first again.
        q.requeue(first.gen, a, first.priority, first.seq, first.item);
        assert!(q.contains(0));
        assert_eq!(q.peek_where(|_| true).map(|(g, _)| g), Some(0));
        assert_eq!(order(&mut q), vec![0, 2]);
    }

    #[test]
    fn a_worker_of_one_namespace_takes_only_its_jobs() {
        let (a, b) = (ns("sched-f"), ns("sched-g"));
        let mut q = RunQueue::default();
        q.push(0, a, 9, ());
        q.push(1, b, 1, ());
        q.push(2, b, 2, ());
        assert_eq!(q.peek_where(|n| n == b).map(|(g, _)| g), Some(2));
        assert_eq!(q.pop_where(|n| n == b).map(|t| t.gen), Some(2));
        assert_eq!(q.pop_where(|n| n == b).map(|t| t.gen), Some(1));
        assert!(q.pop_where(|n| n == b).is_none());
        assert_eq!(q.iter().map(|(g, _)| g).collect::<Vec<_>>(), vec![0]);
    }
}
