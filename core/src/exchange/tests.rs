//! Multi-node exchange tests on the in-process harness: real `Exchange`
//! machines, an in-memory store each, fixed latency, no bandwidth model.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::content::{Content, Layout, hash_buf_read};

use crate::testkit::{Machine, Network, NodeIndex};

const LATENCY: Duration = Duration::from_millis(20);

#[derive(Debug)]
enum Wire {
    Exchange(ExchangeMessage),
    /// The sender closed the connection (the harness has no FIN).
    Closed,
}

struct Peer {
    exchange: Exchange,
    pieces: Vec<Option<Bytes>>,
    layout: Layout,
    /// Serves every block with its bytes flipped.
    corrupt: bool,
    /// Serves forged piece hashes.
    forge_hashes: bool,
    outbox: VecDeque<(NodeIndex, Wire)>,
    events: Vec<(Instant, ExchangeEvent)>,
    /// Every block handed out, in order.
    served: Vec<(PieceIndex, u32)>,
    /// Hash answers still to be given wrong (as if the piece were bad).
    wrong_hashes: u32,
    /// Hash requests kept unanswered, while `Some` (a driver whose hasher
    /// is slow); otherwise each is answered at once.
    held: Option<Vec<VerifyPiece>>,
}

impl Peer {
    fn pump(&mut self, now: Instant) {
        while let Some(output) = self.exchange.poll_output() {
            match output {
                ExchangeOutput::Send { conn, mut message } => {
                    if let ExchangeMessage::Hashes { hashes, .. } = &mut message
                        && self.forge_hashes
                        && let Some(first) = hashes.first_mut()
                    {
                        first.0[0] ^= 1;
                    }
                    self.outbox.push_back((conn.0 as usize, Wire::Exchange(message)));
                }
                ExchangeOutput::ServeBlock(ServeBlock { conn, file, piece, offset, length }) => {
                    self.served.push((piece, offset));
                    let data = self.pieces[piece.0 as usize].as_ref().expect("served pieces are stored");
                    let mut block = data.slice(offset as usize..(offset + length) as usize);
                    if self.corrupt {
                        block = block.iter().map(|b| !b).collect::<Vec<u8>>().into();
                    }
                    let message = ExchangeMessage::Block { file, piece, offset, data: block };
                    self.outbox.push_back((conn.0 as usize, Wire::Exchange(message)));
                    self.exchange.handle_input(now, ExchangeInput::BlockSent { conn, file });
                }
                ExchangeOutput::VerifyPiece(job) => match &mut self.held {
                    Some(held) => held.push(job),
                    None => {
                        let mut hashed = job.hash();
                        if self.wrong_hashes > 0 {
                            self.wrong_hashes -= 1;
                            hashed.hash.0[0] ^= 1;
                        }
                        self.exchange.handle_input(now, ExchangeInput::PieceHashed(hashed));
                    }
                },
                ExchangeOutput::StorePiece(StorePiece { piece, data, .. }) => {
                    assert_eq!(data.len() as u32, self.layout.piece_len(piece));
                    self.pieces[piece.0 as usize] = Some(data);
                }
                ExchangeOutput::Disconnect { conn, .. } => {
                    self.outbox.push_back((conn.0 as usize, Wire::Closed));
                    self.exchange.handle_input(now, ExchangeInput::PeerDisconnected { conn });
                }
                ExchangeOutput::Event(event) => self.events.push((now, event)),
            }
        }
    }

    fn content(&self) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        for piece in &self.pieces {
            out.extend_from_slice(piece.as_ref()?);
        }
        Some(out)
    }
}

impl Machine for Peer {
    type Message = Wire;
    fn handle_message(&mut self, now: Instant, from: NodeIndex, message: Wire) {
        let conn = ConnId(from as u64);
        let input = match message {
            Wire::Exchange(message) => ExchangeInput::Message { conn, message },
            Wire::Closed => ExchangeInput::PeerDisconnected { conn },
        };
        self.exchange.handle_input(now, input);
        self.pump(now);
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.exchange.handle_timeout(now);
        self.pump(now);
    }
    fn poll_transmit(&mut self) -> Option<(NodeIndex, Wire)> {
        self.outbox.pop_front()
    }
    fn poll_timeout(&self) -> Option<Instant> {
        self.exchange.poll_timeout()
    }
}

fn node_id(index: usize) -> NodeId {
    let mut id = [0u8; 32];
    id[..8].copy_from_slice(&(index as u64 + 1).to_be_bytes());
    NodeId(id)
}

struct Swarm {
    net: Network<Peer>,
    data: Vec<u8>,
    file: FileId,
}

/// A file of `pieces` × 64 KiB of seeded pseudo-random bytes.
fn test_file(pieces: u32, seed: u64) -> (Vec<u8>, Content, FileManifest) {
    let piece_bytes = 64 * 1024;
    let data: Vec<u8> = (0..pieces as usize * piece_bytes)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(17).to_le_bytes()[0] ^ seed as u8)
        .collect();
    let layout = Layout::new(data.len() as u64, piece_bytes as u32).unwrap();
    let content = hash_buf_read(&data[..], layout).unwrap();
    let manifest = FileManifest::new("movie.bin", &content).unwrap();
    (data, content, manifest)
}

/// How a test swarm is built.
#[derive(Default)]
struct Setup {
    pieces: u32,
    leechers: usize,
    /// Nodes that serve flipped block bytes.
    corrupt: Vec<usize>,
    /// Nodes that serve forged hash batches.
    forge_hashes: Vec<usize>,
    /// Leechers start from a manifest without piece hashes.
    fetch_hashes: bool,
    /// The seed reveals pieces one by one.
    super_seed: bool,
    /// Replaces the download's `unverified_bytes_max`.
    unverified_bytes_max: Option<u64>,
    seed: u64,
}

/// Node 0 seeds a file of `pieces` × 64 KiB; nodes 1..=leechers download
/// it; `corrupt` nodes serve flipped bytes. Every leecher opens a session
/// with every other node.
fn swarm(pieces: u32, leechers: usize, corrupt: &[usize], seed: u64) -> Swarm {
    swarm_with(Setup { pieces, leechers, corrupt: corrupt.to_vec(), seed, ..Setup::default() })
}

