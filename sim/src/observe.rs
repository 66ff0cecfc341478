//! Observation without perturbation: hosts report what happened, with the
//! simulated time, into one [`Collector`]; a run ends as an [`Outcome`].
//!
//! The trace fingerprint is SHA-256 over every record in arrival order,
//! each written as `host time_µs event` with the full `Debug` form of the
//! node event, so any change in behaviour changes the hash. Only the
//! compact [`Fact`]s metrics need are kept in memory.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::{Digest, Sha256};
use shoal_node::core::exchange::ExchangeEvent;
use shoal_node::core::gossip::GossipEvent;
use shoal_node::core::ids::{FileId, NodeId};
use shoal_node::core::node::{LookupKind, NodeEvent};
use shoal_node::core::wire::{MessageId, Topic};

use crate::model::EngineKind;

/// Index of a file in the plan; [`FILE_UNKNOWN`] for one the plan lacks.
pub type FileIndex = u16;
/// A file the plan does not know (never expected).
pub const FILE_UNKNOWN: FileIndex = FileIndex::MAX;

/// What a metric needs to know of one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fact {
    /// The engine started the host.
    Booted,
    /// The engine crashed the host.
    Crashed,
    /// The engine restarted the host from its store.
    Restarted,
    /// The manifest was found; the download runs.
    DownloadStarted {
        /// File.
        file: FileIndex,
    },
    /// No valid manifest was found.
    ManifestNotFound {
        /// File.
        file: FileIndex,
    },
    /// Every piece verified.
    DownloadCompleted {
        /// File.
        file: FileIndex,
    },
    /// A piece passed its hash check.
    PieceVerified {
        /// File.
        file: FileIndex,
        /// Piece index.
        piece: u32,
    },
    /// A piece failed its hash check.
    PieceFailed {
        /// File.
        file: FileIndex,
    },
    /// A peer was banned from a file.
    Banned {
        /// The banned peer.
        peer: NodeId,
    },
    /// A DHT query ended (any purpose).
    Lookup {
        /// Purpose.
        kind: LookupKind,
        /// Hops.
        rounds: u32,
        /// Start to result.
        duration: Duration,
        /// The core's own verdict.
        success: bool,
    },
    /// A node lookup's answer.
    NodesFound {
        /// Its target.
        target: NodeId,
        /// The closest node found.
        closest: Option<NodeId>,
    },
    /// A search's answer: the files found.
    SearchResults {
        /// Files, by plan index.
        files: Vec<FileIndex>,
    },
    /// The host published a gossip message.
    GossipPublished {
        /// Message id.
        id: MessageId,
        /// Whether its topic is broadcast to every node (Files), not
        /// relayed on a budget (Peers, Swarm; `GossipConfig::peers_relay_per_min`
        /// and `swarm_relay_per_min`).
        broadcast: bool,
    },
    /// A gossip message reached the host.
    GossipDelivered {
        /// Message id.
        id: MessageId,
    },
}

/// One observation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Simulated time.
    pub at: Duration,
    /// Host index.
    pub host: u32,
    /// What.
    pub fact: Fact,
}

/// Gathers records from every host and hashes the trace.
#[derive(Debug)]
pub struct Collector {
    hash: Sha256,
    events: u64,
    records: Vec<Record>,
    files: BTreeMap<FileId, FileIndex>,
    line: String,
    completed: std::collections::BTreeSet<(u32, FileIndex)>,
    answers: usize,
}

impl Collector {
    /// A collector for a plan whose files have these ids, in plan order.
    #[must_use]
    pub fn new(files: &[FileId]) -> Self {
        let files = files.iter().enumerate().map(|(i, f)| (*f, i as FileIndex)).collect();
        Self {
            hash: Sha256::new(),
            events: 0,
            records: Vec::new(),
            files,
            line: String::new(),
            completed: std::collections::BTreeSet::new(),
            answers: 0,
        }
    }

    fn file(&self, id: &FileId) -> FileIndex {
        self.files.get(id).copied().unwrap_or(FILE_UNKNOWN)
    }

