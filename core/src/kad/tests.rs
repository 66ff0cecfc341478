//! Machine-level tests: a single [`Kademlia`] driven by hand, and many on
//! the in-process [`Network`] harness (fixed latency, silent crashes).
//! Outcomes are printed with `eprintln!` (run with `--nocapture`).

use std::collections::{BTreeMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{Rng, RngExt, SeedableRng};

use super::*;
use crate::content::{Content, Layout, PieceHash};
use crate::ids::Distance;
use crate::testkit::{Machine, Network, NodeIndex};
use crate::wire::Message;

// ---- harness adapter ------------------------------------------------------

fn addr_of(index: NodeIndex) -> SocketAddr {
    let i = u32::try_from(index).unwrap();
    SocketAddr::from((Ipv4Addr::from(0x0a00_0000 | i), 4000))
}

fn index_of(addr: SocketAddr) -> NodeIndex {
    match addr {
        SocketAddr::V4(v4) => (u32::from(*v4.ip()) & 0x00ff_ffff) as NodeIndex,
        SocketAddr::V6(_) => usize::MAX,
    }
}

/// A Kademlia machine on the harness. Messages carry the sender's contact,
/// standing in for the identity a real connection's handshake proves.
struct Node {
    kad: Kademlia,
    outbox: VecDeque<(NodeIndex, (Contact, Message))>,
    events: Vec<KadEvent>,
    /// Answers carrying a value (a manifest or keyword entries).
    values_sent: usize,
}

impl Node {
    fn new(config: KadConfig, index: NodeIndex, id: NodeId, seed: [u8; 32]) -> Self {
        let local = Contact { id, addr: addr_of(index) };
        Self {
            kad: Kademlia::new(config, local, seed, Instant::ZERO).unwrap(),
            outbox: VecDeque::new(),
            events: Vec::new(),
            values_sent: 0,
        }
    }

    /// Move the machine's outputs to the harness (a driver's drain loop).
    fn drain(&mut self) {
        let me = self.kad.local();
        while let Some(output) = self.kad.poll_output() {
            match output {
                KadOutput::Send { to, id, request } => {
                    self.outbox.push_back((index_of(to.addr), (me, Message::Request { id, body: request })));
                }
                KadOutput::SendToAddress { addr, id, request } => {
                    self.outbox.push_back((index_of(addr), (me, Message::Request { id, body: request })));
                }
                KadOutput::Respond { to, id, response } => {
                    self.values_sent += usize::from(matches!(response, Response::Value { .. }));
                    self.outbox.push_back((index_of(to.addr), (me, Message::Response { id, body: response })));
                }
                KadOutput::Event(event) => self.events.push(event),
            }
        }
    }

    fn finished(&self, query: QueryId) -> Option<(QueryStats, QueryResult)> {
        self.events.iter().find_map(|e| match e {
            KadEvent::QueryFinished { id, stats, result } if *id == query => Some((*stats, result.clone())),
            _ => None,
        })
    }
}

impl Machine for Node {
    type Message = (Contact, Message);

    fn handle_message(&mut self, now: Instant, _from: NodeIndex, (sender, message): (Contact, Message)) {
        let input = match message {
            Message::Request { id, body } => KadInput::Request { from: sender, id, request: body },
            Message::Response { id, body } => KadInput::Response { from: sender, id, response: body },
            _ => return,
        };
        self.kad.handle_input(now, input);
        self.drain();
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.kad.handle_timeout(now);
        self.drain();
    }

    fn poll_transmit(&mut self) -> Option<(NodeIndex, (Contact, Message))> {
        self.outbox.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.kad.poll_timeout()
    }
}

const LATENCY: Duration = Duration::from_millis(20);

fn random_key(rng: &mut ChaCha8Rng) -> [u8; 32] {
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    key
}

/// `n` nodes joining one after another through node 0's address only.
fn build(n: usize, seed: u64, config: &KadConfig) -> (Network<Node>, ChaCha8Rng) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut net = Network::new(LATENCY);
    for index in 0..n {
        let id = NodeId(random_key(&mut rng));
        let node = Node::new(config.clone(), index, id, random_key(&mut rng));
        let at = net.add(node);
        assert_eq!(at, index);
        if index > 0 {
            net.with_node(index, |m, now| {
                m.kad.bootstrap(now, &[addr_of(0)]);
                m.drain();
            });
        }
        net.run_for(Duration::from_millis(100));
    }
    net.run_for(Duration::from_secs(30));
    (net, rng)
}

/// Run a query on `node` to completion.
fn run_query(
    net: &mut Network<Node>,
    node: NodeIndex,
    start: impl FnOnce(&mut Kademlia, Instant) -> QueryId,
) -> (QueryStats, QueryResult) {
    let query = net.with_node(node, |m, now| {
        let q = start(&mut m.kad, now);
        m.drain();
        q
    });
    let deadline = net.now() + Duration::from_secs(120);
    assert!(net.run_until_with(deadline, |n| n.node(node).finished(query).is_some()), "query never finished");
    let result = net.node(node).finished(query).unwrap();
    // Keep event lists short: later queries search them.
    net.with_node(node, |m, _| m.events.clear());
    result
}

fn closest_live(net: &Network<Node>, target: &[u8; 32]) -> NodeId {
    net.nodes()
        .filter(|(i, _)| net.is_alive(*i))
        .map(|(_, m)| m.kad.local().id)
        .min_by_key(|id| id.distance(target))
        .unwrap()
}

fn percentile(sorted: &[u32], p: usize) -> u32 {
    sorted[(sorted.len() - 1) * p / 100]
}

fn histogram(values: &[u32]) -> BTreeMap<u32, usize> {
    let mut h = BTreeMap::new();
    for v in values {
        *h.entry(*v).or_insert(0) += 1;
    }
    h
}

/// Outcome of a series of lookups; the vectors are sorted.
#[derive(Debug, PartialEq, Eq)]
struct Lookups {
    /// Lookups whose result started with the closest live node.
    found: usize,
    rounds: Vec<u32>,
    messages: Vec<u32>,
    durations_ms: Vec<u32>,
}

impl Lookups {
    fn summary(&self) -> String {
        format!(
            "found closest live {}/{}; rounds histogram {:?} (median {}, p90 {}, max {}); messages median {} p90 {}; \
             duration ms median {} p90 {} max {}",
            self.found,
            self.rounds.len(),
            histogram(&self.rounds),
            percentile(&self.rounds, 50),
            percentile(&self.rounds, 90),
            percentile(&self.rounds, 100),
            percentile(&self.messages, 50),
            percentile(&self.messages, 90),
            percentile(&self.durations_ms, 50),
            percentile(&self.durations_ms, 90),
            percentile(&self.durations_ms, 100),
        )
    }
}

