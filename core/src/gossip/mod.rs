//! GossipSub-style publish/subscribe (GossipSub v1.0 and v1.1 specs,
//! libp2p/specs `pubsub/gossipsub/`; parameters after rust-libp2p
//! `protocols/gossipsub/src/config.rs`) as a sans-IO state machine.
//!
//! Shoal uses three topics: [`Topic::Peers`] (a node joined),
//! [`Topic::Files`] (a file was shared; kept in a bounded [`FileIndex`] that
//! search consults beside the DHT keyword records) and [`Topic::Swarm`]
//! (a node started or stopped seeding a file).
//!
//! How a message travels:
//! - **eager push** along a per-topic mesh of degree D (5..=12, target 6),
//!   kept by a 1 s heartbeat with GRAFT/PRUNE and per-peer back-off
//!   (`mesh.rs`); a node that publishes without subscribing sends to
//!   *fanout* peers instead;
//! - **lazy push**: each heartbeat, the ids of the last few heartbeats'
//!   messages go in IHAVE to a few non-mesh peers, which fetch what they
//!   missed with IWANT from the message cache (`lazy.rs`, `cache.rs`);
//! - ids are content hashes (`validate.rs`); a TTL-bounded seen cache makes
//!   each message reach the application once;
//! - Files are broadcasts; Peers announcements and Swarm notices are
//!   sampled: a node relays them within a token budget
//!   (`peers_relay_per_min`, `swarm_relay_per_min` and their bursts), so a
//!   stream of joins costs each node O(1) frames whatever the network's
//!   size; Peers announcements are never IHAVEd;
//! - a new peer learns all our topics in one `Subscriptions` frame, or
//!   none at all for the topics the handshake implies;
//! - every peer has a rate budget and a penalty; invalid messages and
//!   floods cost points, a graylisted peer is pruned from every mesh and
//!   ignored, and past a second threshold it is disconnected (`peer.rs`).
//!
//! # Driving the machine
//! Call order (quinn-proto `Connection`, str0m): one `handle_*` call, then
//! [`Gossip::poll_output`] until `None`, then arm a timer for
//! [`Gossip::poll_timeout`]. `now` must never go backwards.
//! [`Gossip::handle_timeout`] may be called early or twice: it does nothing
//! before the deadline. The only timer is the heartbeat; every other expiry
//! (seen ids, back-offs, IWANT follow-ups, fanout) is swept by it, so
//! [`Gossip::poll_timeout`] is always `Some`.
//!
//! ```text
//! let mut gossip = Gossip::new(GossipConfig::default(), local_id, seed, now)?;
//! gossip.handle_input(now, GossipInput::PeerConnected { conn, node, implied: STANDARD_TOPICS });
//! while let Some(output) = gossip.poll_output() { /* send, close, notify */ }
//! timer.arm(gossip.poll_timeout());
//! // ... when the timer fires:
//! gossip.handle_timeout(now);
//! while let Some(output) = gossip.poll_output() { /* ... */ }
//! ```
//!
//! Peers are connections: the driver reports `PeerConnected` once the
//! handshake has authenticated the peer's [`NodeId`], and `PeerDisconnected`
//! when the connection is gone (for whatever reason, including a
//! [`GossipOutput::Disconnect`] this machine asked for).
//!
//! Not implemented from v1.1 (and why): peer exchange on PRUNE (Shoal
//! learns peers from the DHT and the Peers topic), outbound mesh quotas
//! (`PeerConnected` carries no direction yet), opportunistic grafting and
//! the positive score terms (no scoring beyond the penalty counter).

mod cache;
mod config;
mod counters;
mod index;
mod lazy;
mod mesh;
mod peer;
mod validate;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod network_tests;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;

