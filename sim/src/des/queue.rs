//! The event queue: events ordered by (time, sequence number), so events at
//! the same simulated microsecond run in the order they were scheduled and
//! a run replays exactly.
//!
//! Simulated time never goes back and no event is scheduled before the
//! last one handed out, so the queue is a radix heap (Ahuja, Mehlhorn,
//! Orlin and Tarjan, "Faster algorithms for the shortest path problem",
//! 1990) on the time: bucket `b` holds the events whose time first differs
//! from the current base time in bit `b`. Taking the next event scans the
//! lowest non-empty bucket once and spreads it over lower buckets; each
//! event moves at most 64 times and in practice a few, in sequential
//! passes over small arrays rather than a binary heap's unpredictable
//! sifts. Events at the base time wait in scheduling order in `due`.
//! The order within a time is kept without sorting (see `refill`).
//! Events are small (a frame in flight waits in `Frames`), so they move
//! with their entries: a slab beside the buckets would cost a cache miss
//! per event taken.

use std::collections::VecDeque;

/// An event and its order key.
#[derive(Debug)]
struct Entry<E> {
    at_us: u64,
    seq: u64,
    event: E,
}

/// Time buckets: one per bit of a `u64` time.
const BUCKETS: usize = 64;

/// A monotone priority queue of timed events; ties run in scheduling order.
pub(crate) struct EventQueue<E> {
    /// The time of `due`: the last event's time handed out (or about to
    /// be). Nothing may be scheduled before it.
    base_us: u64,
    /// Events at `base_us`, in scheduling order.
    due: VecDeque<Entry<E>>,
    /// Bucket `b`: events later than `base_us` whose time's highest bit
    /// that differs from `base_us` is bit `b`.
    buckets: [Vec<Entry<E>>; BUCKETS],
    len: usize,
    seq: u64,
    len_max: usize,
}

impl<E> EventQueue<E> {
    pub(crate) fn new() -> Self {
        Self {
            base_us: 0,
            due: VecDeque::new(),
            buckets: std::array::from_fn(|_| Vec::new()),
            len: 0,
            seq: 0,
            len_max: 0,
        }
    }

    fn bucket(&self, at_us: u64) -> usize {
        (BUCKETS - 1) - (at_us ^ self.base_us).leading_zeros() as usize
    }

    /// Schedule `event` at `at_us` (microseconds of simulated time), no
    /// earlier than the last event taken.
    pub(crate) fn push(&mut self, at_us: u64, event: E) {
        assert!(at_us >= self.base_us, "an event is scheduled no earlier than the last one taken");
        self.seq += 1;
        let entry = Entry { at_us, seq: self.seq, event };
        if at_us == self.base_us {
            // Scheduled after everything already due at this time.
            self.due.push_back(entry);
        } else {
            let bucket = self.bucket(at_us);
            self.buckets[bucket].push(entry);
        }
        self.len += 1;
        self.len_max = self.len_max.max(self.len);
    }

    /// Make `due` hold the earliest events, if any wait: move the base to
    /// the lowest non-empty bucket's earliest time and spread that bucket.
    fn refill(&mut self) {
        if !self.due.is_empty() {
            return;
        }
        let Some(lowest) = self.buckets.iter().position(|b| !b.is_empty()) else { return };
        let mut spread = std::mem::take(&mut self.buckets[lowest]);
        let Some(earliest) = spread.iter().map(|e| e.at_us).min() else { return };
        self.base_us = earliest;
        for entry in spread.drain(..) {
            if entry.at_us == earliest {
                self.due.push_back(entry);
            } else {
                // Lower than `lowest`: it agrees with the new base above.
                let bucket = self.bucket(entry.at_us);
                self.buckets[bucket].push(entry);
            }
        }
        // Keep the emptied bucket's allocation.
        self.buckets[lowest] = spread;
        // Every bucket is in scheduling order: a bucket fills from empty
        // with a spread bucket's entries in that bucket's order, then only
        // with events scheduled later. So `due` is too.
        debug_assert!(self.due.iter().is_sorted_by_key(|e| e.seq), "due events in scheduling order");
    }

    /// Time of the earliest event. It does not move the base: a planned
    /// action before that time may still schedule events.
    pub(crate) fn peek_at(&self) -> Option<u64> {
        if let Some(entry) = self.due.front() {
            return Some(entry.at_us);
        }
        let lowest = self.buckets.iter().find(|b| !b.is_empty())?;
        lowest.iter().map(|e| e.at_us).min()
    }

    /// The earliest event and its time.
    pub(crate) fn pop(&mut self) -> Option<(u64, E)> {
        self.refill();
        let entry = self.due.pop_front()?;
        self.len -= 1;
        Some((entry.at_us, entry.event))
    }

    /// Events ever scheduled.
    pub(crate) fn scheduled(&self) -> u64 {
        self.seq
    }

    /// The most events waiting at once.
    pub(crate) fn len_max(&self) -> usize {
        self.len_max
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    use rand::rngs::ChaCha8Rng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    #[test]
    fn earliest_first_and_ties_in_scheduling_order() {
        let mut q = EventQueue::new();
        q.push(30, "c");
        q.push(10, "a1");
        q.push(20, "b");
        q.push(10, "a2");
        q.push(10, "a3");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(order, vec![(10, "a1"), (10, "a2"), (10, "a3"), (20, "b"), (30, "c")]);
        assert_eq!(q.scheduled(), 5);
        assert_eq!(q.len_max(), 5);
        assert_eq!(q.peek_at(), None);
    }

    /// Against a binary heap on (time, sequence): random delays (many
    /// zero, some huge), pushes between pops, as the engine does.
    #[test]
    fn the_same_order_as_a_binary_heap() {
        for seed in 0..20u8 {
            let mut rng = ChaCha8Rng::from_seed([seed; 32]);
            let mut q = EventQueue::new();
            let mut reference = BinaryHeap::new();
            let (mut now, mut seq) = (0u64, 0u64);
            for _ in 0..20_000 {
                for _ in 0..rng.random_range(0..4) {
                    let delay = match rng.random_range(0..4) {
                        0 => 0,
                        1 => rng.random_range(0..16),
                        2 => rng.random_range(0..100_000),
                        _ => rng.random_range(0..1 << 40),
                    };
                    seq += 1;
                    q.push(now + delay, seq);
                    reference.push(Reverse((now + delay, seq)));
                }
                assert_eq!(q.peek_at(), reference.peek().map(|Reverse((at, _))| *at));
                if rng.random_range(0..4) == 0 {
                    // A planned action between the peek and the pop
                    // schedules at a time before the next event.
                    let at = q.peek_at().map_or(now, |next| rng.random_range(now..=next));
                    seq += 1;
                    q.push(at, seq);
                    reference.push(Reverse((at, seq)));
                }
                let got = q.pop();
                let want = reference.pop().map(|Reverse(e)| e);
                assert_eq!(got, want, "seed {seed}");
                if let Some((at, _)) = got {
                    now = at;
                }
            }
            while let Some(want) = reference.pop() {
                assert_eq!(q.pop(), Some(want.0));
            }
            assert_eq!(q.pop(), None);
        }
    }
}