fn swarm_with(setup: Setup) -> Swarm {
    let Setup { pieces, leechers, seed, .. } = setup;
    let piece_bytes = 64 * 1024;
    let (data, content, manifest) = test_file(pieces, seed);
    let layout = content.layout;
    let file = content.file_id;
    let mut config = ExchangeConfig { super_seeding: setup.super_seed, ..ExchangeConfig::default() };
    if setup.fetch_hashes {
        config.hash_batch_max = 16;
    }
    if let Some(bytes) = setup.unverified_bytes_max {
        config.download.unverified_bytes_max = bytes;
    }
    let mut leech_manifest = manifest.clone();
    if setup.fetch_hashes {
        leech_manifest.piece_hashes = None;
    }
    let mut net = Network::new(LATENCY);
    let total = leechers + 1;
    for index in 0..total {
        let mut rng_seed = [0u8; 32];
        rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
        rng_seed[8..16].copy_from_slice(&(index as u64).to_le_bytes());
        let mut exchange = Exchange::new(config.clone(), rng_seed);
        let seeding = index == 0;
        let pieces_held = if seeding {
            data.chunks(piece_bytes).map(|c| Some(Bytes::copy_from_slice(c))).collect()
        } else {
            vec![None; pieces as usize]
        };
        let input = if seeding {
            ExchangeInput::Seed { manifest: manifest.clone(), piece_hashes: content.piece_hashes.clone() }
        } else {
            ExchangeInput::Download { manifest: leech_manifest.clone(), piece_hashes: None, have: Vec::new() }
        };
        exchange.handle_input(Instant::ZERO, input);
        for other in (0..total).filter(|&o| o != index) {
            exchange.handle_input(
                Instant::ZERO,
                ExchangeInput::PeerConnected { conn: ConnId(other as u64), node: node_id(other) },
            );
        }
        net.add(Peer {
            exchange,
            pieces: pieces_held,
            layout,
            corrupt: setup.corrupt.contains(&index),
            forge_hashes: setup.forge_hashes.contains(&index),
            outbox: VecDeque::new(),
            events: Vec::new(),
            served: Vec::new(),
            wrong_hashes: 0,
            held: None,
        });
    }
    for index in 1..total {
        net.with_node(index, |peer, now| {
            for other in (0..total).filter(|&o| o != index) {
                peer.exchange.handle_input(now, ExchangeInput::Open { conn: ConnId(other as u64), file });
            }
            peer.pump(now);
        });
    }
    Swarm { net, data, file }
}

fn all_complete(net: &Network<Peer>, who: &[usize], file: &FileId) -> bool {
    who.iter().all(|&i| net.node(i).exchange.is_complete(file))
}

#[test]
fn one_seed_and_twenty_leechers_complete_a_64_piece_file() {
    let mut s = swarm(64, 20, &[], 1);
    let leechers: Vec<usize> = (1..=20).collect();
    let done = s.net.run_until_with(Instant::ZERO + Duration::from_secs(600), |n| all_complete(n, &leechers, &s.file));
    assert!(done, "not every leecher completed by t=600 s");
    for &i in &leechers {
        let peer = s.net.node(i);
        assert_eq!(peer.content().as_deref(), Some(&s.data[..]), "node {i} holds the file");
        let stats = peer.exchange.stats();
        assert_eq!(stats.pieces_verified, 64);
        assert_eq!(stats.pieces_failed, 0);
        assert_eq!(stats.violations, 0);
    }
    // The seed is not the only source: leechers trade among themselves.
    let seed_served = s.net.node(0).exchange.stats().blocks_served;
    let total_blocks = 20 * 64 * 4;
    assert!(seed_served < total_blocks, "seed served {seed_served} of {total_blocks} blocks");
    eprintln!("flash crowd: all done at {:?}; seed served {seed_served}/{total_blocks} blocks", s.net.now());
}

#[test]
fn a_corrupting_peer_is_banned_and_nobody_keeps_bad_data() {
    let corrupt = 5;
    let mut s = swarm(64, 20, &[corrupt], 2);
    let honest: Vec<usize> = (1..=20).filter(|&i| i != corrupt).collect();
    let done = s.net.run_until_with(Instant::ZERO + Duration::from_secs(900), |n| all_complete(n, &honest, &s.file));
    assert!(done, "honest leechers did not complete");
    let mut bans = 0;
    let mut failures = 0;
    for &i in &honest {
        let peer = s.net.node(i);
        assert_eq!(peer.content().as_deref(), Some(&s.data[..]), "node {i} holds verified data only");
        for (_, event) in &peer.events {
            match event {
                ExchangeEvent::PeerBanned { node, .. } => {
                    assert_eq!(*node, node_id(corrupt), "only the corrupt node is banned");
                    bans += 1;
                }
                ExchangeEvent::PieceFailed { culprits, .. } => {
                    assert!(culprits.contains(&node_id(corrupt)), "blame falls on the corrupt node: {culprits:?}");
                    failures += 1;
                }
                _ => {}
            }
        }
    }
    assert!(bans >= 1, "the corrupt node was banned by at least one peer");
    eprintln!("bad peer: {failures} failed pieces, banned by {bans} peers");
}

#[test]
fn a_peer_vanishing_mid_piece_costs_only_a_re_request() {
    let mut s = swarm(64, 8, &[], 3);
    // Let transfers start, then node 0 (the only seed) and node 1 vanish
    // silently; node 1 may hold pieces nobody else has yet, but the seed's
    // blocks already spread; restart nothing. To keep the file obtainable,
    // only a leecher vanishes here.
    s.net.run_for(Duration::from_millis(300));
    let inflight_before: u64 = (2..=8).map(|i| s.net.node(i).exchange.stats().blocks_received).sum();
    assert!(inflight_before > 0, "transfers had started");
    s.net.crash(1);
    let live: Vec<usize> = (2..=8).collect();
    let done = s.net.run_until_with(s.net.now() + Duration::from_secs(600), |n| all_complete(n, &live, &s.file));
    assert!(done, "live leechers did not complete after a peer vanished");
    for &i in &live {
        let peer = s.net.node(i);
        assert_eq!(peer.content().as_deref(), Some(&s.data[..]));
        let stats = peer.exchange.stats();
        assert_eq!(stats.pieces_failed, 0, "nothing re-downloaded as bad");
        // Only re-requests: what arrived twice is bounded by a few blocks,
        // not whole pieces fetched again.
        assert!(stats.wasted_bytes <= 16 * 16 * 1024, "node {i} wasted {} bytes", stats.wasted_bytes);
        assert_eq!(stats.payload_bytes_received, s.data.len() as u64, "each byte accepted once");
    }
}