use self::cache::{CachedMessage, MessageCache, SeenCache, SeenInsert};
pub use self::config::GossipConfig;
pub use self::counters::GossipCounters;
pub use self::index::{FileIndex, tokens};
use self::peer::{Peer, TokenBucket};
pub use self::validate::{InvalidMessage, check_message};
use crate::config::ConfigError;
use crate::ids::{ConnId, NodeId};
use crate::time::Instant;
use crate::vec_map::VecMap;
use crate::wire::{Announcement, GoodbyeReason, GossipMessage, KeywordEntry, MessageId, Topic};

/// Something that happened to the gossip machine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GossipInput {
    /// A connection to `node` is up (after the handshake).
    PeerConnected {
        /// The connection.
        conn: ConnId,
        /// The authenticated peer.
        node: NodeId,
        /// Topics the handshake implies both ends subscribe to (a Shoal
        /// node passes [`crate::wire::STANDARD_TOPICS`]; empty for plain
        /// GossipSub). The peer starts subscribed to them, and we announce
        /// only how our own topics differ.
        implied: &'static [Topic],
    },
    /// The connection is gone.
    PeerDisconnected {
        /// The connection.
        conn: ConnId,
    },
    /// A gossip frame arrived on `conn`.
    Message {
        /// The connection.
        conn: ConnId,
        /// The frame.
        message: GossipMessage,
    },
    /// The application wants messages of `topic`.
    Subscribe(Topic),
    /// The application no longer wants messages of `topic`.
    Unsubscribe(Topic),
    /// The application publishes `payload` on `topic` (subscribed or not).
    Publish {
        /// Topic.
        topic: Topic,
        /// What to announce.
        payload: Announcement,
    },
}

/// What the application learns.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GossipEvent {
    /// A message on a subscribed topic, delivered once per id.
    Delivered {
        /// Topic.
        topic: Topic,
        /// Content id.
        id: MessageId,
        /// Who published it.
        origin: NodeId,
        /// The origin's sequence number.
        seq: u64,
        /// The announcement.
        payload: Announcement,
        /// The connection the first copy came from.
        from: ConnId,
    },
    /// A local publish was sent (to `peers` peers; zero means it waits in
    /// the message cache for IHAVE).
    Published {
        /// Topic.
        topic: Topic,
        /// Content id.
        id: MessageId,
        /// Peers it was sent to.
        peers: usize,
    },
    /// A local publish was refused.
    PublishRejected {
        /// Topic.
        topic: Topic,
        /// Why.
        error: InvalidMessage,
    },
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GossipOutput {
    /// Send `message` on `conn` (as `Message::Gossip`).
    Send {
        /// The connection.
        conn: ConnId,
        /// The frame.
        message: GossipMessage,
    },
    /// Close `conn`; gossip has already forgotten it.
    Disconnect {
        /// The connection.
        conn: ConnId,
        /// Why (sent in the peer's `Goodbye`).
        reason: GoodbyeReason,
    },
    /// Tell the application.
    Event(GossipEvent),
}

/// Fanout peers of a topic published to without subscribing (spec v1.0
/// §"Fanout").
#[derive(Debug, Clone)]
struct Fanout {
    peers: BTreeSet<ConnId>,
    last_publish: Instant,
}

/// The gossip state machine of one node. See the module docs for the call
/// order.
#[derive(Debug)]
pub struct Gossip {
    config: GossipConfig,
    local: NodeId,
    rng: ChaCha8Rng,
    /// Tracked connections, at most `peers_max`.
    peers: VecMap<ConnId, Peer>,
    /// Our topics (at most one entry per `Topic` variant).
    subscriptions: BTreeSet<Topic>,
    /// Mesh per subscribed topic, within [D_lo, D_hi] after a heartbeat.
    mesh: BTreeMap<Topic, BTreeSet<ConnId>>,
    /// Fanout per unsubscribed topic we publish to.
    fanout: BTreeMap<Topic, Fanout>,
    /// No GRAFT to/from (topic, node) before this time; at most
    /// `backoff_entries_max`.
    backoff: BTreeMap<(Topic, NodeId), Instant>,
    seen: SeenCache,
    cache: MessageCache,
    /// Ids requested by IWANT -> when they may be requested again; at most
    /// `iwant_pending_max`.
    iwant_pending: BTreeMap<MessageId, Instant>,
    index: FileIndex,
    /// Local publishes that found no peer yet; at most `publish_pending_max`.
    unsent: VecDeque<MessageId>,
    next_seq: u64,
    next_heartbeat: Instant,
    /// Heartbeats run so far: the number of the current one, which
    /// peers' penalties and per-heartbeat counters are settled against.
    heartbeat: u64,
    /// Budget for relaying Peers announcements (`peers_relay_per_min`).
    peers_relay: TokenBucket,
    /// Budget for relaying Swarm notices (`swarm_relay_per_min`).
    swarm_relay: TokenBucket,
    outputs: VecDeque<GossipOutput>,
    counters: GossipCounters,
}

