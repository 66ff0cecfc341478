//! THE driver: runs the core [`Node`] machine over a [`Transport`] with a
//! [`Store`]. The `shoal` daemon runs it over tokio TCP and a disk store;
//! the simulator runs the very same code over turmoil with a memory store
//! (DESIGN.md: a second, sim-only driver is a defect).
//!
//! Tasks and channels, all bounded:
//! - the **loop** owns the node and the store: one mutation (a network
//!   event, a command or the timer), then a full drain of `poll_output`,
//!   then the timer is re-armed from `poll_timeout`;
//! - an **accept** task and one **dial** task per outbound attempt run the
//!   handshake ([`crate::handshake`]) under `handshake_timeout`;
//! - each connection has a **reader** (frames into the loop's queue,
//!   `idle_timeout` without a frame closes it, so a silently partitioned
//!   link does not hang) and a **writer** (frames from its own queue, a
//!   keepalive every `keepalive_interval` when idle, the upload limit).
//!   The queue ([`crate::outbox`]) has two lanes: control, DHT and gossip
//!   frames are written before queued exchange frames (blocks), each lane
//!   in order. A peer whose queue is full is too slow and is disconnected.
//!
//! Complete pieces are hashed where the transport says
//! ([`Transport::piece_hashing`]): on one worker thread for the daemon (at
//! most `pieces_hashing_max` pieces and `pieces_hashing_bytes_max` bytes
//! handed to it; beyond, the loop waits for an answer), inline under
//! turmoil. A piece being hashed when the driver
//! stops is lost, as a piece still being received is.
//!
//! On start the driver serves every complete file of the store and resumes
//! every partial one from the pieces it holds, so a restarted node keeps
//! its verified pieces.
//!
//! Time comes only from `tokio::time` (virtual under turmoil); randomness
//! (handshake nonces) from a seeded ChaCha RNG; every `select!` is
//! `biased;` so runs replay.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use shoal_core::content::{BLOCK_BYTES, PieceHash};
use shoal_core::exchange::{PieceHashed, ServeBlock, StorePiece, VerifyPiece};
use shoal_core::ids::{ConnId, FileId, NodeId, PieceIndex};
use shoal_core::kad::QueryId;
use shoal_core::manifest::FileManifest;
use shoal_core::node::{LookupKind, Node, NodeEvent, NodeInput, NodeOutput};
use shoal_core::time::Instant;
use shoal_core::wire::{ExchangeMessage, GoodbyeReason, KeywordEntry, Message};
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::control::{CommandError, FileState, FileView, LookupLine, NodeStatus, PeerView, PieceRead, TrafficLine};
use crate::framing::{FrameReader, FrameWriter, write_frame};
use crate::handshake::{self, HandshakeError, PeerInfo};
use crate::identity::Identity;
use crate::outbox::{OutboxReceiver, OutboxSender, TryRecv, outbox};
use crate::ratelimit::TokenBucket;
use crate::store::{FileStatus, PieceWrite, Store, StoreError};
use crate::transport::{Listener, PieceHashing, Transport};

/// Driver limits and timings.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The address announced to peers (default: the bound address).
    pub advertise: Option<SocketAddr>,
    /// Largest frame (as the core's `frame_bytes_max`).
    pub frame_bytes_max: u32,
    /// Connections open or being opened at once.
    pub connections_max: usize,
    /// Time for a TCP connect.
    pub dial_timeout: Duration,
    /// Time for the whole handshake.
    pub handshake_timeout: Duration,
    /// A writer sends a keepalive after this long without a frame.
    pub keepalive_interval: Duration,
    /// A reader closes the connection after this long without a frame
    /// (three keepalives lost).
    pub idle_timeout: Duration,
    /// Frames queued for one connection's writer, both lanes together; a
    /// full queue means the peer is too slow and it is disconnected.
    pub conn_queue_frames_max: usize,
    /// Frames from all connections queued for the loop (backpressure:
    /// readers wait).
    pub inbound_queue_frames_max: usize,
    /// Bytes a connection's writer gathers before a system call.
    pub write_buffer_bytes: usize,
    /// Verified pieces handed to the store's writer and not yet durable;
    /// at the limit the loop waits for the disk.
    pub store_writes_queued_max: usize,
    /// Bytes of those pieces (held in memory until durable).
    pub store_writes_queued_bytes_max: usize,
    /// Complete pieces handed to the hashing worker and not yet answered;
    /// at the limit the loop waits for an answer.
    pub pieces_hashing_max: usize,
    /// Bytes of those pieces. The node holds a piece until its hash is
    /// answered (within its unverified bytes, 64 MiB a file), so a worker
    /// starved of CPU would otherwise let a fast download park tens of
    /// megabytes there (measured: 44 MiB on a loaded two-core machine).
    /// 4 MiB (a few milliseconds of hashing) gave the daemon the same
    /// throughput as 8 MiB in the perf test, with less memory.
    pub pieces_hashing_bytes_max: usize,
    /// Upload limit, bytes per second.
    pub max_upload_bytes_per_s: Option<u64>,
    /// Download limit, bytes per second.
    pub max_download_bytes_per_s: Option<u64>,
    /// Searches waiting for their results on behalf of a [`Command::SearchFor`]
    /// (each holds a reply channel until the DHT lookup ends).
    pub searches_waiting_max: usize,
    /// Hits returned to one [`Command::SearchFor`].
    pub search_results_max: usize,
    /// Requested files whose manifest is being looked up or was not found,
    /// remembered for progress queries; the oldest failure is forgotten
    /// first.
    pub gets_tracked_max: usize,
}

impl DriverConfig {
    /// Defaults for a daemon listening on `listen`.
    #[must_use]
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            advertise: None,
            frame_bytes_max: 256 * 1024,
            connections_max: 256,
            dial_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(45),
            conn_queue_frames_max: 1024,
            inbound_queue_frames_max: 4096,
            write_buffer_bytes: 128 * 1024,
            store_writes_queued_max: 4096,
            store_writes_queued_bytes_max: 32 << 20,
            pieces_hashing_max: 64,
            pieces_hashing_bytes_max: 4 << 20,
            max_upload_bytes_per_s: None,
            max_download_bytes_per_s: None,
            searches_waiting_max: 16,
            search_results_max: 100,
            gets_tracked_max: 1024,
        }
    }
}

