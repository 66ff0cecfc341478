//! The composed node: Kademlia, gossip and the piece exchange behind the
//! one sans-IO surface the driver runs (DESIGN.md).
//!
//! The node owns the connection table. The driver does the handshake and
//! reports each authenticated connection ([`NodeInput::Connected`]); the
//! node routes frames to the machine they belong to and turns the machines'
//! outputs into frames, dials and store operations. Kademlia addresses
//! peers by contact: a request to a node without a connection is queued
//! behind a [`NodeOutput::Dial`] (bounded by `dial_pending_max`), and fails
//! back to Kademlia if the dial fails or the connection drops.
//!
//! The user flows (after the seed design):
//! - **share**: serve the file, store its manifest on the k closest nodes,
//!   add a provider record, publish its name's keywords, announce it on
//!   gossip (Files and Swarm topics);
//! - **get**: find the manifest by `FileId` (validated), start the
//!   download and join the swarm at once (provider record and swarm notice,
//!   as a BitTorrent tracker lists leechers), find providers (plus gossip
//!   swarm notices), pool them and dial a few at a time, picked at random,
//!   and open exchange sessions; providers are looked up again while the
//!   download has few peers;
//! - **search**: the DHT keyword lookup, merged with the local index of
//!   gossip file announcements.
//!
//! Call order (STYLE.md §1): one `handle_input`, `handle_timeout` or
//! command, then [`Node::poll_output`] until `None`, then arm a timer for
//! [`Node::poll_timeout`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use crate::config::{Config, ConfigError};
use crate::content::PieceHash;
use crate::exchange::{
    Exchange, ExchangeEvent, ExchangeInput, ExchangeOutput, PieceHashed, ServeBlock, StorePiece, VerifyPiece,
};
use crate::gossip::{Gossip, GossipEvent, GossipInput, GossipOutput};
use crate::ids::{ConnId, FileId, NodeId, PieceIndex};
use crate::kad::{KadEvent, KadInput, KadOutput, Kademlia, QueryId, QueryResult, QueryStats};
use crate::manifest::FileManifest;
use crate::time::Instant;
use crate::vec_map::VecMap;
use crate::wire::{
    Announcement, Contact, GoodbyeReason, KeywordEntry, Message, Request, RequestId, STANDARD_TOPICS, Topic,
};

/// What the driver tells the node.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum NodeInput {
    /// A connection finished its handshake.
    Connected {
        /// The driver's handle for it.
        conn: ConnId,
        /// The authenticated peer.
        peer: NodeId,
        /// Where the peer accepts connections (from its hello), else the
        /// address it connected from.
        addr: SocketAddr,
        /// For a connection we dialled: the address we dialled (its queued
        /// requests go out now).
        dialed: Option<SocketAddr>,
    },
    /// A dial failed (refused, unreachable, handshake failed, timed out).
    DialFailed {
        /// The address.
        addr: SocketAddr,
    },
    /// A connection closed.
    Disconnected {
        /// The connection.
        conn: ConnId,
    },
    /// A frame arrived (handshake frames and keepalives stay in the driver).
    Message {
        /// From this connection.
        conn: ConnId,
        /// The message.
        message: Message,
    },
    /// The driver sent (or dropped) a block it was asked to serve.
    BlockSent {
        /// The connection.
        conn: ConnId,
        /// The file.
        file: FileId,
    },
    /// The hash of a piece the node asked to verify
    /// ([`NodeOutput::VerifyPiece`]).
    PieceHashed(PieceHashed),
}

/// What the node asks of the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeOutput {
    /// Connect to `addr` and report `Connected` (with `dialed`) or
    /// `DialFailed`.
    Dial {
        /// Where.
        addr: SocketAddr,
    },
    /// Send a frame.
    Send {
        /// On this connection.
        conn: ConnId,
        /// The frame.
        message: Message,
    },
    /// Read a block from the store and send it (then report `BlockSent`).
    ServeBlock(ServeBlock),
    /// Hash a complete piece (SHA-256) and report `PieceHashed`
    /// ([`VerifyPiece::hash`]), off the loop or at once: the node waits for
    /// the answer before it stores or refetches the piece.
    VerifyPiece(VerifyPiece),
    /// Write a verified piece to the store.
    StorePiece(StorePiece),
    /// Close a connection, telling the peer why.
    Disconnect {
        /// The connection.
        conn: ConnId,
        /// Why.
        reason: GoodbyeReason,
    },
    /// Something the user or the simulator may want to know.
    Event(NodeEvent),
}

/// What a DHT lookup was for (simulator metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LookupKind {
    /// Joining the network.
    Bootstrap,
    /// Finding a manifest.
    Manifest,
    /// Finding providers.
    Providers,
    /// Storing a manifest or provider record.
    Publish,
    /// Name search.
    Search,
    /// An explicit node lookup ([`Node::find_node`]).
    FindNode,
}

