//! Unit tests of one gossip machine against scripted peers.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

use super::cache::{MessageCache, SeenCache, SeenInsert, Serve};
use super::*;
use crate::ids::FileId;
use crate::wire::{Contact, KeywordEntry};

fn node(i: u64) -> NodeId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&i.to_be_bytes());
    NodeId(id)
}

fn file(name: &str, n: u64) -> Announcement {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&n.to_be_bytes());
    Announcement::File(KeywordEntry { file: FileId(id), name: name.to_owned(), size: 42 })
}

fn peer_announcement() -> Announcement {
    Announcement::Peer(Contact { id: node(77), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4000)) })
}

/// One machine, its clock, and helpers to script peers `ConnId(1..)`.
struct Rig {
    gossip: Gossip,
    now: Instant,
}

impl Rig {
    fn new(config: GossipConfig) -> Self {
        let now = Instant::from_micros(1_000_000);
        Self { gossip: Gossip::new(config, node(0), [7; 32], now).unwrap(), now }
    }

    /// A machine subscribed to Files with `peers` subscribed peers.
    fn subscribed(peers: u64) -> Self {
        let mut rig = Self::new(GossipConfig::default());
        for i in 1..=peers {
            rig.connect(i, true);
        }
        rig.input(GossipInput::Subscribe(Topic::Files));
        rig
    }

    fn drain(&mut self) -> Vec<GossipOutput> {
        std::iter::from_fn(|| self.gossip.poll_output()).collect()
    }

    fn input(&mut self, input: GossipInput) -> Vec<GossipOutput> {
        self.gossip.handle_input(self.now, input);
        self.drain()
    }

    fn from(&mut self, conn: u64, message: GossipMessage) -> Vec<GossipOutput> {
        self.input(GossipInput::Message { conn: ConnId(conn), message })
    }

    fn connect(&mut self, i: u64, subscribe: bool) {
        self.input(GossipInput::PeerConnected { conn: ConnId(i), node: node(i), implied: &[] });
        if subscribe {
            self.from(i, GossipMessage::Subscribe(Topic::Files));
        }
    }

    /// Advance to the next heartbeat and run it.
    fn heartbeat(&mut self) -> Vec<GossipOutput> {
        self.now = self.gossip.poll_timeout().expect("heartbeat armed");
        self.gossip.handle_timeout(self.now);
        self.drain()
    }

    fn mesh(&self) -> BTreeSet<ConnId> {
        self.gossip.mesh_peers(Topic::Files).collect()
    }
}

fn grafts(outputs: &[GossipOutput]) -> BTreeSet<ConnId> {
    sent(outputs, |m| matches!(m, GossipMessage::Graft(_)))
}

fn prunes(outputs: &[GossipOutput]) -> BTreeSet<ConnId> {
    sent(outputs, |m| matches!(m, GossipMessage::Prune { .. }))
}

fn sent(outputs: &[GossipOutput], kind: impl Fn(&GossipMessage) -> bool) -> BTreeSet<ConnId> {
    outputs
        .iter()
        .filter_map(|o| match o {
            GossipOutput::Send { conn, message } if kind(message) => Some(*conn),
            _ => None,
        })
        .collect()
}

fn delivered(outputs: &[GossipOutput]) -> Vec<MessageId> {
    outputs
        .iter()
        .filter_map(|o| match o {
            GossipOutput::Event(GossipEvent::Delivered { id, .. }) => Some(*id),
            _ => None,
        })
        .collect()
}

/// A rig with eight peers, all of them and us subscribed to `topics`.
fn subscribed_rig(config: GossipConfig, topics: &[Topic]) -> Rig {
    let mut rig = Rig::new(config);
    for i in 1..=8 {
        rig.connect(i, false);
        for &topic in topics {
            rig.from(i, GossipMessage::Subscribe(topic));
        }
    }
    for &topic in topics {
        rig.input(GossipInput::Subscribe(topic));
    }
    rig
}

/// Whether a publish was forwarded to anyone.
fn relayed(outputs: &[GossipOutput]) -> bool {
    !sent(outputs, |m| matches!(m, GossipMessage::Publish { .. })).is_empty()
}

fn contact_of(origin: u64) -> Contact {
    Contact { id: node(origin), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4000)) }
}

fn publish_from(origin: u64, seq: u64, payload: Announcement) -> GossipMessage {
    GossipMessage::Publish { topic: Topic::Files, origin: node(origin), seq, payload }
}

#[test]
fn default_config_is_valid_and_inconsistent_degrees_are_not() {
    GossipConfig::default().validate().unwrap();
    let bad = GossipConfig { mesh_degree_low: 7, ..GossipConfig::default() };
    assert!(bad.validate().is_err());
    let bad = GossipConfig { mesh_degree_high: 5, ..GossipConfig::default() };
    assert!(bad.validate().is_err());
    let bad = GossipConfig { message_cache_gossip_heartbeats: 6, ..GossipConfig::default() };
    assert!(bad.validate().is_err());
    let bad = GossipConfig { seen_ttl_ms: 1000, ..GossipConfig::default() };
    assert!(bad.validate().is_err(), "seen cache shorter than the message cache");
    assert!(Gossip::new(bad, node(0), [0; 32], Instant::ZERO).is_err());
}

