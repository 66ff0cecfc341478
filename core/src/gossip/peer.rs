//! Per-connection gossip state: the peer's topics, its inbound rate budget
//! and its penalty. The penalty is a much simplified GossipSub v1.1 peer
//! score (spec v1.1 §"Peer Scoring"): only the negative counters Shoal can
//! judge locally (invalid messages, flooding, GRAFT during back-off), with
//! linear decay, two thresholds (graylist, disconnect) and no positive terms.

use std::collections::BTreeSet;

use crate::ids::NodeId;
use crate::time::Instant;
use crate::wire::Topic;

/// A token costs this many units; refilling `rate` tokens per minute is
/// then exactly `rate` units per microsecond, integers only.
const UNITS_PER_TOKEN: u64 = 60_000_000;

/// A token bucket in integer units (1/60,000,000 of a token):
/// `rate_per_min` sustained, `burst` at once.
#[derive(Debug, Clone)]
pub(super) struct TokenBucket {
    level: u64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens.
    pub(super) fn full(now: Instant, burst: u64) -> Self {
        Self { level: burst.saturating_mul(UNITS_PER_TOKEN), at: now }
    }

    /// Take one token; `false` (nothing taken) when none is left.
    pub(super) fn take(&mut self, now: Instant, rate_per_min: u64, burst: u64) -> bool {
        let elapsed_us = u64::try_from((now - self.at).as_micros()).unwrap_or(u64::MAX);
        self.at = self.at.max(now);
        let cap = burst.saturating_mul(UNITS_PER_TOKEN);
        self.level = self.level.saturating_add(elapsed_us.saturating_mul(rate_per_min)).min(cap);
        if self.level < UNITS_PER_TOKEN {
            return false;
        }
        self.level -= UNITS_PER_TOKEN;
        true
    }
}

/// What gossip knows about one connected peer.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    /// The node at the other end (back-offs are kept per node, so they
    /// survive a reconnection on a new `ConnId`).
    pub(super) node: NodeId,
    /// Topics the peer announced with SUBSCRIBE (at most one per `Topic`).
    pub(super) topics: BTreeSet<Topic>,
    /// Penalty points; see the module docs.
    pub(super) penalty: u32,
    /// IHAVE messages received this heartbeat.
    pub(super) ihave_this_heartbeat: u32,
    /// Ids asked of this peer by IWANT this heartbeat.
    pub(super) iwant_ids_this_heartbeat: usize,
    /// Inbound frame budget.
    budget: TokenBucket,
}

impl Peer {
    pub(super) fn new(node: NodeId, now: Instant, burst: u64) -> Self {
        Self {
            node,
            topics: BTreeSet::new(),
            penalty: 0,
            ihave_this_heartbeat: 0,
            iwant_ids_this_heartbeat: 0,
            budget: TokenBucket::full(now, burst),
        }
    }

    /// Take one frame's worth from the token bucket; `false` when the peer
    /// is over its budget of `rate_per_s` sustained, `burst` at once.
    pub(super) fn take_token(&mut self, now: Instant, rate_per_s: u64, burst: u64) -> bool {
        self.budget.take(now, rate_per_s.saturating_mul(60), burst)
    }

    /// Whether the peer is subscribed to `topic`.
    pub(super) fn wants(&self, topic: Topic) -> bool {
        self.topics.contains(&topic)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::from_micros(1_000_000);
        let mut peer = Peer::new(NodeId::default(), t0, 3);
        assert!((0..3).all(|_| peer.take_token(t0, 10, 3)));
        assert!(!peer.take_token(t0, 10, 3), "burst exhausted");
        // 10 per second: one token every 100 ms.
        assert!(!peer.take_token(t0 + Duration::from_millis(99), 10, 3));
        assert!(peer.take_token(t0 + Duration::from_millis(100), 10, 3));
        // A long idle period refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| peer.take_token(later, 10, 3)));
        assert!(!peer.take_token(later, 10, 3));
    }
}
