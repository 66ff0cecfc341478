//! Three drivers over real TCP on 127.0.0.1, in one process: A bootstraps
//! the network, B serves a file from its store, C fetches it by id alone.

// Test setup that fails should panic loudly.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use shoal_node::core::config::Config;
use shoal_node::core::content::{Layout, hash_buf_read};
use shoal_node::core::exchange::ExchangeEvent;
use shoal_node::core::ids::{FileId, PieceIndex};
use shoal_node::core::manifest::FileManifest;
use shoal_node::core::node::{LookupKind, Node, NodeEvent};
use shoal_node::core::wire::Contact;
use shoal_node::driver::{Command, Driver, DriverConfig, DriverCounters, FrameKind};
use shoal_node::identity::Identity;
use shoal_node::store::{MemoryStore, Store};
use shoal_node::transport::TokioTcp;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

struct Running {
    addr: SocketAddr,
    traffic: std::sync::Arc<shoal_node::driver::Traffic>,
    commands: mpsc::Sender<Command>,
    events: mpsc::UnboundedReceiver<NodeEvent>,
    task: JoinHandle<(DriverCounters, MemoryStore)>,
}

async fn start(index: u8, store: MemoryStore) -> Running {
    let identity = Identity::from_secret([index; 32]);
    let config = DriverConfig::new("127.0.0.1:0".parse().unwrap());
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