#[test]
fn subscribing_grafts_d_peers_and_tells_everyone() {
    let mut rig = Rig::new(GossipConfig::default());
    for i in 1..=10 {
        rig.connect(i, true);
    }
    rig.connect(11, false);
    let out = rig.input(GossipInput::Subscribe(Topic::Files));
    assert_eq!(sent(&out, |m| *m == GossipMessage::Subscribe(Topic::Files)).len(), 11);
    let grafted = grafts(&out);
    assert_eq!(grafted.len(), 6);
    assert!(!grafted.contains(&ConnId(11)), "only subscribers are grafted");
    assert_eq!(rig.mesh(), grafted);
    // A peer connecting later is told all our subscriptions in one frame.
    rig.input(GossipInput::Subscribe(Topic::Peers));
    let out = rig.input(GossipInput::PeerConnected { conn: ConnId(12), node: node(12), implied: &[] });
    assert_eq!(out.len(), 1, "{out:?}");
    let all = GossipMessage::Subscriptions(vec![Topic::Peers, Topic::Files]);
    assert_eq!(sent(&out, |m| *m == all), BTreeSet::from([ConnId(12)]));
}

/// Topics the handshake implies (Shoal's three) are not announced: a new
/// peer starts subscribed to them, nothing is sent when ours are the same,
/// and only the difference goes on the wire otherwise.
#[test]
fn implied_topics_go_without_saying() {
    const IMPLIED: &[Topic] = &[Topic::Peers, Topic::Files];
    let mut rig = Rig::new(GossipConfig::default());
    rig.input(GossipInput::Subscribe(Topic::Peers));
    rig.input(GossipInput::Subscribe(Topic::Files));
    let out = rig.input(GossipInput::PeerConnected { conn: ConnId(1), node: node(1), implied: IMPLIED });
    assert!(sent(&out, |_| true).is_empty(), "same topics: nothing to say, {out:?}");
    // The peer counts as a Files subscriber at once: the heartbeat grafts it.
    assert_eq!(grafts(&rig.heartbeat()), BTreeSet::from([ConnId(1)]));

    // Subscribed beyond the implied set, and not to one of it.
    rig.input(GossipInput::Subscribe(Topic::Swarm));
    rig.input(GossipInput::Unsubscribe(Topic::Peers));
    let out = rig.input(GossipInput::PeerConnected { conn: ConnId(2), node: node(2), implied: IMPLIED });
    assert_eq!(sent(&out, |m| *m == GossipMessage::Subscriptions(vec![Topic::Swarm])), BTreeSet::from([ConnId(2)]));
    assert_eq!(sent(&out, |m| *m == GossipMessage::Unsubscribe(Topic::Peers)), BTreeSet::from([ConnId(2)]));
    assert_eq!(sent(&out, |_| true).len(), 1, "only to the new peer");
}

/// A `Subscriptions` frame subscribes the peer to each topic; one with
/// more than `SUBSCRIPTIONS_MAX` topics is a violation.
#[test]
fn a_subscriptions_frame_counts_for_every_topic_and_is_bounded() {
    let mut rig = Rig::new(GossipConfig::default());
    rig.input(GossipInput::Subscribe(Topic::Files));
    rig.input(GossipInput::Subscribe(Topic::Swarm));
    rig.connect(1, false);
    rig.from(1, GossipMessage::Subscriptions(vec![Topic::Peers, Topic::Swarm]));
    rig.heartbeat();
    assert!(rig.gossip.mesh_peers(Topic::Swarm).any(|c| c == ConnId(1)), "grafted for Swarm");
    assert!(!rig.gossip.mesh_peers(Topic::Files).any(|c| c == ConnId(1)), "not for Files");
    rig.connect(2, false);
    rig.from(2, GossipMessage::Subscriptions(vec![Topic::Swarm; SUBSCRIPTIONS_MAX + 1]));
    assert_eq!(rig.gossip.counters().invalid, 1);
    assert!(rig.gossip.penalty(ConnId(2)).is_some_and(|p| p > 0));
}