/// `lookups` find_node queries for random keys from random live nodes, run
/// in concurrent batches of 50.
fn random_lookups(net: &mut Network<Node>, rng: &mut ChaCha8Rng, lookups: usize) -> Lookups {
    const BATCH: usize = 50;
    let mut found = 0;
    let mut rounds = Vec::new();
    let mut messages = Vec::new();
    let mut durations_ms = Vec::new();
    for batch in 0..lookups.div_ceil(BATCH) {
        let mut running = Vec::new();
        for _ in 0..BATCH.min(lookups - batch * BATCH) {
            let from = loop {
                let i = rng.random_range(0..net.len());
                if net.is_alive(i) {
                    break i;
                }
            };
            let target = random_key(rng);
            let query = net.with_node(from, |m, now| {
                let q = m.kad.find_node(now, target);
                m.drain();
                q
            });
            running.push((from, query, target));
        }
        let deadline = net.now() + Duration::from_secs(120);
        let all_done = |n: &Network<Node>| running.iter().all(|&(from, q, _)| n.node(from).finished(q).is_some());
        assert!(net.run_until_with(deadline, all_done), "lookups never finished");
        for &(from, query, target) in &running {
            let (stats, result) = net.node(from).finished(query).unwrap();
            let QueryResult::FindNode { closest } = result else { panic!("wrong result kind") };
            // The querying node itself may be the closest; it never lists itself.
            let me = net.node(from).kad.local().id;
            let best = match closest.first() {
                Some(b) if b.id.distance(&target) < me.distance(&target) => b.id,
                _ => me,
            };
            found += usize::from(best == closest_live(net, &target));
            rounds.push(stats.rounds);
            messages.push(stats.messages);
            durations_ms.push(u32::try_from(stats.duration.as_millis()).unwrap());
        }
        for &(from, ..) in &running {
            net.with_node(from, |m, _| m.events.clear());
        }
    }
    rounds.sort_unstable();
    messages.sort_unstable();
    durations_ms.sort_unstable();
    Lookups { found, rounds, messages, durations_ms }
}

fn sample_manifest(name: &str, size: u64) -> (FileManifest, FileId) {
    let layout = Layout::for_file(size);
    let hashes = (0..layout.piece_count()).map(|i| PieceHash([(i as u8) ^ (size as u8); 32])).collect();
    let content = Content::from_piece_hashes(layout, hashes);
    (FileManifest::new(name, &content).unwrap(), content.file_id)
}

// ---- many-node tests --------------------------------------------------------

#[test]
fn two_thousand_nodes_find_the_closest_node_in_few_rounds() {
    let (mut net, mut rng) = build(2_000, 1, &KadConfig::default());
    let sizes: Vec<usize> = net.nodes().map(|(_, m)| m.kad.table().len()).collect();
    eprintln!(
        "2000 nodes: table sizes min {} max {} mean {:.1}; {:?}",
        sizes.iter().min().unwrap(),
        sizes.iter().max().unwrap(),
        sizes.iter().sum::<usize>() as f64 / sizes.len() as f64,
        net.stats()
    );
    let report = random_lookups(&mut net, &mut rng, 1_000);
    eprintln!("2000 nodes, 1000 lookups: {}", report.summary());
    assert_eq!(report.found, 1_000, "every lookup finds the true closest node");
    assert!(percentile(&report.rounds, 50) <= 4, "median rounds {}", percentile(&report.rounds, 50));
}

#[test]
fn lookups_survive_thirty_percent_silent_crashes() {
    let (mut net, mut rng) = build(2_000, 2, &KadConfig::default());
    let mut crashed = 0;
    while crashed < 600 {
        let i = rng.random_range(0..net.len());
        if net.is_alive(i) {
            net.crash(i);
            crashed += 1;
        }
    }
    let report = random_lookups(&mut net, &mut rng, 1_000);
    let failed = net.nodes().map(|(_, m)| m.kad.counters().requests_failed).sum::<u64>();
    eprintln!("2000 nodes, 600 crashed, 1000 lookups: {}; requests failed {failed}", report.summary());
    assert!(report.found >= 990, "only {}/1000 lookups found the closest live node", report.found);
}