/// Drive one machine by hand and record what it sends. Hash requests
/// are kept for the test to answer.
struct Probe {
    exchange: Exchange,
    choking: std::collections::BTreeMap<u64, bool>,
    requests: Vec<(ConnId, PieceIndex, u32, u32)>,
    /// Session ends and announcements sent, in order.
    sent: Vec<(ConnId, ExchangeMessage)>,
    verify: Vec<VerifyPiece>,
    stored: Vec<PieceIndex>,
    events: Vec<ExchangeEvent>,
}

impl Probe {
    fn new(config: ExchangeConfig, seed: u8) -> Self {
        Self {
            exchange: Exchange::new(config, [seed; 32]),
            choking: Default::default(),
            requests: Vec::new(),
            sent: Vec::new(),
            verify: Vec::new(),
            stored: Vec::new(),
            events: Vec::new(),
        }
    }

    fn input(&mut self, now: Instant, input: ExchangeInput) {
        self.exchange.handle_input(now, input);
        self.drain();
    }

    /// Peer `peer` connects on `ConnId(peer)`.
    fn connect(&mut self, now: Instant, peer: u64) {
        self.input(now, ExchangeInput::PeerConnected { conn: ConnId(peer), node: node_id(peer as usize) });
    }

    /// Peer `peer` sends `message`.
    fn from(&mut self, now: Instant, peer: u64, message: ExchangeMessage) {
        self.input(now, ExchangeInput::Message { conn: ConnId(peer), message });
    }

    fn drain(&mut self) {
        while let Some(output) = self.exchange.poll_output() {
            match output {
                ExchangeOutput::Send { conn, message } => match message {
                    ExchangeMessage::Choke { .. } => drop(self.choking.insert(conn.0, true)),
                    ExchangeMessage::Unchoke { .. } => drop(self.choking.insert(conn.0, false)),
                    ExchangeMessage::Request { piece, offset, length, .. } => {
                        self.requests.push((conn, piece, offset, length));
                    }
                    message @ (ExchangeMessage::Leave { .. }
                    | ExchangeMessage::HaveAll { .. }
                    | ExchangeMessage::HaveNone { .. }
                    | ExchangeMessage::Have { .. }
                    | ExchangeMessage::Bitfield { .. }) => self.sent.push((conn, message)),
                    _ => {}
                },
                ExchangeOutput::VerifyPiece(job) => self.verify.push(job),
                ExchangeOutput::StorePiece(StorePiece { piece, .. }) => self.stored.push(piece),
                ExchangeOutput::Event(event) => self.events.push(event),
                _ => {}
            }
        }
    }

    /// A peer that holds every piece and unchokes us, on `conn`.
    fn add_seed(&mut self, now: Instant, conn: ConnId, file: FileId) {
        self.input(now, ExchangeInput::PeerConnected { conn, node: node_id(conn.0 as usize) });
        for message in [ExchangeMessage::HaveAll { file }, ExchangeMessage::Unchoke { file }] {
            self.input(now, ExchangeInput::Message { conn, message });
        }
    }

    /// Answer the requests made so far to `conn` (for `piece` only, if
    /// given) with the file's bytes; returns how many.
    fn serve(
        &mut self,
        now: Instant,
        conn: ConnId,
        piece: Option<PieceIndex>,
        data: &[u8],
        layout: Layout,
        file: FileId,
    ) -> usize {
        let wanted = |r: &(ConnId, PieceIndex, u32, u32)| r.0 == conn && piece.is_none_or(|p| p == r.1);
        let asked: Vec<_> = self.requests.iter().copied().filter(wanted).collect();
        self.requests.retain(|r| !wanted(r));
        let count = asked.len();
        for (conn, piece, offset, length) in asked {
            let start = layout.piece_offset(piece) as usize + offset as usize;
            let block = Bytes::copy_from_slice(&data[start..start + length as usize]);
            let message = ExchangeMessage::Block { file, piece, offset, data: block };
            self.input(now, ExchangeInput::Message { conn, message });
        }
        count
    }

    fn unchoked(&self) -> Vec<u64> {
        self.choking.iter().filter(|(_, choked)| !**choked).map(|(conn, _)| *conn).collect()
    }
}

/// Tit for tat: while downloading, the regular slots go to the peers we
/// download fastest from, and one more slot is given at random.
#[test]
fn rechoke_rewards_the_fastest_uploaders() {
    let (data, content, manifest) = test_file(64, 4);
    let layout = content.layout;
    let file = content.file_id;
    let config = ExchangeConfig { upload_slots: 4, ..ExchangeConfig::default() };
    let mut probe = Probe::new(config, 7);
    let t0 = Instant::ZERO;
    probe.input(t0, ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] });
    for peer in 1..=6u64 {
        probe.connect(t0, peer);
        for message in
            [ExchangeMessage::HaveAll { file }, ExchangeMessage::Interested { file }, ExchangeMessage::Unchoke { file }]
        {
            probe.from(t0, peer, message);
        }
    }
    assert_eq!(probe.unchoked(), vec![1, 2, 3, 4, 5], "free slots go to the first interested peers");
    // Peer i answers i of our requests.
    let t1 = t0 + Duration::from_secs(1);
    let requests = std::mem::take(&mut probe.requests);
    for peer in 1..=6u64 {
        let mine = requests.iter().filter(|r| r.0 == ConnId(peer)).take(peer as usize);
        for &(conn, piece, offset, length) in mine.collect::<Vec<_>>() {
            let start = layout.piece_offset(piece) as usize + offset as usize;
            let block = Bytes::copy_from_slice(&data[start..start + length as usize]);
            let message = ExchangeMessage::Block { file, piece, offset, data: block };
            probe.input(t1, ExchangeInput::Message { conn, message });
        }
    }
    let rechoke = probe.exchange.poll_timeout().expect("rechoke armed");
    assert!(rechoke <= t0 + Duration::from_secs(10));
    probe.exchange.handle_timeout(t0 + Duration::from_secs(10));
    probe.drain();
    let unchoked = probe.unchoked();
    assert_eq!(unchoked.len(), 5, "4 regular + 1 optimistic: {unchoked:?}");
    for fastest in [3, 4, 5, 6] {
        assert!(unchoked.contains(&fastest), "peer {fastest} earned a slot: {unchoked:?}");
    }
    assert!(unchoked.contains(&1) ^ unchoked.contains(&2), "one optimistic slot among the slowest: {unchoked:?}");
}