/// Random connects, disconnects, GRAFTs, PRUNEs and (un)subscriptions from
/// peers: after every heartbeat the mesh is within [D_lo, D_hi], or holds
/// every eligible peer when there are fewer than D_lo; it never exceeds
/// D_hi, even between heartbeats.
#[test]
fn mesh_stays_within_bounds_after_every_heartbeat() {
    let config = GossipConfig::default();
    for seed in 0..20u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut rig = Rig::new(config.clone());
        rig.input(GossipInput::Subscribe(Topic::Files));
        let mut connected: BTreeSet<u64> = BTreeSet::new();
        let mut subscribed: BTreeSet<u64> = BTreeSet::new();
        let mut next = 1u64;
        for _round in 0..60 {
            for _op in 0..rng.random_range(0..8) {
                match rng.random_range(0..6) {
                    0 | 1 => {
                        rig.connect(next, true);
                        connected.insert(next);
                        subscribed.insert(next);
                        next += 1;
                    }
                    2 if !connected.is_empty() => {
                        let i = *connected.iter().nth(rng.random_range(0..connected.len())).unwrap();
                        rig.input(GossipInput::PeerDisconnected { conn: ConnId(i) });
                        connected.remove(&i);
                        subscribed.remove(&i);
                    }
                    3 if !subscribed.is_empty() => {
                        let i = *subscribed.iter().nth(rng.random_range(0..subscribed.len())).unwrap();
                        rig.from(i, GossipMessage::Graft(Topic::Files));
                    }
                    4 if !subscribed.is_empty() => {
                        let i = *subscribed.iter().nth(rng.random_range(0..subscribed.len())).unwrap();
                        let backoff_s = rng.random_range(0..5);
                        rig.from(i, GossipMessage::Prune { topic: Topic::Files, backoff_s, peers: vec![] });
                    }
                    5 if !connected.is_empty() => {
                        let i = *connected.iter().nth(rng.random_range(0..connected.len())).unwrap();
                        if subscribed.remove(&i) {
                            rig.from(i, GossipMessage::Unsubscribe(Topic::Files));
                        } else {
                            rig.from(i, GossipMessage::Subscribe(Topic::Files));
                            subscribed.insert(i);
                        }
                    }
                    _ => {}
                }
                assert!(rig.mesh().len() <= config.mesh_degree_high, "seed {seed}: mesh over D_hi between heartbeats");
            }
            rig.heartbeat();
            let mesh = rig.mesh();
            let now = rig.now;
            let eligible = subscribed.iter().filter(|&&i| !rig.gossip.in_backoff(now, Topic::Files, node(i))).count();
            assert!(mesh.len() <= config.mesh_degree_high, "seed {seed}: mesh of {} over D_hi", mesh.len());
            assert!(
                mesh.len() >= config.mesh_degree_low.min(eligible),
                "seed {seed}: mesh of {} with {eligible} eligible peers",
                mesh.len()
            );
            for conn in &mesh {
                assert!(subscribed.contains(&conn.0), "seed {seed}: mesh holds a non-subscriber");
            }
        }
    }
}

#[test]
fn grafts_beyond_d_hi_are_refused_with_prune() {
    let mut rig = Rig::subscribed(20);
    let mut refused = BTreeSet::new();
    for i in 1..=20 {
        refused.extend(prunes(&rig.from(i, GossipMessage::Graft(Topic::Files))));
    }
    assert_eq!(rig.mesh().len(), 12);
    assert_eq!(refused.len(), 8);
    assert!(rig.mesh().is_disjoint(&refused));
}

#[test]
fn prune_backoff_is_respected_in_both_directions() {
    let mut rig = Rig::subscribed(6);
    assert_eq!(rig.mesh().len(), 6);
    // Two mesh peers prune us for 10 s: mesh 4 < D_lo, but they are the
    // only other subscribers, so no heartbeat may graft them before 10 s.
    let pruned_at = rig.now;
    for i in [1, 2] {
        rig.from(i, GossipMessage::Prune { topic: Topic::Files, backoff_s: 10, peers: vec![] });
    }
    assert_eq!(rig.mesh().len(), 4);
    loop {
        let out = rig.heartbeat();
        if rig.now < pruned_at + Duration::from_secs(10) {
            assert!(grafts(&out).is_empty(), "grafted during back-off at {:?}", rig.now);
        } else {
            assert_eq!(grafts(&out), BTreeSet::from([ConnId(1), ConnId(2)]), "re-grafted after back-off");
            break;
        }
    }
    // The other direction: we pruned peer 3 (unsubscribe), it grafts
    // right back: refused with PRUNE and penalised.
    rig.input(GossipInput::Unsubscribe(Topic::Files));
    rig.input(GossipInput::Subscribe(Topic::Files));
    assert!(rig.gossip.in_backoff(rig.now, Topic::Files, node(3)));
    let out = rig.from(3, GossipMessage::Graft(Topic::Files));
    assert_eq!(prunes(&out), BTreeSet::from([ConnId(3)]));
    assert!(!rig.mesh().contains(&ConnId(3)));
    assert_eq!(rig.gossip.penalty(ConnId(3)), Some(GossipConfig::default().penalty_graft_in_backoff));
    assert_eq!(rig.gossip.counters().graft_in_backoff, 1);
}

#[test]
fn huge_backoffs_from_peers_are_clamped() {
    let mut rig = Rig::subscribed(6);
    rig.from(1, GossipMessage::Prune { topic: Topic::Files, backoff_s: u32::MAX, peers: vec![] });
    let max = u64::from(GossipConfig::default().prune_backoff_s_max);
    assert!(rig.gossip.in_backoff(rig.now + Duration::from_secs(max - 1), Topic::Files, node(1)));
    assert!(!rig.gossip.in_backoff(rig.now + Duration::from_secs(max), Topic::Files, node(1)));
}