fn holders(net: &Network<Node>, file: FileId) -> Vec<NodeIndex> {
    net.nodes()
        .filter(|(i, m)| net.is_alive(*i) && m.kad.store().manifest(&file.0, net.now()).is_some())
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn manifests_are_found_everywhere_and_survive_holders_leaving() {
    let n = 300;
    let config = KadConfig::default();
    let k = config.bucket_size;
    let (mut net, _) = build(n, 3, &config);
    let (manifest, file) = sample_manifest("movie.mkv", 3_000_000);
    let origin = 17;
    let (stats, result) = run_query(&mut net, origin, |kad, now| kad.put_manifest(now, manifest.clone()).unwrap());
    eprintln!("put_manifest: {result:?} {stats:?}");
    assert_eq!(result, QueryResult::Stored { stored: k });

    let mut found = 0;
    for node in (0..n).filter(|&i| i != origin) {
        let (_, result) = run_query(&mut net, node, |kad, now| kad.get_manifest(now, file));
        found += usize::from(result == QueryResult::GetManifest { manifest: Some(manifest.clone()) });
    }
    eprintln!("manifest found by {found}/{} nodes", n - 1);
    assert_eq!(found, n - 1);

    // The originator and half of the holders leave silently.
    let original: Vec<NodeIndex> = holders(&net, file).into_iter().filter(|&i| i != origin).collect();
    assert!(original.len() >= k, "{} holders", original.len());
    net.crash(origin);
    let gone = original.len() / 2;
    for &i in &original[..gone] {
        net.crash(i);
    }
    eprintln!("crashed the originator and {gone} of {} holders", original.len());
    // Two replication intervals pass: remaining holders push the record to
    // the new k closest live nodes.
    net.run_for(Duration::from_secs(2 * 3_600 + 120));
    let mut live_by_distance: Vec<(Distance, NodeIndex)> =
        net.nodes().filter(|(i, _)| net.is_alive(*i)).map(|(i, m)| (m.kad.local().id.distance(&file), i)).collect();
    live_by_distance.sort_unstable();
    let now_held = holders(&net, file);
    let k_closest_holding = live_by_distance.iter().take(k).filter(|(_, i)| now_held.contains(i)).count();
    eprintln!("after 2h: {} live holders; {k_closest_holding}/{k} of the k closest live nodes hold it", now_held.len());
    assert_eq!(k_closest_holding, k, "replication restores the record on the k closest live nodes");

    let mut found = 0;
    let mut asked = 0;
    let live: Vec<NodeIndex> = (0..n).filter(|&i| net.is_alive(i)).collect();
    for node in live {
        asked += 1;
        let (_, result) = run_query(&mut net, node, |kad, now| kad.get_manifest(now, file));
        found += usize::from(result == QueryResult::GetManifest { manifest: Some(manifest.clone()) });
    }
    eprintln!("after holders left: found by {found}/{asked} live nodes");
    assert_eq!(found, asked);
}

/// A manifest lookup asks one node at a time (`value_parallelism`), so
/// the k holders send one copy per lookup; with α in flight, the holders
/// asked together each send theirs.
#[test]
fn a_manifest_lookup_costs_the_holders_one_copy() {
    let copies = |value_parallelism: usize| {
        let config = KadConfig { value_parallelism, ..KadConfig::default() };
        let (mut net, _) = build(200, 5, &config);
        let (manifest, file) = sample_manifest("crowd.bin", 3_000_000);
        run_query(&mut net, 3, |kad, now| kad.put_manifest(now, manifest.clone()).unwrap());
        let before: usize = net.nodes().map(|(_, m)| m.values_sent).sum();
        let holding = holders(&net, file);
        let askers: Vec<NodeIndex> = (0..200).filter(|i| !holding.contains(i)).take(40).collect();
        for &node in &askers {
            let (_, result) = run_query(&mut net, node, |kad, now| kad.get_manifest(now, file));
            assert_eq!(result, QueryResult::GetManifest { manifest: Some(manifest.clone()) });
        }
        let sent: usize = net.nodes().map(|(_, m)| m.values_sent).sum();
        (sent - before, askers.len())
    };
    let (serial, lookups) = copies(1);
    assert_eq!(serial, lookups, "one copy per lookup");
    let (parallel, _) = copies(3);
    assert!(parallel > lookups * 3 / 2, "α = 3 sends more copies: {parallel} for {lookups} lookups");
}

/// A crowd asking for one manifest at the same instant is served by the
/// k holders together: past its rate a holder answers with contacts, and
/// every lookup still finds the manifest from another holder.
#[test]
fn a_crowd_asking_at_once_spreads_over_the_holders() {
    let crowd = |per_s: u32, burst: u32| {
        let config =
            KadConfig { value_answers_per_key_per_s: per_s, value_answer_burst: burst, ..KadConfig::default() };
        let (mut net, _) = build(300, 11, &config);
        let (manifest, file) = sample_manifest("crowd.bin", 3_000_000);
        run_query(&mut net, 3, |kad, now| kad.put_manifest(now, manifest.clone()).unwrap());
        let holding = holders(&net, file);
        let before: Vec<usize> = net.nodes().map(|(_, m)| m.values_sent).collect();
        let started = net.now();
        let askers: Vec<(NodeIndex, QueryId)> = (0..300)
            .filter(|i| !holding.contains(i))
            .map(|i| {
                net.with_node(i, |m, now| {
                    let q = m.kad.get_manifest(now, file);
                    m.drain();
                    (i, q)
                })
            })
            .collect();
        let deadline = started + Duration::from_secs(120);
        assert!(net.run_until_with(deadline, |n| askers.iter().all(|&(i, q)| n.node(i).finished(q).is_some())));
        for &(i, q) in &askers {
            let (_, result) = net.node(i).finished(q).unwrap();
            assert_eq!(result, QueryResult::GetManifest { manifest: Some(manifest.clone()) }, "asker {i}");
        }
        let elapsed = net.now().saturating_duration_since(started);
        let copies: Vec<usize> = net.nodes().zip(&before).map(|((_, m), b)| m.values_sent - b).collect();
        let deferred: u64 = net.nodes().map(|(_, m)| m.kad.counters().value_answers_deferred).sum();
        let max = *copies.iter().max().unwrap();
        eprintln!(
            "{} askers, {per_s}/s burst {burst}: most copies from one holder {max}, deferred {deferred}, {elapsed:?}",
            askers.len()
        );
        (askers.len(), max, deferred, elapsed)
    };
    let (askers, unlimited, deferred, _) = crowd(1_000_000, 1_000_000);
    assert_eq!(deferred, 0);
    assert!(unlimited > askers / 10, "without a limit one holder serves much of the crowd: {unlimited}");
    // 21 holders can serve the crowd at this rate, but no single one can.
    let (per_s, burst) = (50, 10);
    let (_, limited, deferred, elapsed) = crowd(per_s, burst);
    assert!(deferred > 0);
    let allowed = burst as usize + (f64::from(per_s) * elapsed.as_secs_f64()).ceil() as usize;
    assert!(limited <= allowed, "{limited} copies from one holder, at most {allowed} allowed in {elapsed:?}");
    assert!(limited < unlimited);
}

/// A provider lookup ends once it knows `enough` providers instead of
/// asking every one of the k closest for the same list.
#[test]
fn a_provider_lookup_stops_once_it_knows_enough() {
    let config = KadConfig::default();
    let (mut net, _) = build(200, 6, &config);
    let file = FileId([0x5a; 32]);
    for node in 100..130 {
        run_query(&mut net, node, |kad, now| kad.add_provider(now, file));
    }
    let (all_stats, all) = run_query(&mut net, 7, |kad, now| kad.get_providers(now, file, usize::MAX));
    let QueryResult::GetProviders { providers } = all else { panic!("{all:?}") };
    assert_eq!(providers.len(), 30);
    let (stats, some) = run_query(&mut net, 8, |kad, now| kad.get_providers(now, file, 8));
    let QueryResult::GetProviders { providers } = some else { panic!("{some:?}") };
    assert!(stats.success && providers.len() >= 8, "{stats:?} {}", providers.len());
    assert!(
        stats.messages * 2 < all_stats.messages,
        "stopping early asks fewer nodes: {} against {}",
        stats.messages,
        all_stats.messages
    );
    // A holder that knows enough itself asks nobody.
    let holder = (0..200).find(|&i| net.node(i).kad.store().provider_count(&file) >= 8).expect("a holder");
    let (stats, local) = run_query(&mut net, holder, |kad, now| kad.get_providers(now, file, 8));
    let QueryResult::GetProviders { providers } = local else { panic!("{local:?}") };
    assert_eq!((stats.messages, stats.success, providers.len()), (0, true, config.providers_returned_max));
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let (mut net, mut rng) = build(120, 9, &KadConfig::default());
        let report = random_lookups(&mut net, &mut rng, 50);
        let tables: Vec<Vec<NodeId>> =
            net.nodes().map(|(_, m)| m.kad.table().entries().map(|e| e.contact.id).collect()).collect();
        (net.stats(), report, tables)
    };
    let (a, b) = (run(), run());
    assert_eq!(a.0, b.0);
    assert!(a == b, "two runs from the same seed diverged");
}

#[test]
fn records_lapse_when_the_originator_stops_republishing() {
    const HOUR_MS: u64 = 3_600_000;
    let config =
        KadConfig { record_ttl_ms: 3 * HOUR_MS, record_republish_interval_ms: 2 * HOUR_MS, ..KadConfig::default() };
    let (mut net, _) = build(60, 8, &config);
    let (manifest, file) = sample_manifest("short-lived.bin", 700_000);
    run_query(&mut net, 3, |kad, now| kad.put_manifest(now, manifest.clone()).unwrap());
    net.crash(3);
    // Holders replicate hourly, but only with the TTL that is left.
    net.run_for(Duration::from_millis(2 * HOUR_MS));
    let still = holders(&net, file).len();
    let (_, result) = run_query(&mut net, 40, |kad, now| kad.get_manifest(now, file));
    assert_eq!(result, QueryResult::GetManifest { manifest: Some(manifest) });
    net.run_for(Duration::from_millis(HOUR_MS + 2 * config.maintenance_interval_ms));
    let after = holders(&net, file).len();
    eprintln!("originator gone: {still} holders after 2h, {after} after the 3h TTL");
    assert!(still >= config.bucket_size);
    assert_eq!(after, 0, "replication must not keep an abandoned record alive");
    let (_, result) = run_query(&mut net, 41, |kad, now| kad.get_manifest(now, file));
    assert_eq!(result, QueryResult::GetManifest { manifest: None });
}

