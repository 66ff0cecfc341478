//! Access links: each host has an uplink and a downlink that carry one
//! frame at a time, first in first out. A frame of B bytes occupies the
//! sender's uplink for B/up, travels for the pair's latency, then occupies
//! the receiver's downlink for B/down (DESIGN.md, des engine).

const NANOS_PER_S: u128 = 1_000_000_000;

/// One direction of a host's access link.
#[derive(Clone, Debug)]
pub(crate) struct Pipe {
    bytes_per_s: Option<u64>,
    /// When the frame now being carried ends, in nanoseconds (kept finer
    /// than the event clock so rounding does not add up frame by frame).
    free_at_ns: u64,
}

impl Pipe {
    /// A pipe of this capacity; `None` is unlimited (frames never wait).
    pub(crate) fn new(bytes_per_s: Option<u64>) -> Self {
        Self { bytes_per_s: bytes_per_s.filter(|&r| r > 0), free_at_ns: 0 }
    }

    /// Queue `bytes` at `now_us`; returns the microsecond the last byte
    /// leaves the pipe (rounded up).
    pub(crate) fn reserve(&mut self, now_us: u64, bytes: u64) -> u64 {
        let Some(rate) = self.bytes_per_s else { return now_us };
        let now_ns = now_us.saturating_mul(1_000);
        let start = self.free_at_ns.max(now_ns);
        let busy = u128::from(bytes) * NANOS_PER_S / u128::from(rate);
        self.free_at_ns = start.saturating_add(u64::try_from(busy).unwrap_or(u64::MAX));
        self.free_at_ns.div_ceil(1_000)
    }

    /// Forget frames in flight (the host crashed: its sockets are gone).
    pub(crate) fn reset(&mut self) {
        self.free_at_ns = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_queue_first_in_first_out_at_the_rate() {
        let mut pipe = Pipe::new(Some(1_000_000)); // 1 byte per µs
        assert_eq!(pipe.reserve(0, 16_384), 16_384);
        // Queued behind the first.
        assert_eq!(pipe.reserve(100, 1_000), 17_384);
        // After an idle gap nothing is banked.
        assert_eq!(pipe.reserve(50_000, 1_000), 51_000);
        let mut unlimited = Pipe::new(None);
        assert_eq!(unlimited.reserve(7, u64::MAX), 7);
    }

    #[test]
    fn long_runs_keep_the_exact_rate() {
        // 3 bytes per µs does not divide 16 KiB: rounding must not drift.
        let mut pipe = Pipe::new(Some(3_000_000));
        let mut end = 0;
        for _ in 0..1_000 {
            end = pipe.reserve(0, 16_384);
        }
        // 16,384,000 bytes at 3 MB/s: 5,461,333.3 µs, rounded up once.
        assert_eq!(end, 5_461_334);
    }
}