/// Why the driver stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// What a user (CLI, API, simulator) asks of a running node.
#[derive(Debug)]
#[non_exhaustive]
pub enum Command {
    /// Join the network.
    Bootstrap(Vec<SocketAddr>),
    /// Share a file already in the store.
    Share {
        /// The file.
        file: FileId,
    },
    /// Fetch a file by id.
    Get {
        /// The file.
        file: FileId,
    },
    /// Search by name (results arrive as events).
    Search {
        /// The words.
        text: String,
    },
    /// Look up the nodes closest to an id (the result arrives as an event).
    Lookup {
        /// The target.
        target: NodeId,
    },
    /// Stop the driver.
    Shutdown,
    /// The node's state and counters.
    Status {
        /// Where the answer goes.
        reply: oneshot::Sender<NodeStatus>,
    },
    /// The open peer connections.
    Peers {
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<PeerView>>,
    },
    /// Every file in the store or requested.
    Files {
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<FileView>>,
    },
    /// One file's manifest and progress (`None`: unknown here).
    File {
        /// The file.
        file: FileId,
        /// Where the answer goes.
        reply: oneshot::Sender<Option<FileView>>,
    },
    /// Share a complete local file, already chunked and hashed by the
    /// caller (hashing must not run on the driver loop).
    ShareLocal {
        /// The file's path.
        path: PathBuf,
        /// Its manifest.
        manifest: FileManifest,
        /// Its piece hashes.
        piece_hashes: Vec<PieceHash>,
        /// The file id, or why not.
        reply: oneshot::Sender<Result<FileId, CommandError>>,
    },
    /// Fetch a file by id (as [`Command::Get`]) and say where it stands.
    Fetch {
        /// The file.
        file: FileId,
        /// Where the answer goes.
        reply: oneshot::Sender<FileView>,
    },
    /// Stop serving and fetching a file and delete what the store made for
    /// it (a shared original is never deleted).
    Remove {
        /// The file.
        file: FileId,
        /// Done, or why not.
        reply: oneshot::Sender<Result<(), CommandError>>,
    },
    /// Search by name and answer with the hits (at most
    /// `search_results_max`).
    SearchFor {
        /// The words.
        text: String,
        /// The hits, or why not.
        reply: oneshot::Sender<Result<Vec<KeywordEntry>, CommandError>>,
    },
    /// Fetch pieces from `from` on first, in order (`cat`, Range reads);
    /// `None` returns to rarest first.
    Stream {
        /// The file.
        file: FileId,
        /// The first piece wanted.
        from: Option<PieceIndex>,
    },
    /// Read one verified piece from the store.
    ReadPiece {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// The bytes, or why not.
        reply: oneshot::Sender<PieceRead>,
    },
}

/// Called with every node event and the time it happened.
pub type Observer = Box<dyn FnMut(Instant, &NodeEvent) + Send>;

/// Counters of the driver (metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverCounters {
    /// Connections refused at `connections_max`.
    pub connections_refused: u64,
    /// Handshakes that failed.
    pub handshakes_failed: u64,
    /// Peers disconnected because their queue was full.
    pub slow_peers: u64,
    /// Queued blocks not sent because the peer cancelled them.
    pub blocks_cancelled: u64,
    /// Store operations that failed.
    pub store_errors: u64,
}

/// Kinds of frames, for traffic accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum FrameKind {
    /// Hello and HelloProof.
    Handshake,
    /// Keepalives and goodbyes.
    Control,
    /// DHT requests and responses.
    Dht,
    /// Gossip.
    Gossip,
    /// Exchange blocks (the payload).
    Block,
    /// Every other exchange message (bitfields, haves, requests, hashes).
    Exchange,
}

impl FrameKind {
    /// Every kind, in report order.
    pub const ALL: [FrameKind; 6] = [
        FrameKind::Handshake,
        FrameKind::Control,
        FrameKind::Dht,
        FrameKind::Gossip,
        FrameKind::Block,
        FrameKind::Exchange,
    ];

    /// The kind of a message.
    #[must_use]
    pub fn of(message: &Message) -> Self {
        match message {
            Message::Hello(_) | Message::HelloProof(_) => Self::Handshake,
            Message::Request { .. } | Message::Response { .. } => Self::Dht,
            Message::Gossip(_) => Self::Gossip,
            Message::Exchange(ExchangeMessage::Block { .. }) => Self::Block,
            Message::Exchange(_) => Self::Exchange,
            _ => Self::Control,
        }
    }

    /// A short name for reports.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Handshake => "handshake",
            Self::Control => "control",
            Self::Dht => "dht",
            Self::Gossip => "gossip",
            Self::Block => "block",
            Self::Exchange => "exchange",
        }
    }
}

/// Wire bytes sent and received by frame kind, readable while the driver
/// runs (metrics, simulator) without disturbing it.
#[derive(Debug, Default)]
pub struct Traffic {
    sent: [AtomicU64; 6],
    received: [AtomicU64; 6],
    gossip_duplicates: AtomicU64,
}