#[test]
fn forged_manifests_are_never_stored_nor_served() {
    let (mut net, _) = build(60, 4, &KadConfig::default());
    let (honest, file) = sample_manifest("honest.iso", 2_000_000);
    let mut forged = honest.clone();
    forged.piece_hashes.as_mut().unwrap()[0].0[0] ^= 1;
    let attacker = 5;
    let attacker_contact = net.node(attacker).kad.local();
    // The attacker stores the forgery directly on the k closest nodes.
    let mut by_distance: Vec<(Distance, NodeIndex)> =
        net.nodes().map(|(i, m)| (m.kad.local().id.distance(&file), i)).collect();
    by_distance.sort_unstable();
    for &(_, victim) in by_distance.iter().take(20) {
        net.with_node(victim, |m, now| {
            let request = Request::Store { key: file.0, record: Record::Manifest(forged.clone()), ttl_s: 86_400 };
            m.kad.handle_input(now, KadInput::Request { from: attacker_contact, id: RequestId(900), request });
            let responses: Vec<KadOutput> = std::iter::from_fn(|| m.kad.poll_output()).collect();
            assert!(
                responses.iter().any(|o| matches!(
                    o,
                    KadOutput::Respond { response: Response::Error { code: ErrorCode::Invalid }, .. }
                )),
                "forgery refused: {responses:?}"
            );
        });
    }
    assert!(holders(&net, file).is_empty());
    let (_, result) = run_query(&mut net, 30, |kad, now| kad.get_manifest(now, file));
    assert_eq!(result, QueryResult::GetManifest { manifest: None });
    // The honest manifest is still accepted afterwards.
    run_query(&mut net, 31, |kad, now| kad.put_manifest(now, honest.clone()).unwrap());
    let (_, result) = run_query(&mut net, 30, |kad, now| kad.get_manifest(now, file));
    assert_eq!(result, QueryResult::GetManifest { manifest: Some(honest) });
}

#[test]
fn a_provider_flood_from_one_peer_is_bounded() {
    let config = KadConfig { records_per_peer_max: 50, providers_per_key_max: 8, ..KadConfig::default() };
    let (mut net, _) = build(40, 5, &config);
    let victim = 7;
    let attacker = net.node(3).kad.local();
    let flooded = net.with_node(victim, |m, now| {
        let mut outcomes: BTreeMap<&'static str, usize> = BTreeMap::new();
        // 1,000 distinct files announced by the attacker itself.
        for n in 0..1_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&n.to_be_bytes());
            let request = Request::AddProvider { file: FileId(key), provider: attacker };
            m.kad.handle_input(now, KadInput::Request { from: attacker, id: RequestId(u64::from(n)), request });
        }
        // Spoofed: announcing other nodes as providers.
        for n in 0..100u8 {
            let victim_contact = Contact { id: NodeId([n; 32]), addr: attacker.addr };
            let request = Request::AddProvider { file: FileId([1; 32]), provider: victim_contact };
            m.kad.handle_input(now, KadInput::Request { from: attacker, id: RequestId(5_000), request });
        }
        // A sybil flood of one key from 100 identities.
        for n in 0..100u8 {
            let sybil = Contact { id: NodeId([n ^ 0x55; 32]), addr: attacker.addr };
            let request = Request::AddProvider { file: FileId([2; 32]), provider: sybil };
            m.kad.handle_input(now, KadInput::Request { from: sybil, id: RequestId(6_000), request });
        }
        while let Some(output) = m.kad.poll_output() {
            if let KadOutput::Respond { response, .. } = output {
                let name = match response {
                    Response::Stored => "stored",
                    Response::Error { code: ErrorCode::Overloaded } => "overloaded",
                    Response::Error { code: ErrorCode::Invalid } => "invalid",
                    _ => "other",
                };
                *outcomes.entry(name).or_insert(0) += 1;
            }
        }
        outcomes
    });
    let kad = &net.node(victim).kad;
    eprintln!("provider flood outcomes: {flooded:?}; counters {:?}", kad.counters());
    assert_eq!(kad.store().charged_to(&attacker.id), 50);
    assert_eq!(kad.counters().providers_spoofed, 100);
    assert_eq!(kad.store().provider_count(&FileId([1; 32])), 0);
    assert_eq!(kad.store().provider_count(&FileId([2; 32])), 8);
    assert_eq!(flooded.get("stored"), Some(&58));
    assert_eq!(flooded.get("invalid"), Some(&100));
    assert_eq!(flooded.get("overloaded"), Some(&(950 + 92)));
}

#[test]
fn name_search_intersects_tokens() {
    let (mut net, _) = build(100, 6, &KadConfig::default());
    let files = [
        ("Ubuntu 24.04 desktop amd64.iso", 11u8, 4_000_000_000u64),
        ("ubuntu-server.iso", 12, 2_000_000_000),
        ("debian.iso", 13, 600_000_000),
    ];
    for (i, (name, tag, size)) in files.iter().enumerate() {
        let entry = KeywordEntry { file: FileId([*tag; 32]), name: (*name).to_owned(), size: *size };
        net.with_node(10 + i, |m, now| {
            m.kad.publish_keywords(now, entry);
            m.drain();
        });
    }
    net.run_for(Duration::from_secs(30));
    let (stats, result) = run_query(&mut net, 50, |kad, now| kad.search(now, "ubuntu iso"));
    let QueryResult::Search { entries } = result else { panic!("not a search result") };
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    eprintln!("search \"ubuntu iso\": {names:?} {stats:?}");
    assert_eq!(names, vec!["Ubuntu 24.04 desktop amd64.iso", "ubuntu-server.iso"]);
    let (_, result) = run_query(&mut net, 60, |kad, now| kad.search(now, "Debian"));
    assert!(matches!(result, QueryResult::Search { entries } if entries.len() == 1 && entries[0].name == "debian.iso"));
    let (_, result) = run_query(&mut net, 61, |kad, now| kad.search(now, "fedora iso"));
    assert_eq!(result, QueryResult::Search { entries: Vec::new() });
}

#[test]
fn providers_are_found_and_expire_without_republish() {
    // Hour-scale TTLs keep the simulated span (and the test) short.
    let config =
        KadConfig { provider_ttl_ms: 2 * 3_600_000, provider_republish_interval_ms: 3_600_000, ..KadConfig::default() };
    let (mut net, _) = build(80, 7, &config);
    let file = FileId([0x42; 32]);
    let provider = net.node(9).kad.local();
    let (_, stored) = run_query(&mut net, 9, |kad, now| kad.add_provider(now, file));
    assert_eq!(stored, QueryResult::Stored { stored: config.bucket_size });
    let (_, result) = run_query(&mut net, 40, |kad, now| kad.get_providers(now, file, usize::MAX));
    assert_eq!(result, QueryResult::GetProviders { providers: vec![provider] });
    // Still there after three TTLs: the provider republishes before expiry.
    net.run_for(Duration::from_millis(3 * config.provider_ttl_ms));
    let (_, result) = run_query(&mut net, 41, |kad, now| kad.get_providers(now, file, usize::MAX));
    assert_eq!(result, QueryResult::GetProviders { providers: vec![provider] });
    // It stops providing: the records lapse at their TTL.
    net.with_node(9, |m, _| m.kad.stop_providing(file));
    net.run_for(Duration::from_millis(config.provider_ttl_ms) + Duration::from_secs(120));
    let (stats, result) = run_query(&mut net, 41, |kad, now| kad.get_providers(now, file, usize::MAX));
    assert_eq!(result, QueryResult::GetProviders { providers: Vec::new() });
    assert!(!stats.success);
}

