//! The composed node on the in-process harness: bootstrap, share, get and
//! search across 30 nodes; connections are modelled by Dial/Accept.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::*;
use crate::content::{Layout, hash_buf_read};
use crate::testkit::{Machine, Network, NodeIndex};
use crate::wire::GossipMessage;

const LATENCY: Duration = Duration::from_millis(20);

#[derive(Debug)]
enum Wire {
    Dial,
    Accept,
    Frame(Message),
    Closed,
}

fn addr(index: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (index / 256) as u8, (index % 256) as u8], 4100))
}

fn index_of(addr: SocketAddr) -> NodeIndex {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => usize::from(ip.octets()[2]) * 256 + usize::from(ip.octets()[3]),
        std::net::IpAddr::V6(_) => usize::MAX,
    }
}

fn node_id(index: usize) -> NodeId {
    NodeId(Sha256::digest((index as u64).to_be_bytes()).into())
}

struct Host {
    node: Node,
    pieces: BTreeMap<FileId, Vec<Option<Bytes>>>,
    connected: BTreeSet<NodeIndex>,
    outbox: VecDeque<(NodeIndex, Wire)>,
    events: Vec<(Instant, NodeEvent)>,
}

impl Host {
    fn connected(&mut self, now: Instant, peer: NodeIndex, dialed: bool) {
        self.connected.insert(peer);
        let input = NodeInput::Connected {
            conn: ConnId(peer as u64),
            peer: node_id(peer),
            addr: addr(peer),
            dialed: dialed.then(|| addr(peer)),
        };
        self.node.handle_input(now, input);
    }

    fn pump(&mut self, now: Instant) {
        while let Some(output) = self.node.poll_output() {
            match output {
                NodeOutput::Dial { addr } => {
                    let peer = index_of(addr);
                    if self.connected.contains(&peer) {
                        self.connected(now, peer, true);
                    } else {
                        self.outbox.push_back((peer, Wire::Dial));
                    }
                }
                NodeOutput::Send { conn, message } => self.outbox.push_back((conn.0 as usize, Wire::Frame(message))),
                NodeOutput::ServeBlock(ServeBlock { conn, file, piece, offset, length }) => {
                    let data = self.pieces[&file][piece.0 as usize].as_ref().expect("served pieces are held");
                    let block = data.slice(offset as usize..(offset + length) as usize);
                    let message =
                        Message::Exchange(crate::wire::ExchangeMessage::Block { file, piece, offset, data: block });
                    self.outbox.push_back((conn.0 as usize, Wire::Frame(message)));
                    self.node.handle_input(now, NodeInput::BlockSent { conn, file });
                }
                NodeOutput::VerifyPiece(job) => self.node.handle_input(now, NodeInput::PieceHashed(job.hash())),
                NodeOutput::StorePiece(StorePiece { file, piece, data }) => {
                    if let Some(pieces) = self.pieces.get_mut(&file) {
                        pieces[piece.0 as usize] = Some(data);
                    }
                }
                NodeOutput::Disconnect { conn, .. } => {
                    self.outbox.push_back((conn.0 as usize, Wire::Closed));
                    self.connected.remove(&(conn.0 as usize));
                    self.node.handle_input(now, NodeInput::Disconnected { conn });
                }
                NodeOutput::Event(event) => {
                    if let NodeEvent::DownloadStarted { file, manifest } = &event {
                        let count = manifest.layout().map_or(0, |l| l.piece_count());
                        self.pieces.insert(*file, vec![None; count as usize]);
                    }
                    self.events.push((now, event));
                }
            }
        }
    }

    fn content(&self, file: &FileId) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for piece in self.pieces.get(file)? {
            out.extend_from_slice(piece.as_ref()?);
        }
        Some(out)
    }

    fn share(&mut self, now: Instant, name: &str, data: &[u8]) -> FileId {
        let content = hash_buf_read(data, Layout::for_file(data.len() as u64)).unwrap();
        let manifest = FileManifest::new(name, &content).unwrap();
        let pieces =
            data.chunks(content.layout.piece_bytes() as usize).map(|c| Some(Bytes::copy_from_slice(c))).collect();
        self.pieces.insert(content.file_id, pieces);
        self.node.share(now, manifest, content.piece_hashes);
        content.file_id
    }
}