impl Traffic {
    fn add(counters: &[AtomicU64; 6], kind: FrameKind, bytes: usize) {
        counters[kind as usize].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// Bytes sent of a kind.
    #[must_use]
    pub fn sent(&self, kind: FrameKind) -> u64 {
        self.sent[kind as usize].load(Ordering::Relaxed)
    }

    /// Bytes received of a kind.
    #[must_use]
    pub fn received(&self, kind: FrameKind) -> u64 {
        self.received[kind as usize].load(Ordering::Relaxed)
    }

    /// Gossip copies of messages already seen, as of the driver's last
    /// loop turn (the simulator's duplicates-per-node metric).
    #[must_use]
    pub fn gossip_duplicates(&self) -> u64 {
        self.gossip_duplicates.load(Ordering::Relaxed)
    }
}

enum NetEvent {
    Connected { conn: ConnId, peer: PeerInfo, remote: SocketAddr, dialed: Option<SocketAddr>, writer: OutboxSender },
    DialFailed { addr: SocketAddr },
    Frame { conn: ConnId, message: Message },
    Closed { conn: ConnId },
}

/// Shared by the loop and the connection tasks.
struct Shared<T> {
    transport: T,
    identity: Identity,
    config: DriverConfig,
    advertise: SocketAddr,
    epoch: tokio::time::Instant,
    next_conn: AtomicU64,
    net: mpsc::Sender<NetEvent>,
    upload: Mutex<TokenBucket>,
    download: Mutex<TokenBucket>,
    traffic: Arc<Traffic>,
    /// Pieces stored since start: readers waiting for a piece (streaming)
    /// wake on every change.
    stored: watch::Sender<u64>,
}

/// A bound, not yet running driver.
pub struct Driver<T: Transport> {
    shared: Arc<Shared<T>>,
    listener: T::Listener,
    net_rx: mpsc::Receiver<NetEvent>,
}

fn since(epoch: tokio::time::Instant) -> Instant {
    Instant::from_duration(tokio::time::Instant::now().saturating_duration_since(epoch))
}

impl<T: Transport> Driver<T> {
    /// Bind the listen address. Build the [`Node`] with [`Self::local_addr`]
    /// and [`Self::now`], then [`Self::run`] it.
    pub async fn bind(transport: T, identity: Identity, config: DriverConfig) -> Result<Self, DriverError> {
        let listener =
            transport.bind(config.listen).await.map_err(|source| DriverError::Bind { addr: config.listen, source })?;
        let bound = listener.local_addr().map_err(|source| DriverError::Bind { addr: config.listen, source })?;
        let advertise = config.advertise.unwrap_or(bound);
        let (net, net_rx) = mpsc::channel(config.inbound_queue_frames_max);
        let epoch = tokio::time::Instant::now();
        let burst = 4 * 16 * 1024;
        let shared = Arc::new(Shared {
            upload: Mutex::new(TokenBucket::new(config.max_upload_bytes_per_s, burst, Duration::ZERO)),
            download: Mutex::new(TokenBucket::new(config.max_download_bytes_per_s, burst, Duration::ZERO)),
            transport,
            identity,
            config,
            advertise,
            epoch,
            next_conn: AtomicU64::new(1),
            net,
            traffic: Arc::new(Traffic::default()),
            stored: watch::Sender::new(0),
        });
        Ok(Self { shared, listener, net_rx })
    }

    /// The address peers reach us at.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.advertise
    }

    /// Live traffic counters.
    #[must_use]
    pub fn traffic(&self) -> Arc<Traffic> {
        self.shared.traffic.clone()
    }

    /// Pieces stored since start; changes whenever a piece becomes durable
    /// (a streaming reader waits on it for the piece it needs).
    #[must_use]
    pub fn stored_pieces(&self) -> watch::Receiver<u64> {
        self.shared.stored.subscribe()
    }

    /// The driver's clock, in the core's time.
    #[must_use]
    pub fn now(&self) -> Instant {
        since(self.shared.epoch)
    }