/// Topics in one [`GossipMessage::Subscriptions`]; more is a violation.
/// Shoal has three; room for a few more before the wire version changes.
pub const SUBSCRIPTIONS_MAX: usize = 8;

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

/// Getters.
impl Gossip {
    /// This node's id (the origin of its publishes).
    #[must_use]
    pub fn local_id(&self) -> NodeId {
        self.local
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &GossipConfig {
        &self.config
    }

    /// Counters so far.
    #[must_use]
    pub fn counters(&self) -> &GossipCounters {
        &self.counters
    }

    /// Whether the application subscribed to `topic`.
    #[must_use]
    pub fn is_subscribed(&self, topic: Topic) -> bool {
        self.subscriptions.contains(&topic)
    }

    /// Mesh peers of `topic`.
    pub fn mesh_peers(&self, topic: Topic) -> impl Iterator<Item = ConnId> + '_ {
        self.mesh.get(&topic).into_iter().flatten().copied()
    }

    /// Fanout peers of `topic`.
    pub fn fanout_peers(&self, topic: Topic) -> impl Iterator<Item = ConnId> + '_ {
        self.fanout.get(&topic).into_iter().flat_map(|f| f.peers.iter().copied())
    }

    /// Number of tracked peers.
    #[must_use]
    pub fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Penalty points of the peer on `conn`, if tracked.
    #[must_use]
    pub fn penalty(&self, conn: ConnId) -> Option<u32> {
        self.peers.get(&conn).map(|p| self.penalty_of(p))
    }

    /// Whether GRAFTs between us and `node` on `topic` are suspended at `now`.
    #[must_use]
    pub fn in_backoff(&self, now: Instant, topic: Topic, node: NodeId) -> bool {
        self.backoff.get(&(topic, node)).is_some_and(|&until| until > now)
    }

    /// The local index of file announcements.
    #[must_use]
    pub fn file_index(&self) -> &FileIndex {
        &self.index
    }

    /// Announced files whose name has every word of `words`, newest first.
    #[must_use]
    pub fn search(&self, words: &str) -> Vec<KeywordEntry> {
        self.index.search(words)
    }

    /// Message ids in the seen cache and messages in the message cache.
    #[must_use]
    pub fn cache_sizes(&self) -> (usize, usize) {
        (self.seen.len(), self.cache.len())
    }
}

/// Construction, `handle_*`, `poll_*`.
impl Gossip {
    /// A machine for node `local`, all randomness drawn from `seed`, its
    /// first heartbeat within one interval of `now` (at a random offset, so
    /// nodes started together do not all graft in the same instant).
    pub fn new(config: GossipConfig, local: NodeId, seed: [u8; 32], now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        use rand::RngExt;
        let first_heartbeat_ms = rng.random_range(0..config.heartbeat_interval_ms);
        // rust-libp2p starts sequence numbers at the wall clock so a restart
        // does not reuse them; the core has no clock, and drivers seed each
        // incarnation differently, so a random start does the same.
        let next_seq = rng.random::<u64>() >> 1;
        Ok(Self {
            seen: SeenCache::new(millis(config.seen_ttl_ms), config.seen_entries_max),
            cache: MessageCache::new(
                config.message_cache_heartbeats,
                config.message_cache_gossip_heartbeats,
                config.message_cache_entries_max,
            ),
            index: FileIndex::new(config.file_index_entries_max, config.search_results_max),
            local,
            rng,
            peers: VecMap::new(),
            subscriptions: BTreeSet::new(),
            mesh: BTreeMap::new(),
            fanout: BTreeMap::new(),
            backoff: BTreeMap::new(),
            iwant_pending: BTreeMap::new(),
            unsent: VecDeque::new(),
            next_seq,
            next_heartbeat: now + millis(first_heartbeat_ms),
            heartbeat: 0,
            peers_relay: TokenBucket::full(now, config.peers_relay_burst),
            swarm_relay: TokenBucket::full(now, config.swarm_relay_burst),
            outputs: VecDeque::new(),
            counters: GossipCounters::default(),
            config,
        })
    }