impl Machine for Host {
    type Message = Wire;
    fn handle_message(&mut self, now: Instant, from: NodeIndex, message: Wire) {
        match message {
            Wire::Dial => {
                if !self.connected.contains(&from) {
                    self.connected(now, from, false);
                }
                self.outbox.push_back((from, Wire::Accept));
            }
            Wire::Accept => self.connected(now, from, true),
            Wire::Frame(message) => {
                self.node.handle_input(now, NodeInput::Message { conn: ConnId(from as u64), message })
            }
            Wire::Closed => {
                self.connected.remove(&from);
                self.node.handle_input(now, NodeInput::Disconnected { conn: ConnId(from as u64) });
            }
        }
        self.pump(now);
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.node.handle_timeout(now);
        self.pump(now);
    }
    fn poll_transmit(&mut self) -> Option<(NodeIndex, Wire)> {
        self.outbox.pop_front()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.node.poll_timeout()
    }
}

/// `n` nodes, all bootstrapped through node 0 (joining 10 ms apart).
fn network(n: usize, seed: u64) -> Network<Host> {
    let mut net = Network::new(LATENCY);
    for index in 0..n {
        let mut node_seed = [0u8; 32];
        node_seed[..8].copy_from_slice(&seed.to_le_bytes());
        node_seed[8..16].copy_from_slice(&(index as u64).to_le_bytes());
        let local = Contact { id: node_id(index), addr: addr(index) };
        let node = Node::new(Config::default(), local, node_seed, Instant::ZERO).unwrap();
        net.add(Host {
            node,
            pieces: BTreeMap::new(),
            connected: BTreeSet::new(),
            outbox: VecDeque::new(),
            events: Vec::new(),
        });
    }
    for index in 1..n {
        net.run_for(Duration::from_millis(10));
        net.with_node(index, |host, now| {
            host.node.bootstrap(now, &[addr(0)]);
            host.pump(now);
        });
    }
    net.run_for(Duration::from_secs(5));
    net
}

fn file_bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed).collect()
}

#[test]
fn a_shared_file_is_found_and_fetched_by_id_alone() {
    let mut net = network(30, 1);
    let data = file_bytes(1 << 20, 7);
    let file = net.with_node(1, |host, now| {
        let file = host.share(now, "movie.mkv", &data);
        host.pump(now);
        file
    });
    net.run_for(Duration::from_secs(5));
    let getters: Vec<usize> = (10..30).collect();
    for &i in &getters {
        net.with_node(i, |host, now| {
            host.node.get(now, file);
            host.pump(now);
        });
    }
    let deadline = net.now() + Duration::from_secs(300);
    let done = net.run_until_with(deadline, |n| getters.iter().all(|&i| n.node(i).node.exchange().is_complete(&file)));
    assert!(done, "not every getter completed");
    for &i in &getters {
        assert_eq!(net.node(i).content(&file).as_deref(), Some(&data[..]), "node {i}");
    }
    eprintln!("node get: 20 getters done by {:?}", net.now());
}

#[test]
fn search_finds_files_by_the_words_of_their_names() {
    let mut net = network(30, 2);
    for (index, name) in [(2, "Ubuntu 24.04 desktop amd64.iso"), (3, "ubuntu-server.iso"), (4, "debian.iso")] {
        net.with_node(index, |host, now| {
            host.share(now, name, &file_bytes(40_000 + index, index as u8));
            host.pump(now);
        });
    }
    net.run_for(Duration::from_secs(10));
    let id = net.with_node(25, |host, now| {
        let id = host.node.search(now, "ubuntu iso");
        host.pump(now);
        id
    });
    net.run_for(Duration::from_secs(30));
    let results = net
        .node(25)
        .events
        .iter()
        .find_map(|(_, e)| match e {
            NodeEvent::SearchResults { id: got, entries } if *got == id => Some(entries.clone()),
            _ => None,
        })
        .expect("search finished");
    let mut names: Vec<&str> = results.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["Ubuntu 24.04 desktop amd64.iso", "ubuntu-server.iso"]);
}

