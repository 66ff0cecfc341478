//! Three drivers over real TCP on 127.0.0.1, in one process: A bootstraps
//! the network, B serves a file from its store, C fetches it by id alone.

// Test setup that fails should panic loudly.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use shoal_node::core::config::Config;
use shoal_node::core::content::{Layout, PieceHash, hash_buf_read};
use shoal_node::core::exchange::ExchangeEvent;
use shoal_node::core::ids::{FileId, PieceIndex};
use shoal_node::core::manifest::FileManifest;
use shoal_node::core::node::{LookupKind, Node, NodeEvent};
use shoal_node::core::wire::Contact;
use shoal_node::driver::{Command, Driver, DriverConfig, DriverCounters, FrameKind};
use shoal_node::identity::Identity;
use shoal_node::store::{FileStatus, HeldPieces, MemoryStore, Store, StoreError};
use shoal_node::transport::TokioTcp;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

struct Running<S = MemoryStore> {
    addr: SocketAddr,
    traffic: std::sync::Arc<shoal_node::driver::Traffic>,
    commands: mpsc::Sender<Command>,
    events: mpsc::UnboundedReceiver<NodeEvent>,
    task: JoinHandle<(DriverCounters, S)>,
}

async fn start(index: u8, store: MemoryStore) -> Running {
    start_with(index, store, DriverConfig::new("127.0.0.1:0".parse().unwrap())).await
}

async fn start_with<S: Store + Send + 'static>(index: u8, store: S, config: DriverConfig) -> Running<S> {
    let identity = Identity::from_secret([index; 32]);
    let driver = Driver::bind(TokioTcp, identity.clone(), config).await.unwrap();
    let addr = driver.local_addr();
    let traffic = driver.traffic();
    let local = Contact { id: identity.node_id(), addr };
    let node = Node::new(Config::default(), local, [index; 32], driver.now()).unwrap();
    let (commands, rx) = mpsc::channel(16);
    let (events_tx, events) = mpsc::unbounded_channel();
    let observer = Box::new(move |_at, event: &NodeEvent| {
        let _ = events_tx.send(event.clone());
    });
    let task = tokio::spawn(driver.run(node, store, rx, Some(observer), [index + 100; 32]));
    Running { addr, traffic, commands, events, task }
}

async fn wait_for(events: &mut mpsc::UnboundedReceiver<NodeEvent>, want: impl Fn(&NodeEvent) -> bool) -> bool {
    // A generous guard against a hang, not a performance claim.
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = events.recv().await {
            if want(&event) {
                return true;
            }
        }
        false
    });
    found.await.unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_shared_on_one_daemon_is_fetched_by_another_over_tcp() {
    let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let content = hash_buf_read(&data[..], Layout::for_file(data.len() as u64)).unwrap();
    let manifest = FileManifest::new("clip.bin", &content).unwrap();
    let file: FileId = content.file_id;

    let a = start(1, MemoryStore::new()).await;
    let mut sharer_store = MemoryStore::new();
    sharer_store.add_shared(Bytes::from(data.clone()), &manifest, &content.piece_hashes).unwrap();
    let mut b = start(2, sharer_store).await;
    let mut c = start(3, MemoryStore::new()).await;

    for node in [&b, &c] {
        node.commands.send(Command::Bootstrap(vec![a.addr])).await.unwrap();
    }
    assert!(wait_for(&mut b.events, |e| matches!(e, NodeEvent::Bootstrapped { contacts } if *contacts > 0)).await);
    assert!(wait_for(&mut c.events, |e| matches!(e, NodeEvent::Bootstrapped { contacts } if *contacts > 0)).await);

    // B serves the file from its store since start; once it has contacts
    // it publishes the records by itself (no Share command).
    assert!(
        wait_for(&mut b.events, |e| matches!(e, NodeEvent::Lookup { kind: LookupKind::Publish, .. })).await,
        "the stored file was published after bootstrap"
    );
    c.commands.send(Command::Get { file }).await.unwrap();
    let complete = wait_for(
        &mut c.events,
        |e| matches!(e, NodeEvent::Exchange(ExchangeEvent::DownloadComplete { file: f }) if *f == file),
    )
    .await;
    assert!(complete, "C did not complete the download");

    for node in [&a, &b, &c] {
        node.commands.send(Command::Shutdown).await.unwrap();
    }
    let (c_counters, c_store) = c.task.await.unwrap();
    assert_eq!(c_counters.store_errors, 0);
    let layout = content.layout;
    let mut fetched = Vec::new();
    for piece in 0..layout.piece_count() {
        fetched.extend_from_slice(&c_store.piece(&file, PieceIndex(piece)).expect("every piece stored"));
    }
    assert_eq!(fetched, data, "C holds exactly the shared bytes");
    // Traffic accounting: C received the file as block payload (plus a
    // small header per block), and sent no blocks.
    let blocks_in = c.traffic.received(FrameKind::Block);
    assert!(blocks_in >= data.len() as u64, "block bytes {blocks_in} < file {}", data.len());
    assert!(blocks_in < data.len() as u64 * 11 / 10, "block overhead over 10%: {blocks_in}");
    assert_eq!(c.traffic.sent(FrameKind::Block), 0);
    assert!(c.traffic.sent(FrameKind::Dht) > 0 && c.traffic.received(FrameKind::Handshake) > 0);
    drop(a.events);
    let _ = a.task.await;
    let _ = b.task.await;
}