/// A peer that loses interest (it completed) gives its upload slot to a
/// waiting peer at once, without waiting for the rechoke; its renewed
/// interest waits for a slot like anyone's.
#[test]
fn a_slot_freed_by_lost_interest_goes_to_a_waiting_peer() {
    let (_, content, manifest) = test_file(64, 4);
    let file = content.file_id;
    let config = ExchangeConfig { upload_slots: 1, optimistic_unchoke_slots: 0, ..ExchangeConfig::default() };
    let mut probe = Probe::new(config, 8);
    let t0 = Instant::ZERO;
    probe.input(t0, ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] });
    for peer in 1..=3u64 {
        probe.connect(t0, peer);
        probe.from(t0, peer, ExchangeMessage::Interested { file });
    }
    assert_eq!(probe.unchoked(), vec![1], "one slot, taken by the first interested peer");
    let t1 = t0 + Duration::from_secs(1);
    probe.from(t1, 1, ExchangeMessage::NotInterested { file });
    let unchoked = probe.unchoked();
    assert_eq!(unchoked.len(), 1, "peer 1 is choked, a waiting peer gets the slot: {unchoked:?}");
    assert!(unchoked.contains(&2) ^ unchoked.contains(&3), "{unchoked:?}");
    // Renewed interest does not take a slot that is in use.
    probe.from(t1, 1, ExchangeMessage::Interested { file });
    assert_eq!(probe.unchoked(), unchoked, "the slot stays with the interested peer");
}

/// The HAVEs `probe` sent on `conn` (each a list of piece numbers),
/// which leave its record.
fn take_haves(probe: &mut Probe, conn: u64) -> Vec<Vec<u32>> {
    let mut found = Vec::new();
    probe.sent.retain(|(c, m)| match m {
        ExchangeMessage::Have { pieces, .. } if c.0 == conn => {
            found.push(pieces.iter().map(|p| p.0).collect());
            false
        }
        _ => true,
    });
    found
}

/// A downloader with one upload slot and no optimistic one, a seed on
/// connection 9 and `peers` interested peers (1..) that have nothing;
/// peer 1 holds the slot.
fn downloader_with_peers(config: ExchangeConfig, pieces: u32, peers: u64) -> (Probe, Vec<u8>, Content) {
    let (data, content, manifest) = test_file(pieces, 4);
    let file = content.file_id;
    let config = ExchangeConfig { upload_slots: 1, optimistic_unchoke_slots: 0, ..config };
    let mut probe = Probe::new(config, 8);
    let t0 = Instant::ZERO;
    let piece_hashes = Some(content.piece_hashes.clone());
    probe.input(t0, ExchangeInput::Download { manifest, piece_hashes, have: vec![] });
    probe.add_seed(t0, ConnId(9), file);
    for peer in 1..=peers {
        probe.connect(t0, peer);
        probe.from(t0, peer, ExchangeMessage::HaveNone { file });
        probe.from(t0, peer, ExchangeMessage::Interested { file });
    }
    assert_eq!(probe.unchoked(), vec![1], "one slot, taken by the first interested peer");
    (probe, data, content)
}

/// Complete the piece the download asked the seed (connection 9) for
/// first, at `now`; returns its number.
fn complete_one(probe: &mut Probe, now: Instant, data: &[u8], content: &Content) -> u32 {
    let (file, layout) = (content.file_id, content.layout);
    let piece = probe.requests.first().map(|r| r.1).expect("a request");
    while probe.serve(now, ConnId(9), Some(piece), data, layout, file) > 0 {}
    for job in std::mem::take(&mut probe.verify) {
        probe.input(now, ExchangeInput::PieceHashed(job.hash()));
    }
    assert!(probe.stored.contains(&piece));
    piece.0
}

/// A completed piece is announced at once to a peer we unchoke that
/// lacks few of our pieces (it may ask for it now); a peer we choke
/// hears of the first at once and of the next ones in one batch at the
/// end of `have_batch_interval`, or when it is unchoked.
#[test]
fn haves_reach_unchoked_peers_at_once_and_choked_peers_in_batches() {
    let config = ExchangeConfig::default();
    let interval = config.have_batch_interval;
    let (mut probe, data, content) = downloader_with_peers(config, 8, 2);
    let file = content.file_id;
    let haves = take_haves;
    let complete_one = |probe: &mut Probe, now: Instant| complete_one(probe, now, &data, &content);
    let t0 = Instant::ZERO;
    // Four pieces complete, 10 ms apart.
    let done: Vec<u32> = (0..4).map(|i| complete_one(&mut probe, t0 + Duration::from_millis(10 * i))).collect();
    let each: Vec<Vec<u32>> = done.iter().map(|&p| vec![p]).collect();
    assert_eq!(haves(&mut probe, 1), each, "the unchoked peer hears of each at once");
    assert_eq!(haves(&mut probe, 2), vec![vec![done[0]]], "the choked peer hears of the first at once");
    let due = t0 + interval;
    assert!(probe.exchange.poll_timeout().is_some_and(|t| t <= due));
    probe.exchange.handle_timeout(due - Duration::from_millis(1));
    probe.drain();
    assert!(haves(&mut probe, 2).is_empty(), "nothing before the interval ends");
    probe.exchange.handle_timeout(due);
    probe.drain();
    assert_eq!(haves(&mut probe, 2), vec![done[1..].to_vec()], "the rest in one batch");
    // The next piece waits a whole interval, but an unchoke sends it at once.
    let t1 = due + Duration::from_millis(10);
    let fifth = complete_one(&mut probe, t1);
    assert!(haves(&mut probe, 2).is_empty());
    probe.from(t1, 1, ExchangeMessage::NotInterested { file });
    assert_eq!(probe.unchoked(), vec![2], "peer 2 takes the freed slot");
    assert_eq!(haves(&mut probe, 2), vec![vec![fifth]], "and hears of the piece with its unchoke");
    // A HAVE names at least one piece, and only pieces of the file.
    for (peer, pieces) in [(1, vec![]), (2, vec![PieceIndex(8)])] {
        probe.from(t1, peer, ExchangeMessage::Have { file, pieces });
        let last = probe.events.last();
        assert!(
            matches!(last, Some(ExchangeEvent::ProtocolViolation { violation: Violation::BadRange, .. })),
            "{last:?}"
        );
    }
}