#[test]
fn a_message_is_delivered_once_and_forwarded_to_the_mesh() {
    let mut rig = Rig::subscribed(8);
    let mesh = rig.mesh();
    let source = *mesh.first().unwrap();
    let out = rig.from(source.0, publish_from(50, 1, file("a.txt", 1)));
    assert_eq!(delivered(&out).len(), 1);
    let forwarded = sent(&out, |m| matches!(m, GossipMessage::Publish { .. }));
    let expected: BTreeSet<ConnId> = mesh.iter().copied().filter(|&c| c != source).collect();
    assert_eq!(forwarded, expected, "to the mesh except the source");
    // The same message from another peer is a duplicate: not delivered,
    // not forwarded.
    let out = rig.from(8, publish_from(50, 1, file("a.txt", 1)));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(rig.gossip.counters().duplicates, 1);
    // The origin is never sent its own message.
    let origin = *mesh.last().unwrap();
    let out = rig.from(source.0, publish_from(origin.0, 9, file("b.txt", 2)));
    assert!(!sent(&out, |m| matches!(m, GossipMessage::Publish { .. })).contains(&origin));
}

#[test]
fn seen_cache_expires_after_its_ttl() {
    let mut rig = Rig::subscribed(8);
    let first = delivered(&rig.from(1, publish_from(50, 1, file("a.txt", 1))));
    assert_eq!(first.len(), 1);
    let ttl = Duration::from_millis(GossipConfig::default().seen_ttl_ms);
    let seen_at = rig.now;
    while rig.now < seen_at + ttl - Duration::from_secs(1) {
        rig.heartbeat();
    }
    assert!(delivered(&rig.from(1, publish_from(50, 1, file("a.txt", 1)))).is_empty(), "still inside the TTL");
    while rig.now < seen_at + ttl {
        rig.heartbeat();
    }
    assert_eq!(delivered(&rig.from(1, publish_from(50, 1, file("a.txt", 1)))), first, "forgotten after the TTL");
}

#[test]
fn seen_cache_is_bounded_and_evicts_the_oldest() {
    let mut seen = SeenCache::new(Duration::from_secs(60), 2);
    let t = Instant::from_micros(5);
    let id = |b: u8| MessageId([b; 32]);
    assert_eq!(seen.insert(t, id(1)), SeenInsert::Fresh { evicted: 0 });
    assert_eq!(seen.insert(t, id(2)), SeenInsert::Fresh { evicted: 0 });
    assert_eq!(seen.insert(t, id(2)), SeenInsert::Duplicate);
    assert_eq!(seen.insert(t, id(3)), SeenInsert::Fresh { evicted: 1 });
    assert_eq!(seen.len(), 2);
    assert!(!seen.contains(t, &id(1)), "oldest evicted");
    assert!(seen.contains(t, &id(2)) && seen.contains(t, &id(3)));
    let later = t + Duration::from_secs(60);
    assert!(!seen.contains(later, &id(3)), "expired at the TTL");
    seen.expire(later);
    assert_eq!(seen.len(), 0);
}

#[test]
fn message_cache_windows_and_retransmission_limit() {
    let mut cache = MessageCache::new(3, 2, 100);
    let id = |b: u8| MessageId([b; 32]);
    let message = || super::cache::CachedMessage::new(Topic::Files, node(1), 1, file("x", 1));
    cache.put(id(1), message());
    cache.shift();
    cache.put(id(2), message());
    assert_eq!(cache.gossip_ids(Topic::Files), vec![id(2), id(1)]);
    assert!(cache.gossip_ids(Topic::Swarm).is_empty());
    cache.shift();
    assert_eq!(cache.gossip_ids(Topic::Files), vec![id(2)], "only the 2 newest windows are advertised");
    assert!(cache.contains(&id(1)), "but 3 are kept");
    cache.shift();
    assert!(!cache.contains(&id(1)));
    for _ in 0..3 {
        assert!(matches!(cache.serve(&id(2), ConnId(9), 3), Serve::Message(_)));
    }
    assert_eq!(cache.serve(&id(2), ConnId(9), 3), Serve::RetransmissionLimit);
    assert!(matches!(cache.serve(&id(2), ConnId(8), 3), Serve::Message(_)), "the limit is per peer");
    assert_eq!(cache.serve(&id(1), ConnId(8), 3), Serve::Missing);

    let mut small = MessageCache::new(3, 2, 2);
    assert_eq!(small.put(id(1), message()), 0);
    small.shift();
    assert_eq!(small.put(id(2), message()), 0);
    assert_eq!(small.put(id(3), message()), 1);
    assert!(!small.contains(&id(1)) && small.contains(&id(2)) && small.contains(&id(3)));
}