    /// Run until [`Command::Shutdown`] or the command channel closes, then
    /// hand back the store. Randomness (handshake nonces) comes from `seed`
    /// only.
    pub async fn run<S: Store>(
        self,
        mut node: Node,
        mut store: S,
        mut commands: mpsc::Receiver<Command>,
        mut observer: Option<Observer>,
        seed: [u8; 32],
    ) -> (DriverCounters, S) {
        let Driver { shared, listener, mut net_rx } = self;
        resume_from_store(&mut node, &store, since(shared.epoch));
        let mut rng = ChaCha8Rng::from_seed(seed);
        let accept = spawn_accept(shared.clone(), listener, rng.random());
        let mut conns: BTreeMap<ConnId, ConnEntry> = BTreeMap::new();
        let mut dialing = 0usize;
        let mut counters = DriverCounters::default();
        let mut control = Control::default();
        let writes_max = shared.config.store_writes_queued_max.max(1);
        let (write_jobs, write_rx) = mpsc::channel(writes_max);
        let (write_done_tx, mut write_done) = mpsc::channel(writes_max);
        let writer = tokio::spawn(write_pieces(write_rx, write_done_tx));
        let mut writes = Writes::default();
        let hashing = shared.transport.piece_hashing();
        let hashes_max = shared.config.pieces_hashing_max.max(1);
        let (hash_jobs, hash_rx) = mpsc::channel(hashes_max);
        let (hashed_tx, mut hashed) = mpsc::channel(hashes_max);
        let hasher = (hashing == PieceHashing::Worker)
            .then(|| tokio::task::spawn_blocking(move || hash_pieces(hash_rx, hashed_tx)));
        let hashes_bytes_max = shared.config.pieces_hashing_bytes_max;
        let mut hashes = Hashes::default();
        loop {
            let deadline = node.poll_timeout().map(|at| shared.epoch + at.since_epoch());
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                Some(done) = write_done.recv(), if writes.total > 0 => {
                    writes.finish(&mut store, &mut counters, &shared.stored, done);
                }
                Some((answer, bytes)) = hashed.recv(), if hashes.pending > 0 => {
                    hashes.finish(bytes);
                    node.handle_input(since(shared.epoch), NodeInput::PieceHashed(answer));
                }
                Some(event) = net_rx.recv() => {
                    let now = since(shared.epoch);
                    match event {
                        NetEvent::Connected { conn, peer, remote, dialed, writer } => {
                            if dialed.is_some() {
                                dialing = dialing.saturating_sub(1);
                            }
                            if conns.len() >= shared.config.connections_max {
                                counters.connections_refused += 1;
                                let _ = writer.try_send(Message::Goodbye { reason: GoodbyeReason::TooManyConnections });
                                continue;
                            }
                            let addr = peer.listen_addr.unwrap_or(remote);
                            let entry = ConnEntry {
                                writer,
                                node: peer.node,
                                addr,
                                outbound: dialed.is_some(),
                                opened: tokio::time::Instant::now(),
                            };
                            conns.insert(conn, entry);
                            node.handle_input(now, NodeInput::Connected { conn, peer: peer.node, addr, dialed });
                        }
                        NetEvent::DialFailed { addr } => {
                            dialing = dialing.saturating_sub(1);
                            counters.handshakes_failed += 1;
                            node.handle_input(now, NodeInput::DialFailed { addr });
                        }
                        NetEvent::Frame { conn, message } => {
                            if let Message::Exchange(ExchangeMessage::Cancel { file, piece, offset, .. }) = &message
                                && let Some(entry) = conns.get(&conn)
                                && entry.writer.cancel(*file, *piece, *offset)
                            {
                                counters.blocks_cancelled += 1;
                            }
                            if conns.contains_key(&conn) {
                                node.handle_input(now, NodeInput::Message { conn, message });
                            }
                        }
                        NetEvent::Closed { conn } => {
                            if conns.remove(&conn).is_some() {
                                node.handle_input(now, NodeInput::Disconnected { conn });
                            }
                        }
                    }
                }
                command = commands.recv() => {
                    let now = since(shared.epoch);
                    let Some(command) = command else { break };
                    if let Command::Remove { file, .. } = &command {
                        // Its pieces in flight land (or fail) before its
                        // directory goes.
                        while writes.by_file.contains_key(file) {
                            let Some(done) = write_done.recv().await else { break };
                            writes.finish(&mut store, &mut counters, &shared.stored, done);
                        }
                    }
                    let mut context = Context {
                        node: &mut node,
                        store: &mut store,
                        control: &mut control,
                        counters: &mut counters,
                        conns: &conns,
                        config: &shared.config,
                    };
                    if context.command(now, command, &shared.traffic, shared.epoch, &shared.identity).is_break() {
                        break;
                    }
                }
                () = sleep => node.handle_timeout(since(shared.epoch)),
            }
            // Drain: one mutation, then every output.
            while let Some(output) = node.poll_output() {
                let now = since(shared.epoch);
                match output {
                    NodeOutput::Dial { addr } => {
                        if conns.len() + dialing >= shared.config.connections_max {
                            counters.connections_refused += 1;
                            node.handle_input(now, NodeInput::DialFailed { addr });
                        } else {
                            dialing += 1;
                            spawn_dial(shared.clone(), addr, rng.random());
                        }
                    }
                    NodeOutput::Send { conn, message } => {
                        send(&mut conns, &mut node, &mut counters, now, conn, message);
                    }
                    NodeOutput::ServeBlock(ServeBlock { conn, file, piece, offset, length }) => {
                        match store.read_block(&file, piece, offset, length) {
                            Ok(data) => {
                                let message = Message::Exchange(ExchangeMessage::Block { file, piece, offset, data });
                                send(&mut conns, &mut node, &mut counters, now, conn, message);
                            }
                            Err(_) => counters.store_errors += 1,
                        }
                        node.handle_input(now, NodeInput::BlockSent { conn, file });
                    }
                    NodeOutput::VerifyPiece(job) => {
                        if hashing == PieceHashing::Inline {
                            node.handle_input(now, NodeInput::PieceHashed(job.hash()));
                            continue;
                        }
                        // At the limit, wait for the worker (backpressure).
                        let bytes = job.data.len();
                        while hashes.pending >= hashes_max
                            || (hashes.pending > 0 && hashes.bytes + bytes > hashes_bytes_max)
                        {
                            let Some((answer, done)) = hashed.recv().await else { break };
                            hashes.finish(done);
                            node.handle_input(now, NodeInput::PieceHashed(answer));
                        }
                        match hash_jobs.try_send(job) {
                            Ok(()) => hashes.start(bytes),
                            // The worker is gone: hash here.
                            Err(refused) => {
                                node.handle_input(now, NodeInput::PieceHashed(refused.into_inner().hash()));
                            }
                        }
                    }
                    NodeOutput::StorePiece(StorePiece { file, piece, data }) => {
                        if store.manifest(&file).is_none()
                            && let Some(manifest) = control.awaiting_hashes.remove(&file)
                        {
                            // The first verified piece of a file whose hashes
                            // were fetched from peers: they are known now.
                            let hashes = node.exchange().piece_hashes(&file).map(<[_]>::to_vec);
                            if let Some(hashes) = hashes {
                                counters.store_errors += u64::from(store.create(&manifest, &hashes).is_err());
                            }
                        }
                        match store.prepare_write(&file, piece, data.clone()) {
                            None => match store.write_verified_piece(&file, piece, data) {
                                Ok(()) => shared.stored.send_modify(|stored| *stored += 1),
                                Err(_) => counters.store_errors += 1,
                            },
                            Some(Ok(None)) => {}
                            Some(Ok(Some(job))) => {
                                // At the limit, wait for the disk (backpressure).
                                let bytes_max = shared.config.store_writes_queued_bytes_max;
                                while writes.total >= writes_max
                                    || (writes.total > 0 && writes.bytes + job.len() > bytes_max)
                                {
                                    let Some(done) = write_done.recv().await else { break };
                                    writes.finish(&mut store, &mut counters, &shared.stored, done);
                                }
                                writes.start(file, job.len());
                                if write_jobs.send(job).await.is_err() {
                                    counters.store_errors += 1;
                                }
                            }
                            Some(Err(_)) => counters.store_errors += 1,
                        }
                    }
                    NodeOutput::Disconnect { conn, reason } => {
                        if let Some(entry) = conns.remove(&conn) {
                            let _ = entry.writer.try_send(Message::Goodbye { reason });
                            node.handle_input(now, NodeInput::Disconnected { conn });
                        }
                    }
                    NodeOutput::Event(event) => {
                        let mut context = Context {
                            node: &mut node,
                            store: &mut store,
                            control: &mut control,
                            counters: &mut counters,
                            conns: &conns,
                            config: &shared.config,
                        };
                        context.event(now, &event);
                        if let Some(observe) = observer.as_mut() {
                            observe(now, &event);
                        }
                    }
                    _ => {}
                }
            }
            shared.traffic.gossip_duplicates.store(node.gossip().counters().duplicates, Ordering::Relaxed);
        }
        accept.abort();
        drop(hash_jobs);
        if let Some(hasher) = hasher {
            let _ = hasher.await;
        }
        // Every piece in flight lands before the store is handed back.
        drop(write_jobs);
        while writes.total > 0 {
            let Some(done) = write_done.recv().await else { break };
            writes.finish(&mut store, &mut counters, &shared.stored, done);
        }
        let _ = writer.await;
        (counters, store)
    }
}

/// A piece write that ran off the loop.
struct WriteDone {
    file: FileId,
    piece: PieceIndex,
    bytes: usize,
    result: Result<(), StoreError>,
}

/// Piece writes handed to the store's writer, by file.
#[derive(Default)]
struct Writes {
    total: usize,
    bytes: usize,
    by_file: BTreeMap<FileId, usize>,
}

impl Writes {
    fn start(&mut self, file: FileId, bytes: usize) {
        self.total += 1;
        self.bytes += bytes;
        *self.by_file.entry(file).or_default() += 1;
    }