    /// Feed one input. Drain [`poll_output`](Self::poll_output) afterwards.
    pub fn handle_input(&mut self, now: Instant, input: GossipInput) {
        match input {
            GossipInput::PeerConnected { conn, node, implied } => self.on_connected(now, conn, node, implied),
            GossipInput::PeerDisconnected { conn } => self.forget_peer(conn),
            GossipInput::Message { conn, message } => self.on_message(now, conn, message),
            GossipInput::Subscribe(topic) => self.subscribe(now, topic),
            GossipInput::Unsubscribe(topic) => self.unsubscribe(now, topic),
            GossipInput::Publish { topic, payload } => self.publish(now, topic, payload),
        }
    }

    /// Run the heartbeat if its time has come; otherwise do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_heartbeat {
            return;
        }
        self.heartbeat(now);
        let interval = millis(self.config.heartbeat_interval_ms);
        // Keep the phase, but never schedule in the past after a late call.
        self.next_heartbeat += interval;
        if self.next_heartbeat <= now {
            self.next_heartbeat = now + interval;
        }
    }

    /// The next output, until `None`.
    pub fn poll_output(&mut self) -> Option<GossipOutput> {
        crate::outputs::pop_output(&mut self.outputs)
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_heartbeat)
    }
}

/// Internals shared by the submodules.
impl Gossip {
    fn push(&mut self, output: GossipOutput) {
        if self.outputs.len() >= self.config.output_queue_max {
            self.counters.outputs_dropped += 1;
            return;
        }
        self.outputs.push_back(output);
    }

    fn send(&mut self, conn: ConnId, message: GossipMessage) {
        self.push(GossipOutput::Send { conn, message });
    }

    fn event(&mut self, event: GossipEvent) {
        self.push(GossipOutput::Event(event));
    }

    /// A peer's penalty points now (see [`Peer`] on the lazy decay).
    fn penalty_of(&self, peer: &Peer) -> u32 {
        peer.penalty(self.heartbeat, self.config.penalty_decay_per_heartbeat)
    }

    /// Whether a peer may be grafted, gossiped to or published to: not
    /// graylisted.
    fn in_good_standing(&self, peer: &Peer) -> bool {
        self.penalty_of(peer) < self.config.penalty_graylist
    }

    fn is_graylisted(&self, conn: ConnId) -> bool {
        self.peers.get(&conn).is_some_and(|p| !self.in_good_standing(p))
    }

    /// `items` shuffled with the machine's RNG (ordered input, so the
    /// result depends only on the seed and the inputs).
    fn shuffled<T>(&mut self, mut items: Vec<T>) -> Vec<T> {
        items.shuffle(&mut self.rng);
        items
    }