    fn hash_line(&mut self, host: usize, at: Duration, what: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        self.line.clear();
        let _ = writeln!(self.line, "{host} {} {what:?}", at.as_micros());
        self.hash.update(self.line.as_bytes());
        self.events += 1;
    }

    /// The engine did something to a host (boot, crash, restart).
    pub fn engine(&mut self, host: usize, at: Duration, fact: Fact) {
        self.hash_line(host, at, &fact);
        self.records.push(Record { at, host: host as u32, fact });
    }

    /// A host's node reported an event.
    pub fn node_event(&mut self, host: usize, at: Duration, event: &NodeEvent) {
        self.hash_line(host, at, event);
        let fact = match event {
            NodeEvent::DownloadStarted { file, .. } => Fact::DownloadStarted { file: self.file(file) },
            NodeEvent::ManifestNotFound { file } => Fact::ManifestNotFound { file: self.file(file) },
            NodeEvent::Lookup { kind, stats } => {
                Fact::Lookup { kind: *kind, rounds: stats.rounds, duration: stats.duration, success: stats.success }
            }
            NodeEvent::NodesFound { target, closest, .. } => {
                Fact::NodesFound { target: *target, closest: closest.first().copied() }
            }
            NodeEvent::SearchResults { entries, .. } => {
                Fact::SearchResults { files: entries.iter().map(|e| self.file(&e.file)).collect() }
            }
            NodeEvent::Gossip(GossipEvent::Published { id, topic, .. }) => {
                Fact::GossipPublished { id: *id, broadcast: *topic == Topic::Files }
            }
            NodeEvent::Gossip(GossipEvent::Delivered { id, .. }) => Fact::GossipDelivered { id: *id },
            NodeEvent::Exchange(ExchangeEvent::PieceVerified { file, piece }) => {
                Fact::PieceVerified { file: self.file(file), piece: piece.0 }
            }
            NodeEvent::Exchange(ExchangeEvent::PieceFailed { file, .. }) => Fact::PieceFailed { file: self.file(file) },
            NodeEvent::Exchange(ExchangeEvent::DownloadComplete { file }) => {
                Fact::DownloadCompleted { file: self.file(file) }
            }
            NodeEvent::Exchange(ExchangeEvent::PeerBanned { node, .. }) => Fact::Banned { peer: *node },
            _ => return,
        };
        match fact {
            Fact::DownloadCompleted { file } => {
                self.completed.insert((host as u32, file));
            }
            Fact::NodesFound { .. } | Fact::SearchResults { .. } => self.answers += 1,
            _ => {}
        }
        self.records.push(Record { at, host: host as u32, fact });
    }

    /// Events hashed so far.
    #[must_use]
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Distinct (host, file) downloads completed so far (the engines'
    /// stop condition).
    #[must_use]
    pub fn completions(&self) -> usize {
        self.completed.len()
    }

    /// Lookup and search answers so far.
    #[must_use]
    pub fn answers(&self) -> usize {
        self.answers
    }

    /// The records and the trace hash.
    #[must_use]
    pub fn finish(self) -> (Vec<Record>, [u8; 32], u64) {
        (self.records, self.hash.finalize().into(), self.events)
    }
}

/// What an engine hands back.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Which engine ran.
    pub engine: EngineKind,
    /// Simulated time at the end.
    pub sim_time: Duration,
    /// The determinism fingerprint.
    pub trace_hash: [u8; 32],
    /// Events hashed.
    pub events: u64,
    /// Facts, in trace order.
    pub records: Vec<Record>,
    /// Each host's node id.
    pub node_ids: Vec<NodeId>,
    /// Wire bytes sent, by frame kind.
    pub bytes_by_kind: BTreeMap<String, u64>,
    /// Gossip copies of already-seen messages, summed over hosts.
    pub gossip_duplicates: u64,
    /// Hosts whose completed download holds bytes other than the file's.
    pub bad_content: Vec<String>,
    /// Engine-specific figures (events per second, bytes per node…).
    pub engine_stats: BTreeMap<String, f64>,
}

impl Outcome {
    /// The trace hash in hex.
    #[must_use]
    pub fn trace_hex(&self) -> String {
        self.trace_hash.iter().map(|b| format!("{b:02x}")).collect()
    }
}