#[test]
fn ihave_gossip_goes_to_non_mesh_peers_and_iwant_is_served() {
    let spec_only = GossipConfig { gossip_to_mesh_peers: false, ..GossipConfig::default() };
    let mut rig = Rig::new(spec_only);
    for i in 1..=12 {
        rig.connect(i, true);
    }
    rig.input(GossipInput::Subscribe(Topic::Files));
    rig.heartbeat();
    let out = rig.input(GossipInput::Publish { topic: Topic::Files, payload: file("new.iso", 3) });
    let id = match out.last() {
        Some(GossipOutput::Event(GossipEvent::Published { id, peers, .. })) => {
            assert_eq!(*peers, rig.mesh().len());
            *id
        }
        other => panic!("{other:?}"),
    };
    let out = rig.heartbeat();
    let ihave = sent(&out, |m| matches!(m, GossipMessage::IHave { ids, .. } if ids == &vec![id]));
    assert!(!ihave.is_empty(), "gossip emitted");
    assert!(ihave.is_disjoint(&rig.mesh()), "IHAVE only outside the mesh (spec)");
    let asker = *ihave.first().unwrap();
    let out = rig.from(asker.0, GossipMessage::IWant { ids: vec![id, MessageId([0; 32])] });
    assert_eq!(sent(&out, |m| matches!(m, GossipMessage::Publish { .. })), BTreeSet::from([asker]));
    assert_eq!(rig.gossip.counters().iwant_missing, 1);
}

#[test]
fn mesh_peers_get_ihave_only_for_ids_they_did_not_send_us() {
    let mut rig = Rig::subscribed(8);
    let mesh = rig.mesh();
    let mut members = mesh.iter().copied();
    let (source, echo) = (members.next().unwrap(), members.next().unwrap());
    let out = rig.from(source.0, publish_from(50, 1, file("a.txt", 1)));
    let id = delivered(&out)[0];
    // A crossing copy from another mesh peer also proves it has the message.
    rig.from(echo.0, publish_from(50, 1, file("a.txt", 1)));
    let out = rig.heartbeat();
    let told = sent(&out, |m| matches!(m, GossipMessage::IHave { ids, .. } if ids == &vec![id]));
    let expected: BTreeSet<ConnId> = mesh.iter().copied().filter(|&c| c != source && c != echo).collect();
    assert!(told.is_superset(&expected), "mesh peers that may have missed the push are told");
    assert!(!told.contains(&source) && !told.contains(&echo), "peers that sent it are not");
}

#[test]
fn ihave_of_unseen_ids_is_answered_by_one_iwant() {
    let mut rig = Rig::subscribed(8);
    let unseen = MessageId([5; 32]);
    let out = rig.from(1, GossipMessage::IHave { topic: Topic::Files, ids: vec![unseen, unseen] });
    assert_eq!(out, vec![GossipOutput::Send { conn: ConnId(1), message: GossipMessage::IWant { ids: vec![unseen] } }]);
    // Another peer advertising it within the follow-up time is not asked.
    assert!(rig.from(2, GossipMessage::IHave { topic: Topic::Files, ids: vec![unseen] }).is_empty());
    // Ids we have seen are never requested.
    delivered(&rig.from(3, publish_from(50, 1, file("a.txt", 1))));
    let Some(GossipOutput::Event(GossipEvent::Delivered { id: seen, .. })) =
        rig.from(3, publish_from(50, 2, file("b.txt", 2))).pop()
    else {
        panic!("not delivered")
    };
    assert!(rig.from(4, GossipMessage::IHave { topic: Topic::Files, ids: vec![seen] }).is_empty());
    // More IHAVEs per heartbeat than allowed are ignored.
    let limit = GossipConfig::default().ihave_per_peer_per_heartbeat_max;
    for n in 0..limit + 3 {
        rig.from(5, GossipMessage::IHave { topic: Topic::Files, ids: vec![MessageId([n as u8 + 100; 32])] });
    }
    assert_eq!(rig.gossip.counters().ihave_ignored, 3);
}

#[test]
fn publishing_without_subscribing_uses_fanout_until_it_expires() {
    let mut rig = Rig::new(GossipConfig::default());
    for i in 1..=10 {
        rig.connect(i, true);
    }
    rig.connect(11, false);
    let out = rig.input(GossipInput::Publish { topic: Topic::Files, payload: file("a", 1) });
    let first = sent(&out, |m| matches!(m, GossipMessage::Publish { .. }));
    assert_eq!(first.len(), 6);
    assert!(!first.contains(&ConnId(11)));
    let out = rig.input(GossipInput::Publish { topic: Topic::Files, payload: file("b", 2) });
    assert_eq!(sent(&out, |m| matches!(m, GossipMessage::Publish { .. })), first, "same fanout peers");
    // Subscribing turns the fanout into the mesh (libp2p `join`).
    let mut joined = Rig::new(GossipConfig::default());
    for i in 1..=10 {
        joined.connect(i, true);
    }
    let fanout: BTreeSet<ConnId> =
        sent(&joined.input(GossipInput::Publish { topic: Topic::Files, payload: file("a", 1) }), |m| {
            matches!(m, GossipMessage::Publish { .. })
        });
    joined.input(GossipInput::Subscribe(Topic::Files));
    assert_eq!(joined.mesh(), fanout);
    // Unused fanout is dropped after its TTL.
    let published_at = rig.now;
    while rig.now < published_at + Duration::from_millis(GossipConfig::default().fanout_ttl_ms) {
        rig.heartbeat();
    }
    assert_eq!(rig.gossip.fanout_peers(Topic::Files).count(), 0);
}