/// A get for a file nobody has retries its manifest lookup with backoff,
/// then reports it missing once.
#[test]
fn a_missing_manifest_is_retried_then_reported_once() {
    let mut net = network(12, 4);
    net.run_for(Duration::from_secs(5));
    let missing = FileId([0x5a; 32]);
    let asked = net.with_node(3, |host, now| {
        host.node.get(now, missing);
        host.pump(now);
        now
    });
    net.run_for(Duration::from_secs(120));
    let events = &net.node(3).events;
    let lookups = events
        .iter()
        .filter(|(at, e)| *at >= asked && matches!(e, NodeEvent::Lookup { kind: LookupKind::Manifest, .. }))
        .count();
    let missing_at: Vec<Instant> = events
        .iter()
        .filter(|(_, e)| matches!(e, NodeEvent::ManifestNotFound { file } if *file == missing))
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(lookups, 6, "one lookup per attempt");
    assert_eq!(missing_at.len(), 1, "reported once");
    // Waits of 1 + 2 + 4 + 8 + 16 s between the six attempts.
    assert!(missing_at[0] - asked >= Duration::from_secs(31), "{:?}", missing_at[0] - asked);
}

#[test]
fn find_node_reports_the_closest_live_nodes() {
    let mut net = network(30, 3);
    net.run_for(Duration::from_secs(10));
    let target = node_id(1000);
    let id = net.with_node(17, |host, now| {
        let id = host.node.find_node(now, target);
        host.pump(now);
        id
    });
    net.run_for(Duration::from_secs(20));
    let found = net
        .node(17)
        .events
        .iter()
        .find_map(|(_, e)| match e {
            NodeEvent::NodesFound { id: got, target: t, closest } if *got == id && *t == target => {
                Some(closest.clone())
            }
            _ => None,
        })
        .expect("lookup finished");
    let mut truth: Vec<NodeId> = (0..30).filter(|&i| i != 17).map(node_id).collect();
    truth.sort_by_key(|n| n.distance(&target));
    assert_eq!(found.first(), truth.first(), "the closest node is found first");
    let lookup = net.node(17).events.iter().any(|(_, e)| {
        matches!(e, NodeEvent::Lookup { kind: LookupKind::FindNode, stats } if stats.success && stats.rounds >= 1)
    });
    assert!(lookup, "a successful FindNode lookup is reported");
}

/// The same seed replays the same run; another seed does not.
#[test]
fn the_same_seed_gives_the_same_trace() {
    fn trace(seed: u64) -> [u8; 32] {
        let mut net = network(20, seed);
        let data = file_bytes(200_000, 3);
        let file = net.with_node(1, |host, now| {
            let file = host.share(now, "a.bin", &data);
            host.pump(now);
            file
        });
        for i in 5..10 {
            net.with_node(i, |host, now| {
                host.node.get(now, file);
                host.pump(now);
            });
        }
        net.run_for(Duration::from_secs(60));
        let mut hash = Sha256::new();
        for (index, host) in net.nodes() {
            for (at, event) in &host.events {
                hash.update(format!("{index} {at:?} {event:?}\n").as_bytes());
            }
        }
        hash.finalize().into()
    }
    assert_eq!(trace(4), trace(4));
    assert_ne!(trace(4), trace(5));
}

/// Peers that never answer cannot grow the node's request tracking past
/// `requests_tracked_max`.
#[test]
fn unanswered_requests_are_tracked_within_the_limit() {
    let config = Config { requests_tracked_max: 4, ..Config::default() };
    let local = Contact { id: node_id(0), addr: addr(0) };
    let mut node = Node::new(config, local, [9; 32], Instant::ZERO).unwrap();
    let peers: Vec<SocketAddr> = (1..=10).map(addr).collect();
    for (i, &peer) in peers.iter().enumerate() {
        let conn = ConnId(i as u64 + 1);
        node.handle_input(Instant::ZERO, NodeInput::Connected { conn, peer: node_id(i + 1), addr: peer, dialed: None });
    }
    while node.poll_output().is_some() {}
    node.bootstrap(Instant::ZERO, &peers);
    let mut sent = 0;
    while let Some(output) = node.poll_output() {
        sent += usize::from(matches!(output, NodeOutput::Send { message: Message::Request { .. }, .. }));
    }
    assert_eq!(sent, 10, "one bootstrap request per peer, on its open connection");
    assert_eq!(node.counters().requests_untracked, 6, "only the newest 4 stay tracked");
}

