//! Many-node tests on the in-process harness ([`crate::testkit::Network`]):
//! 500 nodes, 8-20 random connections each (seeded), 10 ms one-way latency.
//! They measure delivery ratio, copies received per node per message and
//! delivery delay, print them (`-- --nocapture`) and assert the issue's
//! bounds. Nothing here depends on wall-clock time.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use sha2::{Digest, Sha256};

use super::*;
use crate::testkit::{Machine, Network, NodeIndex};
use crate::wire::KeywordEntry;

const NODES: usize = 500;
const DEGREE_MIN: usize = 8;
const DEGREE_MAX: usize = 20;
const LATENCY: Duration = Duration::from_millis(10);
/// Every tenth node does not subscribe: it relays nothing, and publishing
/// from one exercises fanout.
const UNSUBSCRIBED_EVERY: usize = 10;

/// A gossip machine adapted to the harness: connection `ConnId(i)` is the
/// link to node `i`.
struct SimNode {
    gossip: Gossip,
    outbox: VecDeque<(NodeIndex, GossipMessage)>,
    /// First deliveries: id -> simulated time.
    delivered: BTreeMap<MessageId, Instant>,
    published: Vec<MessageId>,
    disconnects: Vec<ConnId>,
}

impl SimNode {
    fn new(index: NodeIndex, seed: u64) -> Self {
        let mut node_seed = [0u8; 32];
        node_seed[..8].copy_from_slice(&seed.to_be_bytes());
        node_seed[8..16].copy_from_slice(&(index as u64).to_be_bytes());
        let gossip = Gossip::new(GossipConfig::default(), node_id(index), node_seed, Instant::ZERO).unwrap();
        Self {
            gossip,
            outbox: VecDeque::new(),
            delivered: BTreeMap::new(),
            published: Vec::new(),
            disconnects: Vec::new(),
        }
    }

    fn input(&mut self, now: Instant, input: GossipInput) {
        self.gossip.handle_input(now, input);
        self.drain(now);
    }

    /// Drain the machine after every mutation (the call-order contract).
    fn drain(&mut self, now: Instant) {
        while let Some(output) = self.gossip.poll_output() {
            match output {
                GossipOutput::Send { conn, message } => self.outbox.push_back((conn.0 as NodeIndex, message)),
                GossipOutput::Disconnect { conn, .. } => self.disconnects.push(conn),
                GossipOutput::Event(GossipEvent::Delivered { id, .. }) => {
                    let first = self.delivered.insert(id, now).is_none();
                    assert!(first, "message {id:?} delivered twice");
                }
                GossipOutput::Event(GossipEvent::Published { id, .. }) => self.published.push(id),
                GossipOutput::Event(GossipEvent::PublishRejected { error, .. }) => panic!("publish rejected: {error}"),
            }
        }
    }
}

impl Machine for SimNode {
    type Message = GossipMessage;
    fn handle_message(&mut self, now: Instant, from: NodeIndex, message: GossipMessage) {
        self.input(now, GossipInput::Message { conn: ConnId(from as u64), message });
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.gossip.handle_timeout(now);
        self.drain(now);
    }
    fn poll_transmit(&mut self) -> Option<(NodeIndex, GossipMessage)> {
        self.outbox.pop_front()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.gossip.poll_timeout()
    }
}

fn node_id(index: NodeIndex) -> NodeId {
    NodeId(Sha256::digest((index as u64).to_be_bytes()).into())
}

fn subscribes(index: NodeIndex) -> bool {
    index % UNSUBSCRIBED_EVERY != UNSUBSCRIBED_EVERY - 1
}

/// Random undirected graph: every node gets 8-20 distinct neighbours.
fn random_edges(rng: &mut ChaCha8Rng) -> BTreeSet<(NodeIndex, NodeIndex)> {
    let mut degree = vec![0usize; NODES];
    let mut edges = BTreeSet::new();
    for a in 0..NODES {
        let target = rng.random_range(DEGREE_MIN..=DEGREE_MAX);
        let mut attempts = 0;
        while degree[a] < target && attempts < 10_000 {
            attempts += 1;
            let b = rng.random_range(0..NODES);
            let edge = (a.min(b), a.max(b));
            if b == a || degree[b] >= DEGREE_MAX || edges.contains(&edge) {
                continue;
            }
            edges.insert(edge);
            degree[a] += 1;
            degree[b] += 1;
        }
    }
    let (lo, hi) = (degree.iter().min().copied(), degree.iter().max().copied());
    assert!(lo >= Some(DEGREE_MIN) && hi <= Some(DEGREE_MAX), "topology degrees {lo:?}..{hi:?}");
    edges
}