/// An unchoked peer that lacks at least `have_at_once_below` of our
/// pieces has enough to ask us for: it hears of new ones in batches
/// `have_batch_interval_unchoked` apart, like a choked peer on its
/// longer interval.
#[test]
fn unchoked_peers_with_pieces_to_ask_for_hear_in_short_batches() {
    let config = ExchangeConfig { have_at_once_below: 2, ..ExchangeConfig::default() };
    let (short, long) = (config.have_batch_interval_unchoked, config.have_batch_interval);
    assert!(short < long);
    let (mut probe, data, content) = downloader_with_peers(config, 8, 2);
    let t0 = Instant::ZERO;
    let ms = Duration::from_millis;
    let done: Vec<u32> = (0..4).map(|i| complete_one(&mut probe, t0 + ms(10 * i), &data, &content)).collect();
    // Peer 1 lacked one of our pieces when the first completed: it went
    // at once. From the second it lacks two, and they wait.
    assert_eq!(take_haves(&mut probe, 1), vec![vec![done[0]]]);
    assert_eq!(take_haves(&mut probe, 2), vec![vec![done[0]]], "the choked peer hears of the first at once");
    probe.exchange.handle_timeout(t0 + short - ms(1));
    probe.drain();
    assert!(take_haves(&mut probe, 1).is_empty(), "nothing before the short interval ends");
    probe.exchange.handle_timeout(t0 + short);
    probe.drain();
    assert_eq!(take_haves(&mut probe, 1), vec![done[1..].to_vec()], "the rest in one batch");
    assert!(take_haves(&mut probe, 2).is_empty(), "the choked peer waits for its longer interval");
    probe.exchange.handle_timeout(t0 + long);
    probe.drain();
    assert_eq!(take_haves(&mut probe, 2), vec![done[1..].to_vec()]);
}

/// Sessions we open count against the upload slots like those peers
/// open: interest comes after the session, and the slots still bound
/// who is served. Nobody waiting, a peer that loses interest keeps its
/// slot (no choke round trip when it wants something again); a newcomer
/// takes such a slot at once.
#[test]
fn upload_slots_bound_the_peers_served_whoever_opened() {
    let (_, content, manifest) = test_file(64, 4);
    let file = content.file_id;
    let config = ExchangeConfig { upload_slots: 2, optimistic_unchoke_slots: 0, ..ExchangeConfig::default() };
    let mut probe = Probe::new(config, 9);
    let t0 = Instant::ZERO;
    let hashes = content.piece_hashes.clone();
    probe.input(t0, ExchangeInput::Seed { manifest, piece_hashes: hashes });
    for peer in 1..=4u64 {
        let conn = ConnId(peer);
        probe.connect(t0, peer);
        probe.input(t0, ExchangeInput::Open { conn, file });
    }
    assert!(probe.unchoked().is_empty(), "nobody is unchoked before it is interested");
    for peer in 1..=3u64 {
        probe.from(t0, peer, ExchangeMessage::HaveNone { file });
        probe.from(t0, peer, ExchangeMessage::Interested { file });
    }
    assert_eq!(probe.unchoked(), vec![1, 2], "two slots, two peers served");
    // Peer 3 waits: peer 1 losing interest hands its slot over at once.
    probe.from(t0, 1, ExchangeMessage::NotInterested { file });
    assert_eq!(probe.unchoked(), vec![2, 3]);
    // Nobody waits: peer 2 losing interest keeps its slot...
    probe.from(t0, 2, ExchangeMessage::NotInterested { file });
    assert_eq!(probe.unchoked(), vec![2, 3]);
    // ...until peer 4 wants one.
    probe.from(t0, 4, ExchangeMessage::HaveNone { file });
    probe.from(t0, 4, ExchangeMessage::Interested { file });
    assert_eq!(probe.unchoked(), vec![3, 4]);
}

/// An unchoked peer that asks for nothing for a whole
/// `idle_slot_interval` gives its slot to a peer waiting for one.
#[test]
fn an_idle_upload_slot_goes_to_a_waiting_peer() {
    let (_, content, manifest) = test_file(64, 4);
    let file = content.file_id;
    let config = ExchangeConfig { upload_slots: 1, optimistic_unchoke_slots: 0, ..ExchangeConfig::default() };
    let interval = config.idle_slot_interval;
    let mut probe = Probe::new(config, 10);
    let t0 = Instant::ZERO;
    let hashes = content.piece_hashes.clone();
    probe.input(t0, ExchangeInput::Seed { manifest, piece_hashes: hashes });
    for peer in 1..=2u64 {
        probe.connect(t0, peer);
        probe.from(t0, peer, ExchangeMessage::HaveNone { file });
        probe.from(t0, peer, ExchangeMessage::Interested { file });
    }
    assert_eq!(probe.unchoked(), vec![1]);
    // The first check finds peer 1 unchoked for part of the interval
    // only; it requests during the second: it keeps the slot.
    probe.exchange.handle_timeout(t0 + interval);
    probe.drain();
    let request = ExchangeMessage::Request { file, piece: PieceIndex(0), offset: 0, length: 16 * 1024 };
    probe.input(t0 + interval * 3 / 2, ExchangeInput::Message { conn: ConnId(1), message: request });
    probe.exchange.handle_timeout(t0 + interval * 2);
    probe.drain();
    assert_eq!(probe.unchoked(), vec![1], "a request in the last interval kept the slot");
    // A whole interval without a request: the slot moves to peer 2.
    probe.exchange.handle_timeout(t0 + interval * 3);
    probe.drain();
    assert_eq!(probe.unchoked(), vec![2]);
    assert_eq!(probe.exchange.stats().idle_slots_reassigned, 1);
}

/// A manifest without hashes: leechers fetch them in proven batches (from
/// the seed and from each other) before any block; a peer serving forged
/// batches is disconnected and nobody is misled.
#[test]
fn piece_hashes_are_fetched_with_proofs_and_forgeries_rejected() {
    let forger = 3;
    let mut s = swarm_with(Setup {
        pieces: 64,
        leechers: 10,
        forge_hashes: vec![forger],
        fetch_hashes: true,
        seed: 5,
        ..Setup::default()
    });
    let honest: Vec<usize> = (1..=10).filter(|&i| i != forger).collect();
    let done = s.net.run_until_with(Instant::ZERO + Duration::from_secs(600), |n| all_complete(n, &honest, &s.file));
    assert!(done, "leechers without inline hashes did not complete");
    let mut forgeries = 0;
    for &i in &honest {
        let peer = s.net.node(i);
        assert_eq!(peer.content().as_deref(), Some(&s.data[..]), "node {i} holds the file");
        assert_eq!(peer.exchange.stats().pieces_failed, 0, "hashes were right before any piece was checked");
        forgeries += peer
            .events
            .iter()
            .filter(|(_, e)| matches!(e, ExchangeEvent::ProtocolViolation { violation: Violation::BadHashes, node, .. } if *node == node_id(forger)))
            .count();
    }
    assert!(forgeries >= 1, "the forger was caught");
    eprintln!("hash fetch: forger caught by {forgeries} peers");
}

