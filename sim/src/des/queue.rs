//! The event heap: events ordered by (time, sequence number), so events at
//! the same simulated microsecond run in the order they were scheduled and
//! a run replays exactly.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

struct Entry<E> {
    at_us: u64,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}

impl<E> Eq for Entry<E> {}

impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<E> Ord for Entry<E> {
    // Reversed: `BinaryHeap` is a max-heap and the earliest event goes first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_us, other.seq).cmp(&(self.at_us, self.seq))
    }
}

/// A min-heap of timed events; ties run in scheduling order.
pub(crate) struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    seq: u64,
    len_max: usize,
}

impl<E> EventQueue<E> {
    pub(crate) fn new() -> Self {
        Self { heap: BinaryHeap::new(), seq: 0, len_max: 0 }
    }

    /// Schedule `event` at `at_us` (microseconds of simulated time).
    pub(crate) fn push(&mut self, at_us: u64, event: E) {
        self.seq += 1;
        self.heap.push(Entry { at_us, seq: self.seq, event });
        self.len_max = self.len_max.max(self.heap.len());
    }

    /// Time of the earliest event.
    pub(crate) fn peek_at(&self) -> Option<u64> {
        self.heap.peek().map(|e| e.at_us)
    }

    /// The earliest event and its time.
    pub(crate) fn pop(&mut self) -> Option<(u64, E)> {
        self.heap.pop().map(|e| (e.at_us, e.event))
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
}