// ---- single-machine tests -----------------------------------------------------

fn contact(n: u8) -> Contact {
    let mut id = [0u8; 32];
    id[0] = n;
    Contact { id: NodeId(id), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from(n) + 1000)) }
}

fn machine(config: KadConfig) -> Kademlia {
    Kademlia::new(config, Contact { id: NodeId([0xff; 32]), addr: addr_of(0) }, [9; 32], Instant::ZERO).unwrap()
}

fn drain(kad: &mut Kademlia) -> Vec<KadOutput> {
    std::iter::from_fn(|| kad.poll_output()).collect()
}

fn sends(outputs: &[KadOutput]) -> Vec<(Contact, RequestId, Request)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            KadOutput::Send { to, id, request } => Some((*to, *id, request.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn lookup_ends_by_the_kademlia_rule_and_marks_silent_contacts_stale() {
    let config = KadConfig { bucket_size: 2, parallelism: 2, ..KadConfig::default() };
    // Local id zero: 0x01.., 0x10.., 0x20.. fall in three different buckets,
    // so no ping-before-evict interferes.
    let mut kad =
        Kademlia::new(config.clone(), Contact { id: NodeId([0; 32]), addr: addr_of(0) }, [9; 32], Instant::ZERO)
            .unwrap();
    let t0 = Instant::ZERO;
    // Learn two contacts by receiving pings from them.
    for n in [0x10, 0x20] {
        kad.handle_input(t0, KadInput::Request { from: contact(n), id: RequestId(1), request: Request::Ping });
    }
    drain(&mut kad);
    let query = kad.find_node(t0, [0x01; 32]);
    let first = sends(&drain(&mut kad));
    assert_eq!(first.iter().map(|(c, ..)| c.id.0[0]).collect::<Vec<_>>(), vec![0x10, 0x20], "alpha = 2, closest");
    // 0x10 answers with a closer node; 0x20 stays silent.
    let response = Response::Nodes { closer: vec![contact(0x01)] };
    kad.handle_input(t0, KadInput::Response { from: contact(0x10), id: first[0].1, response });
    let second = sends(&drain(&mut kad));
    assert_eq!(second.iter().map(|(c, ..)| c.id.0[0]).collect::<Vec<_>>(), vec![0x01]);
    kad.handle_input(
        t0,
        KadInput::Response { from: contact(0x01), id: second[0].1, response: Response::Nodes { closer: vec![] } },
    );
    // The two closest live (0x01, 0x10) answered: finished without waiting for 0x20.
    let outputs = drain(&mut kad);
    let finished = outputs.iter().find_map(|o| match o {
        KadOutput::Event(KadEvent::QueryFinished { id, stats, result }) if *id == query => Some((stats, result)),
        _ => None,
    });
    let (stats, result) = finished.expect("finished by the Kademlia rule");
    assert_eq!(result, &QueryResult::FindNode { closest: vec![contact(0x01), contact(0x10)] });
    assert_eq!((stats.rounds, stats.messages, stats.success), (2, 3, true));
    // Early and spurious timeouts do nothing; the silent request times out.
    kad.handle_timeout(t0);
    kad.handle_timeout(t0 + Duration::from_millis(1));
    assert_eq!(kad.counters().requests_failed, 0);
    // First the stall deadline (a no-op: the query is over), then the
    // request's own timeout.
    let stall = kad.poll_timeout().unwrap();
    assert_eq!(stall, t0 + Duration::from_millis(config.request_stall_ms));
    kad.handle_timeout(stall);
    assert_eq!(kad.counters().requests_failed, 0);
    assert!(drain(&mut kad).is_empty());
    let timeout = kad.poll_timeout().unwrap();
    assert_eq!(timeout, t0 + Duration::from_millis(config.request_timeout_ms));
    kad.handle_timeout(timeout);
    kad.handle_timeout(timeout);
    assert_eq!(kad.counters().requests_failed, 1);
    let stale = kad.table().entries().find(|e| e.contact.id == contact(0x20).id).unwrap();
    assert_eq!(stale.failures, 1, "unresponsive contact marked stale");
    // A late answer is dropped and counted.
    kad.handle_input(timeout, KadInput::Response { from: contact(0x20), id: first[1].1, response: Response::Pong });
    assert_eq!(kad.counters().responses_unexpected, 1);
}

#[test]
fn find_value_stops_at_a_valid_value_and_skips_forgeries() {
    let mut kad = machine(KadConfig { parallelism: 1, ..KadConfig::default() });
    let (manifest, file) = sample_manifest("x.bin", 500_000);
    let mut forged = manifest.clone();
    forged.size += 1;
    for n in [0x10, 0x20, 0x30] {
        kad.handle_input(
            Instant::ZERO,
            KadInput::Request { from: contact(n), id: RequestId(1), request: Request::Ping },
        );
    }
    drain(&mut kad);
    let query = kad.get_manifest(Instant::ZERO, file);
    let mut answers = vec![Record::Manifest(forged), Record::Manifest(manifest.clone())].into_iter();
    let mut asked = 0;
    let result = loop {
        let outputs = drain(&mut kad);
        if let Some(result) = outputs.iter().find_map(|o| match o {
            KadOutput::Event(KadEvent::QueryFinished { id, result, .. }) if *id == query => Some(result.clone()),
            _ => None,
        }) {
            break result;
        }
        let (to, id, request) = sends(&outputs).pop().expect("lookup continues");
        assert_eq!(request, Request::FindValue { key: file.0 });
        asked += 1;
        let record = answers.next().expect("stops after the valid value");
        kad.handle_input(Instant::ZERO, KadInput::Response { from: to, id, response: Response::Value { record } });
    };
    assert_eq!(result, QueryResult::GetManifest { manifest: Some(manifest) });
    assert_eq!(asked, 2);
    assert_eq!(kad.counters().values_rejected, 1);
}

/// A holder answers a key with its value at the key's rate, and a
/// manifest it published itself at the originator's lower rate; past
/// them, with contacts.
#[test]
fn a_holder_answers_a_hot_key_at_its_rate_and_its_own_manifest_at_a_lower_one() {
    let config = KadConfig::default();
    let mut kad = machine(config.clone());
    let (manifest, file) = sample_manifest("hot.bin", 500_000);
    let store = Request::Store { key: file.0, record: Record::Manifest(manifest), ttl_s: 3_600 };
    kad.handle_input(Instant::ZERO, KadInput::Request { from: contact(1), id: RequestId(1), request: store });
    let (own, own_file) = sample_manifest("own.bin", 700_000);
    kad.put_manifest(Instant::ZERO, own).unwrap();
    drain(&mut kad);
    // Values answered for `key` out of `asks` requests from different
    // peers at `at`.
    let answer = |kad: &mut Kademlia, key: FileId, at: Instant, asks: u8| {
        let mut values = 0;
        for n in 0..asks {
            let request = Request::FindValue { key: key.0 };
            kad.handle_input(at, KadInput::Request { from: contact(n + 2), id: RequestId(u64::from(n)), request });
            for output in drain(kad) {
                match output {
                    KadOutput::Respond { response: Response::Value { .. }, .. } => values += 1,
                    KadOutput::Respond { response: Response::Nodes { closer }, .. } => {
                        assert!(!closer.is_empty(), "the asker is sent on to other nodes");
                    }
                    _ => {}
                }
            }
        }
        values
    };
    let burst = config.value_answer_burst as usize;
    let asks = u8::try_from(burst + 20).unwrap();
    assert_eq!(answer(&mut kad, file, Instant::ZERO, asks), burst);
    assert_eq!(kad.counters().value_answers_deferred, 20);
    // Later, the steady rate's worth, up to the burst.
    let step = Duration::from_micros(1_000_000 / u64::from(config.value_answers_per_key_per_s));
    assert_eq!(answer(&mut kad, file, Instant::ZERO + step * 3, asks), 3);
    let later = Instant::ZERO + Duration::from_secs(5);
    assert_eq!(answer(&mut kad, file, later, asks), burst);
    // Our own manifest: one answer per 1 / origin_value_answers_per_s.
    assert_eq!(answer(&mut kad, own_file, later, asks), 1);
    let step = Duration::from_micros(1_000_000 / u64::from(config.origin_value_answers_per_s));
    assert_eq!(answer(&mut kad, own_file, later + step / 2, asks), 0);
    assert_eq!(answer(&mut kad, own_file, later + step, asks), 1);
}

#[test]
fn empty_table_retries_bootstrap_with_backoff() {
    let config = KadConfig::default();
    let mut kad = machine(config.clone());
    let seed = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    kad.bootstrap(Instant::ZERO, &[seed]);
    let mut attempts = Vec::new();
    let mut now = Instant::ZERO;
    for _ in 0..4 {
        let outputs = drain(&mut kad);
        for o in &outputs {
            if let KadOutput::SendToAddress { addr, id, .. } = o {
                assert_eq!(*addr, seed);
                attempts.push(now);
                kad.handle_input(now, KadInput::RequestFailed { id: *id });
            }
        }
        assert!(drain(&mut kad).contains(&KadOutput::Event(KadEvent::Bootstrapped { contacts: 0 })));
        now = kad.poll_timeout().unwrap();
        kad.handle_timeout(now);
    }
    let gaps: Vec<u64> = attempts.windows(2).map(|w| (w[1] - w[0]).as_millis() as u64).collect();
    assert_eq!(gaps, vec![1_000, 2_000, 4_000]);
}

/// Join through one seed that answers with `closer`: checks the seed is
/// asked for our own neighbourhood, and returns its contact.
fn join_through_seed(kad: &mut Kademlia, closer: Vec<Contact>) -> Contact {
    let seed = SocketAddr::from((Ipv4Addr::LOCALHOST, 9));
    kad.bootstrap(Instant::ZERO, &[seed]);
    let outputs = drain(kad);
    let Some(KadOutput::SendToAddress { id, request, .. }) = outputs.first() else { panic!("{outputs:?}") };
    assert_eq!(*request, Request::FindNode { target: kad.local().id.0 });
    let seed_contact = Contact { id: NodeId([0x77; 32]), addr: seed };
    kad.handle_input(
        Instant::ZERO,
        KadInput::Response { from: seed_contact, id: *id, response: Response::Nodes { closer } },
    );
    seed_contact
}

#[test]
fn seed_answer_fills_the_table() {
    let mut kad = machine(KadConfig::default());
    let seed_contact = join_through_seed(&mut kad, vec![contact(0x10), contact(0x20)]);
    assert!(kad.table().contains(&seed_contact.id));
    let asked: Vec<u8> = sends(&drain(&mut kad)).iter().map(|(c, ..)| c.id.0[0]).collect();
    assert_eq!(asked, vec![0x20, 0x10], "self-lookup continues from the seed's answer, closest to us first");
}

/// After the self-lookup, only the farther buckets it left empty are
/// refreshed: a bucket holding contacts already routes into its part of
/// the key space.
#[test]
fn joining_refreshes_only_the_empty_farther_buckets() {
    let mut kad = machine(KadConfig::default());
    // Our id is 0xff..: the seed 0x77.. and 0x7f.. fall in bucket 255,
    // 0xdf.. in 253.
    join_through_seed(&mut kad, vec![contact(0x7f), contact(0xdf)]);
    // Refresh lookup targets, each asked of up to α contacts.
    let mut refreshes = std::collections::BTreeSet::new();
    let mut pending: VecDeque<(Contact, RequestId, Request)> = sends(&drain(&mut kad)).into();
    while let Some((to, id, request)) = pending.pop_front() {
        let Request::FindNode { target } = request else { panic!("{request:?}") };
        if target != [0xff; 32] {
            refreshes.insert(target);
        }
        kad.handle_input(
            Instant::ZERO,
            KadInput::Response { from: to, id, response: Response::Nodes { closer: vec![] } },
        );
        pending.extend(sends(&drain(&mut kad)));
    }
    assert_eq!(kad.table().nearest_bucket(), Some(253));
    let buckets: Vec<_> = refreshes.iter().map(|t| kad.table().bucket_of(&NodeId(*t))).collect();
    assert_eq!(buckets, vec![Some(254)], "254 is empty; 255 holds two contacts");
    assert_eq!(kad.counters().join_refreshes_skipped, 1);
}

#[test]
fn late_lookup_answers_do_not_disturb_the_store_round() {
    let config = KadConfig { bucket_size: 2, parallelism: 2, ..KadConfig::default() };
    let mut kad =
        Kademlia::new(config, Contact { id: NodeId([0; 32]), addr: addr_of(0) }, [9; 32], Instant::ZERO).unwrap();
    let (manifest, file) = sample_manifest("late.bin", 300_000);
    let near = |delta: u8| {
        let mut id = file.0;
        id[0] ^= delta;
        Contact { id: NodeId(id), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from(delta) + 2000)) }
    };
    let (a, b, c) = (near(0x20), near(0x30), near(0x01));
    let t0 = Instant::ZERO;
    for from in [a, b] {
        kad.handle_input(t0, KadInput::Request { from, id: RequestId(1), request: Request::Ping });
    }
    drain(&mut kad);
    let query = kad.put_manifest(t0, manifest).unwrap();
    let asked = sends(&drain(&mut kad));
    assert_eq!(asked.iter().map(|(to, ..)| *to).collect::<Vec<_>>(), vec![a, b]);
    let b_request = asked[1].1;
    // a reveals c, closer than b: b's request is now outside the k closest.
    kad.handle_input(t0, KadInput::Response { from: a, id: asked[0].1, response: Response::Nodes { closer: vec![c] } });
    let to_c = sends(&drain(&mut kad));
    assert_eq!(to_c[0].0, c);
    kad.handle_input(t0, KadInput::Response { from: c, id: to_c[0].1, response: Response::Nodes { closer: vec![] } });
    let stores = sends(&drain(&mut kad));
    let mut targets: Vec<Contact> = stores.iter().map(|(to, ..)| *to).collect();
    // c also gets a replication store: it is a newly learned contact among
    // the k closest to a record we hold (Kademlia §2.5).
    targets.dedup();
    assert_eq!(targets, vec![c, a], "store to the k closest");
    assert!(stores.iter().all(|(_, _, r)| matches!(r, Request::Store { .. })));
    // b answers its lookup request late, while the stores are out.
    kad.handle_input(t0, KadInput::Response { from: b, id: b_request, response: Response::Nodes { closer: vec![] } });
    assert!(drain(&mut kad).is_empty(), "a late lookup answer neither stores nor finishes");
    for (to, id, _) in &stores {
        kad.handle_input(t0, KadInput::Response { from: *to, id: *id, response: Response::Stored });
    }
    let outputs = drain(&mut kad);
    assert!(outputs.iter().any(|o| matches!(
        o,
        KadOutput::Event(KadEvent::QueryFinished { id, result: QueryResult::Stored { stored: 2 }, .. }) if *id == query
    )));
}