/// Node-level events.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// Bootstrap finished with this many contacts.
    Bootstrapped {
        /// Routing-table contacts.
        contacts: usize,
    },
    /// A DHT query ended.
    Lookup {
        /// What it was for.
        kind: LookupKind,
        /// Rounds, messages, duration, success.
        stats: QueryStats,
    },
    /// The manifest of a requested file was found; the download started.
    DownloadStarted {
        /// The file.
        file: FileId,
        /// Its manifest.
        manifest: FileManifest,
    },
    /// No valid manifest was found for a requested file after
    /// `manifest_lookup_attempts` lookups; the get is dropped.
    ManifestNotFound {
        /// The file.
        file: FileId,
    },
    /// Results of a search.
    SearchResults {
        /// The id [`Node::search`] returned.
        id: QueryId,
        /// Matching files, by id.
        entries: Vec<KeywordEntry>,
    },
    /// Result of [`Node::find_node`].
    NodesFound {
        /// The id [`Node::find_node`] returned.
        id: QueryId,
        /// What was looked up.
        target: NodeId,
        /// The closest contacts that answered, closest first.
        closest: Vec<NodeId>,
    },
    /// A gossip message was delivered.
    Gossip(GossipEvent),
    /// A piece-exchange event (verified pieces, completion, bans).
    Exchange(ExchangeEvent),
}

/// Counters of the composition itself.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeCounters {
    /// Requests failed, or sessions not opened, because `dial_pending_max`
    /// was reached.
    pub dial_queue_full: u64,
    /// Frames that belong to no machine here (handshake frames after it).
    pub frames_unexpected: u64,
    /// Responses to requests we did not send on that connection.
    pub responses_unexpected: u64,
    /// Requests forgotten at `requests_tracked_max`.
    pub requests_untracked: u64,
    /// Connections we closed because nothing used them for
    /// `connection_idle_timeout`.
    pub connections_idle_closed: u64,
    /// Gossip peer announcements not probed: the contact's bucket is full.
    pub probes_skipped: u64,
    /// Connections closed, least recently used first, to stay within
    /// `connections_target`.
    pub connections_trimmed: u64,
    /// Swarm notices a seed did not dial (a download pools them instead):
    /// the file has `peers_per_file_max` peers.
    pub swarm_dials_skipped: u64,
    /// Swarm candidates forgotten undialled: a newcomer took the place of
    /// one at random in a full pool (`swarm_candidates_max`).
    pub swarm_candidates_replaced: u64,
}

#[derive(Clone, Debug)]
struct PeerConn {
    node: NodeId,
    addr: SocketAddr,
    /// Last DHT traffic on it, either way (exchange sessions and gossip
    /// meshes keep a connection open by themselves).
    last_used: Instant,
    /// How many of our tracked DHT requests are in flight on it (entries
    /// of `Node::requests` naming it; usually none, one or two). A count,
    /// not a list: the rare disconnection with requests in flight finds
    /// them in `Node::requests`, and no connection carries a buffer.
    requests_inflight: u32,
    /// Whether the exchange has been told of it ([`Node::exchange_knows`]).
    exchange: bool,
}

/// Work waiting for a connection to an address.
#[derive(Clone, Debug, Default)]
struct PendingDial {
    requests: Vec<(RequestId, Request)>,
    opens: BTreeSet<FileId>,
}

#[derive(Clone, Debug)]
struct Download {
    next_provider_lookup: Option<Instant>,
    /// A manifest lookup failed; the next try is due then.
    next_manifest_lookup: Option<Instant>,
    manifest_attempts: u32,
    /// Swarm members heard of (providers found, swarm notices) and not
    /// yet dialled: at most `swarm_candidates_max`.
    candidates: Vec<Contact>,
    /// When the next dial round is due, while candidates wait.
    next_swarm_dial: Option<Instant>,
    /// When the last dial round ran.
    last_swarm_dial: Option<Instant>,
    /// Wait before the next round: `swarm_dial_interval`, doubled by each
    /// round that found the swarm full.
    swarm_dial_wait: Duration,
}

impl Download {
    fn new() -> Self {
        Self {
            next_provider_lookup: None,
            next_manifest_lookup: None,
            manifest_attempts: 0,
            candidates: Vec::new(),
            next_swarm_dial: None,
            last_swarm_dial: None,
            swarm_dial_wait: Duration::ZERO,
        }
    }
}

/// Idle connections are looked for four times per idle timeout (so one
/// closes at most a quarter of the timeout late), at most once a second.
fn idle_sweep_interval(timeout: Duration) -> Duration {
    (timeout / 4).max(Duration::from_secs(1))
}

/// First wait before a failed manifest lookup is retried.
const MANIFEST_RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest wait between manifest lookups.
const MANIFEST_RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
enum Purpose {
    Manifest(FileId),
    Providers(FileId),
    Publish,
    Search,
    FindNode(NodeId),
}

#[cfg(test)]
mod tests;

/// The composed node machine (module docs).
pub struct Node {
    config: Config,
    local: Contact,
    kad: Kademlia,
    gossip: Gossip,
    exchange: Exchange,
    /// Open connections. This and the two indexes below are sorted `Vec`s
    /// ([`VecMap`]): a node has up to `connections_target` of them, and in
    /// B-trees (leaves half full under ascending handles, one allocation
    /// per address) they were most of a simulated node's memory.
    conns: VecMap<ConnId, PeerConn>,
    /// Per connected node: the connection to use (the newest), and how
    /// many are open to it.
    by_node: VecMap<NodeId, (ConnId, u32)>,
    /// Open connections by the peer's address (a request to a contact goes
    /// on any connection to its address).
    by_addr: VecMap<(SocketAddr, ConnId), ()>,
    /// When the next idle-connection sweep is due.
    next_idle_sweep: Instant,
    dialing: BTreeMap<SocketAddr, PendingDial>,
    dial_pending: usize,
    /// Our DHT requests in flight: the connection each went on, and when.
    requests: BTreeMap<RequestId, (ConnId, Instant)>,
    queries: BTreeMap<QueryId, Purpose>,
    downloads: BTreeMap<FileId, Download>,
    /// Text of running searches, to merge with the gossip file index.
    search_text: BTreeMap<QueryId, String>,
    /// Manifests of the files we serve (at most `exchange.files_max`).
    served: BTreeMap<FileId, FileManifest>,
    /// Whether we have had contacts (and so published what we serve).
    announced: bool,
    out: VecDeque<NodeOutput>,
    counters: NodeCounters,
    /// Picks which swarm candidates to dial.
    rng: ChaCha8Rng,
}

