//! The two message caches of GossipSub (spec v1.0 §"Message Cache"):
//! - [`SeenCache`]: ids of every message handled recently, so each is
//!   delivered and forwarded once (libp2p `duplicate_cache_time`);
//! - [`MessageCache`]: the full messages of the last few heartbeats, sliced
//!   by heartbeat, advertised by IHAVE and served on IWANT (libp2p
//!   `mcache.rs`: `history_length` windows, `history_gossip` advertised).
//!
//! Both are bounded: overflow evicts the oldest entry and reports it so the
//! machine can count it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use crate::ids::{ConnId, NodeId};
use crate::time::Instant;
use crate::wire::{Announcement, GossipMessage, MessageId, Topic};

/// Ids seen within the last `ttl`, at most `entries_max` of them.
#[derive(Debug)]
pub(super) struct SeenCache {
    /// Id -> when it was first seen.
    seen_at: BTreeMap<MessageId, Instant>,
    /// Insertion order. `now` never goes backwards and the TTL is fixed, so
    /// this is also expiry order: expiring pops from the front.
    order: VecDeque<(Instant, MessageId)>,
    ttl: Duration,
    entries_max: usize,
}

/// What [`SeenCache::insert`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SeenInsert {
    /// Already seen within the TTL.
    Duplicate,
    /// New; `evicted` older ids were dropped to make room.
    Fresh {
        /// Entries evicted by the size limit (not by expiry).
        evicted: usize,
    },
}

impl SeenCache {
    pub(super) fn new(ttl: Duration, entries_max: usize) -> Self {
        assert!(entries_max > 0, "seen cache needs room for one id");
        Self { seen_at: BTreeMap::new(), order: VecDeque::new(), ttl, entries_max }
    }

    /// Record `id` as seen at `now`, unless it already was.
    pub(super) fn insert(&mut self, now: Instant, id: MessageId) -> SeenInsert {
        self.expire(now);
        if self.seen_at.contains_key(&id) {
            return SeenInsert::Duplicate;
        }
        let mut evicted = 0;
        while self.seen_at.len() >= self.entries_max {
            let Some((_, old)) = self.order.pop_front() else { break };
            self.seen_at.remove(&old);
            evicted += 1;
        }
        self.seen_at.insert(id, now);
        self.order.push_back((now, id));
        SeenInsert::Fresh { evicted }
    }

    /// Whether `id` was seen within the TTL (expired entries may linger
    /// until the next `expire`, so check the time too).
    pub(super) fn contains(&self, now: Instant, id: &MessageId) -> bool {
        self.seen_at.get(id).is_some_and(|&at| at + self.ttl > now)
    }

    /// Forget ids older than the TTL.
    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.order.front() {
            if at + self.ttl > now {
                break;
            }
            self.order.pop_front();
            self.seen_at.remove(&id);
        }
        assert_eq!(self.seen_at.len(), self.order.len(), "seen map and order queue hold the same ids");
    }

    /// Ids currently held.
    pub(super) fn len(&self) -> usize {
        self.seen_at.len()
    }
}

/// One cached message and how often each peer was sent it by IWANT.
#[derive(Debug, Clone)]
pub(super) struct CachedMessage {
    pub(super) topic: Topic,
    pub(super) origin: NodeId,
    pub(super) seq: u64,
    pub(super) payload: Announcement,
    /// IWANT answers per connection (libp2p `gossip_retransimission`).
    served: BTreeMap<ConnId, u8>,
    /// Connections that sent us a copy: they certainly have it, so they
    /// need no IHAVE for it (at most one entry per peer).
    received_from: BTreeSet<ConnId>,
}

impl CachedMessage {
    pub(super) fn new(topic: Topic, origin: NodeId, seq: u64, payload: Announcement) -> Self {
        Self { topic, origin, seq, payload, served: BTreeMap::new(), received_from: BTreeSet::new() }
    }

    /// The wire form.
    pub(super) fn to_publish(&self) -> GossipMessage {
        GossipMessage::Publish { topic: self.topic, origin: self.origin, seq: self.seq, payload: self.payload.clone() }
    }
}

