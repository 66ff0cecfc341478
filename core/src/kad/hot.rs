//! A holder's limit on how often it answers one key with the value.
//!
//! A manifest lives on the k nodes closest to its file id, but lookups do
//! not spread over them evenly: a holder that everyone knows (the
//! bootstrap node, say) is in every asker's first round and answers every
//! one: in a 300-node test, one holder sent 143 of 279 copies. Past a
//! key's rate a holder answers with the closer contacts instead, as if it
//! did not hold the value, and the lookup moves on to the next holder; the
//! key's k replicas share the crowd. The node that published the manifest
//! answers at a much lower rate (`origin_value_answers_per_s`): in a
//! 1,000-peer flash crowd whose only seed was the bootstrap node and a
//! holder, the manifest
//! copies it sent (about 33 KB each, 1,024 piece hashes) held back its
//! first block until 5.69 s instead of 3.10 s.
//!
//! The rate is a generic cell rate algorithm (the ATM leaky bucket): one
//! "theoretical arrival time" per key, no timer, exact in integer
//! microseconds. A key whose time has passed is as good as absent, so the
//! table holds hot keys only and is bounded by `keys_max`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::time::Instant;
use crate::wire::RecordKey;

/// Per-key answer rates (module docs).
#[derive(Debug)]
pub(crate) struct ValueThrottle {
    /// Time between answers at the steady rate.
    interval: Duration,
    /// How far ahead of `now` a key's arrival time may run: answers beyond
    /// the steady rate allowed in a burst, times `interval`.
    tolerance: Duration,
    keys_max: usize,
    /// Theoretical arrival time of the next answer, per hot key.
    next: BTreeMap<RecordKey, Instant>,
}

impl ValueThrottle {
    /// `per_s` answers a second per key, `burst` of them at once, for up
    /// to `keys_max` hot keys. `per_s` and `burst` are at least 1.
    pub(crate) fn new(per_s: u32, burst: u32, keys_max: usize) -> Self {
        let interval = Duration::from_micros(1_000_000 / u64::from(per_s.max(1)));
        let tolerance = interval * burst.max(1).saturating_sub(1);
        Self { interval, tolerance, keys_max, next: BTreeMap::new() }
    }

    /// Whether `key` may be answered with its value at `now`; counts the
    /// answer when it may.
    pub(crate) fn allow(&mut self, key: &RecordKey, now: Instant) -> bool {
        let at = self.next.get(key).map_or(now, |&at| at.max(now));
        if at.saturating_duration_since(now) > self.tolerance {
            return false;
        }
        if !self.next.contains_key(key) && self.next.len() >= self.keys_max {
            self.next.retain(|_, at| *at > now);
            if self.next.len() >= self.keys_max {
                // Every tracked key is hot: drop the coolest, the one
                // closest to being as good as absent.
                let coolest = self.next.iter().min_by_key(|&(_, at)| *at).map(|(k, _)| *k);
                if let Some(coolest) = coolest {
                    self.next.remove(&coolest);
                }
            }
        }
        self.next.insert(*key, at + self.interval);
        true
    }

    /// Keys tracked now (hot or not yet pruned).
    #[cfg(test)]
    pub(crate) fn tracked(&self) -> usize {
        self.next.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Instant {
        Instant::from_micros(n * 1_000)
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        // 10 a second, 4 at once.
        let mut t = ValueThrottle::new(10, 4, 8);
        let key = [7; 32];
        let at_once = (0..10).filter(|_| t.allow(&key, ms(0))).count();
        assert_eq!(at_once, 4);
        assert!(!t.allow(&key, ms(99)), "the fifth answer is due after one interval");
        assert!(t.allow(&key, ms(100)));
        assert!(!t.allow(&key, ms(150)));
        // A second of silence refills the burst, and no more than it.
        let later = (0..10).filter(|_| t.allow(&key, ms(1_200))).count();
        assert_eq!(later, 4);
        // Other keys have their own budget.
        assert!(t.allow(&[8; 32], ms(1_200)));
    }

    #[test]
    fn over_a_long_run_the_rate_holds() {
        let mut t = ValueThrottle::new(32, 8, 8);
        let key = [1; 32];
        // Asked every millisecond for 10 s: 32 a second plus the burst.
        let answered = (0..10_000).filter(|&i| t.allow(&key, ms(i))).count();
        assert!((320..=320 + 8).contains(&answered), "{answered}");
    }

    #[test]
    fn the_table_keeps_hot_keys_within_its_bound() {
        let mut t = ValueThrottle::new(1, 2, 4);
        for n in 0..100u8 {
            assert!(t.allow(&[n; 32], ms(u64::from(n))), "a new key always has its burst");
            assert!(t.tracked() <= 4);
        }
        // The hottest key survives a crowd of one-off keys.
        let hot = [200; 32];
        assert!(t.allow(&hot, ms(1_000)));
        assert!(t.allow(&hot, ms(1_000)));
        assert!(!t.allow(&hot, ms(1_000)));
        for n in 0..3u8 {
            assert!(t.allow(&[n; 32], ms(1_000)));
        }
        assert!(!t.allow(&hot, ms(1_000)), "the hot key's spent burst was not forgotten");
    }
}