impl Node {
    /// A node with identity `local` (its id and listen address); every
    /// machine's RNG is derived from `seed`.
    pub fn new(config: Config, local: Contact, seed: [u8; 32], now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let config_idle = config.connection_idle_timeout;
        let mut rng = ChaCha8Rng::from_seed(seed);
        let mut sub_seed = || {
            let mut s = [0u8; 32];
            rand::Rng::fill_bytes(&mut rng, &mut s);
            s
        };
        let kad = Kademlia::new(config.kad.clone(), local, sub_seed(), now)?;
        let mut gossip = Gossip::new(config.gossip.clone(), local.id, sub_seed(), now)?;
        let exchange = Exchange::new(config.exchange.clone(), sub_seed());
        let dial_rng = ChaCha8Rng::from_seed(sub_seed());
        for &topic in STANDARD_TOPICS {
            gossip.handle_input(now, GossipInput::Subscribe(topic));
        }
        let mut node = Self {
            config,
            local,
            kad,
            gossip,
            exchange,
            conns: VecMap::new(),
            by_node: VecMap::new(),
            by_addr: VecMap::new(),
            next_idle_sweep: now + idle_sweep_interval(config_idle),
            dialing: BTreeMap::new(),
            dial_pending: 0,
            requests: BTreeMap::new(),
            queries: BTreeMap::new(),
            downloads: BTreeMap::new(),
            search_text: BTreeMap::new(),
            served: BTreeMap::new(),
            announced: false,
            out: VecDeque::new(),
            counters: NodeCounters::default(),
            rng: dial_rng,
        };
        node.drain(now);
        Ok(node)
    }

    /// This node's contact.
    #[must_use]
    pub fn local(&self) -> Contact {
        self.local
    }

    /// The Kademlia machine (read-only: tables, records, counters).
    #[must_use]
    pub fn kad(&self) -> &Kademlia {
        &self.kad
    }

    /// The gossip machine.
    #[must_use]
    pub fn gossip(&self) -> &Gossip {
        &self.gossip
    }

    /// The exchange machine.
    #[must_use]
    pub fn exchange(&self) -> &Exchange {
        &self.exchange
    }

    /// Composition counters.
    #[must_use]
    pub fn counters(&self) -> NodeCounters {
        self.counters
    }

    /// Open connections.
    #[must_use]
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// Next output, until `None`.
    pub fn poll_output(&mut self) -> Option<NodeOutput> {
        crate::outputs::pop_output(&mut self.out)
    }