#[test]
fn idle_buckets_are_refreshed_after_an_hour() {
    let config = KadConfig::default();
    let mut kad = machine(config.clone());
    let peer = contact(0x10);
    kad.handle_input(Instant::ZERO, KadInput::Request { from: peer, id: RequestId(1), request: Request::Ping });
    drain(&mut kad);
    let bucket = kad.table().bucket_of(&peer.id).unwrap();
    let mut now = Instant::ZERO;
    let hour = Duration::from_millis(config.bucket_refresh_interval_ms);
    let mut refreshes = Vec::new();
    while now < Instant::ZERO + hour + Duration::from_secs(120) {
        now = kad.poll_timeout().unwrap();
        kad.handle_timeout(now);
        for (to, id, request) in sends(&drain(&mut kad)) {
            if let Request::FindNode { target } = request {
                refreshes.push((now, kad.table().bucket_of(&NodeId(target))));
                // The peer answers, so the refresh ends and the peer stays live.
                kad.handle_input(
                    now,
                    KadInput::Response { from: to, id, response: Response::Nodes { closer: vec![] } },
                );
                drain(&mut kad);
            }
        }
    }
    assert_eq!(refreshes.len(), 1, "{refreshes:?}");
    assert!(refreshes[0].0 >= Instant::ZERO + hour, "not before the bucket was idle for an hour");
    assert_eq!(refreshes[0].1, Some(bucket), "a random id in the idle bucket");
}