/// piece a second time, and the swarm still completes.
#[test]
fn a_super_seed_serves_each_piece_once_before_any_twice() {
    let mut s = swarm_with(Setup { pieces: 64, leechers: 8, super_seed: true, seed: 6, ..Setup::default() });
    let leechers: Vec<usize> = (1..=8).collect();
    let done = s.net.run_until_with(Instant::ZERO + Duration::from_secs(600), |n| all_complete(n, &leechers, &s.file));
    assert!(done, "leechers of a super seed did not complete");
    for &i in &leechers {
        assert_eq!(s.net.node(i).content().as_deref(), Some(&s.data[..]));
    }
    // Piece starts (block 0) in the order the seed served them.
    let starts: Vec<PieceIndex> =
        s.net.node(0).served.iter().filter(|(_, offset)| *offset == 0).map(|(piece, _)| *piece).collect();
    let mut seen = std::collections::BTreeSet::new();
    for piece in &starts {
        if !seen.insert(*piece) {
            assert_eq!(seen.len(), 64, "{piece:?} served twice after only {} distinct pieces", seen.len());
            break;
        }
    }
    assert_eq!(seen.len(), 64, "every piece came from the seed once");
    eprintln!("super seed: served {} piece starts for 64 pieces to 8 leechers", starts.len());
}

/// A super seed learns a revealed piece has spread from whoever announces
/// it, not only from the peer it was revealed to: that peer may fetch it
/// from a neighbour and, since we hold the piece, never send us the HAVE
/// (redundant HAVEs are suppressed). Waiting on it stalled a 200-peer
/// crowd with four pieces never revealed.
#[test]
fn a_super_seed_reveals_more_when_another_peer_announces_a_revealed_piece() {
    let (_, content, manifest) = test_file(64, 7);
    let file = content.file_id;
    let config = ExchangeConfig { super_seeding: true, super_seed_reveals_per_peer: 2, ..ExchangeConfig::default() };
    let mut seed = Probe::new(config, 13);
    let t0 = Instant::ZERO;
    seed.input(t0, ExchangeInput::Seed { manifest, piece_hashes: content.piece_hashes.clone() });
    for peer in 1..=2u64 {
        seed.connect(t0, peer);
        seed.from(t0, peer, ExchangeMessage::HaveNone { file });
    }
    let revealed = |seed: &Probe, conn: u64| -> Vec<PieceIndex> {
        let mut pieces: Vec<PieceIndex> = seed
            .sent
            .iter()
            .filter(|(c, _)| c.0 == conn)
            .flat_map(|(_, m)| match m {
                ExchangeMessage::Have { pieces, .. } => pieces.clone(),
                _ => Vec::new(),
            })
            .collect();
        pieces.sort();
        pieces
    };
    let (first, second) = (revealed(&seed, 1), revealed(&seed, 2));
    assert_eq!((first.len(), second.len()), (2, 2), "two pieces revealed to each peer");
    assert!(first.iter().all(|p| !second.contains(p)), "no piece revealed twice before all once");
    // Peer 2 got peer 1's first piece from peer 1 and announces it; peer 1
    // (which holds it too) says nothing, as its HAVE would be redundant.
    seed.from(t0, 2, ExchangeMessage::Have { file, pieces: vec![first[0]] });
    let now_first = revealed(&seed, 1);
    assert_eq!(now_first.len(), 3, "peer 1 is shown a new piece in place of the one that spread: {now_first:?}");
    let new: Vec<_> = now_first.iter().filter(|p| !first.contains(p)).collect();
    assert!(new.len() == 1 && !second.contains(new[0]), "the new piece was revealed to nobody before: {new:?}");
    // Peer 2 still waits on its own two reveals: announcing a piece that
    // was not revealed to it changes nothing for it.
    assert_eq!(revealed(&seed, 2), second);
}

/// A node with no room for another peer of a file says so with a `Leave`
/// (a silent refusal left the opener waiting forever on a session nobody
/// serves: a 100-peer swarm had a download stuck at 0 pieces); the
/// opener drops its side, and a `Leave` is never answered.
#[test]
fn a_full_swarm_refuses_a_session_with_leave() {
    let (_, content, manifest) = test_file(64, 4);
    let file = content.file_id;
    let config = ExchangeConfig { peers_per_file_max: 1, ..ExchangeConfig::default() };
    let mut seed = Probe::new(config, 11);
    let t0 = Instant::ZERO;
    seed.input(t0, ExchangeInput::Seed { manifest: manifest.clone(), piece_hashes: content.piece_hashes.clone() });
    for peer in 1..=2u64 {
        seed.input(t0, ExchangeInput::PeerConnected { conn: ConnId(peer), node: node_id(peer as usize) });
        seed.input(t0, ExchangeInput::Message { conn: ConnId(peer), message: ExchangeMessage::HaveNone { file } });
    }
    assert_eq!(seed.exchange.peer_count(&file), 1);
    assert_eq!(
        seed.sent,
        vec![(ConnId(1), ExchangeMessage::HaveAll { file }), (ConnId(2), ExchangeMessage::Leave { file })],
        "the first peer is served, the second told there is no room"
    );
    // The refused side: it opened a session, gets the `Leave`, drops it.
    let mut leecher = Probe::new(ExchangeConfig::default(), 12);
    leecher.input(t0, ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] });
    leecher.input(t0, ExchangeInput::PeerConnected { conn: ConnId(0), node: node_id(0) });
    leecher.input(t0, ExchangeInput::Open { conn: ConnId(0), file });
    assert_eq!(leecher.exchange.peer_count(&file), 1);
    leecher.input(t0, ExchangeInput::Message { conn: ConnId(0), message: ExchangeMessage::Leave { file } });
    assert_eq!(leecher.exchange.peer_count(&file), 0, "the refused session is gone: the node looks elsewhere");
    // A late `Leave` for a session nobody holds opens nothing, answers nothing.
    let before = seed.sent.len();
    seed.input(t0, ExchangeInput::Message { conn: ConnId(2), message: ExchangeMessage::Leave { file } });
    assert_eq!(seed.sent.len(), before);
    assert_eq!(seed.exchange.peer_count(&file), 1);
}