#[test]
fn flooding_peer_is_pruned_then_disconnected() {
    let config = GossipConfig::default();
    let mut rig = Rig::subscribed(8);
    let flooder = *rig.mesh().first().unwrap();
    let mut outputs = Vec::new();
    let total = config.peer_messages_burst + u64::from(config.penalty_disconnect) + 20;
    for seq in 0..total {
        outputs.extend(rig.from(flooder.0, publish_from(50, seq, file("spam", seq))));
    }
    let c = *rig.gossip.counters();
    // Its SUBSCRIBE took one token of the burst.
    assert_eq!(c.delivered, config.peer_messages_burst - 1, "the rest of the burst is accepted");
    assert!(!rig.mesh().contains(&flooder), "graylisted out of the mesh");
    assert!(prunes(&outputs).contains(&flooder), "and told so");
    assert_eq!(c.graylisted, 1);
    let disconnects: Vec<&GossipOutput> =
        outputs.iter().filter(|o| matches!(o, GossipOutput::Disconnect { .. })).collect();
    assert_eq!(
        disconnects,
        vec![&GossipOutput::Disconnect { conn: flooder, reason: GoodbyeReason::ProtocolViolation }],
        "disconnected exactly once"
    );
    assert_eq!(c.rate_limited, u64::from(config.penalty_disconnect / config.penalty_over_rate));
    assert_eq!(c.delivered + c.rate_limited + c.unknown_conn, total, "later frames hit a forgotten connection");
    assert_eq!(c.unknown_conn, 21);
    assert_eq!(rig.gossip.penalty(flooder), None);
    // The next heartbeat refills the mesh from the honest peers.
    rig.heartbeat();
    assert!(rig.mesh().len() >= config.mesh_degree_low);
}

#[test]
fn invalid_messages_are_penalised_and_never_delivered() {
    let config = GossipConfig::default();
    let mut rig = Rig::subscribed(8);
    let bad = *rig.mesh().first().unwrap();
    // Wrong announcement for the topic.
    let out = rig.from(
        bad.0,
        GossipMessage::Publish { topic: Topic::Swarm, origin: node(50), seq: 1, payload: peer_announcement() },
    );
    assert!(delivered(&out).is_empty());
    assert_eq!(rig.gossip.penalty(bad), Some(config.penalty_invalid_message));
    // An unsafe file name.
    assert!(delivered(&rig.from(bad.0, publish_from(50, 2, file("../etc/passwd", 1)))).is_empty());
    assert!(!rig.mesh().contains(&bad), "graylisted at {} points", config.penalty_graylist);
    // A graylisted peer's valid messages are ignored too.
    assert!(delivered(&rig.from(bad.0, publish_from(50, 3, file("ok", 1)))).is_empty());
    assert_eq!(rig.gossip.counters().graylisted_ignored, 1);
    // But its invalid ones still count, up to the disconnect.
    let mut outputs = Vec::new();
    for seq in 10..20 {
        outputs.extend(rig.from(bad.0, publish_from(50, seq, file("a/b", 1))));
    }
    assert!(outputs.contains(&GossipOutput::Disconnect { conn: bad, reason: GoodbyeReason::ProtocolViolation }));
    assert_eq!(rig.gossip.penalty(bad), None, "forgotten once disconnected");
    let invalid_from_bad = rig.gossip.counters().invalid;
    assert_eq!(invalid_from_bad, u64::from(config.penalty_disconnect / config.penalty_invalid_message));
    // Over-long lists from two other peers.
    let others: Vec<u64> = (1..=8).filter(|&i| ConnId(i) != bad).collect();
    let (second, third) = (others[0], others[1]);
    let ids = vec![MessageId([1; 32]); config.ihave_ids_max + 1];
    rig.from(second, GossipMessage::IWant { ids: ids.clone() });
    rig.from(second, GossipMessage::IHave { topic: Topic::Files, ids });
    let contact = Contact { id: node(9), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)) };
    rig.from(third, GossipMessage::Prune { topic: Topic::Files, backoff_s: 1, peers: vec![contact; 17] });
    assert_eq!(rig.gossip.counters().invalid, invalid_from_bad + 3);
    // Penalties decay with heartbeats.
    let before = rig.gossip.penalty(ConnId(third)).unwrap();
    assert_eq!(before, config.penalty_invalid_message);
    rig.heartbeat();
    assert_eq!(rig.gossip.penalty(ConnId(third)), Some(before - config.penalty_decay_per_heartbeat));
}