/// 500 connected, subscribed nodes after `warmup` of heartbeats.
fn build(seed: u64, warmup: Duration) -> (Network<SimNode>, ChaCha8Rng) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut net = Network::new(LATENCY);
    for i in 0..NODES {
        net.add(SimNode::new(i, seed));
    }
    for (a, b) in random_edges(&mut rng) {
        net.with_node(a, |m, now| {
            m.input(now, GossipInput::PeerConnected { conn: ConnId(b as u64), node: node_id(b), implied: &[] })
        });
        net.with_node(b, |m, now| {
            m.input(now, GossipInput::PeerConnected { conn: ConnId(a as u64), node: node_id(a), implied: &[] })
        });
    }
    for i in (0..NODES).filter(|&i| subscribes(i)) {
        net.with_node(i, |m, now| m.input(now, GossipInput::Subscribe(Topic::Files)));
        net.with_node(i, |m, now| m.input(now, GossipInput::Subscribe(Topic::Peers)));
    }
    net.run_for(warmup);
    (net, rng)
}

fn announcement(n: u64) -> Announcement {
    let mut file = [0u8; 32];
    file[..8].copy_from_slice(&n.to_be_bytes());
    Announcement::File(KeywordEntry { file: FileId(file), name: format!("holiday photos {n}.tar"), size: 1 << 20 })
}

use crate::ids::FileId;

/// Publish one announcement from `origin`; returns (id, publish time).
fn publish(net: &mut Network<SimNode>, origin: NodeIndex, n: u64) -> (MessageId, Instant) {
    let at = net.now();
    net.with_node(origin, |m, now| {
        m.input(now, GossipInput::Publish { topic: Topic::Files, payload: announcement(n) });
    });
    let id = net.node(origin).published.last().copied().expect("published");
    (id, at)
}

struct Measured {
    ratio_min: f64,
    ratio_mean: f64,
    copies_per_node_per_message: f64,
    delay_ms: Vec<f64>,
}