/// Two peers holding every piece trade nothing: the session ends on both
/// sides (libtorrent's `close_redundant_connections`), freeing peer slots
/// for peers still downloading; whoever completes second says so.
#[test]
fn sessions_between_complete_peers_end() {
    let (data, content, manifest) = test_file(4, 5);
    let file = content.file_id;
    let layout = content.layout;
    let t0 = Instant::ZERO;
    // A seed meeting a seed leaves at once.
    let mut seed = Probe::new(ExchangeConfig::default(), 13);
    seed.input(t0, ExchangeInput::Seed { manifest: manifest.clone(), piece_hashes: content.piece_hashes.clone() });
    seed.input(t0, ExchangeInput::PeerConnected { conn: ConnId(1), node: node_id(1) });
    seed.input(t0, ExchangeInput::Message { conn: ConnId(1), message: ExchangeMessage::HaveAll { file } });
    assert_eq!(seed.sent.last(), Some(&(ConnId(1), ExchangeMessage::Leave { file })));
    assert_eq!(seed.exchange.peer_count(&file), 0);
    // A leecher fed by a seed leaves the seed when it completes, and keeps
    // its session with a peer still downloading.
    let mut leecher = Probe::new(ExchangeConfig::default(), 14);
    leecher.input(t0, ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] });
    for (conn, announcement) in [(0, ExchangeMessage::HaveAll { file }), (2, ExchangeMessage::HaveNone { file })] {
        leecher.input(t0, ExchangeInput::PeerConnected { conn: ConnId(conn), node: node_id(conn as usize) });
        leecher.input(t0, ExchangeInput::Message { conn: ConnId(conn), message: announcement });
    }
    leecher.input(t0, ExchangeInput::Message { conn: ConnId(0), message: ExchangeMessage::Unchoke { file } });
    for _ in 0..16 {
        let requests = std::mem::take(&mut leecher.requests);
        if requests.is_empty() {
            break;
        }
        for (conn, piece, offset, length) in requests {
            let start = layout.piece_offset(piece) as usize + offset as usize;
            let block = Bytes::copy_from_slice(&data[start..start + length as usize]);
            let message = ExchangeMessage::Block { file, piece, offset, data: block };
            leecher.input(t0, ExchangeInput::Message { conn, message });
        }
        for job in std::mem::take(&mut leecher.verify) {
            leecher.input(t0, ExchangeInput::PieceHashed(job.hash()));
        }
    }
    assert!(leecher.exchange.is_complete(&file));
    assert!(leecher.sent.contains(&(ConnId(0), ExchangeMessage::Leave { file })), "left the seed");
    assert!(!leecher.sent.contains(&(ConnId(2), ExchangeMessage::Leave { file })), "kept the downloader");
    assert_eq!(leecher.exchange.peer_count(&file), 1);
}

/// The driver's hash says a piece is bad: the piece is fetched again, its
/// sender gets a strike (one, not a ban), and the download completes with
/// the right bytes.
#[test]
fn a_piece_whose_hash_answer_mismatches_is_refetched_and_its_sender_struck() {
    // Two leechers: a culprit never gets the same piece again, so the
    // piece comes back from the other source.
    let mut s = swarm(8, 2, &[], 7);
    s.net.with_node(1, |peer, _| peer.wrong_hashes = 1);
    let done = s.net.run_until_with(Instant::ZERO + Duration::from_secs(60), |n| all_complete(n, &[1, 2], &s.file));
    assert!(done, "the downloads did not complete");
    let peer = s.net.node(1);
    assert_eq!(peer.content().as_deref(), Some(&s.data[..]));
    let stats = peer.exchange.stats();
    assert_eq!((stats.pieces_verified, stats.pieces_failed), (8, 1));
    assert_eq!(stats.blocks_received, 9 * 4, "eight pieces of four blocks, one of them twice");
    let failed: Vec<&Vec<NodeId>> = peer
        .events
        .iter()
        .filter_map(|(_, e)| match e {
            ExchangeEvent::PieceFailed { culprits, .. } => Some(culprits),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1);
    assert!(!failed[0].is_empty(), "the piece's senders are blamed");
    assert!(failed[0].iter().all(|n| [node_id(0), node_id(2)].contains(n)), "{failed:?}");
    assert!(!peer.events.iter().any(|(_, e)| matches!(e, ExchangeEvent::PeerBanned { .. })), "one strike is no ban");
}

/// A driver that is slow to hash holds back the download, not memory:
/// pieces waiting for their hash count in the unverified bytes, so at
/// `unverified_bytes_max` nothing more is requested until answers come.
#[test]
fn pieces_waiting_for_their_hash_are_bounded_by_the_unverified_bytes() {
    let piece_bytes: u64 = 64 * 1024;
    let mut s = swarm_with(Setup {
        pieces: 16,
        leechers: 1,
        unverified_bytes_max: Some(3 * piece_bytes),
        seed: 8,
        ..Setup::default()
    });
    s.net.with_node(1, |peer, _| peer.held = Some(Vec::new()));
    s.net.run_for(Duration::from_secs(5));
    let peer = s.net.node(1);
    assert_eq!(peer.held.as_ref().map(Vec::len), Some(3), "three pieces fill the budget");
    assert_eq!(peer.exchange.pieces_verifying(), 3);
    assert!(peer.pieces.iter().all(Option::is_none), "nothing is stored before its hash");
    assert_eq!(s.net.node(0).served.len(), 3 * 4, "no block past the budget was requested");
    // The hasher catches up: the rest follows.
    s.net.with_node(1, |peer, now| {
        for job in peer.held.take().unwrap_or_default() {
            peer.exchange.handle_input(now, ExchangeInput::PieceHashed(job.hash()));
        }
        peer.pump(now);
    });
    let done = s.net.run_until_with(s.net.now() + Duration::from_secs(60), |n| all_complete(n, &[1], &s.file));
    assert!(done, "the download did not resume after the answers");
    assert_eq!(s.net.node(1).content().as_deref(), Some(&s.data[..]));
    assert_eq!(s.net.node(1).exchange.pieces_verifying(), 0);
}

/// A hash answer that arrives after its file was removed is dropped, and
/// so is one for an earlier download of a file added again: only the
/// answer to the current question stores the piece.
#[test]
fn a_late_hash_answer_for_a_removed_file_is_ignored() {
    let (data, content, manifest) = test_file(4, 9);
    let (layout, file) = (content.layout, content.file_id);
    let mut probe = Probe::new(ExchangeConfig::default(), 9);
    let t0 = Instant::ZERO;
    let download = ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] };
    // Streaming from piece 0: both downloads fetch it first.
    let stream = ExchangeInput::Stream { file, from: Some(PieceIndex(0)) };
    let piece = PieceIndex(0);
    probe.input(t0, download.clone());
    probe.input(t0, stream.clone());
    probe.add_seed(t0, ConnId(1), file);
    assert_eq!(probe.serve(t0, ConnId(1), Some(piece), &data, layout, file), 4);
    let stale = probe.verify.pop().expect("a complete piece is handed out to hash");
    assert_eq!((stale.file, stale.piece), (file, piece));

    probe.input(t0, ExchangeInput::Remove { file });
    probe.input(t0, ExchangeInput::PieceHashed(stale.hash()));
    assert!(probe.stored.is_empty() && probe.events.is_empty(), "removed: the answer is dropped");

    // Added again: the same piece is fetched and asked about anew.
    probe.requests.clear();
    probe.input(t0, download);
    probe.input(t0, stream);
    probe.input(t0, ExchangeInput::Open { conn: ConnId(1), file });
    for message in [ExchangeMessage::HaveAll { file }, ExchangeMessage::Unchoke { file }] {
        probe.input(t0, ExchangeInput::Message { conn: ConnId(1), message });
    }
    assert_eq!(probe.serve(t0, ConnId(1), Some(piece), &data, layout, file), 4);
    let current = probe.verify.pop().expect("asked again");
    assert_eq!(current.piece, piece);
    assert_ne!(current.id, stale.id, "each download numbers its questions apart");
    probe.input(t0, ExchangeInput::PieceHashed(stale.hash()));
    assert!(probe.stored.is_empty(), "an answer to the earlier download is dropped");
    assert_eq!(probe.exchange.pieces_verifying(), 1);
    probe.input(t0, ExchangeInput::PieceHashed(current.hash()));
    assert_eq!(probe.stored, [piece]);
    assert_eq!(probe.events, [ExchangeEvent::PieceVerified { file, piece }]);
}