    /// Earliest deadline of any machine.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let downloads = self
            .downloads
            .values()
            .flat_map(|d| [d.next_provider_lookup, d.next_manifest_lookup, d.next_swarm_dial])
            .flatten();
        let sweep = (!self.conns.is_empty()).then_some(self.next_idle_sweep);
        [self.kad.poll_timeout(), self.gossip.poll_timeout(), self.exchange.poll_timeout(), sweep]
            .into_iter()
            .flatten()
            .chain(downloads)
            .min()
    }

    /// Run due timers of every machine. Tolerates early calls.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.kad.handle_timeout(now);
        self.gossip.handle_timeout(now);
        self.exchange.handle_timeout(now);
        let due = |timer: fn(&Download) -> Option<Instant>| -> Vec<FileId> {
            self.downloads.iter().filter(|(_, d)| timer(d).is_some_and(|at| at <= now)).map(|(&f, _)| f).collect()
        };
        let (retries, due, dials) =
            (due(|d| d.next_manifest_lookup), due(|d| d.next_provider_lookup), due(|d| d.next_swarm_dial));
        for file in dials {
            self.swarm_dial_round(now, file);
        }
        for file in retries {
            self.find_manifest(now, file);
        }
        for file in due {
            // Checked when the timer fires, not when it was set: peers come
            // and go (a partition closes every link) while a download runs.
            if self.exchange.peer_count(&file) < self.config.download_peers_target as usize {
                self.find_providers(now, file);
            } else if let Some(download) = self.downloads.get_mut(&file) {
                download.next_provider_lookup = Some(now + self.config.provider_refresh_interval);
            }
        }
        if now >= self.next_idle_sweep {
            self.close_idle(now);
        }
        self.drain(now);
    }

    /// Close connections nothing uses (libp2p's idle connection timeout):
    /// no exchange session, in no gossip mesh, no DHT request in flight,
    /// and no DHT traffic for `connection_idle_timeout`. DHT lookups dial
    /// whom they ask; without this every node would keep a connection to
    /// everyone it ever asked or answered, up to `connections_max`, and
    /// then refuse newcomers. Requests Kademlia has long timed out on (no
    /// answer within twice its request timeout) stop counting first.
    fn close_idle(&mut self, now: Instant) {
        let timeout = self.config.connection_idle_timeout;
        self.next_idle_sweep = now + idle_sweep_interval(timeout);
        let given_up = Duration::from_millis(self.config.kad.request_timeout_ms.saturating_mul(2));
        let stale: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, (_, sent))| now.saturating_duration_since(*sent) > given_up)
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            self.untrack_request(id);
        }
        let idle: Vec<ConnId> = self
            .closable()
            .into_iter()
            .filter(|(last_used, _)| now.saturating_duration_since(*last_used) >= timeout)
            .map(|(_, conn)| conn)
            .collect();
        for conn in idle {
            self.close(now, conn, GoodbyeReason::Idle);
        }
    }

    /// Keep the open connections at most `connections_target`: past it,
    /// close the least recently used closable ones, idle or not, down to
    /// seven eighths of the target (so the scan runs once per target/8
    /// connections, not on each). The driver refuses connections at
    /// `connections_max`; trimming first leaves room for the lookups of
    /// others.
    fn trim(&mut self, now: Instant) {
        let target = self.config.connections_target as usize;
        if self.conns.len() <= target {
            return;
        }
        let excess = self.conns.len() - target * 7 / 8;
        let mut closable = self.closable();
        closable.sort_unstable();
        for (_, conn) in closable.into_iter().take(excess) {
            self.counters.connections_trimmed += 1;
            self.close(now, conn, GoodbyeReason::TooManyConnections);
        }
    }

    /// Connections that only DHT traffic uses and that have no request of
    /// ours in flight, with their last use.
    fn closable(&self) -> Vec<(Instant, ConnId)> {
        let meshed: BTreeSet<ConnId> =
            [Topic::Peers, Topic::Files, Topic::Swarm].into_iter().flat_map(|t| self.gossip.mesh_peers(t)).collect();
        self.conns
            .iter()
            .filter(|(conn, p)| {
                p.requests_inflight == 0 && !meshed.contains(conn) && !self.exchange.has_sessions(**conn)
            })
            .map(|(&conn, p)| (p.last_used, conn))
            .collect()
    }

    fn close(&mut self, now: Instant, conn: ConnId, reason: GoodbyeReason) {
        if reason == GoodbyeReason::Idle {
            self.counters.connections_idle_closed += 1;
        }
        self.out.push_back(NodeOutput::Disconnect { conn, reason });
        self.on_disconnected(now, conn);
    }

    /// Process one driver input.
    pub fn handle_input(&mut self, now: Instant, input: NodeInput) {
        match input {
            NodeInput::Connected { conn, peer, addr, dialed } => self.on_connected(now, conn, peer, addr, dialed),
            NodeInput::DialFailed { addr } => {
                if let Some(pending) = self.dialing.remove(&addr) {
                    self.dial_pending -= pending.requests.len();
                    for (id, _) in pending.requests {
                        self.kad.handle_input(now, KadInput::RequestFailed { id });
                    }
                }
            }
            NodeInput::Disconnected { conn } => self.on_disconnected(now, conn),
            NodeInput::Message { conn, message } => self.on_message(now, conn, message),
            NodeInput::BlockSent { conn, file } => {
                self.exchange.handle_input(now, ExchangeInput::BlockSent { conn, file });
            }
            NodeInput::PieceHashed(hashed) => self.exchange.handle_input(now, ExchangeInput::PieceHashed(hashed)),
        }
        self.drain(now);
    }

    /// Join the network through these addresses.
    pub fn bootstrap(&mut self, now: Instant, seeds: &[SocketAddr]) {
        self.kad.bootstrap(now, seeds);
        self.drain(now);
    }

    /// Share a file we hold: serve it, and publish it in the DHT and on
    /// gossip (at once if we have contacts, else after the first bootstrap).
    pub fn share(&mut self, now: Instant, manifest: FileManifest, piece_hashes: Vec<PieceHash>) {
        let Ok(file) = manifest.validate() else { return };
        if self.served.len() >= self.config.exchange.files_max as usize && !self.served.contains_key(&file) {
            return; // the exchange would refuse it too
        }
        self.exchange.handle_input(now, ExchangeInput::Seed { manifest: manifest.clone(), piece_hashes });
        self.served.insert(file, manifest);
        if self.announced {
            self.publish(now, file);
        }
        self.drain(now);
    }

    /// Store the manifest, provider record and keywords of a served file,
    /// and announce it on gossip.
    fn publish(&mut self, now: Instant, file: FileId) {
        let Some(manifest) = self.served.get(&file).cloned() else { return };
        let entry = KeywordEntry { file, name: manifest.name.clone(), size: manifest.size };
        if let Ok(q) = self.kad.put_manifest(now, manifest) {
            self.queries.insert(q, Purpose::Publish);
        }
        self.announce_provider(now, file, true);
        self.kad.publish_keywords(now, entry.clone());
        self.gossip.handle_input(now, GossipInput::Publish { topic: Topic::Files, payload: Announcement::File(entry) });
    }

    /// Resume a download found in the store at start.
    pub fn resume(
        &mut self,
        now: Instant,
        manifest: FileManifest,
        piece_hashes: Option<Vec<PieceHash>>,
        have: Vec<PieceIndex>,
    ) {
        let Ok(file) = manifest.validate() else { return };
        self.exchange.handle_input(now, ExchangeInput::Download { manifest, piece_hashes, have });
        self.downloads.insert(file, Download::new());
        if self.announced {
            self.announce_provider(now, file, false);
            self.find_providers(now, file);
        }
        self.drain(now);
    }

    /// Fetch a file by id: find its manifest, then its providers.
    pub fn get(&mut self, now: Instant, file: FileId) {
        if self.downloads.contains_key(&file) || self.exchange.progress(&file).is_some() {
            return;
        }
        self.downloads.insert(file, Download::new());
        self.find_manifest(now, file);
        self.drain(now);
    }

    /// Search for files by name; results come as [`NodeEvent::SearchResults`].
    pub fn search(&mut self, now: Instant, text: &str) -> QueryId {
        let q = self.kad.search(now, text);
        self.queries.insert(q, Purpose::Search);
        self.search_text.insert(q, text.to_owned());
        self.drain(now);
        q
    }

    /// Look up the nodes closest to `target` (simulator workloads, network
    /// probes); the answer comes as [`NodeEvent::NodesFound`].
    pub fn find_node(&mut self, now: Instant, target: NodeId) -> QueryId {
        let q = self.kad.find_node(now, target.0);
        self.queries.insert(q, Purpose::FindNode(target));
        self.drain(now);
        q
    }

    /// Stop serving and fetching a file.
    pub fn remove(&mut self, now: Instant, file: FileId) {
        self.downloads.remove(&file);
        self.served.remove(&file);
        self.kad.stop_providing(file);
        self.kad.unpublish_keywords(file);
        self.exchange.handle_input(now, ExchangeInput::Remove { file });
        self.drain(now);
    }

    /// Fetch pieces from `from` on first, in order (`cat`, Range reads).
    pub fn stream(&mut self, now: Instant, file: FileId, from: Option<PieceIndex>) {
        self.exchange.handle_input(now, ExchangeInput::Stream { file, from });
        self.drain(now);
    }

    /// Set a download's priority (0 pauses it).
    pub fn set_priority(&mut self, now: Instant, file: FileId, priority: u8) {
        self.exchange.handle_input(now, ExchangeInput::Priority { file, priority });
        self.drain(now);
    }

    fn on_connected(&mut self, now: Instant, conn: ConnId, peer: NodeId, addr: SocketAddr, dialed: Option<SocketAddr>) {
        // A repeated report for a known connection only flushes the queue.
        if !self.conns.contains_key(&conn) {
            self.conns
                .insert(conn, PeerConn { node: peer, addr, last_used: now, requests_inflight: 0, exchange: false });
            let entry = self.by_node.get_or_insert_with(peer, || (conn, 0));
            *entry = (conn, entry.1 + 1);
            self.by_addr.insert((addr, conn), ());
            self.gossip.handle_input(now, GossipInput::PeerConnected { conn, node: peer, implied: STANDARD_TOPICS });
        }
        for key in [dialed, Some(addr)].into_iter().flatten() {
            let Some(pending) = self.dialing.remove(&key) else { continue };
            self.dial_pending -= pending.requests.len();
            for (id, request) in pending.requests {
                self.track_request(now, id, conn);
                self.out.push_back(NodeOutput::Send { conn, message: Message::Request { id, body: request } });
            }
            for file in pending.opens {
                self.exchange_knows(now, conn);
                self.exchange.handle_input(now, ExchangeInput::Open { conn, file });
            }
        }
        self.trim(now);
    }

    fn on_disconnected(&mut self, now: Instant, conn: ConnId) {
        let Some(peer) = self.conns.remove(&conn) else { return };
        self.by_addr.remove(&(peer.addr, conn));
        if let Some(&(current, open)) = self.by_node.get(&peer.node) {
            if open <= 1 {
                self.by_node.remove(&peer.node);
            } else if current == conn {
                // Another connection to the node remains (rare: only then
                // is the table scanned).
                let other = self.conns.iter().find(|(_, p)| p.node == peer.node).map(|(&c, _)| c);
                self.by_node.insert(peer.node, (other.unwrap_or(conn), open - 1));
            } else {
                self.by_node.insert(peer.node, (current, open - 1));
            }
        }
        self.gossip.handle_input(now, GossipInput::PeerDisconnected { conn });
        if peer.exchange {
            self.exchange.handle_input(now, ExchangeInput::PeerDisconnected { conn });
        }
        if peer.requests_inflight > 0 {
            // In id order, as Kademlia sent them.
            let failed: Vec<RequestId> =
                self.requests.iter().filter(|(_, (c, _))| *c == conn).map(|(&id, _)| id).collect();
            for id in failed {
                self.requests.remove(&id);
                self.kad.handle_input(now, KadInput::RequestFailed { id });
            }
        }
    }

    /// The oldest open connection to `addr`.
    fn first_conn_to(&self, addr: SocketAddr) -> Option<ConnId> {
        let (&(at, conn), ()) = self.by_addr.first_from(&(addr, ConnId(0)))?;
        (at == addr).then_some(conn)
    }

    fn contact(&self, conn: ConnId) -> Option<Contact> {
        self.conns.get(&conn).map(|p| Contact { id: p.node, addr: p.addr })
    }

    fn on_message(&mut self, now: Instant, conn: ConnId, message: Message) {
        let Some(from) = self.contact(conn) else { return };
        match message {
            Message::Request { id, body } => {
                self.mark_used(now, conn);
                self.kad.handle_input(now, KadInput::Request { from, id, request: body });
            }
            Message::Response { id, body } => {
                // Any connection to the node we asked will do: two nodes
                // that dialled each other at once may answer on the other.
                let asked = self.requests.get(&id).and_then(|(c, _)| self.conns.get(c)).map(|p| p.node);
                if asked == Some(from.id) {
                    self.untrack_request(id);
                    self.mark_used(now, conn);
                    self.kad.handle_input(now, KadInput::Response { from, id, response: body });
                } else {
                    self.counters.responses_unexpected += 1;
                }
            }
            Message::Gossip(message) => self.gossip.handle_input(now, GossipInput::Message { conn, message }),
            Message::Exchange(message) => {
                self.exchange_knows(now, conn);
                self.exchange.handle_input(now, ExchangeInput::Message { conn, message });
            }
            Message::Goodbye { .. } => self.on_disconnected(now, conn),
            _ => self.counters.frames_unexpected += 1,
        }
    }

    /// Tell the exchange of `conn` before its first session may open:
    /// most connections only ever carry a DHT request or two, and an
    /// exchange entry for each was a tenth of a simulated node's memory.
    /// Told once: a connection the exchange then forgets (it closes one
    /// after a violation or a ban) stays forgotten, as when it was told
    /// at connection time.
    fn exchange_knows(&mut self, now: Instant, conn: ConnId) {
        if let Some(peer) = self.conns.get_mut(&conn)
            && !peer.exchange
        {
            peer.exchange = true;
            self.exchange.handle_input(now, ExchangeInput::PeerConnected { conn, node: peer.node });
        }
    }

    /// Remember which connection a DHT request went on, so a dropped
    /// connection fails it at once. Bounded: a peer that never answers
    /// on a live connection cannot grow this map; past the limit the
    /// oldest entry (request ids increase) is forgotten and Kademlia's own
    /// timeout handles it.
    fn track_request(&mut self, now: Instant, id: RequestId, conn: ConnId) {
        if self.requests.len() >= self.config.requests_tracked_max as usize
            && let Some((oldest, _)) = self.requests.first_key_value()
        {
            self.untrack_request(*oldest);
            self.counters.requests_untracked += 1;
        }
        // Request ids are unique; a repeated one would move, not count twice.
        self.untrack_request(id);
        self.requests.insert(id, (conn, now));
        if let Some(peer) = self.conns.get_mut(&conn) {
            peer.requests_inflight += 1;
        }
        self.mark_used(now, conn);
    }

    fn untrack_request(&mut self, id: RequestId) {
        if let Some((conn, _)) = self.requests.remove(&id)
            && let Some(peer) = self.conns.get_mut(&conn)
        {
            peer.requests_inflight -= 1;
        }
    }

    fn mark_used(&mut self, now: Instant, conn: ConnId) {
        if let Some(peer) = self.conns.get_mut(&conn) {
            peer.last_used = now;
        }
    }

    /// Send a DHT request to `addr` (and `node`, if known), dialling first
    /// if no connection is open.
    fn send_request(&mut self, now: Instant, node: Option<NodeId>, addr: SocketAddr, id: RequestId, request: Request) {
        let conn = node.and_then(|n| self.by_node.get(&n).map(|&(c, _)| c)).or_else(|| self.first_conn_to(addr));
        if let Some(conn) = conn {
            self.track_request(now, id, conn);
            self.out.push_back(NodeOutput::Send { conn, message: Message::Request { id, body: request } });
            return;
        }
        if self.dial_pending >= self.config.dial_pending_max as usize {
            self.counters.dial_queue_full += 1;
            self.kad.handle_input(now, KadInput::RequestFailed { id });
            return;
        }
        self.dial_pending += 1;
        let pending = self.dialing.entry(addr).or_default();
        let first = pending.requests.is_empty() && pending.opens.is_empty();
        pending.requests.push((id, request));
        if first {
            self.out.push_back(NodeOutput::Dial { addr });
        }
    }

    /// Exchange `file` with `peer`, dialling it if needed.
    fn open_with(&mut self, now: Instant, peer: Contact, file: FileId) {
        if peer.id == self.local.id {
            return;
        }
        if let Some(&(conn, _)) = self.by_node.get(&peer.id) {
            self.exchange_knows(now, conn);
            self.exchange.handle_input(now, ExchangeInput::Open { conn, file });
            return;
        }
        // Swarm notices arrive from gossip: bound the addresses we queue
        // dials for, whatever peers announce.
        if !self.dialing.contains_key(&peer.addr) && self.dialing.len() >= self.config.dial_pending_max as usize {
            self.counters.dial_queue_full += 1;
            return;
        }
        let pending = self.dialing.entry(peer.addr).or_default();
        let first = pending.requests.is_empty() && pending.opens.is_empty();
        pending.opens.insert(file);
        if first {
            self.out.push_back(NodeOutput::Dial { addr: peer.addr });
        }
    }

    /// Remember a swarm member to dial; a full pool replaces a random
    /// entry, so it stays a sample of everyone heard of, not of the first.
    fn add_candidate(&mut self, now: Instant, file: FileId, peer: Contact) {
        let (max, interval) = (self.config.swarm_candidates_max as usize, self.config.swarm_dial_interval);
        if peer.id == self.local.id {
            return;
        }
        let Some(download) = self.downloads.get_mut(&file) else { return };
        if download.candidates.iter().any(|c| c.id == peer.id) {
            return;
        }
        if download.candidates.len() < max {
            download.candidates.push(peer);
        } else {
            let i = rand::RngExt::random_range(&mut self.rng, 0..download.candidates.len());
            download.candidates[i] = peer;
            self.counters.swarm_candidates_replaced += 1;
        }
        if download.next_swarm_dial.is_none() {
            let due = download.last_swarm_dial.map_or(now, |last| (last + interval).max(now));
            download.next_swarm_dial = Some(due);
        }
    }

    /// Dial up to `swarm_dials_per_round` swarm candidates picked at
    /// random, while the swarm has room: a crowd hears of its members in
    /// the same order, and dialling each as it is heard of fills the
    /// first few to announce and leaves the last with a third of the
    /// peers (1,000-peer flash crowd).
    fn swarm_dial_round(&mut self, now: Instant, file: FileId) {
        let pending = self.dialing.values().filter(|d| d.opens.contains(&file)).count();
        let room = usize::from(self.config.exchange.peers_per_file_max)
            .saturating_sub(self.exchange.peer_count(&file) + pending)
            .min(self.config.swarm_dials_per_round as usize);
        let interval = self.config.swarm_dial_interval;
        let wait_max = self.config.provider_refresh_interval.max(interval);
        let Some(download) = self.downloads.get_mut(&file) else { return };
        download.next_swarm_dial = None;
        download.last_swarm_dial = Some(now);
        let mut picked = Vec::with_capacity(room);
        for _ in 0..room.min(download.candidates.len()) {
            let i = rand::RngExt::random_range(&mut self.rng, 0..download.candidates.len());
            picked.push(download.candidates.swap_remove(i));
        }
        // A swarm at its peer limit is looked at less and less often (up
        // to the provider refresh), not every interval for nothing.
        download.swarm_dial_wait =
            if picked.is_empty() { (download.swarm_dial_wait * 2).clamp(interval, wait_max) } else { interval };
        if !download.candidates.is_empty() {
            download.next_swarm_dial = Some(now + download.swarm_dial_wait);
        }
        for peer in picked {
            self.open_with(now, peer, file);
        }
    }

    fn find_manifest(&mut self, now: Instant, file: FileId) {
        let Some(download) = self.downloads.get_mut(&file) else { return };
        download.next_manifest_lookup = None;
        download.manifest_attempts += 1;
        let q = self.kad.get_manifest(now, file);
        self.queries.insert(q, Purpose::Manifest(file));
    }

    fn find_providers(&mut self, now: Instant, file: FileId) {
        let Some(download) = self.downloads.get_mut(&file) else { return };
        download.next_provider_lookup = None;
        let q = self.kad.get_providers(now, file, self.config.download_peers_target as usize);
        self.queries.insert(q, Purpose::Providers(file));
    }

    /// Tell the DHT and the Swarm topic that we hold (part of) `file`.
    fn announce_provider(&mut self, now: Instant, file: FileId, seeding: bool) {
        let q = self.kad.add_provider(now, file);
        self.queries.insert(q, Purpose::Publish);
        let payload = Announcement::Swarm { file, node: self.local, seeding };
        self.gossip.handle_input(now, GossipInput::Publish { topic: Topic::Swarm, payload });
    }

    /// Move every machine's output into ours, until all are drained (one
    /// machine's output can feed another).
    fn drain(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            while let Some(output) = self.kad.poll_output() {
                progressed = true;
                self.on_kad_output(now, output);
            }
            while let Some(output) = self.gossip.poll_output() {
                progressed = true;
                match output {
                    GossipOutput::Send { conn, message } => {
                        self.out.push_back(NodeOutput::Send { conn, message: Message::Gossip(message) });
                    }
                    GossipOutput::Disconnect { conn, reason } => {
                        self.out.push_back(NodeOutput::Disconnect { conn, reason })
                    }
                    GossipOutput::Event(event) => self.on_gossip_event(now, event),
                }
            }
            while let Some(output) = self.exchange.poll_output() {
                progressed = true;
                self.on_exchange_output(now, output);
            }
            if !progressed {
                if self.announced || self.kad.table().is_empty() {
                    break;
                }
                self.announce(now);
            }
        }
    }

    /// The first contact (a bootstrap, or a peer that found us): announce
    /// ourselves, and everything served or resumed before we had anyone to
    /// tell.
    fn announce(&mut self, now: Instant) {
        self.announced = true;
        let payload = Announcement::Peer(self.local);
        self.gossip.handle_input(now, GossipInput::Publish { topic: Topic::Peers, payload });
        let served: Vec<FileId> = self.served.keys().copied().collect();
        for file in served {
            self.publish(now, file);
        }
        let downloads: Vec<FileId> = self.downloads.keys().copied().collect();
        for file in downloads {
            self.announce_provider(now, file, false);
            self.find_providers(now, file);
        }
    }

    fn on_kad_output(&mut self, now: Instant, output: KadOutput) {
        match output {
            KadOutput::Send { to, id, request } => self.send_request(now, Some(to.id), to.addr, id, request),
            KadOutput::SendToAddress { addr, id, request } => self.send_request(now, None, addr, id, request),
            KadOutput::Respond { to, id, response } => {
                if let Some(&(conn, _)) = self.by_node.get(&to.id) {
                    self.mark_used(now, conn);
                    self.out.push_back(NodeOutput::Send { conn, message: Message::Response { id, body: response } });
                }
            }
            KadOutput::Event(KadEvent::Bootstrapped { contacts }) => {
                self.out.push_back(NodeOutput::Event(NodeEvent::Bootstrapped { contacts }));
            }
            KadOutput::Event(KadEvent::QueryFinished { id, stats, result }) => self.on_query(now, id, stats, result),
        }
    }

    fn on_query(&mut self, now: Instant, id: QueryId, stats: QueryStats, result: QueryResult) {
        let Some(purpose) = self.queries.remove(&id) else { return };
        let search_text = self.search_text.remove(&id);
        let kind = match purpose {
            Purpose::Manifest(_) => LookupKind::Manifest,
            Purpose::Providers(_) => LookupKind::Providers,
            Purpose::Publish => LookupKind::Publish,
            Purpose::Search => LookupKind::Search,
            Purpose::FindNode(_) => LookupKind::FindNode,
        };
        self.out.push_back(NodeOutput::Event(NodeEvent::Lookup { kind, stats }));
        match (purpose, result) {
            (Purpose::Manifest(file), QueryResult::GetManifest { manifest: Some(manifest) }) => {
                self.exchange.handle_input(
                    now,
                    ExchangeInput::Download { manifest: manifest.clone(), piece_hashes: None, have: Vec::new() },
                );
                self.out.push_back(NodeOutput::Event(NodeEvent::DownloadStarted { file, manifest }));
                // Join the swarm at once, as BitTorrent trackers list
                // leechers: partial holders trade with each other long
                // before anyone completes.
                self.announce_provider(now, file, false);
                self.find_providers(now, file);
            }
            (Purpose::Manifest(file), _) => {
                let attempts_max = self.config.manifest_lookup_attempts;
                match self.downloads.get_mut(&file) {
                    Some(download) if download.manifest_attempts < attempts_max => {
                        let doublings = download.manifest_attempts.saturating_sub(1).min(16);
                        let wait = MANIFEST_RETRY_INITIAL.saturating_mul(1 << doublings).min(MANIFEST_RETRY_MAX);
                        download.next_manifest_lookup = Some(now + wait);
                    }
                    Some(_) => {
                        self.downloads.remove(&file);
                        self.out.push_back(NodeOutput::Event(NodeEvent::ManifestNotFound { file }));
                    }
                    // Removed while the lookup ran.
                    None => {}
                }
            }
            (Purpose::Providers(file), QueryResult::GetProviders { providers }) => {
                for provider in providers.into_iter().take(self.config.providers_per_lookup_max as usize) {
                    self.add_candidate(now, file, provider);
                }
                // Check again later, for as long as the download runs.
                if let Some(download) = self.downloads.get_mut(&file) {
                    download.next_provider_lookup = Some(now + self.config.provider_refresh_interval);
                }
            }
            (Purpose::Search, QueryResult::Search { entries }) => {
                let text = search_text.unwrap_or_default();
                let mut merged: BTreeMap<FileId, KeywordEntry> = entries.into_iter().map(|e| (e.file, e)).collect();
                for entry in self.gossip.search(&text) {
                    merged.entry(entry.file).or_insert(entry);
                }
                let entries = merged.into_values().collect();
                self.out.push_back(NodeOutput::Event(NodeEvent::SearchResults { id, entries }));
            }
            (Purpose::FindNode(target), QueryResult::FindNode { closest }) => {
                let closest = closest.into_iter().map(|c| c.id).collect();
                self.out.push_back(NodeOutput::Event(NodeEvent::NodesFound { id, target, closest }));
            }
            _ => {}
        }
    }

    fn on_gossip_event(&mut self, now: Instant, event: GossipEvent) {
        if let GossipEvent::Delivered { payload: Announcement::Peer(contact), .. } = &event {
            // A peer announced itself: a DHT contact once it answers a
            // ping, if its bucket has room (in a large network most
            // buckets are full, and a ping per announcement would dial
            // every newcomer).
            if self.kad.table().has_room_for(&contact.id) {
                self.kad.probe(now, *contact);
            } else {
                self.counters.probes_skipped += 1;
            }
        }
        if let GossipEvent::Delivered { payload: Announcement::Swarm { file, node, seeding }, .. } = &event
            && (self.downloads.contains_key(file) || (!seeding && self.exchange.is_complete(file)))
        {
            // A new swarm member for a file we fetch or serve (DESIGN:
            // swarm notices): a source for us, dialled in a later round
            // (`swarm_dial_round`), or a leecher we can feed, while the
            // swarm has room for it.
            if self.downloads.contains_key(file) {
                self.add_candidate(now, *file, *node);
            } else if self.exchange.peer_count(file) < usize::from(self.config.exchange.peers_per_file_max) {
                self.open_with(now, *node, *file);
            } else {
                self.counters.swarm_dials_skipped += 1;
            }
        }
        self.out.push_back(NodeOutput::Event(NodeEvent::Gossip(event)));
    }

    fn on_exchange_output(&mut self, now: Instant, output: ExchangeOutput) {
        let out = match output {
            ExchangeOutput::Send { conn, message } => NodeOutput::Send { conn, message: Message::Exchange(message) },
            ExchangeOutput::ServeBlock(serve) => NodeOutput::ServeBlock(serve),
            ExchangeOutput::VerifyPiece(verify) => NodeOutput::VerifyPiece(verify),
            ExchangeOutput::StorePiece(store) => NodeOutput::StorePiece(store),
            ExchangeOutput::Disconnect { conn, reason } => NodeOutput::Disconnect { conn, reason },
            ExchangeOutput::Event(event) => {
                if let ExchangeEvent::DownloadComplete { file } = &event
                    && self.downloads.remove(file).is_some()
                {
                    // Now a seed: refresh the record, tell the swarm.
                    self.announce_provider(now, *file, true);
                }
                NodeOutput::Event(NodeEvent::Exchange(event))
            }
        };
        self.out.push_back(out);
    }
}