/// Delivery over live subscribers other than each message's origin, and
/// PUBLISH copies received per live subscriber per message.
fn measure(net: &Network<SimNode>, messages: &[(MessageId, Instant, NodeIndex)], copies_before: u64) -> Measured {
    let live: Vec<NodeIndex> = (0..NODES).filter(|&i| net.is_alive(i) && subscribes(i)).collect();
    let mut ratios = Vec::new();
    let mut delay_ms = Vec::new();
    for &(id, at, origin) in messages {
        let receivers: Vec<NodeIndex> = live.iter().copied().filter(|&i| i != origin).collect();
        let mut got = 0;
        for &i in &receivers {
            if let Some(&when) = net.node(i).delivered.get(&id) {
                got += 1;
                delay_ms.push((when - at).as_secs_f64() * 1000.0);
            }
        }
        ratios.push(got as f64 / receivers.len() as f64);
    }
    let copies: u64 =
        live.iter().map(|&i| net.node(i).gossip.counters().messages_received).sum::<u64>() - copies_before;
    delay_ms.sort_by(f64::total_cmp);
    Measured {
        ratio_min: ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratio_mean: ratios.iter().sum::<f64>() / ratios.len() as f64,
        copies_per_node_per_message: copies as f64 / (live.len() * messages.len()) as f64,
        delay_ms,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn report(name: &str, m: &Measured) {
    eprintln!(
        "[gossip {name}] delivery ratio min {:.4} mean {:.4}; copies/node/message {:.2}; \
         delay ms p50 {:.0} p90 {:.0} max {:.0} ({} deliveries)",
        m.ratio_min,
        m.ratio_mean,
        m.copies_per_node_per_message,
        percentile(&m.delay_ms, 50.0),
        percentile(&m.delay_ms, 90.0),
        m.delay_ms.last().copied().unwrap_or(f64::NAN),
        m.delay_ms.len(),
    );
}

fn total_received(net: &Network<SimNode>) -> u64 {
    (0..NODES)
        .filter(|&i| net.is_alive(i) && subscribes(i))
        .map(|i| net.node(i).gossip.counters().messages_received)
        .sum()
}

/// 20 messages from random origins (two of them non-subscribers, which
/// publish through fanout), 100 ms apart.
fn publish_batch(net: &mut Network<SimNode>, rng: &mut ChaCha8Rng) -> Vec<(MessageId, Instant, NodeIndex)> {
    let mut origins: Vec<NodeIndex> = (0..NODES).filter(|&i| net.is_alive(i) && subscribes(i)).collect();
    origins.shuffle(rng);
    origins.truncate(18);
    let mut fanout: Vec<NodeIndex> = (0..NODES).filter(|&i| net.is_alive(i) && !subscribes(i)).collect();
    fanout.shuffle(rng);
    origins.extend(fanout.into_iter().take(2));
    let mut messages = Vec::new();
    for (n, origin) in origins.into_iter().enumerate() {
        let (id, at) = publish(net, origin, n as u64);
        messages.push((id, at, origin));
        net.run_for(Duration::from_millis(100));
    }
    messages
}

#[test]
fn every_subscriber_receives_each_message_without_flooding() {
    let (mut net, mut rng) = build(7, Duration::from_secs(10));
    for i in (0..NODES).filter(|&i| subscribes(i)) {
        let mesh = net.node(i).gossip.mesh_peers(Topic::Files).count();
        assert!((5..=12).contains(&mesh), "node {i} mesh of {mesh} after warm-up");
    }
    let before = total_received(&net);
    let messages = publish_batch(&mut net, &mut rng);
    net.run_for(Duration::from_secs(5));
    let m = measure(&net, &messages, before);
    report("full network", &m);
    assert_eq!(m.ratio_min, 1.0, "a subscriber missed a message");
    // Eager push, not the lazy repair, must do most of the work: nine in
    // ten deliveries before any heartbeat could have sent an IHAVE.
    let heartbeat_ms = GossipConfig::default().heartbeat_interval_ms as f64;
    assert!(percentile(&m.delay_ms, 90.0) < heartbeat_ms, "p90 delay at or over one heartbeat");
    let bound = (GossipConfig::default().mesh_degree + 2) as f64;
    assert!(m.copies_per_node_per_message <= bound, "{} copies per node per message", m.copies_per_node_per_message);
    // Non-subscribers take no part in relaying.
    for i in (0..NODES).filter(|&i| !subscribes(i)) {
        assert!(net.node(i).delivered.is_empty(), "non-subscriber {i} got a delivery");
    }
}

#[test]
fn live_subscribers_receive_after_a_fifth_of_nodes_crash_silently() {
    let (mut net, mut rng) = build(11, Duration::from_secs(10));
    let mut victims: Vec<NodeIndex> = (0..NODES).collect();
    victims.shuffle(&mut rng);
    for &victim in &victims[..NODES / 5] {
        net.crash(victim);
    }
    let before = total_received(&net);
    let messages = publish_batch(&mut net, &mut rng);
    net.run_for(Duration::from_secs(5));
    let m = measure(&net, &messages, before);
    report("20% crashed", &m);
    assert!(m.ratio_min >= 0.99, "delivery ratio {} below 99%", m.ratio_min);
    // Eager push, not the lazy repair, must do most of the work: nine in
    // ten deliveries before any heartbeat could have sent an IHAVE.
    let heartbeat_ms = GossipConfig::default().heartbeat_interval_ms as f64;
    assert!(percentile(&m.delay_ms, 90.0) < heartbeat_ms, "p90 delay at or over one heartbeat");
    let bound = (GossipConfig::default().mesh_degree + 2) as f64;
    assert!(m.copies_per_node_per_message <= bound, "{} copies per node per message", m.copies_per_node_per_message);
}

/// Partition `group_size` random subscribers away, publish 5 messages in
/// the rest of the network over 0.5 s, heal 1 s after the first: every
/// isolated node must receive all 5 within three heartbeats of the heal,
/// the first copies through IWANT (the mesh push to them was lost).
fn partition_and_heal(seed: u64, group_size: usize) {
    let (mut net, mut rng) = build(seed, Duration::from_secs(10));
    let mut group: Vec<NodeIndex> = (0..NODES).filter(|&i| subscribes(i)).collect();
    group.shuffle(&mut rng);
    group.truncate(group_size);
    let isolated: BTreeSet<NodeIndex> = group.iter().copied().collect();
    let groups: Vec<(NodeIndex, u32)> = group.iter().map(|&i| (i, 1)).collect();
    net.partition(&groups);
    let mut messages = Vec::new();
    for n in 0..5 {
        let origin = loop {
            let o = rng.random_range(0..NODES);
            if !isolated.contains(&o) && subscribes(o) {
                break o;
            }
        };
        let (id, _) = publish(&mut net, origin, 100 + n);
        messages.push((id, origin));
        net.run_for(Duration::from_millis(100));
    }
    net.run_for(Duration::from_millis(500));
    for (id, origin) in &messages {
        let everyone_else = (0..NODES).filter(|&i| !isolated.contains(&i) && i != *origin && subscribes(i)).count();
        let got = (0..NODES).filter(|&i| net.node(i).delivered.contains_key(id)).count();
        assert_eq!(got, everyone_else, "the rest of the network got {id:?}");
    }
    let messages: Vec<MessageId> = messages.into_iter().map(|(id, _)| id).collect();
    net.heal();
    let healed_at = net.now();
    // "Within a few heartbeats": three.
    let deadline = healed_at + Duration::from_secs(3);
    let recovered =
        |n: &Network<SimNode>| isolated.iter().all(|&i| messages.iter().all(|id| n.node(i).delivered.contains_key(id)));
    let all = net.run_until_with(deadline, recovered);
    let net = &net;
    let mut after_heal_ms: Vec<f64> = isolated
        .iter()
        .flat_map(|&i| messages.iter().filter_map(move |id| net.node(i).delivered.get(id)))
        .map(|&t| (t - healed_at).as_secs_f64() * 1000.0)
        .collect();
    after_heal_ms.sort_by(f64::total_cmp);
    let via_iwant: u64 = isolated.iter().map(|&i| net.node(i).gossip.counters().delivered_after_iwant).sum();
    eprintln!(
        "[gossip partition of {group_size}] {}/{} missed deliveries recovered; ms after heal p50 {:.0} p90 {:.0} \
         max {:.0}; {via_iwant} first copies via IWANT",
        after_heal_ms.len(),
        isolated.len() * messages.len(),
        percentile(&after_heal_ms, 50.0),
        percentile(&after_heal_ms, 90.0),
        after_heal_ms.last().copied().unwrap_or(f64::NAN),
    );
    assert!(all, "missed messages not recovered within 3 heartbeats of the heal");
    if group_size == 1 {
        assert_eq!(via_iwant, messages.len() as u64, "recovered by IWANT");
    } else {
        // Inside a group, the first member to fetch a message pushes it
        // on through the group's own mesh links.
        assert!(via_iwant >= messages.len() as u64, "recovered by IWANT");
    }
}

#[test]
fn a_healed_node_fetches_missed_messages_through_ihave_iwant() {
    partition_and_heal(13, 1);
}

#[test]
fn a_healed_group_of_fifty_fetches_missed_messages() {
    partition_and_heal(29, 50);
}

/// A node joins with 8 links and at once announces itself on the Peers
/// topic, before any peer's SUBSCRIBE has reached it: the notice is held,
/// sent when the first SUBSCRIBE arrives, and every subscriber learns of it.
#[test]
fn a_joining_node_is_announced_to_every_subscriber() {
    let (mut net, mut rng) = build(19, Duration::from_secs(10));
    let joiner = net.add(SimNode::new(NODES, 19));
    let mut links: Vec<NodeIndex> = (0..NODES).collect();
    links.shuffle(&mut rng);
    for &peer in &links[..DEGREE_MIN] {
        let conn = |i: NodeIndex| ConnId(i as u64);
        net.with_node(joiner, |m, now| {
            m.input(now, GossipInput::PeerConnected { conn: conn(peer), node: node_id(peer), implied: &[] })
        });
        net.with_node(peer, |m, now| {
            m.input(now, GossipInput::PeerConnected { conn: conn(joiner), node: node_id(joiner), implied: &[] })
        });
    }
    let contact =
        crate::wire::Contact { id: node_id(joiner), addr: std::net::SocketAddr::from(([10, 0, 1, 244], 7000)) };
    net.with_node(joiner, |m, now| {
        m.input(now, GossipInput::Subscribe(Topic::Peers));
        m.input(now, GossipInput::Publish { topic: Topic::Peers, payload: Announcement::Peer(contact) });
    });
    let id = *net.node(joiner).published.last().expect("published");
    let at = net.now();
    let everyone =
        |n: &Network<SimNode>| (0..NODES).filter(|&i| subscribes(i)).all(|i| n.node(i).delivered.contains_key(&id));
    let all = net.run_until_with(at + Duration::from_secs(5), everyone);
    let mut delays: Vec<f64> =
        (0..NODES).filter_map(|i| net.node(i).delivered.get(&id)).map(|&t| (t - at).as_secs_f64() * 1000.0).collect();
    delays.sort_by(f64::total_cmp);
    let c = net.node(joiner).gossip.counters();
    eprintln!(
        "[gossip join] {} of {} subscribers learned the new node; delay ms p50 {:.0} max {:.0}; held then sent: {}",
        delays.len(),
        (0..NODES).filter(|&i| subscribes(i)).count(),
        percentile(&delays, 50.0),
        delays.last().copied().unwrap_or(f64::NAN),
        c.publish_sent_late,
    );
    assert_eq!(c.publish_no_peers, 1, "no peer was known to subscribe at publish time");
    assert_eq!(c.publish_sent_late, 1);
    assert!(all, "a subscriber never learned of the joining node");
}

/// One node turns hostile and sends each neighbour a stream of invalid
/// PUBLISH frames (a Peers notice on the Files topic): every neighbour
/// disconnects it, and honest traffic still reaches every subscriber.
#[test]
fn a_node_sending_invalid_messages_is_disconnected_by_all_its_peers() {
    let (mut net, mut rng) = build(23, Duration::from_secs(10));
    let attacker = 0;
    let neighbours: Vec<NodeIndex> = (1..NODES)
        .filter(|&i| {
            net.node(i).gossip.peer_count() > 0 && net.node(i).gossip.penalty(ConnId(attacker as u64)).is_some()
        })
        .collect();
    assert!(neighbours.len() >= DEGREE_MIN);
    let junk = |seq: u64| GossipMessage::Publish {
        topic: Topic::Files,
        origin: node_id(attacker),
        seq,
        payload: Announcement::Peer(crate::wire::Contact {
            id: node_id(attacker),
            addr: std::net::SocketAddr::from(([10, 0, 0, 1], 1)),
        }),
    };
    net.with_node(attacker, |m, _| {
        for seq in 0..100 {
            for &n in &neighbours {
                m.outbox.push_back((n, junk(seq)));
            }
        }
    });
    net.run_for(Duration::from_secs(1));
    for &n in &neighbours {
        let node = net.node(n);
        assert_eq!(node.disconnects, vec![ConnId(attacker as u64)], "neighbour {n} disconnected the attacker");
        let config = GossipConfig::default();
        let invalid = u64::from(config.penalty_disconnect / config.penalty_invalid_message);
        assert_eq!(node.gossip.counters().invalid, invalid, "neighbour {n} counted the junk up to the disconnect");
        assert!(node.delivered.is_empty(), "junk was delivered");
    }
    net.crash(attacker); // the driver closed every connection to it
    let before = total_received(&net);
    let messages = publish_batch(&mut net, &mut rng);
    net.run_for(Duration::from_secs(5));
    let m = measure(&net, &messages, before);
    report("after disconnecting an attacker", &m);
    assert_eq!(m.ratio_min, 1.0);
}

/// Same seed, same run: the delivery log is identical.
#[test]
fn runs_are_deterministic() {
    let run = || {
        let (mut net, mut rng) = build(3, Duration::from_secs(3));
        let messages = publish_batch(&mut net, &mut rng);
        net.run_for(Duration::from_secs(2));
        let log: Vec<(NodeIndex, MessageId, Instant)> = (0..NODES)
            .flat_map(|i| net.node(i).delivered.iter().map(move |(&id, &t)| (i, id, t)).collect::<Vec<_>>())
            .collect();
        (messages, log, net.stats())
    };
    let (first, second) = (run(), run());
    assert_eq!(first.0, second.0);
    assert!(first.1 == second.1, "delivery logs differ");
    assert_eq!(first.2, second.2);
}

/// A node that never subscribed learns nothing, and crashing every mesh
/// peer of a node does not stop it receiving through IHAVE.
#[test]
fn mesh_loss_is_repaired_by_lazy_push() {
    let (mut net, mut rng) = build(17, Duration::from_secs(10));
    let target = (0..NODES).find(|&i| subscribes(i)).expect("a subscriber");
    let mesh: Vec<ConnId> = net.node(target).gossip.mesh_peers(Topic::Files).collect();
    for conn in &mesh {
        net.crash(conn.0 as NodeIndex);
    }
    let origin = loop {
        let o = rng.random_range(0..NODES);
        if net.is_alive(o) && o != target && subscribes(o) {
            break o;
        }
    };
    let (id, at) = publish(&mut net, origin, 999);
    let got = net.run_until_with(at + Duration::from_secs(5), |n| n.node(target).delivered.contains_key(&id));
    assert!(got, "node with a dead mesh never received the message");
    assert!(net.node(target).gossip.counters().delivered_after_iwant >= 1);
    let disconnects: usize = (0..NODES).map(|i| net.node(i).disconnects.len()).sum();
    assert_eq!(disconnects, 0, "honest nodes were disconnected");
}