    /// A write finished: the store counts the piece (if it succeeded) and
    /// streaming readers wake.
    fn finish<S: Store>(
        &mut self,
        store: &mut S,
        counters: &mut DriverCounters,
        stored: &watch::Sender<u64>,
        done: WriteDone,
    ) {
        self.total = self.total.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(done.bytes);
        if let Some(count) = self.by_file.get_mut(&done.file) {
            *count -= 1;
            if *count == 0 {
                self.by_file.remove(&done.file);
            }
        }
        match store.commit_write(&done.file, done.piece, done.result) {
            Ok(()) => stored.send_modify(|stored| *stored += 1),
            Err(_) => counters.store_errors += 1,
        }
    }
}

/// The store's writer: runs piece writes in order on a blocking thread,
/// gathering the jobs already queued into one batch (one sync per file per
/// batch), so the loop never waits for a disk sync unless
/// `store_writes_queued_max` are in flight. Stores that write
/// synchronously never send it anything.
async fn write_pieces(mut jobs: mpsc::Receiver<PieceWrite>, done: mpsc::Sender<WriteDone>) {
    // Pieces whose write failed, by file: later bitfields leave them out.
    let mut failed: BTreeMap<FileId, Vec<PieceIndex>> = BTreeMap::new();
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while let Ok(job) = jobs.try_recv() {
            batch.push(job);
        }
        let keys: Vec<(FileId, PieceIndex)> = batch.iter().map(|job| (job.file(), job.piece())).collect();
        let sizes: Vec<usize> = batch.iter().map(PieceWrite::len).collect();
        let skip = failed.clone();
        let results =
            tokio::task::spawn_blocking(move || PieceWrite::run_batch(batch, &skip)).await.unwrap_or_else(|_| {
                keys.iter()
                    .map(|&(file, piece)| {
                        let interrupted = std::io::Error::other("piece write interrupted");
                        (
                            file,
                            piece,
                            Err(StoreError::Io { op: "write piece", path: PathBuf::new(), source: interrupted }),
                        )
                    })
                    .collect()
            });
        for ((file, piece, result), bytes) in results.into_iter().zip(sizes) {
            if result.is_err() {
                let pieces = failed.entry(file).or_default();
                if !pieces.contains(&piece) {
                    pieces.push(piece);
                }
            }
            if done.send(WriteDone { file, piece, bytes, result }).await.is_err() {
                return;
            }
        }
    }
}

/// Pieces handed to the hashing worker and not yet answered.
#[derive(Default)]
struct Hashes {
    pending: usize,
    bytes: usize,
}

impl Hashes {
    fn start(&mut self, bytes: usize) {
        self.pending += 1;
        self.bytes += bytes;
    }

    fn finish(&mut self, bytes: usize) {
        self.pending = self.pending.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// The hashing worker, on a blocking thread: hashes pieces in the order
/// asked and answers each at once, with the piece's length. Ends when the
/// loop drops its end of the jobs channel (or of the answers').
fn hash_pieces(mut jobs: mpsc::Receiver<VerifyPiece>, answers: mpsc::Sender<(PieceHashed, usize)>) {
    while let Some(job) = jobs.blocking_recv() {
        let answer = (job.hash(), job.data.len());
        // The piece's bytes go back to the node's alone (it reuses them).
        drop(job);
        if answers.blocking_send(answer).is_err() {
            break;
        }
    }
}

/// One open connection, as the loop knows it.
struct ConnEntry {
    /// The writer's queue (a `Cancel` from the peer takes back a block
    /// still in it).
    writer: OutboxSender,
    node: NodeId,
    addr: SocketAddr,
    outbound: bool,
    opened: tokio::time::Instant,
}

/// What the loop remembers on behalf of the user commands (API, CLI).
#[derive(Default)]
struct Control {
    /// Requested files whose manifest is not known: being looked up, or
    /// not found (at most `gets_tracked_max`).
    gets: BTreeMap<FileId, FileState>,
    /// Searches whose caller waits for the hits (at most
    /// `searches_waiting_max`).
    searches: BTreeMap<QueryId, oneshot::Sender<Result<Vec<KeywordEntry>, CommandError>>>,
    /// Lookups finished and succeeded, by purpose.
    lookups: BTreeMap<&'static str, (u64, u64)>,
    /// Downloads whose manifest carries no piece hashes: the store entry
    /// is created once the exchange has fetched and proven them.
    awaiting_hashes: BTreeMap<FileId, FileManifest>,
}

/// The loop's state, borrowed for one command or event.
struct Context<'a, S> {
    node: &'a mut Node,
    store: &'a mut S,
    control: &'a mut Control,
    counters: &'a mut DriverCounters,
    conns: &'a BTreeMap<ConnId, ConnEntry>,
    config: &'a DriverConfig,
}

fn lookup_name(kind: LookupKind) -> &'static str {
    match kind {
        LookupKind::Bootstrap => "bootstrap",
        LookupKind::Manifest => "manifest",
        LookupKind::Providers => "providers",
        LookupKind::Publish => "publish",
        LookupKind::Search => "search",
        LookupKind::FindNode => "find_node",
        _ => "other",
    }
}

