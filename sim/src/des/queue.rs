//! The event heap: events ordered by (time, sequence number), so events at
//! the same simulated microsecond run in the order they were scheduled and
//! a run replays exactly.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A heap entry: the order key and where the event waits. Events stay put
/// in the slab while the heap sifts, so a sift moves 24 bytes, not an
/// event (a frame in flight is a whole `Message`).
struct Entry {
    at_us: u64,
    seq: u64,
    slot: u32,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        (self.at_us, self.seq) == (other.at_us, other.seq)
    }
}

impl Eq for Entry {}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Entry {
    // Reversed: `BinaryHeap` is a max-heap and the earliest event goes first.
    // `seq` is unique, so `slot` never decides.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at_us, other.seq).cmp(&(self.at_us, self.seq))
    }
}

/// A min-heap of timed events; ties run in scheduling order.
pub(crate) struct EventQueue<E> {
    heap: BinaryHeap<Entry>,
    /// The waiting events, by slot; `None` is a free slot.
    events: Vec<Option<E>>,
    /// Free slots, the latest freed last (reused first, while its cache
    /// line is warm).
    free: Vec<u32>,
    seq: u64,
    len_max: usize,
}

impl<E> EventQueue<E> {
    pub(crate) fn new() -> Self {
        Self { heap: BinaryHeap::new(), events: Vec::new(), free: Vec::new(), seq: 0, len_max: 0 }
    }

    /// Schedule `event` at `at_us` (microseconds of simulated time).
    pub(crate) fn push(&mut self, at_us: u64, event: E) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(slot) => {
                self.events[slot as usize] = Some(event);
                slot
            }
            None => {
                // More than 2^32 events waiting at once would not fit in
                // memory long before this.
                let slot = u32::try_from(self.events.len()).expect("fewer than 2^32 events waiting");
                self.events.push(Some(event));
                slot
            }
        };
        self.heap.push(Entry { at_us, seq: self.seq, slot });
        self.len_max = self.len_max.max(self.heap.len());
    }

    /// Time of the earliest event.
    pub(crate) fn peek_at(&self) -> Option<u64> {
        self.heap.peek().map(|e| e.at_us)
    }

    /// The earliest event and its time.
    pub(crate) fn pop(&mut self) -> Option<(u64, E)> {
        let entry = self.heap.pop()?;
        let event = self.events[entry.slot as usize].take();
        assert!(event.is_some(), "a queued slot holds its event");
        self.free.push(entry.slot);
        event.map(|event| (entry.at_us, event))
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
