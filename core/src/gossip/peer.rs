//! Per-connection gossip state: the peer's topics, its inbound rate budget
//! and its penalty. The penalty is a much simplified GossipSub v1.1 peer
//! score (spec v1.1 §"Peer Scoring"): only the negative counters Shoal can
//! judge locally (invalid messages, flooding, GRAFT during back-off), with
//! linear decay, two thresholds (graylist, disconnect) and no positive terms.

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

/// A set of topics in one byte (a bit per [`Topic`] variant): a peer's
/// subscriptions, kept inline rather than in a tree node of their own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct TopicSet(u8);

impl TopicSet {
    fn bit(topic: Topic) -> u8 {
        // A fieldless enum of at most eight variants (SUBSCRIPTIONS_MAX).
        const _: () = assert!(super::SUBSCRIPTIONS_MAX <= 8, "a topic is one bit of a byte");
        1 << (topic as u8)
    }

    pub(super) fn insert(&mut self, topic: Topic) {
        self.0 |= Self::bit(topic);
    }

    pub(super) fn remove(&mut self, topic: Topic) {
        self.0 &= !Self::bit(topic);
    }

    pub(super) fn contains(self, topic: Topic) -> bool {
        self.0 & Self::bit(topic) != 0
    }
}

impl Extend<Topic> for TopicSet {
    fn extend<I: IntoIterator<Item = Topic>>(&mut self, topics: I) {
        for topic in topics {
            self.insert(topic);
        }
    }
}

/// What gossip knows about one connected peer.
///
/// The penalty decays and the per-heartbeat counters restart at every
/// heartbeat, but lazily: they are brought up to date ([`Peer::settle`])
/// when next read or changed, from the number of heartbeats since, so a
/// heartbeat does not touch every peer's (cold) state. Repeated saturating
/// decay by `d` over `n` heartbeats is one saturating decay by `n * d`, so
/// the values are the ones an eager loop would give.
#[derive(Debug, Clone)]
pub(super) struct Peer {
    /// The node at the other end (back-offs are kept per node, so they
    /// survive a reconnection on a new `ConnId`).
    pub(super) node: NodeId,
    /// Topics the peer announced with SUBSCRIBE (or the handshake implied).
    pub(super) topics: TopicSet,
    /// Penalty points as of heartbeat `settled`; see the module docs.
    penalty: u32,
    /// IHAVE messages received in heartbeat `settled`.
    ihave_this_heartbeat: u32,
    /// Ids asked of this peer by IWANT in heartbeat `settled`.
    iwant_ids_this_heartbeat: usize,
    /// The heartbeat (count of heartbeats run) the fields above are for.
    settled: u64,
    /// Inbound frame budget.
    budget: TokenBucket,
}

impl Peer {
    /// A peer connected during heartbeat `heartbeat`.
    pub(super) fn new(node: NodeId, now: Instant, burst: u64, heartbeat: u64) -> Self {
        Self {
            node,
            topics: TopicSet::default(),
            penalty: 0,
            ihave_this_heartbeat: 0,
            iwant_ids_this_heartbeat: 0,
            settled: heartbeat,
            budget: TokenBucket::full(now, burst),
        }
    }

    /// Penalty points at heartbeat `heartbeat`, forgiving `decay` points
    /// per heartbeat since the last change.
    pub(super) fn penalty(&self, heartbeat: u64, decay: u32) -> u32 {
        let elapsed = heartbeat.saturating_sub(self.settled);
        let forgiven = elapsed.saturating_mul(u64::from(decay));
        self.penalty.saturating_sub(u32::try_from(forgiven).unwrap_or(u32::MAX))
    }

    /// Bring the penalty and the per-heartbeat counters up to heartbeat
    /// `heartbeat`.
    fn settle(&mut self, heartbeat: u64, decay: u32) {
        if self.settled < heartbeat {
            self.penalty = self.penalty(heartbeat, decay);
            self.ihave_this_heartbeat = 0;
            self.iwant_ids_this_heartbeat = 0;
            self.settled = heartbeat;
        }
    }

    /// Add `points` at heartbeat `heartbeat`; the penalty before and after.
    pub(super) fn penalise(&mut self, heartbeat: u64, decay: u32, points: u32) -> (u32, u32) {
        self.settle(heartbeat, decay);
        let before = self.penalty;
        self.penalty = before.saturating_add(points);
        (before, self.penalty)
    }

    /// Count one IHAVE received in heartbeat `heartbeat`; how many this
    /// heartbeat, and the ids already asked of the peer in it.
    pub(super) fn count_ihave(&mut self, heartbeat: u64, decay: u32) -> (u32, usize) {
        self.settle(heartbeat, decay);
        self.ihave_this_heartbeat += 1;
        (self.ihave_this_heartbeat, self.iwant_ids_this_heartbeat)
    }

    /// Count `ids` asked of the peer by IWANT in heartbeat `heartbeat`.
    pub(super) fn count_iwant_ids(&mut self, heartbeat: u64, decay: u32, ids: usize) {
        self.settle(heartbeat, decay);
        self.iwant_ids_this_heartbeat += ids;
    }

    /// Take one frame's worth from the token bucket; `false` when the peer
    /// is over its budget of `rate_per_s` sustained, `burst` at once.
    pub(super) fn take_token(&mut self, now: Instant, rate_per_s: u64, burst: u64) -> bool {
        self.budget.take(now, rate_per_s.saturating_mul(60), burst)
    }

    /// Whether the peer is subscribed to `topic`.
    pub(super) fn wants(&self, topic: Topic) -> bool {
        self.topics.contains(topic)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::from_micros(1_000_000);
        let mut peer = Peer::new(NodeId::default(), t0, 3, 0);
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

    /// Decay settled late is the decay an eager per-heartbeat loop gives.
    #[test]
    fn a_lazily_settled_penalty_is_the_eagerly_decayed_one() {
        let mut peer = Peer::new(NodeId::default(), Instant::ZERO, 3, 10);
        assert_eq!(peer.penalise(10, 2, 7), (0, 7));
        assert_eq!(peer.count_ihave(10, 2), (1, 0));
        peer.count_iwant_ids(10, 2, 4);
        assert_eq!(peer.count_ihave(10, 2), (2, 4), "the same heartbeat");
        // Heartbeats 11 and 12 each forgive 2: 7 -> 5 -> 3.
        assert_eq!(peer.penalty(12, 2), 3);
        assert_eq!(peer.count_ihave(12, 2), (1, 0), "a new heartbeat, counters restart");
        assert_eq!(peer.penalise(13, 2, 1), (1, 2));
        assert_eq!(peer.penalty(1_000, 2), 0, "never below zero");
        assert_eq!(peer.penalty(u64::MAX, u32::MAX), 0);
    }
}