    fn on_connected(&mut self, now: Instant, conn: ConnId, node: NodeId, implied: &[Topic]) {
        if self.peers.contains_key(&conn) {
            return;
        }
        if self.peers.len() >= self.config.peers_max {
            self.counters.peers_rejected += 1;
            return;
        }
        let mut peer = Peer::new(node, now, self.config.peer_messages_burst, self.heartbeat);
        peer.topics.extend(implied.iter().copied());
        self.peers.insert(conn, peer);
        // Spec v1.0 §"Subscriptions": announce our topics to each new peer,
        // all in one frame; the implied ones go without saying, and an
        // implied topic we left is withdrawn.
        let topics: Vec<Topic> = self.subscriptions.iter().copied().filter(|t| !implied.contains(t)).collect();
        if !topics.is_empty() {
            self.send(conn, GossipMessage::Subscriptions(topics));
        }
        let left: Vec<Topic> = implied.iter().copied().filter(|t| !self.subscriptions.contains(t)).collect();
        for topic in left {
            self.send(conn, GossipMessage::Unsubscribe(topic));
        }
        // A held publish can go as soon as one subscriber is known.
        if !implied.is_empty() && !self.unsent.is_empty() {
            self.flush_unsent(now);
        }
    }

    fn forget_peer(&mut self, conn: ConnId) {
        self.peers.remove(&conn);
        for mesh in self.mesh.values_mut() {
            mesh.remove(&conn);
        }
        for fanout in self.fanout.values_mut() {
            fanout.peers.remove(&conn);
        }
    }

    /// Add penalty points; graylist or disconnect at the thresholds.
    fn penalise(&mut self, now: Instant, conn: ConnId, points: u32) {
        let (graylist, disconnect) = (self.config.penalty_graylist, self.config.penalty_disconnect);
        let (heartbeat, decay) = (self.heartbeat, self.config.penalty_decay_per_heartbeat);
        let Some(peer) = self.peers.get_mut(&conn) else { return };
        let (before, after) = peer.penalise(heartbeat, decay, points);
        if after >= disconnect {
            self.counters.disconnected += 1;
            self.forget_peer(conn);
            self.push(GossipOutput::Disconnect { conn, reason: GoodbyeReason::ProtocolViolation });
        } else if before < graylist && after >= graylist {
            self.counters.graylisted += 1;
            self.prune_everywhere(now, conn);
        }
    }

    fn on_message(&mut self, now: Instant, conn: ConnId, message: GossipMessage) {
        let (rate, burst) = (self.config.peer_messages_per_s, self.config.peer_messages_burst);
        let Some(peer) = self.peers.get_mut(&conn) else {
            self.counters.unknown_conn += 1;
            return;
        };
        if !peer.take_token(now, rate, burst) {
            self.counters.rate_limited += 1;
            self.penalise(now, conn, self.config.penalty_over_rate);
            return;
        }
        if self.is_graylisted(conn) {
            // Spec v1.1 §"Graylisting": ignore everything from the peer.
            // Its invalid frames still cost points, or a peer sending only
            // garbage would stall at the graylist and never be disconnected.
            if self.violation(&message).is_some() {
                return self.invalid(now, conn);
            }
            self.counters.graylisted_ignored += 1;
            return;
        }
        match message {
            GossipMessage::Subscribe(topic) => self.on_subscribe(now, conn, [topic]),
            GossipMessage::Subscriptions(topics) if topics.len() > SUBSCRIPTIONS_MAX => self.invalid(now, conn),
            GossipMessage::Subscriptions(topics) => self.on_subscribe(now, conn, topics),
            GossipMessage::Unsubscribe(topic) => {
                if let Some(peer) = self.peers.get_mut(&conn) {
                    peer.topics.remove(topic);
                }
                if let Some(mesh) = self.mesh.get_mut(&topic) {
                    mesh.remove(&conn);
                }
                if let Some(fanout) = self.fanout.get_mut(&topic) {
                    fanout.peers.remove(&conn);
                }
            }
            GossipMessage::Graft(topic) => self.on_graft(now, conn, topic),
            GossipMessage::Prune { topic, backoff_s, peers } => self.on_prune(now, conn, topic, backoff_s, &peers),
            GossipMessage::Publish { topic, origin, seq, payload } => {
                self.on_publish(now, conn, topic, origin, seq, payload);
            }
            GossipMessage::IHave { topic, ids } => self.on_ihave(now, conn, topic, ids),
            GossipMessage::IWant { ids } => self.on_iwant(now, conn, &ids),
        }
    }