/// Over 1024 pieces, the manifest carries no piece hashes: the downloader
/// fetches them from the seeder with Merkle proofs, and its store entry is
/// created once they are known.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_without_inline_hashes_is_fetched_and_stored() {
    let piece_bytes = 16 * 1024u32;
    let data = shoal_node::core::content::synthetic_bytes(77, 1100 * piece_bytes as usize - 5);
    let layout = Layout::new(data.len() as u64, piece_bytes).unwrap();
    let content = hash_buf_read(&data[..], layout).unwrap();
    let manifest = FileManifest::new("many-pieces.bin", &content).unwrap();
    assert!(manifest.piece_hashes.is_none(), "1100 hashes do not fit a record");
    let file = content.file_id;

    let mut sharer_store = MemoryStore::new();
    sharer_store.add_shared(Bytes::from(data.clone()), &manifest, &content.piece_hashes).unwrap();
    let mut b = start(12, sharer_store).await;
    let mut c = start(13, MemoryStore::new()).await;
    c.commands.send(Command::Bootstrap(vec![b.addr])).await.unwrap();
    assert!(wait_for(&mut c.events, |e| matches!(e, NodeEvent::Bootstrapped { contacts } if *contacts > 0)).await);
    assert!(wait_for(&mut b.events, |e| matches!(e, NodeEvent::Lookup { kind: LookupKind::Publish, .. })).await);
    c.commands.send(Command::Get { file }).await.unwrap();
    let complete = wait_for(
        &mut c.events,
        |e| matches!(e, NodeEvent::Exchange(ExchangeEvent::DownloadComplete { file: f }) if *f == file),
    )
    .await;
    assert!(complete, "C did not complete the download");
    for node in [&b, &c] {
        node.commands.send(Command::Shutdown).await.unwrap();
    }
    let (c_counters, c_store) = c.task.await.unwrap();
    assert_eq!(c_counters.store_errors, 0);
    assert_eq!(c_store.piece_hashes(&file).map(<[_]>::len), Some(1100));
    let mut fetched = Vec::new();
    for piece in 0..layout.piece_count() {
        fetched.extend_from_slice(&c_store.piece(&file, PieceIndex(piece)).expect("every piece stored"));
    }
    assert_eq!(fetched, data);
    drop(b.events);
    let _ = b.task.await;
}

/// A store whose blocks go out with every byte flipped.
struct Corrupting(MemoryStore);