/// The sender of a piece leaves while it is being hashed, and the hash is
/// wrong: nobody present is blamed (its slot may have a new occupant), the
/// piece is fetched from another peer, and nothing panics.
#[test]
fn a_sender_gone_while_its_piece_is_hashed_is_not_confused_with_others() {
    let (data, content, manifest) = test_file(4, 10);
    let (layout, file) = (content.layout, content.file_id);
    let mut probe = Probe::new(ExchangeConfig::default(), 10);
    let t0 = Instant::ZERO;
    probe.input(t0, ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] });
    probe.add_seed(t0, ConnId(1), file);
    let piece = probe.requests[0].1;
    assert_eq!(probe.serve(t0, ConnId(1), Some(piece), &data, layout, file), 4);
    let job = probe.verify.pop().expect("a complete piece is handed out to hash");
    probe.input(t0, ExchangeInput::PeerDisconnected { conn: ConnId(1) });
    // Another peer takes the freed slot.
    probe.requests.clear();
    probe.add_seed(t0, ConnId(2), file);
    let mut wrong = job.hash();
    wrong.hash.0[0] ^= 1;
    probe.input(t0, ExchangeInput::PieceHashed(wrong));
    assert_eq!(probe.events, [ExchangeEvent::PieceFailed { file, piece, culprits: vec![] }]);
    assert!(!probe.events.iter().any(|e| matches!(e, ExchangeEvent::PeerBanned { .. })));
    // The other peer serves everything asked of it, the piece included.
    for _ in 0..8 {
        probe.serve(t0, ConnId(2), None, &data, layout, file);
        for job in std::mem::take(&mut probe.verify) {
            probe.input(t0, ExchangeInput::PieceHashed(job.hash()));
        }
    }
    assert!(probe.exchange.is_complete(&file), "the download completed from the other peer");
    assert_eq!(probe.stored.iter().filter(|&&p| p == piece).count(), 1, "stored once, the good copy");
}

/// Hashing lags behind a bad peer: it completes pieces and starts another
/// before its strikes land. When it is banned, the piece it left half
/// done starts over without its blocks, so the honest peer that finishes
/// it is neither blamed nor shut out of it, and the download completes.
#[test]
fn a_banned_peers_half_done_piece_does_not_blame_who_finishes_it() {
    let (data, content, manifest) = test_file(16, 11);
    let (layout, file) = (content.layout, content.file_id);
    let flipped: Vec<u8> = data.iter().map(|b| !b).collect();
    let config = ExchangeConfig { strikes_max: 3, ..ExchangeConfig::default() };
    let mut probe = Probe::new(config, 11);
    let t0 = Instant::ZERO;
    probe.input(t0, ExchangeInput::Download { manifest, piece_hashes: None, have: vec![] });
    let (bad, good) = (ConnId(1), ConnId(2));
    probe.add_seed(t0, bad, file);
    // Three whole pieces from the bad peer, their hashes not yet answered.
    while probe.verify.len() < 3 {
        let piece = probe.requests.iter().find(|r| r.0 == bad).map(|r| r.1).expect("the bad peer is asked");
        probe.serve(t0, bad, Some(piece), &flipped, layout, file);
    }
    // Half of a fourth.
    let piece = probe.requests.iter().find(|r| r.0 == bad).map(|r| r.1).expect("a fourth piece");
    let half: Vec<_> = probe.requests.iter().filter(|r| r.0 == bad && r.1 == piece).take(2).copied().collect();
    for (conn, piece, offset, length) in half {
        let start = layout.piece_offset(piece) as usize + offset as usize;
        let block = Bytes::copy_from_slice(&flipped[start..start + length as usize]);
        probe.input(
            t0,
            ExchangeInput::Message { conn, message: ExchangeMessage::Block { file, piece, offset, data: block } },
        );
    }
    probe.add_seed(t0, good, file);
    for job in std::mem::take(&mut probe.verify) {
        probe.input(t0, ExchangeInput::PieceHashed(job.hash()));
    }
    assert!(probe.events.contains(&ExchangeEvent::PeerBanned { file, node: node_id(1) }), "{:?}", probe.events);
    probe.input(t0, ExchangeInput::PeerDisconnected { conn: bad });
    probe.requests.retain(|r| r.0 == good);
    for _ in 0..16 {
        probe.serve(t0, good, None, &data, layout, file);
        for job in std::mem::take(&mut probe.verify) {
            probe.input(t0, ExchangeInput::PieceHashed(job.hash()));
        }
    }
    assert!(probe.exchange.is_complete(&file), "the honest peer served every piece");
    for event in &probe.events {
        if let ExchangeEvent::PieceFailed { culprits, .. } = event {
            assert_eq!(culprits, &[node_id(1)], "only the bad peer is blamed");
        }
    }
    assert_eq!(probe.exchange.stats().pieces_failed, 3);
}
