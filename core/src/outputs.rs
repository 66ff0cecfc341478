//! Output queues: every machine keeps its outputs in a `VecDeque` that the
//! driver drains after each call (STYLE.md §1). A burst (a heartbeat's
//! grafts, a lookup's first requests) grows the buffer, and a `VecDeque`
//! never gives it back; a simulator holding 10^5 nodes held their biggest
//! bursts' buffers for the whole run. [`pop_output`] returns a drained
//! queue's buffer once it is larger than a call usually needs.

use std::collections::VecDeque;

/// Outputs a drained queue keeps room for: most calls emit a few.
pub const OUTPUTS_ROOM_KEPT: usize = 8;

/// The front of `queue`; when there is none, a buffer grown past
/// [`OUTPUTS_ROOM_KEPT`] entries is freed.
pub fn pop_output<T>(queue: &mut VecDeque<T>) -> Option<T> {
    let output = queue.pop_front();
    if output.is_none() && queue.capacity() > OUTPUTS_ROOM_KEPT {
        *queue = VecDeque::new();
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drained_queue_gives_a_burst_buffer_back() {
        let mut queue: VecDeque<u64> = (0..100).collect();
        let drained: Vec<u64> = std::iter::from_fn(|| pop_output(&mut queue)).collect();
        assert_eq!(drained, (0..100).collect::<Vec<_>>(), "in order, all of them");
        assert_eq!(queue.capacity(), 0);
        queue.extend([1, 2]);
        assert_eq!(pop_output(&mut queue), Some(1));
        let room = queue.capacity();
        assert_eq!((pop_output(&mut queue), pop_output(&mut queue)), (Some(2), None));
        assert_eq!(queue.capacity(), room, "a small buffer is kept for the next call");
    }
}
