//! What the REST API and the client commands exchange with a running node:
//! the JSON views of its state (serde, shared by the daemon that writes
//! them and the `shoal` client that reads them), and the replies the
//! driver sends back to a [`Command`](crate::driver::Command).

use std::net::SocketAddr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The node as a whole (`GET /v1/status`, and the source of `/metrics`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// The node id, hex.
    pub node_id: String,
    /// The address peers reach this node at.
    pub listen: Option<SocketAddr>,
    /// Seconds since the driver started.
    pub uptime_s: u64,
    /// Open peer connections.
    pub peers: usize,
    /// Contacts in the Kademlia routing table.
    pub routing_contacts: usize,
    /// Complete files served.
    pub files_seeding: usize,
    /// Files being downloaded (manifest known).
    pub files_downloading: usize,
    /// Wire bytes by frame kind.
    pub traffic: Vec<TrafficLine>,
    /// Pieces that passed their hash check.
    pub pieces_verified: u64,
    /// Pieces that failed their hash check.
    pub pieces_failed: u64,
    /// Blocks handed out to peers.
    pub blocks_served: u64,
    /// Received payload that was not needed (endgame duplicates, races).
    pub wasted_bytes: u64,
    /// DHT lookups by purpose.
    pub lookups: Vec<LookupLine>,
    /// Gossip messages published here.
    pub gossip_published: u64,
    /// Gossip messages delivered here (first copies).
    pub gossip_delivered: u64,
    /// Gossip duplicates received.
    pub gossip_duplicates: u64,
    /// Store operations that failed.
    pub store_errors: u64,
    /// Peers dropped because they did not keep up.
    pub slow_peers: u64,
    /// Queued blocks taken back because the peer cancelled them.
    pub blocks_cancelled: u64,
    /// Handshakes or dials that failed.
    pub handshakes_failed: u64,
    /// Connections refused at the connection limit.
    pub connections_refused: u64,
}

/// Wire bytes of one frame kind.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TrafficLine {
    /// The kind (`block`, `dht`, `gossip`, ...).
    pub kind: String,
    /// Bytes sent.
    pub sent_bytes: u64,
    /// Bytes received.
    pub received_bytes: u64,
}

/// DHT lookups of one purpose.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LookupLine {
    /// The purpose (`bootstrap`, `manifest`, `providers`, `publish`, `search`).
    pub kind: String,
    /// Lookups finished.
    pub total: u64,
    /// Of which achieved their purpose.
    pub succeeded: u64,
}

/// One open peer connection (`GET /v1/peers`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerView {
    /// The peer's node id, hex.
    pub node_id: String,
    /// Where it accepts connections.
    pub addr: SocketAddr,
    /// Whether we dialled it (else it dialled us).
    pub outbound: bool,
    /// Seconds since the connection opened.
    pub connected_s: u64,
}

/// Where a file stands on this node.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileState {
    /// Looking up its manifest in the DHT.
    FindingManifest,
    /// No valid manifest was found: the download failed.
    NotFound,
    /// Fetching pieces.
    Downloading,
    /// Every piece held and verified; served to others.
    Complete,
}

/// One file: manifest and local progress (`GET /v1/files/{id}`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileView {
    /// The file id, hex.
    pub id: String,
    /// Where it stands.
    pub state: FileState,
    /// Its name (from the manifest; empty before the manifest is known).
    pub name: String,
    /// Length in bytes (0 before the manifest is known).
    pub size: u64,
    /// Piece size in bytes.
    pub piece_bytes: u32,
    /// Pieces in the file.
    pub pieces: u32,
    /// Pieces held, verified and durable.
    pub pieces_held: u32,
    /// Bytes held (pieces held, in bytes).
    pub bytes_held: u64,
    /// Peers exchanging it with us.
    pub peers: usize,
    /// A local file shared in place (rather than downloaded).
    pub shared: bool,
}

/// One search hit (`GET /v1/search`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SearchHit {
    /// The file id, hex.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
}

/// The answer of `POST /v1/files` and `PUT /v1/files`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Shared {
    /// The file id, hex.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
}

/// The driver's answer to a piece read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PieceRead {
    /// The piece's bytes, verified.
    Held(Bytes),
    /// Not held yet (the file is known).
    Missing,
    /// The file is not in the store, or the piece is past its end.
    Unknown,
    /// The store could not read it (the message names the path).
    Unreadable(String),
}

/// Why the driver refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// No such file here.
    #[error("file {0} is not on this node")]
    UnknownFile(String),
    /// The file is already shared or downloaded here.
    #[error("file {0} is already on this node")]
    AlreadyPresent(String),
    /// Too many requests of this kind are waiting.
    #[error("too many {0} requests in progress; try again")]
    Busy(&'static str),
    /// The store failed (the message names the path).
    #[error("{0}")]
    Store(String),
}