/// A bucket refresh converges on the `refresh_closest` contacts nearest its
/// random target, not on k: with ten live contacts in the bucket, the
/// default asks α = 3 of them, where a k-closest refresh asks all ten.
#[test]
fn a_bucket_refresh_ends_when_the_closest_few_answered() {
    let refresh_requests = |config: KadConfig| {
        let mut kad = machine(config.clone());
        // Ten contacts in bucket 255 (our id is 0xff..).
        for n in 0x10..0x1a {
            kad.handle_input(
                Instant::ZERO,
                KadInput::Request { from: contact(n), id: RequestId(1), request: Request::Ping },
            );
        }
        drain(&mut kad);
        let mut now = Instant::ZERO;
        let mut asked = 0;
        let end = Instant::ZERO + Duration::from_millis(config.bucket_refresh_interval_ms) + Duration::from_secs(120);
        while now < end {
            now = kad.poll_timeout().unwrap();
            kad.handle_timeout(now);
            let mut pending: VecDeque<(Contact, RequestId, Request)> = sends(&drain(&mut kad)).into();
            while let Some((to, id, request)) = pending.pop_front() {
                assert!(matches!(request, Request::FindNode { .. }), "{request:?}");
                asked += 1;
                let response = Response::Nodes { closer: vec![] };
                kad.handle_input(now, KadInput::Response { from: to, id, response });
                pending.extend(sends(&drain(&mut kad)));
            }
        }
        asked
    };
    let config = KadConfig::default();
    assert_eq!(refresh_requests(config.clone()), config.refresh_closest);
    assert_eq!(refresh_requests(KadConfig { refresh_closest: config.bucket_size, ..config }), 10);
}

