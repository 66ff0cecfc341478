//! A token bucket: the `--max-upload`/`--max-download` limiter of the
//! daemon and the bandwidth model of the simulator (turmoil has none; the
//! bucket runs on `tokio::time`, which is virtual under turmoil).
//!
//! The arithmetic is pure and integer (micro-bytes), so it is exact and
//! testable without a runtime; [`TokenBucket::take`] returns how long the
//! caller must wait. Takes may overdraw: the bucket goes into debt and
//! later callers wait for it, which keeps senders in FIFO order.

use std::time::Duration;

const MICRO: u128 = 1_000_000;

/// A byte-rate limiter.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    /// Bytes per second; `None` is unlimited.
    rate_bytes_per_s: Option<u64>,
    /// Most bytes that may be sent at once after idling.
    burst_bytes: u64,
    /// Balance in micro-bytes; negative is debt.
    balance: i128,
    /// Time of the last refill.
    last: Duration,
}

impl TokenBucket {
    /// A bucket that starts full. `rate_bytes_per_s: None` never waits.
    #[must_use]
    pub fn new(rate_bytes_per_s: Option<u64>, burst_bytes: u64, now: Duration) -> Self {
        Self { rate_bytes_per_s, burst_bytes, balance: i128::from(burst_bytes) * MICRO as i128, last: now }
    }

    /// The configured rate.
    #[must_use]
    pub fn rate(&self) -> Option<u64> {
        self.rate_bytes_per_s
    }

    fn refill(&mut self, now: Duration) {
        let Some(rate) = self.rate_bytes_per_s else { return };
        let elapsed = now.saturating_sub(self.last);
        self.last = self.last.max(now);
        let earned = elapsed.as_micros().saturating_mul(u128::from(rate));
        let cap = i128::from(self.burst_bytes) * MICRO as i128;
        self.balance = self.balance.saturating_add(i128::try_from(earned).unwrap_or(i128::MAX)).min(cap);
    }

    /// Spend `bytes` at `now`; returns how long to wait before sending
    /// them (zero if the balance covers them).
    pub fn take(&mut self, bytes: u64, now: Duration) -> Duration {
        let Some(rate) = self.rate_bytes_per_s.filter(|&r| r > 0) else { return Duration::ZERO };
        self.refill(now);
        self.balance -= i128::from(bytes) * MICRO as i128;
        if self.balance >= 0 {
            return Duration::ZERO;
        }
        // Debt in micro-bytes / rate (bytes per s) = microseconds to wait.
        let debt = self.balance.unsigned_abs();
        Duration::from_micros(u64::try_from(debt / u128::from(rate)).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn unlimited_never_waits() {
        let mut bucket = TokenBucket::new(None, 0, Duration::ZERO);
        assert_eq!(bucket.take(u64::MAX, Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn a_full_burst_then_the_rate() {
        // 1 MB/s, 64 KiB burst.
        let mut bucket = TokenBucket::new(Some(1_000_000), 65_536, Duration::ZERO);
        assert_eq!(bucket.take(65_536, Duration::ZERO), Duration::ZERO, "the burst is free");
        assert_eq!(bucket.take(100_000, Duration::ZERO), Duration::from_millis(100));
        // Debt carries: the next taker waits behind the first.
        assert_eq!(bucket.take(100_000, Duration::ZERO), Duration::from_millis(200));
        // After 300 ms the debt is paid and nothing is banked beyond it.
        assert_eq!(bucket.take(0, Duration::from_millis(300)), Duration::ZERO);
    }

    #[test]
    fn long_run_throughput_matches_the_rate() {
        let mut bucket = TokenBucket::new(Some(2_000_000), 16_384, Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        while now < 10 * S {
            now += bucket.take(16_384, now);
            sent += 16_384;
        }
        let rate = sent as f64 / now.as_secs_f64();
        assert!((1_990_000.0..2_010_000.0).contains(&rate), "rate {rate}");
    }

    #[test]
    fn idle_time_banks_at_most_one_burst() {
        let mut bucket = TokenBucket::new(Some(1_000), 1_000, Duration::ZERO);
        assert_eq!(bucket.take(1_000, Duration::from_secs(100)), Duration::ZERO);
        assert_eq!(bucket.take(1_000, Duration::from_secs(100)), S);
    }
}