impl<S: Store> Context<'_, S> {
    /// Carry out one command; `Break` stops the driver.
    fn command(
        &mut self,
        now: Instant,
        command: Command,
        traffic: &Traffic,
        epoch: tokio::time::Instant,
        identity: &Identity,
    ) -> std::ops::ControlFlow<()> {
        match command {
            Command::Shutdown => return std::ops::ControlFlow::Break(()),
            Command::Bootstrap(seeds) => self.node.bootstrap(now, &seeds),
            Command::Share { file } => {
                let manifest = self.store.manifest(&file).cloned();
                let hashes = self.store.piece_hashes(&file).map(<[_]>::to_vec);
                if let (Some(manifest), Some(hashes)) = (manifest, hashes) {
                    self.node.share(now, manifest, hashes);
                }
            }
            Command::Get { file } => {
                self.fetch(now, file);
            }
            Command::Search { text } => {
                self.node.search(now, &text);
            }
            Command::Lookup { target } => {
                self.node.find_node(now, target);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status(traffic, epoch, identity));
            }
            Command::Peers { reply } => {
                let peers = self
                    .conns
                    .values()
                    .map(|entry| PeerView {
                        node_id: entry.node.to_string(),
                        addr: entry.addr,
                        outbound: entry.outbound,
                        connected_s: entry.opened.elapsed().as_secs(),
                    })
                    .collect();
                let _ = reply.send(peers);
            }
            Command::Files { reply } => {
                let mut files: Vec<FileView> =
                    self.store.files().iter().map(|status| self.stored_view(status)).collect();
                files.extend(
                    self.control.awaiting_hashes.iter().map(|(file, manifest)| self.awaiting_view(file, manifest)),
                );
                files.extend(self.control.gets.iter().map(|(file, state)| pending_view(file, *state)));
                let _ = reply.send(files);
            }
            Command::File { file, reply } => {
                let _ = reply.send(self.view(&file));
            }
            Command::ShareLocal { path, manifest, piece_hashes, reply } => {
                let _ = reply.send(self.share_local(now, &path, manifest, piece_hashes));
            }
            Command::Fetch { file, reply } => {
                let _ = reply.send(self.fetch(now, file));
            }
            Command::Remove { file, reply } => {
                let _ = reply.send(self.remove(now, file));
            }
            Command::SearchFor { text, reply } => {
                self.control.searches.retain(|_, waiting| !waiting.is_closed());
                if self.control.searches.len() >= self.config.searches_waiting_max {
                    let _ = reply.send(Err(CommandError::Busy("search")));
                } else {
                    let query = self.node.search(now, &text);
                    self.control.searches.insert(query, reply);
                }
            }
            Command::Stream { file, from } => self.node.stream(now, file, from),
            Command::ReadPiece { file, piece, reply } => {
                let _ = reply.send(self.read_piece(&file, piece));
            }
        }
        std::ops::ControlFlow::Continue(())
    }

    /// Bookkeeping for one node event (before the observer sees it).
    fn event(&mut self, now: Instant, event: &NodeEvent) {
        match event {
            NodeEvent::DownloadStarted { file, manifest } => {
                if self.control.gets.remove(file).is_none() {
                    // Removed while its manifest was being looked up.
                    self.node.remove(now, *file);
                    return;
                }
                match manifest.piece_hashes.as_deref() {
                    Some(hashes) => {
                        self.counters.store_errors += u64::from(self.store.create(manifest, hashes).is_err());
                    }
                    None => {
                        if self.control.awaiting_hashes.len() >= self.config.gets_tracked_max {
                            self.control.awaiting_hashes.pop_first();
                        }
                        self.control.awaiting_hashes.insert(*file, manifest.clone());
                    }
                }
            }
            NodeEvent::ManifestNotFound { file } => {
                if let Some(state) = self.control.gets.get_mut(file) {
                    *state = FileState::NotFound;
                }
            }
            NodeEvent::SearchResults { id, entries } => {
                if let Some(reply) = self.control.searches.remove(id) {
                    let hits = entries.iter().take(self.config.search_results_max).cloned().collect();
                    let _ = reply.send(Ok(hits));
                }
            }
            NodeEvent::Lookup { kind, stats } => {
                let line = self.control.lookups.entry(lookup_name(*kind)).or_default();
                line.0 += 1;
                line.1 += u64::from(stats.success);
            }
            _ => {}
        }
    }

    fn status(&self, traffic: &Traffic, epoch: tokio::time::Instant, identity: &Identity) -> NodeStatus {
        let exchange = self.node.exchange().stats();
        let gossip = self.node.gossip().counters();
        let files = self.store.files();
        let seeding = files.iter().filter(|f| f.held_pieces == f.piece_count).count();
        NodeStatus {
            node_id: identity.node_id().to_string(),
            listen: Some(self.node.local().addr),
            uptime_s: epoch.elapsed().as_secs(),
            peers: self.conns.len(),
            routing_contacts: self.node.kad().table().len(),
            files_seeding: seeding,
            files_downloading: files.len() - seeding + self.control.awaiting_hashes.len(),
            traffic: FrameKind::ALL
                .iter()
                .map(|&kind| TrafficLine {
                    kind: kind.name().to_owned(),
                    sent_bytes: traffic.sent(kind),
                    received_bytes: traffic.received(kind),
                })
                .collect(),
            pieces_verified: exchange.pieces_verified,
            pieces_failed: exchange.pieces_failed,
            blocks_served: exchange.blocks_served,
            wasted_bytes: exchange.wasted_bytes,
            lookups: self
                .control
                .lookups
                .iter()
                .map(|(kind, (total, succeeded))| LookupLine {
                    kind: (*kind).to_owned(),
                    total: *total,
                    succeeded: *succeeded,
                })
                .collect(),
            gossip_published: gossip.published,
            gossip_delivered: gossip.delivered,
            gossip_duplicates: gossip.duplicates,
            store_errors: self.counters.store_errors,
            slow_peers: self.counters.slow_peers,
            blocks_cancelled: self.counters.blocks_cancelled,
            handshakes_failed: self.counters.handshakes_failed,
            connections_refused: self.counters.connections_refused,
        }
    }

    /// A file in the store.
    fn stored_view(&self, status: &FileStatus) -> FileView {
        let file = status.file;
        let manifest = self.store.manifest(&file);
        let layout = manifest.and_then(|m| m.layout().ok());
        let complete = status.held_pieces == status.piece_count;
        let bytes_held = match (layout, self.store.held(&file)) {
            (Some(layout), _) if complete => layout.file_bytes(),
            (Some(layout), Ok(held)) => {
                let last = PieceIndex(status.piece_count.saturating_sub(1));
                let full = u64::from(status.held_pieces) * u64::from(layout.piece_bytes());
                if held.contains(last) {
                    full - u64::from(layout.piece_bytes()) + u64::from(layout.piece_len(last))
                } else {
                    full
                }
            }
            _ => 0,
        };
        FileView {
            id: file.to_string(),
            state: if complete { FileState::Complete } else { FileState::Downloading },
            name: manifest.map(|m| m.name.clone()).unwrap_or_default(),
            size: manifest.map_or(0, |m| m.size),
            piece_bytes: layout.map_or(0, |l| l.piece_bytes()),
            pieces: status.piece_count,
            pieces_held: status.held_pieces,
            bytes_held,
            peers: self.node.exchange().peer_count(&file),
            shared: status.shared,
        }
    }

    /// A download still fetching its piece hashes.
    fn awaiting_view(&self, file: &FileId, manifest: &FileManifest) -> FileView {
        let layout = manifest.layout().ok();
        FileView {
            id: file.to_string(),
            state: FileState::Downloading,
            name: manifest.name.clone(),
            size: manifest.size,
            piece_bytes: layout.map_or(0, |l| l.piece_bytes()),
            pieces: layout.map_or(0, |l| l.piece_count()),
            pieces_held: 0,
            bytes_held: 0,
            peers: self.node.exchange().peer_count(file),
            shared: false,
        }
    }

    fn view(&self, file: &FileId) -> Option<FileView> {
        if let Ok(held) = self.store.held(file) {
            let status = FileStatus {
                file: *file,
                held_pieces: held.count(),
                piece_count: held.piece_count(),
                shared: self.store.files().iter().any(|f| f.file == *file && f.shared),
            };
            return Some(self.stored_view(&status));
        }
        if let Some(manifest) = self.control.awaiting_hashes.get(file) {
            return Some(self.awaiting_view(file, manifest));
        }
        self.control.gets.get(file).map(|state| pending_view(file, *state))
    }

    /// Start fetching `file` unless it is here or on its way; say where it
    /// stands.
    fn fetch(&mut self, now: Instant, file: FileId) -> FileView {
        if let Some(view) = self.view(&file).filter(|v| v.state != FileState::NotFound) {
            return view;
        }
        if self.control.gets.len() >= self.config.gets_tracked_max && !self.control.gets.contains_key(&file) {
            let oldest = self
                .control
                .gets
                .iter()
                .find(|(_, state)| **state == FileState::NotFound)
                .map(|(f, _)| *f)
                .or_else(|| self.control.gets.keys().next().copied());
            if let Some(oldest) = oldest {
                self.control.gets.remove(&oldest);
            }
        }
        self.control.gets.insert(file, FileState::FindingManifest);
        self.node.get(now, file);
        pending_view(&file, FileState::FindingManifest)
    }

    fn share_local(
        &mut self,
        now: Instant,
        path: &std::path::Path,
        manifest: FileManifest,
        piece_hashes: Vec<PieceHash>,
    ) -> Result<FileId, CommandError> {
        let file = manifest.validate().map_err(|e| CommandError::Store(e.to_string()))?;
        if let Ok(held) = self.store.held(&file) {
            // The same content again (under any name) is already served.
            return if held.is_complete() { Ok(file) } else { Err(CommandError::AlreadyPresent(file.to_string())) };
        }
        self.store.share_path(path, &manifest, &piece_hashes).map_err(|e| CommandError::Store(e.to_string()))?;
        self.control.gets.remove(&file);
        self.node.share(now, manifest, piece_hashes);
        Ok(file)
    }

    fn remove(&mut self, now: Instant, file: FileId) -> Result<(), CommandError> {
        let in_store = self.store.manifest(&file).is_some();
        let pending = self.control.gets.remove(&file).is_some();
        let awaiting = self.control.awaiting_hashes.remove(&file).is_some();
        if !(in_store || pending || awaiting) {
            return Err(CommandError::UnknownFile(file.to_string()));
        }
        self.node.remove(now, file);
        if in_store {
            self.store.remove(&file).map_err(|e| CommandError::Store(e.to_string()))?;
        }
        Ok(())
    }

    /// A whole verified piece, read block by block (a piece is at most
    /// 16 MiB; the streaming reader asks for one at a time).
    fn read_piece(&mut self, file: &FileId, piece: PieceIndex) -> PieceRead {
        let Some(layout) = self.store.manifest(file).and_then(|m| m.layout().ok()) else {
            return PieceRead::Unknown;
        };
        if piece.0 >= layout.piece_count() {
            return PieceRead::Unknown;
        }
        match self.store.held(file) {
            Ok(held) if held.contains(piece) => {}
            Ok(_) => return PieceRead::Missing,
            Err(_) => return PieceRead::Unknown,
        }
        let piece_bytes = layout.piece_len(piece);
        let mut bytes = bytes::BytesMut::with_capacity(piece_bytes as usize);
        let mut offset = 0;
        while offset < piece_bytes {
            let length = BLOCK_BYTES.min(piece_bytes - offset);
            match self.store.read_block(file, piece, offset, length) {
                Ok(block) => bytes.extend_from_slice(&block),
                Err(error) => {
                    self.counters.store_errors += 1;
                    return PieceRead::Unreadable(error.to_string());
                }
            }
            offset += length;
        }
        PieceRead::Held(bytes.freeze())
    }
}