/// What [`MessageCache::serve`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Serve {
    /// Send this.
    Message(GossipMessage),
    /// Not (or no longer) cached.
    Missing,
    /// This peer already got it `iwant_retransmissions_max` times.
    RetransmissionLimit,
}

/// Messages of the last `heartbeats` heartbeats, at most `entries_max`.
#[derive(Debug)]
pub(super) struct MessageCache {
    messages: BTreeMap<MessageId, CachedMessage>,
    /// Ids by heartbeat window, newest first (libp2p `mcache.history`).
    windows: VecDeque<Vec<(Topic, MessageId)>>,
    heartbeats: usize,
    gossip_heartbeats: usize,
    entries_max: usize,
}

impl MessageCache {
    pub(super) fn new(heartbeats: usize, gossip_heartbeats: usize, entries_max: usize) -> Self {
        assert!(heartbeats > 0, "message cache needs one window");
        assert!(gossip_heartbeats <= heartbeats, "cannot advertise uncached windows");
        let mut windows = VecDeque::with_capacity(heartbeats);
        windows.push_back(Vec::new());
        Self { messages: BTreeMap::new(), windows, heartbeats, gossip_heartbeats, entries_max }
    }

    /// Cache a message in the current window. Returns how many older
    /// messages were evicted to stay within `entries_max`.
    pub(super) fn put(&mut self, id: MessageId, message: CachedMessage) -> usize {
        if self.messages.contains_key(&id) {
            return 0;
        }
        let mut evicted = 0;
        while self.messages.len() >= self.entries_max {
            // The oldest window's first id is the oldest message.
            let Some(oldest) = self.windows.iter_mut().rev().find(|w| !w.is_empty()) else { break };
            let (_, old) = oldest.remove(0);
            self.messages.remove(&old);
            evicted += 1;
        }
        let topic = message.topic;
        self.messages.insert(id, message);
        if let Some(current) = self.windows.front_mut() {
            current.push((topic, id));
        }
        evicted
    }

    /// The cached message `id`.
    pub(super) fn get(&self, id: &MessageId) -> Option<&CachedMessage> {
        self.messages.get(id)
    }

    /// Whether `id` is cached.
    #[cfg(test)]
    pub(super) fn contains(&self, id: &MessageId) -> bool {
        self.messages.contains_key(id)
    }

    /// Answer an IWANT for `id` from `conn`, at most `retransmissions_max`
    /// times per peer (spec v1.1 §"Spam Protection Measures").
    pub(super) fn serve(&mut self, id: &MessageId, conn: ConnId, retransmissions_max: u8) -> Serve {
        let Some(message) = self.messages.get_mut(id) else { return Serve::Missing };
        let served = message.served.entry(conn).or_insert(0);
        if *served >= retransmissions_max {
            return Serve::RetransmissionLimit;
        }
        *served += 1;
        Serve::Message(message.to_publish())
    }

    /// Note that `conn` sent us a copy of `id`, if still cached.
    pub(super) fn note_sender(&mut self, id: &MessageId, conn: ConnId) {
        if let Some(message) = self.messages.get_mut(id) {
            message.received_from.insert(conn);
        }
    }

    /// Whether `conn` sent us a copy of `id`.
    pub(super) fn sent_by(&self, id: &MessageId, conn: ConnId) -> bool {
        self.messages.get(id).is_some_and(|m| m.received_from.contains(&conn))
    }

    /// Ids of `topic` from the `gossip_heartbeats` newest windows, to
    /// advertise in IHAVE.
    pub(super) fn gossip_ids(&self, topic: Topic) -> Vec<MessageId> {
        self.windows
            .iter()
            .take(self.gossip_heartbeats)
            .flat_map(|w| w.iter().filter(|(t, _)| *t == topic).map(|&(_, id)| id))
            .collect()
    }

    /// Start a new window, dropping the oldest beyond `heartbeats` (called
    /// at the end of every heartbeat, like libp2p `mcache.shift`).
    pub(super) fn shift(&mut self) {
        self.windows.push_front(Vec::new());
        while self.windows.len() > self.heartbeats {
            if let Some(old) = self.windows.pop_back() {
                for (_, id) in old {
                    self.messages.remove(&id);
                }
            }
        }
    }

    /// Messages currently held.
    pub(super) fn len(&self) -> usize {
        self.messages.len()
    }
}