impl Store for Corrupting {
    type SharedSource = Bytes;
    fn create(&mut self, manifest: &FileManifest, hashes: &[PieceHash]) -> Result<FileId, StoreError> {
        self.0.create(manifest, hashes)
    }
    fn add_shared(
        &mut self,
        source: Bytes,
        manifest: &FileManifest,
        hashes: &[PieceHash],
    ) -> Result<FileId, StoreError> {
        self.0.add_shared(source, manifest, hashes)
    }
    fn write_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> Result<(), StoreError> {
        self.0.write_piece(file, piece, data)
    }
    fn read_block(&mut self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> Result<Bytes, StoreError> {
        let block = self.0.read_block(file, piece, offset, length)?;
        Ok(block.iter().map(|b| !b).collect::<Vec<u8>>().into())
    }
    fn held(&self, file: &FileId) -> Result<HeldPieces, StoreError> {
        self.0.held(file)
    }
    fn manifest(&self, file: &FileId) -> Option<&FileManifest> {
        self.0.manifest(file)
    }
    fn piece_hashes(&self, file: &FileId) -> Option<&[PieceHash]> {
        self.0.piece_hashes(file)
    }
    fn files(&self) -> Vec<FileStatus> {
        self.0.files()
    }
    fn remove(&mut self, file: &FileId) -> Result<(), StoreError> {
        self.0.remove(file)
    }
}

/// Pieces are hashed on the driver's worker thread, at most one handed to
/// it at a time (the loop waits for each answer): the downloader blames a
/// seeder serving corrupt blocks, takes the pieces from an honest one,
/// and stores only the right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_hashed_off_the_loop_catch_a_corrupt_seeder() {
    let data = shoal_node::core::content::synthetic_bytes(91, 2 * 1024 * 1024);
    let layout = Layout::new(data.len() as u64, 64 * 1024).unwrap();
    let content = hash_buf_read(&data[..], layout).unwrap();
    let manifest = FileManifest::new("checked.bin", &content).unwrap();
    let file = content.file_id;
    let shared = || {
        let mut store = MemoryStore::new();
        store.add_shared(Bytes::from(data.clone()), &manifest, &content.piece_hashes).unwrap();
        store
    };
    // The honest seeder uploads at 1 MiB/s, so it alone needs 2 s for the
    // file: the corrupt one, found by the same lookup in milliseconds on
    // loopback, is always asked for pieces. Unthrottled, the honest seeder
    // sometimes served the whole file first (1 run in 12) and nothing was
    // blamed.
    let throttled =
        DriverConfig { max_upload_bytes_per_s: Some(1024 * 1024), ..DriverConfig::new("127.0.0.1:0".parse().unwrap()) };
    let mut honest = start_with(21, shared(), throttled).await;
    let mut corrupt = start_with(22, Corrupting(shared()), DriverConfig::new("127.0.0.1:0".parse().unwrap())).await;
    let config = DriverConfig { pieces_hashing_max: 1, ..DriverConfig::new("127.0.0.1:0".parse().unwrap()) };
    let mut c = start_with(23, MemoryStore::new(), config).await;
    corrupt.commands.send(Command::Bootstrap(vec![honest.addr])).await.unwrap();
    assert!(
        wait_for(&mut corrupt.events, |e| matches!(e, NodeEvent::Bootstrapped { contacts } if *contacts > 0)).await
    );
    for events in [&mut honest.events, &mut corrupt.events] {
        assert!(wait_for(events, |e| matches!(e, NodeEvent::Lookup { kind: LookupKind::Publish, .. })).await);
    }
    c.commands.send(Command::Bootstrap(vec![honest.addr, corrupt.addr])).await.unwrap();
    assert!(wait_for(&mut c.events, |e| matches!(e, NodeEvent::Bootstrapped { contacts } if *contacts > 0)).await);
    c.commands.send(Command::Get { file }).await.unwrap();
    let corrupt_id = Identity::from_secret([22; 32]).node_id();
    let honest_id = Identity::from_secret([21; 32]).node_id();
    let (mut blamed, mut failed, mut complete) = (0, 0, false);
    // A generous guard against a hang, not a performance claim.
    let _ = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(event) = c.events.recv().await {
            match event {
                NodeEvent::Exchange(ExchangeEvent::PieceFailed { culprits, .. }) => {
                    // A piece whose corrupt sender was banned meanwhile
                    // blames nobody, or whoever finished it.
                    failed += 1;
                    blamed += usize::from(culprits.contains(&corrupt_id));
                }
                NodeEvent::Exchange(ExchangeEvent::PeerBanned { node, .. }) => {
                    assert_ne!(node, honest_id, "the honest seeder is not banned");
                }
                NodeEvent::Exchange(ExchangeEvent::DownloadComplete { file: f }) if f == file => {
                    complete = true;
                    break;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(complete, "the download did not complete");
    assert!(blamed >= 1, "the corrupt seeder's pieces failed their hash");
    for node in [&honest.commands, &corrupt.commands, &c.commands] {
        node.send(Command::Shutdown).await.unwrap();
    }
    let (_, c_store) = c.task.await.unwrap();
    let mut fetched = Vec::new();
    for piece in 0..layout.piece_count() {
        fetched.extend_from_slice(&c_store.piece(&file, PieceIndex(piece)).expect("every piece stored"));
    }
    assert_eq!(fetched, data, "only verified bytes were stored");
    eprintln!("worker hashing: {failed} pieces failed, {blamed} blamed on the corrupt seeder");
    drop((honest.events, corrupt.events));
    let _ = honest.task.await;
    let _ = corrupt.task.await;
}