fn pending_view(file: &FileId, state: FileState) -> FileView {
    FileView {
        id: file.to_string(),
        state,
        name: String::new(),
        size: 0,
        piece_bytes: 0,
        pieces: 0,
        pieces_held: 0,
        bytes_held: 0,
        peers: 0,
        shared: false,
    }
}

/// After a (re)start: serve every complete file in the store and resume
/// every partial one from the pieces it holds. Public so the simulator's
/// des engine, which drives the core without this driver, starts nodes the
/// same way.
pub fn resume_from_store<S: Store>(node: &mut Node, store: &S, now: Instant) {
    for status in store.files() {
        let (Some(manifest), Some(hashes)) = (store.manifest(&status.file), store.piece_hashes(&status.file)) else {
            continue;
        };
        let (manifest, hashes) = (manifest.clone(), hashes.to_vec());
        if status.held_pieces == status.piece_count {
            node.share(now, manifest, hashes);
        } else {
            let held = store.held(&status.file).map(|h| h.indices()).unwrap_or_default();
            node.resume(now, manifest, Some(hashes), held);
        }
    }
}

/// Queue a frame for a connection's writer; a full queue disconnects it.
fn send(
    conns: &mut BTreeMap<ConnId, ConnEntry>,
    node: &mut Node,
    counters: &mut DriverCounters,
    now: Instant,
    conn: ConnId,
    message: Message,
) {
    let Some(entry) = conns.get(&conn) else { return };
    if entry.writer.try_send(message).is_err() {
        counters.slow_peers += 1;
        conns.remove(&conn);
        node.handle_input(now, NodeInput::Disconnected { conn });
    }
}