    fn on_subscribe(&mut self, now: Instant, conn: ConnId, topics: impl IntoIterator<Item = Topic>) {
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.topics.extend(topics);
        }
        // A held publish can go as soon as one subscriber is known, rather
        // than wait up to a heartbeat.
        if !self.unsent.is_empty() {
            self.flush_unsent(now);
        }
    }

    /// The first rule `message` breaks, if any: the checks every handler
    /// makes before acting, gathered for graylisted peers.
    fn violation(&self, message: &GossipMessage) -> Option<InvalidMessage> {
        let too_many = |count: usize, max: usize| (count > max).then_some(InvalidMessage::TooManyItems { count, max });
        match message {
            GossipMessage::Publish { topic, origin, seq, payload } => {
                check_message(*topic, origin, *seq, payload, self.config.message_bytes_max).err()
            }
            GossipMessage::IHave { ids, .. } | GossipMessage::IWant { ids } => {
                too_many(ids.len(), self.config.ihave_ids_max)
            }
            GossipMessage::Prune { peers, .. } => too_many(peers.len(), self.config.prune_peers_max),
            GossipMessage::Subscriptions(topics) => too_many(topics.len(), SUBSCRIPTIONS_MAX),
            GossipMessage::Subscribe(_) | GossipMessage::Unsubscribe(_) | GossipMessage::Graft(_) => None,
        }
    }

    /// A peer's invalid message: count and penalise.
    fn invalid(&mut self, now: Instant, conn: ConnId) {
        self.counters.invalid += 1;
        self.penalise(now, conn, self.config.penalty_invalid_message);
    }

    fn on_publish(
        &mut self,
        now: Instant,
        conn: ConnId,
        topic: Topic,
        origin: NodeId,
        seq: u64,
        payload: Announcement,
    ) {
        self.counters.messages_received += 1;
        let id = match check_message(topic, &origin, seq, &payload, self.config.message_bytes_max) {
            Ok(id) => id,
            Err(_) => return self.invalid(now, conn),
        };
        match self.seen.insert(now, id) {
            SeenInsert::Duplicate => {
                self.counters.duplicates += 1;
                self.cache.note_sender(&id, conn);
                return;
            }
            SeenInsert::Fresh { evicted } => self.counters.seen_evicted += evicted as u64,
        }
        if self.iwant_pending.remove(&id).is_some() {
            self.counters.delivered_after_iwant += 1;
        }
        if !self.subscriptions.contains(&topic) {
            // Spec v1.0: only subscribers relay; a stray copy is dropped.
            self.counters.unsubscribed_dropped += 1;
            return;
        }
        let c = &self.config;
        let within_budget = match topic {
            Topic::Peers => self.peers_relay.take(now, c.peers_relay_per_min, c.peers_relay_burst),
            Topic::Swarm => self.swarm_relay.take(now, c.swarm_relay_per_min, c.swarm_relay_burst),
            Topic::Files => true,
        };
        if !within_budget {
            // Over the relay budget: ours to read, not to spread.
            self.counters.relay_budget_exceeded += 1;
            self.counters.delivered += 1;
            return self.event(GossipEvent::Delivered { topic, id, origin, seq, payload, from: conn });
        }
        self.remember(id, CachedMessage::new(topic, origin, seq, payload.clone()));
        self.cache.note_sender(&id, conn);
        // Forward to the mesh, except the peer it came from and the origin
        // (spec v1.0 §"Message Processing").
        let targets: Vec<ConnId> = self
            .mesh_peers(topic)
            .filter(|&c| c != conn && self.peers.get(&c).is_some_and(|p| p.node != origin))
            .collect();
        let message = GossipMessage::Publish { topic, origin, seq, payload: payload.clone() };
        self.counters.forwarded += targets.len() as u64;
        for target in targets {
            self.send(target, message.clone());
        }
        self.counters.delivered += 1;
        self.event(GossipEvent::Delivered { topic, id, origin, seq, payload, from: conn });
    }

    /// Put a message in the message cache, and a file announcement in the
    /// file index.
    fn remember(&mut self, id: MessageId, message: CachedMessage) {
        if let Announcement::File(entry) = &message.payload {
            self.counters.file_index_evicted += self.index.insert(entry.clone()) as u64;
        }
        self.counters.message_cache_evicted += self.cache.put(id, message) as u64;
    }

    fn publish(&mut self, now: Instant, topic: Topic, payload: Announcement) {
        let seq = self.next_seq;
        let id = match check_message(topic, &self.local, seq, &payload, self.config.message_bytes_max) {
            Ok(id) => id,
            Err(error) => {
                self.counters.publish_rejected += 1;
                return self.event(GossipEvent::PublishRejected { topic, error });
            }
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        if let SeenInsert::Fresh { evicted } = self.seen.insert(now, id) {
            self.counters.seen_evicted += evicted as u64;
        }
        self.remember(id, CachedMessage::new(topic, self.local, seq, payload.clone()));
        let targets = self.publish_targets(now, topic);
        if targets.is_empty() {
            self.counters.publish_no_peers += 1;
            if self.unsent.len() >= self.config.publish_pending_max {
                self.counters.publish_pending_dropped += 1;
                self.unsent.pop_front();
            }
            if self.config.publish_pending_max > 0 {
                self.unsent.push_back(id);
            }
        }
        let message = GossipMessage::Publish { topic, origin: self.local, seq, payload };
        for &target in &targets {
            self.send(target, message.clone());
        }
        self.counters.published += 1;
        self.event(GossipEvent::Published { topic, id, peers: targets.len() });
    }

    /// Send held local publishes now that peers may be known (on a peer's
    /// SUBSCRIBE, and by the heartbeat after mesh repair).
    fn flush_unsent(&mut self, now: Instant) {
        for id in std::mem::take(&mut self.unsent) {
            let Some(message) = self.cache.get(&id) else {
                self.counters.publish_pending_dropped += 1;
                continue;
            };
            let (topic, wire) = (message.topic, message.to_publish());
            let targets = self.publish_targets(now, topic);
            if targets.is_empty() {
                self.unsent.push_back(id);
                continue;
            }
            self.counters.publish_sent_late += 1;
            for target in targets {
                self.send(target, wire.clone());
            }
        }
    }

    /// Where a local publish goes: the mesh when subscribed, else the
    /// fanout, created on first use (spec v1.0 §"Publishing").
    fn publish_targets(&mut self, now: Instant, topic: Topic) -> Vec<ConnId> {
        if self.subscriptions.contains(&topic) {
            let mesh: Vec<ConnId> = self.mesh_peers(topic).collect();
            if !mesh.is_empty() {
                return mesh;
            }
            // Subscribed but the mesh is not built yet (before the first
            // heartbeat): D random subscribers, as for fanout, not kept.
            return self.pick_peers(topic, self.config.mesh_degree, &BTreeSet::new());
        }
        let mut peers = self.fanout.remove(&topic).map(|f| f.peers).unwrap_or_default();
        if peers.len() < self.config.mesh_degree {
            let more = self.pick_peers(topic, self.config.mesh_degree - peers.len(), &peers);
            peers.extend(more);
        }
        let targets = peers.iter().copied().collect();
        self.fanout.insert(topic, Fanout { peers, last_publish: now });
        targets
    }

    /// Up to `count` random peers subscribed to `topic`, not graylisted and
    /// not in `exclude`.
    fn pick_peers(&mut self, topic: Topic, count: usize, exclude: &BTreeSet<ConnId>) -> Vec<ConnId> {
        let candidates: Vec<ConnId> = self
            .peers
            .iter()
            .filter(|(c, p)| p.wants(topic) && self.in_good_standing(p) && !exclude.contains(c))
            .map(|(&c, _)| c)
            .collect();
        let mut picked = self.shuffled(candidates);
        picked.truncate(count);
        picked
    }
}