/// A node with `n` accepted connections (peers 1..=n) and nothing else.
fn node_with_connections(config: Config, n: usize) -> Node {
    let local = Contact { id: node_id(0), addr: addr(0) };
    let mut node = Node::new(config, local, [7; 32], Instant::ZERO).unwrap();
    for i in 1..=n {
        let input = NodeInput::Connected { conn: ConnId(i as u64), peer: node_id(i), addr: addr(i), dialed: None };
        node.handle_input(Instant::ZERO, input);
    }
    node
}

/// The connections a node closed in its pending output, with the reason.
fn closed(node: &mut Node) -> Vec<(u64, GoodbyeReason)> {
    let mut out = Vec::new();
    while let Some(output) = node.poll_output() {
        if let NodeOutput::Disconnect { conn, reason } = output {
            out.push((conn.0, reason));
        }
    }
    out
}

/// Connections only the DHT used close after `connection_idle_timeout`
/// without DHT traffic; a request from a peer keeps its connection open
/// that much longer.
#[test]
fn idle_connections_close_after_the_timeout() {
    let config = Config::default();
    let idle = config.connection_idle_timeout;
    let mut node = node_with_connections(config, 6);
    // The peers leave the topics the handshake implied, so no gossip mesh
    // holds their connections open.
    for conn in 1..=6 {
        for &topic in STANDARD_TOPICS {
            let message = Message::Gossip(GossipMessage::Unsubscribe(topic));
            node.handle_input(Instant::ZERO, NodeInput::Message { conn: ConnId(conn), message });
        }
    }
    assert!(closed(&mut node).is_empty());
    let t = |s: u64| Instant::ZERO + Duration::from_secs(s);
    // Peer 3 asks something at 10 s.
    let request = Message::Request { id: RequestId(1), body: Request::FindNode { target: [5; 32] } };
    node.handle_input(t(10), NodeInput::Message { conn: ConnId(3), message: request });
    assert!(closed(&mut node).is_empty(), "answering closes nothing");
    // Run every timer up to just before the timeout: nothing closes.
    let mut now = Instant::ZERO;
    let mut step = |node: &mut Node, until: Instant| {
        let mut got = Vec::new();
        while let Some(at) = node.poll_timeout().filter(|&at| at <= until) {
            now = now.max(at);
            node.handle_timeout(now);
            got.extend(closed(node));
        }
        got
    };
    assert!(step(&mut node, Instant::ZERO + idle - Duration::from_millis(1)).is_empty());
    let first = step(&mut node, Instant::ZERO + idle + idle / 4);
    assert_eq!(first, [1, 2, 4, 5, 6].map(|c| (c, GoodbyeReason::Idle)), "all but the one asked at 10 s");
    assert_eq!(node.connections(), 1);
    let second = step(&mut node, t(10) + idle + idle / 4);
    assert_eq!(second, [(3, GoodbyeReason::Idle)]);
    assert_eq!(node.counters().connections_idle_closed, 6);
    assert_eq!(node.poll_timeout().filter(|_| node.connections() > 0), None);
}