/// Random, hostile traffic: requests of every kind with junk fields,
/// answers to real and made-up request ids, failures. The machine must not
/// panic and must stay within its limits.
#[test]
fn hostile_traffic_never_panics_and_stays_bounded() {
    let config = KadConfig { bucket_size: 4, records_per_peer_max: 8, queries_max: 8, ..KadConfig::default() };
    let mut kad = machine(config.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    let (manifest, file) = sample_manifest("bait.bin", 200_000);
    let mut pending: Vec<RequestId> = Vec::new();
    let mut now = Instant::ZERO;
    for step in 0..20_000u32 {
        now += Duration::from_millis(rng.random_range(0..50));
        let peer = Contact {
            id: NodeId(if rng.random_bool(0.5) { random_key(&mut rng) } else { [rng.random_range(0..8u8); 32] }),
            addr: addr_of(rng.random_range(1..1000)),
        };
        let key = if rng.random_bool(0.3) { file.0 } else { random_key(&mut rng) };
        let junk_contacts: Vec<Contact> = (0..rng.random_range(0..40))
            .map(|i| Contact { id: NodeId(random_key(&mut rng)), addr: addr_of(i + 1) })
            .collect();
        let mut forged = manifest.clone();
        forged.size = rng.random();
        let entry = KeywordEntry { file: FileId(key), name: format!("x{}.iso", rng.random::<u16>()), size: 1 };
        let request = match rng.random_range(0..8) {
            0 => Request::Ping,
            1 => Request::FindNode { target: key },
            2 => Request::FindValue { key },
            3 => Request::Store { key, record: Record::Manifest(forged), ttl_s: rng.random() },
            4 => Request::Store { key: file.0, record: Record::Manifest(manifest.clone()), ttl_s: rng.random() },
            5 => {
                Request::Store { key, record: Record::Keywords(vec![entry.clone(); rng.random_range(0..20)]), ttl_s: 9 }
            }
            6 => Request::AddProvider {
                file: FileId(key),
                provider: if rng.random_bool(0.5) { peer } else { junk_contacts.first().copied().unwrap_or(peer) },
            },
            _ => Request::GetProviders { file: FileId(key) },
        };
        let response = match rng.random_range(0..6) {
            0 => Response::Nodes { closer: junk_contacts.clone() },
            1 => Response::Value { record: Record::Manifest(manifest.clone()) },
            2 => Response::Value { record: Record::Keywords(vec![entry; 3]) },
            3 => Response::Providers { providers: junk_contacts.clone(), closer: junk_contacts },
            4 => Response::Stored,
            _ => Response::Error { code: ErrorCode::Overloaded },
        };
        let id = if rng.random_bool(0.7) && !pending.is_empty() {
            pending.swap_remove(rng.random_range(0..pending.len()))
        } else {
            RequestId(rng.random())
        };
        match rng.random_range(0..10) {
            0..=3 => kad.handle_input(now, KadInput::Request { from: peer, id, request }),
            4..=7 => kad.handle_input(now, KadInput::Response { from: peer, id, response }),
            8 => kad.handle_input(now, KadInput::RequestFailed { id }),
            _ => {
                let _ = match step % 5 {
                    0 => kad.find_node(now, key),
                    1 => kad.get_manifest(now, FileId(key)),
                    2 => kad.get_providers(now, FileId(key), rng.random_range(1..40)),
                    3 => kad.search(now, "x1 iso"),
                    _ => kad.add_provider(now, FileId(key)),
                };
            }
        }
        if kad.poll_timeout().is_some_and(|t| t <= now) {
            kad.handle_timeout(now);
        }
        for output in drain(&mut kad) {
            if let KadOutput::Send { id, .. } | KadOutput::SendToAddress { id, .. } = output {
                pending.push(id);
            }
        }
        pending.truncate(500);
    }
    assert!(kad.table().len() <= 256 * config.bucket_size);
    assert!(kad.queries_running() <= config.queries_max);
    for n in 0..8u8 {
        assert!(kad.store().charged_to(&NodeId([n; 32])) <= config.records_per_peer_max);
    }
    let c = kad.counters();
    eprintln!("hostile traffic: {c:?}; store {:?}", kad.store().counters());
    assert!(c.values_rejected > 0 && c.responses_unexpected > 0 && c.contacts_dropped > 0);
}

#[test]
fn an_invalid_config_is_refused_not_a_panic() {
    let config = KadConfig { parallelism: 0, ..KadConfig::default() };
    let local = Contact { id: NodeId([1; 32]), addr: addr_of(1) };
    assert!(Kademlia::new(config, local, [0; 32], Instant::ZERO).is_err());
}

#[test]
fn an_endless_lookup_ends_at_the_query_timeout() {
    // A tarpit: every answer names one new, closer contact, forever.
    let config = KadConfig { query_timeout_ms: 5_000, ..KadConfig::default() };
    let mut kad = machine(config.clone());
    let tarpit = |n: u16| {
        let mut id = [0u8; 32];
        id[..2].copy_from_slice(&(0xffff - n).to_be_bytes());
        id[31] = 1;
        Contact { id: NodeId(id), addr: addr_of(usize::from(n) + 10) }
    };
    kad.handle_input(Instant::ZERO, KadInput::Request { from: tarpit(0), id: RequestId(1), request: Request::Ping });
    drain(&mut kad);
    let query = kad.find_node(Instant::ZERO, [0; 32]);
    let mut now = Instant::ZERO;
    let mut answered = 0u16;
    let finished = loop {
        let outputs = drain(&mut kad);
        if let Some(stats) = outputs.iter().find_map(|o| match o {
            KadOutput::Event(KadEvent::QueryFinished { id, stats, .. }) if *id == query => Some(*stats),
            _ => None,
        }) {
            break stats;
        }
        now += Duration::from_millis(100);
        kad.handle_timeout(now);
        for (to, id, _) in sends(&outputs) {
            answered += 1;
            let closer = vec![tarpit(answered)];
            kad.handle_input(now, KadInput::Response { from: to, id, response: Response::Nodes { closer } });
        }
        assert!(now < Instant::ZERO + Duration::from_secs(60), "the query timeout never fired");
    };
    assert!(!finished.success);
    assert_eq!(finished.duration, Duration::from_millis(config.query_timeout_ms));
    assert!(answered >= 40, "the tarpit kept it busy: {answered} answers");
}

/// Kademlia §2.5 on a newcomer: only the closest holder of a record
/// stores it to a new contact that is among the k closest to its key.
#[test]
fn only_the_closest_holder_replicates_to_a_newcomer() {
    let (manifest, file) = sample_manifest("replicated.bin", 100_000);
    let key = file.0;
    let near = |byte: usize, bit: u8| {
        let mut id = key;
        id[byte] ^= bit;
        NodeId(id)
    };
    let at = |id: NodeId, port: u16| Contact { id, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)) };
    let t0 = Instant::ZERO;
    let stores_to_newcomer = |local: NodeId, others: &[Contact]| {
        let mut kad = Kademlia::new(KadConfig::default(), at(local, 1), [9; 32], t0).unwrap();
        for &other in others {
            kad.handle_input(t0, KadInput::Request { from: other, id: RequestId(1), request: Request::Ping });
        }
        let origin = at(near(0, 0x80), 2);
        let store = Request::Store { key, record: Record::Manifest(manifest.clone()), ttl_s: 86_400 };
        kad.handle_input(t0, KadInput::Request { from: origin, id: RequestId(2), request: store });
        drain(&mut kad);
        let newcomer = at(near(31, 0x02), 3);
        kad.handle_input(t0, KadInput::Request { from: newcomer, id: RequestId(3), request: Request::Ping });
        sends(&drain(&mut kad))
            .into_iter()
            .filter(|(to, _, r)| to.id == newcomer.id && matches!(r, Request::Store { .. }))
            .count()
    };
    // We are the closest holder we know of: we hand the record over.
    assert_eq!(stores_to_newcomer(near(31, 0x01), &[]), 1);
    // A contact closer to the key than us holds it too: it sends, not us.
    assert_eq!(stores_to_newcomer(near(31, 0x04), &[at(near(31, 0x01), 4)]), 0);
}

#[test]
fn a_probed_contact_joins_the_table_only_when_it_answers_as_itself() {
    let local = Contact { id: NodeId([1; 32]), addr: addr_of(1) };
    let mut kad = Kademlia::new(KadConfig::default(), local, [7; 32], Instant::ZERO).unwrap();
    let heard = Contact { id: NodeId([2; 32]), addr: addr_of(2) };
    let now = Instant::ZERO;
    kad.probe(now, heard);
    let Some(KadOutput::Send { to, id, request: Request::Ping }) = kad.poll_output() else {
        panic!("a probe pings the contact");
    };
    assert_eq!(to, heard);
    assert!(!kad.table().contains(&heard.id), "not before it answers");
    let impostor = Contact { id: NodeId([3; 32]), addr: heard.addr };
    kad.handle_input(now, KadInput::Response { from: impostor, id, response: Response::Pong });
    assert!(!kad.table().contains(&impostor.id) && !kad.table().contains(&heard.id), "a wrong id is ignored");
    kad.handle_input(now, KadInput::Response { from: heard, id, response: Response::Pong });
    assert!(kad.table().contains(&heard.id), "the answer admits it");
    while kad.poll_output().is_some() {}
    kad.probe(now, heard);
    kad.probe(now, local);
    assert_eq!(kad.poll_output(), None, "known contacts and ourselves are not probed");
}