fn spawn_accept<T: Transport>(shared: Arc<Shared<T>>, mut listener: T::Listener, seed: [u8; 32]) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut rng = ChaCha8Rng::from_seed(seed);
        loop {
            let Ok((stream, remote)) = listener.accept().await else {
                // Out of descriptors and the like: back off, do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let nonce: [u8; 32] = rng.random();
            tokio::spawn(connection(shared.clone(), stream, remote, None, nonce));
        }
    })
}

fn spawn_dial<T: Transport>(shared: Arc<Shared<T>>, addr: SocketAddr, nonce: [u8; 32]) {
    tokio::spawn(async move {
        match tokio::time::timeout(shared.config.dial_timeout, shared.transport.connect(addr)).await {
            Ok(Ok(stream)) => connection(shared, stream, addr, Some(addr), nonce).await,
            _ => {
                let _ = shared.net.send(NetEvent::DialFailed { addr }).await;
            }
        }
    });
}

/// Handshake, then pump frames both ways until either side stops.
async fn connection<T: Transport>(
    shared: Arc<Shared<T>>,
    stream: T::Stream,
    remote: SocketAddr,
    dialed: Option<SocketAddr>,
    nonce: [u8; 32],
) {
    let (reader, mut writer) = T::split(stream);
    let max = shared.config.frame_bytes_max;
    let mut reader = FrameReader::new(reader, max);
    let handshake = tokio::time::timeout(
        shared.config.handshake_timeout,
        handshake(&shared.identity, shared.advertise, nonce, &mut reader, &mut writer, max, &shared.traffic),
    )
    .await;
    let peer = match handshake {
        Ok(Ok(peer)) => peer,
        _ => {
            if let Some(addr) = dialed {
                let _ = shared.net.send(NetEvent::DialFailed { addr }).await;
            }
            return;
        }
    };
    let conn = ConnId(shared.next_conn.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = outbox(shared.config.conn_queue_frames_max);
    let connected = NetEvent::Connected { conn, peer, remote, dialed, writer: tx };
    if shared.net.send(connected).await.is_err() {
        return; // the driver stopped
    }
    let writing = tokio::spawn(write_loop(shared.clone(), writer, rx));
    let limited = shared.config.max_download_bytes_per_s.is_some();
    // Idle too long, closed, or a bad frame: the connection ends.
    while let Ok(Ok(Some((message, bytes)))) = tokio::time::timeout(shared.config.idle_timeout, reader.next()).await {
        Traffic::add(&shared.traffic.received, FrameKind::of(&message), bytes);
        if limited {
            let now = tokio::time::Instant::now().saturating_duration_since(shared.epoch);
            let wait = shared.download.lock().await.take(bytes as u64, now);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        match message {
            Message::Keepalive => {}
            Message::Goodbye { .. } => break,
            message => {
                if shared.net.send(NetEvent::Frame { conn, message }).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = shared.net.send(NetEvent::Closed { conn }).await;
    writing.abort();
}

async fn handshake<R, W>(
    identity: &Identity,
    advertise: SocketAddr,
    nonce: [u8; 32],
    reader: &mut FrameReader<R>,
    writer: &mut W,
    max: u32,
    traffic: &Traffic,
) -> Result<PeerInfo, HandshakeError>
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let ours = handshake::hello(identity, Some(advertise), nonce);
    let io = |_| HandshakeError::Interrupted("connection failed");
    let sent = write_frame(writer, &Message::Hello(ours.clone()), max)
        .await
        .map_err(|_| HandshakeError::Interrupted("write"))?;
    Traffic::add(&traffic.sent, FrameKind::Handshake, sent);
    let Some((Message::Hello(theirs), received)) = reader.next().await.map_err(io)? else {
        return Err(HandshakeError::Interrupted("expected hello"));
    };
    Traffic::add(&traffic.received, FrameKind::Handshake, received);
    let proof = handshake::proof(identity, &theirs);
    let proof = match proof {
        Ok(proof) => proof,
        Err(error) => {
            let reason = match error {
                HandshakeError::VersionMismatch { .. } => GoodbyeReason::VersionMismatch,
                _ => GoodbyeReason::ProtocolViolation,
            };
            let _ = write_frame(writer, &Message::Goodbye { reason }, max).await;
            return Err(error);
        }
    };
    let sent = write_frame(writer, &Message::HelloProof(proof), max)
        .await
        .map_err(|_| HandshakeError::Interrupted("write"))?;
    Traffic::add(&traffic.sent, FrameKind::Handshake, sent);
    let Some((Message::HelloProof(their_proof), received)) = reader.next().await.map_err(io)? else {
        return Err(HandshakeError::Interrupted("expected proof"));
    };
    Traffic::add(&traffic.received, FrameKind::Handshake, received);
    handshake::verify_peer(identity, &ours, &theirs, &their_proof)
}

/// Frames go through a [`FrameWriter`] of `write_buffer_bytes` and out in
/// one write when the queue runs dry (or the buffer fills): a busy
/// connection sends many frames per system call, an idle one sends each at
/// once. The queue hands out its control lane first ([`crate::outbox`]).
async fn write_loop<T: Transport>(shared: Arc<Shared<T>>, writer: T::Writer, rx: OutboxReceiver) {
    let max = shared.config.frame_bytes_max;
    let limited = shared.config.max_upload_bytes_per_s.is_some();
    let mut writer = FrameWriter::new(writer, shared.config.write_buffer_bytes);
    loop {
        let message = match rx.try_recv() {
            TryRecv::Frame(message) => message,
            TryRecv::Closed => break, // the loop dropped us
            TryRecv::Empty => {
                if writer.flush().await.is_err() {
                    break;
                }
                tokio::select! {
                    biased;
                    message = rx.recv() => match message {
                        Some(message) => message,
                        None => break,
                    },
                    () = tokio::time::sleep(shared.config.keepalive_interval) => Message::Keepalive,
                }
            }
        };
        let goodbye = matches!(message, Message::Goodbye { .. });
        let Ok(bytes) = writer.send(&message, max).await else { break };
        Traffic::add(&shared.traffic.sent, FrameKind::of(&message), bytes);
        if limited {
            let now = tokio::time::Instant::now().saturating_duration_since(shared.epoch);
            let wait = shared.upload.lock().await.take(bytes as u64, now);
            if !wait.is_zero() {
                // Out before the pause, so the limit shapes the wire, not the buffer.
                if writer.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(wait).await;
            }
        }
        if goodbye {
            break;
        }
    }
    let _ = writer.shutdown().await;
}