/// Past `connections_target` the least recently used connections close
/// (down to 7/8 of the target), not those in use.
#[test]
fn connections_past_the_target_close_least_recently_used_first() {
    let config = Config { connections_target: 8, ..Config::default() };
    let mut node = node_with_connections(config, 8);
    assert!(closed(&mut node).is_empty(), "at the target nothing closes");
    // Peers 1..=8 send a request each, newest last, except peer 2.
    for i in [1, 3, 4, 5, 6, 7, 8] {
        let request = Message::Request { id: RequestId(i), body: Request::Ping };
        let now = Instant::ZERO + Duration::from_secs(i);
        node.handle_input(now, NodeInput::Message { conn: ConnId(i), message: request });
    }
    let _ = closed(&mut node);
    let ninth = NodeInput::Connected { conn: ConnId(9), peer: node_id(9), addr: addr(9), dialed: None };
    node.handle_input(Instant::ZERO + Duration::from_secs(9), ninth);
    // 9 open, target 8: close 9 - 7 = 2, least recently used first.
    let got = closed(&mut node);
    assert_eq!(got, [(2, GoodbyeReason::TooManyConnections), (1, GoodbyeReason::TooManyConnections)]);
    assert_eq!(node.connections(), 7);
    assert_eq!(node.counters().connections_trimmed, 2);
}

/// Swarm members heard of wait in a bounded pool and are dialled in
/// rounds, a few at a time, picked at random, while the swarm has room
/// (counting dials still pending).
#[test]
fn swarm_candidates_are_dialled_in_rounds_within_the_room() {
    let mut config = Config { swarm_candidates_max: 5, swarm_dials_per_round: 3, ..Config::default() };
    config.exchange.peers_per_file_max = 4;
    let interval = config.swarm_dial_interval;
    let local = Contact { id: node_id(0), addr: addr(0) };
    let mut node = Node::new(config, local, [3; 32], Instant::ZERO).unwrap();
    let file = FileId([0xab; 32]);
    node.get(Instant::ZERO, file);
    let dials = |node: &mut Node| {
        let mut got = Vec::new();
        while let Some(output) = node.poll_output() {
            if let NodeOutput::Dial { addr } = output {
                got.push(index_of(addr));
            }
        }
        got
    };
    assert!(dials(&mut node).is_empty());
    for i in 1..=7 {
        node.add_candidate(Instant::ZERO, file, Contact { id: node_id(i), addr: addr(i) });
    }
    node.add_candidate(Instant::ZERO, file, local);
    assert_eq!(node.downloads[&file].candidates.len(), 5, "the pool is bounded, ourselves left out");
    assert_eq!(node.counters().swarm_candidates_replaced, 2);
    assert!(dials(&mut node).is_empty(), "nothing is dialled before the round");
    assert_eq!(node.poll_timeout(), Some(Instant::ZERO), "the first round is due at once");
    node.handle_timeout(Instant::ZERO);
    let first = dials(&mut node);
    assert_eq!(first.len(), 3, "{first:?}");
    // Room for 4 peers, 3 dials pending: one more in the next round.
    assert_eq!(node.poll_timeout(), Some(Instant::ZERO + interval));
    node.handle_timeout(Instant::ZERO + interval);
    let second = dials(&mut node);
    assert_eq!(second.len(), 1, "{second:?}");
    let mut all: Vec<_> = first.iter().chain(&second).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), 4, "each candidate is dialled once");
    assert_eq!(node.downloads[&file].candidates.len(), 1);
    // Now full (4 dials pending): each round that finds no room waits
    // twice as long as the last.
    let mut now = Instant::ZERO + interval;
    for wait in [interval, interval * 2, interval * 4] {
        assert_eq!(node.downloads[&file].next_swarm_dial, Some(now + wait));
        now += wait;
        node.handle_timeout(now);
        assert!(dials(&mut node).is_empty());
    }
    // Picked at random: another seed dials another first three.
    let firsts: BTreeSet<Vec<NodeIndex>> = (0..8u8)
        .map(|seed| {
            let mut node =
                Node::new(Config { swarm_dials_per_round: 3, ..Config::default() }, local, [seed; 32], Instant::ZERO)
                    .unwrap();
            node.get(Instant::ZERO, file);
            for i in 1..=7 {
                node.add_candidate(Instant::ZERO, file, Contact { id: node_id(i), addr: addr(i) });
            }
            node.handle_timeout(Instant::ZERO);
            let mut got = dials(&mut node);
            got.sort_unstable();
            got
        })
        .collect();
    assert!(firsts.len() > 1, "the same three every time: {firsts:?}");
}