#[test]
fn local_publishes_are_validated() {
    let mut rig = Rig::subscribed(8);
    let reject = |rig: &mut Rig, topic, payload| match rig.input(GossipInput::Publish { topic, payload }).as_slice() {
        [GossipOutput::Event(GossipEvent::PublishRejected { error, .. })] => error.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(reject(&mut rig, Topic::Peers, file("a", 1)), InvalidMessage::WrongTopic { topic: Topic::Peers });
    assert!(matches!(reject(&mut rig, Topic::Files, file("a/b", 1)), InvalidMessage::BadName { .. }));
    let tight = GossipConfig { message_bytes_max: 512, ..GossipConfig::default() };
    let entry = file(&"x".repeat(255), 1);
    check_message(Topic::Files, &node(1), 0, &entry, tight.message_bytes_max).unwrap();
    assert!(matches!(
        check_message(Topic::Files, &node(1), 0, &entry, 200),
        Err(InvalidMessage::TooLarge { max: 200, .. })
    ));
    assert_eq!(rig.gossip.counters().publish_rejected, 2);
    assert_eq!(rig.gossip.counters().published, 0);
}

#[test]
fn message_ids_bind_origin_sequence_topic_and_payload() {
    let base = check_message(Topic::Files, &node(1), 5, &file("a", 1), 1024).unwrap();
    assert_eq!(base, check_message(Topic::Files, &node(1), 5, &file("a", 1), 1024).unwrap(), "stable");
    assert_ne!(base, check_message(Topic::Files, &node(2), 5, &file("a", 1), 1024).unwrap());
    assert_ne!(base, check_message(Topic::Files, &node(1), 6, &file("a", 1), 1024).unwrap());
    assert_ne!(base, check_message(Topic::Files, &node(1), 5, &file("b", 1), 1024).unwrap());
    let swarm = |seeding| Announcement::Swarm {
        file: FileId([1; 32]),
        node: Contact { id: node(1), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)) },
        seeding,
    };
    assert_ne!(
        check_message(Topic::Swarm, &node(1), 5, &swarm(true), 1024).unwrap(),
        check_message(Topic::Swarm, &node(1), 5, &swarm(false), 1024).unwrap()
    );
}

#[test]
fn spurious_and_early_timeouts_change_nothing() {
    let mut rig = Rig::subscribed(8);
    let deadline = rig.gossip.poll_timeout().unwrap();
    let counters = *rig.gossip.counters();
    rig.gossip.handle_timeout(deadline - Duration::from_micros(1));
    rig.gossip.handle_timeout(rig.now);
    assert!(rig.drain().is_empty());
    assert_eq!(*rig.gossip.counters(), counters);
    assert_eq!(rig.gossip.poll_timeout(), Some(deadline));
    rig.heartbeat();
    rig.gossip.handle_timeout(rig.now);
    assert_eq!(rig.gossip.counters().heartbeats, counters.heartbeats + 1, "a second call at the same time is a no-op");
    assert_eq!(rig.gossip.poll_timeout(), Some(deadline + Duration::from_secs(1)));
}

#[test]
fn peers_beyond_the_limit_are_not_tracked() {
    let config = GossipConfig { peers_max: 2, ..GossipConfig::default() };
    let mut rig = Rig::new(config);
    for i in 1..=3 {
        rig.connect(i, true);
    }
    assert_eq!(rig.gossip.peer_count(), 2);
    assert_eq!(rig.gossip.counters().peers_rejected, 1);
    assert_eq!(rig.gossip.counters().unknown_conn, 1, "its SUBSCRIBE was ignored");
}

#[test]
fn file_announcements_feed_a_bounded_searchable_index() {
    let mut index = FileIndex::new(3, 2);
    let entry = |n: u64, name: &str| match file(name, n) {
        Announcement::File(e) => e,
        _ => unreachable!(),
    };
    assert_eq!(index.insert(entry(1, "Holiday-Photos_2024.tar")), 0);
    assert_eq!(index.insert(entry(2, "holiday video.mp4")), 0);
    assert_eq!(index.insert(entry(3, "work photos.zip")), 0);
    let names = |v: Vec<KeywordEntry>| v.into_iter().map(|e| e.name).collect::<Vec<_>>();
    assert_eq!(names(index.search("PHOTOS holiday")), vec!["Holiday-Photos_2024.tar"], "every word must match");
    assert_eq!(names(index.search("photos")), vec!["work photos.zip", "Holiday-Photos_2024.tar"], "newest first");
    assert_eq!(names(index.search("holiday")).len(), 2);
    assert!(index.search("").is_empty() && index.search("--").is_empty());
    assert!(index.search("phot").is_empty(), "whole tokens only");
    // Re-announcing refreshes; the bound evicts the oldest.
    assert_eq!(index.insert(entry(1, "holiday photos 2024.tar")), 0);
    assert_eq!(index.insert(entry(4, "music.flac")), 1);
    assert!(index.get(&FileId([0; 32])).is_none());
    assert_eq!(index.len(), 3);
    assert!(names(index.search("video")).is_empty(), "file 2 was the oldest");
    // results_max caps a search.
    index.insert(entry(5, "a photos"));
    assert_eq!(index.search("photos").len(), 2);

    // The machine indexes what it delivers and what it publishes.
    let mut rig = Rig::subscribed(8);
    rig.from(1, publish_from(50, 1, file("linux distro.iso", 10)));
    rig.input(GossipInput::Publish { topic: Topic::Files, payload: file("my linux notes.txt", 11) });
    rig.from(1, GossipMessage::Publish { topic: Topic::Peers, origin: node(50), seq: 2, payload: peer_announcement() });
    assert_eq!(names(rig.gossip.search("linux")), vec!["my linux notes.txt", "linux distro.iso"]);
    assert_eq!(rig.gossip.file_index().len(), 2);
}

#[test]
fn a_publish_with_no_known_subscriber_is_held_until_one_appears() {
    let config = GossipConfig { publish_pending_max: 1, ..GossipConfig::default() };
    let mut rig = Rig::new(config);
    rig.connect(1, false);
    rig.input(GossipInput::Subscribe(Topic::Peers));
    let out = rig.input(GossipInput::Publish { topic: Topic::Peers, payload: peer_announcement() });
    assert!(sent(&out, |m| matches!(m, GossipMessage::Publish { .. })).is_empty());
    // A second held publish pushes the first out of the one-slot queue.
    let second = Announcement::Peer(Contact { id: node(78), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)) });
    rig.input(GossipInput::Publish { topic: Topic::Peers, payload: second.clone() });
    assert_eq!(rig.gossip.counters().publish_no_peers, 2);
    assert_eq!(rig.gossip.counters().publish_pending_dropped, 1);
    assert!(
        rig.heartbeat().iter().all(|o| !matches!(o, GossipOutput::Send { message: GossipMessage::Publish { .. }, .. }))
    );
    let out = rig.from(1, GossipMessage::Subscribe(Topic::Peers));
    let published: Vec<&Announcement> = out
        .iter()
        .filter_map(|o| match o {
            GossipOutput::Send { conn: ConnId(1), message: GossipMessage::Publish { payload, .. } } => Some(payload),
            _ => None,
        })
        .collect();
    assert_eq!(published, vec![&second], "sent on the first SUBSCRIBE");
    assert_eq!(rig.gossip.counters().publish_sent_late, 1);
    assert!(rig.from(1, GossipMessage::Subscribe(Topic::Files)).is_empty(), "sent once");
}

/// Peers announcements beyond the relay budget are delivered but not
/// forwarded; the budget refills at `peers_relay_per_min`. Files
/// announcements are not budgeted.
#[test]
fn peers_announcements_are_relayed_within_the_budget() {
    let config = GossipConfig { peers_relay_burst: 3, peers_relay_per_min: 60, ..GossipConfig::default() };
    let mut rig = subscribed_rig(config, &[Topic::Peers, Topic::Files]);
    let source = *rig.gossip.mesh_peers(Topic::Peers).collect::<Vec<_>>().first().unwrap();
    let announce = |origin: u64| GossipMessage::Publish {
        topic: Topic::Peers,
        origin: node(origin),
        seq: 1,
        payload: Announcement::Peer(contact_of(origin)),
    };
    let mut pattern = Vec::new();
    for origin in 100..105 {
        let out = rig.from(source.0, announce(origin));
        assert_eq!(delivered(&out).len(), 1, "every announcement is delivered here");
        pattern.push(relayed(&out));
    }
    assert_eq!(pattern, [true, true, true, false, false], "the burst of 3, then nothing");
    assert_eq!(rig.gossip.counters().relay_budget_exceeded, 2);
    // Files announcements are broadcast whatever the Peers budget.
    let out = rig.from(source.0, publish_from(50, 1, file("a.txt", 1)));
    assert!(relayed(&out));
    // One token a second.
    rig.now += Duration::from_millis(1_000);
    assert!(relayed(&rig.from(source.0, announce(105))));
    assert!(!relayed(&rig.from(source.0, announce(106))));
}

/// Swarm notices have a budget of their own (`swarm_relay_per_min`): past
/// it they are delivered, not forwarded, and spending it leaves the Peers
/// budget whole.
#[test]
fn swarm_notices_are_relayed_within_their_own_budget() {
    let config =
        GossipConfig { swarm_relay_burst: 2, swarm_relay_per_min: 60, peers_relay_burst: 1, ..GossipConfig::default() };
    let mut rig = subscribed_rig(config, &[Topic::Swarm, Topic::Peers]);
    let source = *rig.gossip.mesh_peers(Topic::Swarm).collect::<Vec<_>>().first().unwrap();
    let notice = |origin: u64| GossipMessage::Publish {
        topic: Topic::Swarm,
        origin: node(origin),
        seq: 1,
        payload: Announcement::Swarm { file: FileId([7; 32]), node: contact_of(origin), seeding: false },
    };
    let mut pattern = Vec::new();
    for origin in 100..104 {
        let out = rig.from(source.0, notice(origin));
        assert_eq!(delivered(&out).len(), 1, "every notice is delivered here");
        pattern.push(relayed(&out));
    }
    assert_eq!(pattern, [true, true, false, false], "the burst of 2, then nothing");
    assert_eq!(rig.gossip.counters().relay_budget_exceeded, 2);
    let peer = GossipMessage::Publish {
        topic: Topic::Peers,
        origin: node(200),
        seq: 1,
        payload: Announcement::Peer(contact_of(200)),
    };
    let source = *rig.gossip.mesh_peers(Topic::Peers).collect::<Vec<_>>().first().unwrap();
    assert!(relayed(&rig.from(source.0, peer)), "the Peers budget is untouched");
    rig.now += Duration::from_millis(1_000);
    assert!(relayed(&rig.from(source.0, notice(104))), "one token a second");
}
