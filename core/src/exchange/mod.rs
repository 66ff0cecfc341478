//! Piece exchange: per-peer sessions that trade a file's pieces.
//!
//! One [`Exchange`] machine serves every file of a node. On a connection,
//! each file has its own session (BEP 3 semantics, per file): each side
//! first announces what it holds (`Bitfield`, `HaveAll` or `HaveNone`),
//! then `Have`s as it completes pieces; `Interested`/`Choke`/`Unchoke` gate
//! requests; blocks are requested 16 KiB at a time by the download
//! scheduler ([`crate::scheduler::Download`]).
//!
//! Every peer message is validated: an unknown piece, a bad block range, a
//! block nobody asked for, a malformed bitfield or a second one is a
//! protocol violation and the connection is closed with a reason. A piece
//! is hashed when complete and only a verified piece leaves the machine
//! ([`ExchangeOutput::StorePiece`]); a failed piece is discarded and
//! fetched from someone else, and its senders get a strike each; at
//! `strikes_max` a peer is banned from the file.
//!
//! Hashing is the driver's work, so a daemon can do it off its event loop
//! (SHA-256 of every byte downloaded was a third of a downloader's CPU):
//! a complete piece leaves as [`ExchangeOutput::VerifyPiece`] and the
//! driver answers with [`ExchangeInput::PieceHashed`], at once or later.
//! Until the answer the piece is neither requested again nor stored, and
//! still counts in the download's unverified bytes: pieces awaiting their
//! hash are bounded by `download.unverified_bytes_max`, as pieces being
//! assembled are. An answer is matched to its question by a [`VerifyId`];
//! one for a file since removed (or removed and added again) is ignored.
//! Peers that left while their piece was being hashed are not struck: a
//! session's slot is forgotten by the download when it ends.
//!
//! Uploads are rationed by choking (BEP 3, libtorrent's choker):
//! `upload_slots` regular slots re-chosen every `rechoke_interval` —
//! while downloading, for the peers we download fastest from (tit for
//! tat); while seeding, for the peers we upload fastest to (spreads
//! pieces fastest) — plus an optimistic slot rotated every
//! `optimistic_unchoke_interval` so newcomers can bootstrap.
//!
//! Super seeding (`super_seeding`, for a seed that starts a swarm): the
//! seed announces `HaveNone` and reveals pieces by `Have`, a couple per
//! peer at a time in one global order, revealing the next to a peer when
//! any peer announces one of the pieces revealed to it (BEP 16: the piece
//! has spread); so no piece is served twice before every piece was served
//! once (Bharambe, Herley, Padmanabhan 2006).
//!
//! Call order (STYLE.md §1): one `handle_input`/`handle_timeout`, then
//! `poll_output` until `None`, then arm a timer for `poll_timeout`.

mod config;
mod piece_buffers;
mod swarm;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

pub use config::ExchangeConfig;
use swarm::Swarm;

use crate::content::{PieceHash, hash_piece};
use crate::ids::{ConnId, FileId, NodeId, PieceIndex};
use crate::manifest::FileManifest;
use crate::scheduler::PeerSlot;
use crate::time::Instant;
use crate::vec_map::VecMap;
use crate::wire::{ExchangeMessage, GoodbyeReason};

/// What the driver or the node tells the exchange.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ExchangeInput {
    /// A connection completed its handshake with `node`.
    PeerConnected {
        /// The connection.
        conn: ConnId,
        /// The authenticated peer.
        node: NodeId,
    },
    /// A connection closed.
    PeerDisconnected {
        /// The connection.
        conn: ConnId,
    },
    /// An exchange message arrived.
    Message {
        /// From this connection.
        conn: ConnId,
        /// The message.
        message: ExchangeMessage,
    },
    /// Serve a file we hold completely.
    Seed {
        /// Its validated manifest.
        manifest: FileManifest,
        /// Its piece hashes (from the manifest or fetched and proven).
        piece_hashes: Vec<PieceHash>,
    },
    /// Download a file, keeping the pieces already verified in `have`.
    Download {
        /// Its validated manifest.
        manifest: FileManifest,
        /// Its piece hashes, if known (from the manifest, or kept from an
        /// earlier fetch); otherwise they are fetched from peers with
        /// Merkle range proofs before any block.
        piece_hashes: Option<Vec<PieceHash>>,
        /// Pieces already stored and verified (resume).
        have: Vec<PieceIndex>,
    },
    /// Stop serving and fetching a file.
    Remove {
        /// The file.
        file: FileId,
    },
    /// Exchange `file` with the peer on `conn` (a provider or a peer that
    /// announced it): opens the session from our side.
    Open {
        /// The connection.
        conn: ConnId,
        /// The file.
        file: FileId,
    },
    /// Fetch pieces from `from` on first, in order (`None`: rarest first).
    Stream {
        /// The file.
        file: FileId,
        /// First piece wanted.
        from: Option<PieceIndex>,
    },
    /// Set a file's priority: 0 pauses it, 1..=7 weight its share of each
    /// peer (4 is normal).
    Priority {
        /// The file.
        file: FileId,
        /// The priority.
        priority: u8,
    },
    /// The driver finished sending (or dropped) a block it was asked to
    /// serve: the peer's queue has room again.
    BlockSent {
        /// The connection.
        conn: ConnId,
        /// The file.
        file: FileId,
    },
    /// The answer to a [`ExchangeOutput::VerifyPiece`].
    PieceHashed(PieceHashed),
}

/// What the exchange asks of the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeOutput {
    /// Send a message.
    Send {
        /// To this connection.
        conn: ConnId,
        /// The message.
        message: ExchangeMessage,
    },
    /// Read a block from the store and send it as
    /// [`ExchangeMessage::Block`]; answer with [`ExchangeInput::BlockSent`].
    ServeBlock(ServeBlock),
    /// Hash a complete piece and answer with [`ExchangeInput::PieceHashed`]
    /// ([`VerifyPiece::hash`] does it).
    VerifyPiece(VerifyPiece),
    /// Write a verified piece to the store.
    StorePiece(StorePiece),
    /// Close a connection.
    Disconnect {
        /// The connection.
        conn: ConnId,
        /// Why (sent to the peer in a goodbye).
        reason: GoodbyeReason,
    },
    /// Something the node or the simulator may want to know.
    Event(ExchangeEvent),
}

/// A block the driver must read from the store and send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeBlock {
    /// To this connection.
    pub conn: ConnId,
    /// The file.
    pub file: FileId,
    /// The piece.
    pub piece: PieceIndex,
    /// Byte offset in the piece.
    pub offset: u32,
    /// Length.
    pub length: u32,
}

/// A verified piece the driver must write to the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StorePiece {
    /// The file.
    pub file: FileId,
    /// The piece.
    pub piece: PieceIndex,
    /// Its bytes, hash-checked.
    pub data: Bytes,
}

/// Pairs a [`PieceHashed`] with the [`VerifyPiece`] it answers: the high
/// 32 bits number the file's download (so an answer outliving its
/// download never matches the next one), the low 32 bits the pieces
/// hashed in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerifyId(pub u64);

/// A complete piece the driver must hash (SHA-256) before the exchange
/// stores or rejects it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyPiece {
    /// The file.
    pub file: FileId,
    /// The piece.
    pub piece: PieceIndex,
    /// Echoed in the answer.
    pub id: VerifyId,
    /// The piece's bytes as received (the exchange keeps them too).
    pub data: Bytes,
}

impl VerifyPiece {
    /// Hash the piece: the answer to give the exchange.
    #[must_use]
    pub fn hash(&self) -> PieceHashed {
        PieceHashed { file: self.file, piece: self.piece, id: self.id, hash: hash_piece(&self.data) }
    }
}

/// A piece's hash, computed by the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceHashed {
    /// The file.
    pub file: FileId,
    /// The piece.
    pub piece: PieceIndex,
    /// From the [`VerifyPiece`].
    pub id: VerifyId,
    /// SHA-256 of the piece's bytes.
    pub hash: PieceHash,
}

/// Why a peer's message was a protocol violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Violation {
    /// A piece index or block range outside the file.
    BadRange,
    /// A block we never requested.
    UnsolicitedBlock,
    /// A malformed or repeated availability announcement.
    BadBitfield,
    /// Too many requests while choked, or past the queue limit.
    RequestFlood,
    /// A message for a file before any session for it.
    NoSession,
    /// Piece hashes we did not ask for.
    UnsolicitedHashes,
    /// Piece hashes whose proof does not lead to the file's root: forged.
    BadHashes,
}

/// Observable exchange events.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExchangeEvent {
    /// A piece passed its hash check.
    PieceVerified {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
    },
    /// A piece failed its hash check.
    PieceFailed {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Who sent its blocks.
        culprits: Vec<NodeId>,
    },
    /// Every piece of a file is verified.
    DownloadComplete {
        /// The file.
        file: FileId,
    },
    /// A peer reached `strikes_max` and is banned from a file.
    PeerBanned {
        /// The file.
        file: FileId,
        /// The peer.
        node: NodeId,
    },
    /// A peer broke the protocol; its connection is closed.
    ProtocolViolation {
        /// The connection.
        conn: ConnId,
        /// The peer.
        node: NodeId,
        /// What it did.
        violation: Violation,
    },
}

/// Counters, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExchangeStats {
    /// Blocks accepted.
    pub blocks_received: u64,
    /// Payload bytes of accepted blocks.
    pub payload_bytes_received: u64,
    /// Payload bytes received that were not needed (endgame, races).
    pub wasted_bytes: u64,
    /// Blocks handed to the driver to serve.
    pub blocks_served: u64,
    /// Pieces verified.
    pub pieces_verified: u64,
    /// Pieces that failed verification.
    pub pieces_failed: u64,
    /// Requests we rejected (choked, unknown piece, over the queue limit).
    pub requests_rejected: u64,
    /// Upload slots moved from an unchoked peer that asked for nothing
    /// to a waiting one (`idle_slot_interval`).
    pub idle_slots_reassigned: u64,
    /// Protocol violations seen.
    pub violations: u64,
    /// Messages dropped because a limit was reached (files, peers).
    pub dropped_over_limit: u64,
}

#[derive(Clone, Debug)]
struct Conn {
    node: NodeId,
    /// Open sessions on this connection: file -> the peer's slot in it.
    files: BTreeMap<FileId, PeerSlot>,
}

/// The piece-exchange machine (module docs).
pub struct Exchange {
    config: ExchangeConfig,
    rng: ChaCha8Rng,
    swarms: BTreeMap<FileId, Swarm>,
    /// Connections the node told us of (before their first session).
    conns: VecMap<ConnId, Conn>,
    out: VecDeque<ExchangeOutput>,
    next_rechoke: Option<Instant>,
    next_optimistic: Option<Instant>,
    next_idle_check: Option<Instant>,
    stats: ExchangeStats,
    /// Swarms created so far: numbers each one's [`VerifyId`]s.
    swarms_added: u64,
}

impl Exchange {
    /// A machine with no files; randomness from `seed` only.
    #[must_use]
    pub fn new(config: ExchangeConfig, seed: [u8; 32]) -> Self {
        Self {
            config,
            rng: ChaCha8Rng::from_seed(seed),
            swarms: BTreeMap::new(),
            conns: VecMap::new(),
            out: VecDeque::new(),
            next_rechoke: None,
            next_optimistic: None,
            next_idle_check: None,
            stats: ExchangeStats::default(),
            swarms_added: 0,
        }
    }

    /// Counters so far.
    #[must_use]
    pub fn stats(&self) -> ExchangeStats {
        self.stats
    }

    /// Whether we hold every piece of `file`.
    #[must_use]
    pub fn is_complete(&self, file: &FileId) -> bool {
        self.swarms.get(file).is_some_and(Swarm::is_complete)
    }

    /// Pieces of `file` we hold, and its piece count.
    #[must_use]
    pub fn progress(&self, file: &FileId) -> Option<(u32, u32)> {
        self.swarms.get(file).map(Swarm::progress)
    }

    /// The piece hashes of `file` once all are known: from the manifest,
    /// or fetched from peers and proven against its root (the driver
    /// creates a download's store entry with them).
    #[must_use]
    pub fn piece_hashes(&self, file: &FileId) -> Option<&[PieceHash]> {
        self.swarms.get(file).and_then(Swarm::piece_hashes)
    }

    /// Peers exchanging `file` with us.
    #[must_use]
    pub fn peer_count(&self, file: &FileId) -> usize {
        self.swarms.get(file).map_or(0, Swarm::peer_count)
    }

    /// Complete pieces waiting for the driver's [`ExchangeInput::PieceHashed`].
    #[must_use]
    pub fn pieces_verifying(&self) -> usize {
        self.swarms.values().map(Swarm::verifying_count).sum()
    }

    /// Whether any file is being exchanged on `conn`.
    #[must_use]
    pub fn has_sessions(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !c.files.is_empty())
    }

    /// Process one input (call order in the module docs).
    pub fn handle_input(&mut self, now: Instant, input: ExchangeInput) {
        match input {
            ExchangeInput::PeerConnected { conn, node } => {
                self.conns.insert(conn, Conn { node, files: BTreeMap::new() });
            }
            ExchangeInput::PeerDisconnected { conn } => self.close_conn(now, conn),
            ExchangeInput::Message { conn, message } => self.on_message(now, conn, message),
            ExchangeInput::Seed { manifest, piece_hashes } => {
                self.add_swarm(now, &manifest, Some(piece_hashes), None);
            }
            ExchangeInput::Download { manifest, piece_hashes, have } => {
                let piece_hashes = piece_hashes.or_else(|| manifest.piece_hashes.clone());
                self.add_swarm(now, &manifest, piece_hashes, Some(have));
            }
            ExchangeInput::Remove { file } => self.remove_swarm(file),
            ExchangeInput::Open { conn, file } => self.open(conn, file),
            ExchangeInput::Stream { file, from } => {
                if let Some(swarm) = self.swarms.get_mut(&file) {
                    swarm.set_streaming(from);
                    swarm.refill_all(now, &mut self.out);
                }
            }
            ExchangeInput::Priority { file, priority } => {
                if let Some(swarm) = self.swarms.get_mut(&file) {
                    swarm.set_priority(priority);
                    swarm.refill_all(now, &mut self.out);
                }
            }
            ExchangeInput::BlockSent { conn, file } => {
                if let Some(slot) = self.conns.get(&conn).and_then(|c| c.files.get(&file)).copied()
                    && let Some(swarm) = self.swarms.get_mut(&file)
                {
                    swarm.block_sent(slot);
                }
            }
            ExchangeInput::PieceHashed(hashed) => self.on_piece_hashed(now, hashed),
        }
        self.arm_choker(now);
    }

    /// The driver hashed a piece: store it or blame its senders. An answer
    /// for a file no longer here is dropped.
    fn on_piece_hashed(&mut self, now: Instant, hashed: PieceHashed) {
        let file = hashed.file;
        let Some(swarm) = self.swarms.get_mut(&file) else { return };
        // Completion comes only with a verified piece.
        let was_complete = swarm.is_complete();
        let after = swarm.on_piece_hashed(now, hashed, &mut self.out, &mut self.stats);
        if !was_complete && swarm.is_complete() {
            self.leave_complete_peers(now, file);
        }
        if let swarm::After::Banned((conn, node)) = after {
            self.out.push_back(ExchangeOutput::Event(ExchangeEvent::PeerBanned { file, node }));
            self.end_session(now, conn, file, GoodbyeReason::Banned);
        }
    }

    /// Run due timers: request timeouts, rechoke, optimistic unchoke.
    /// Tolerates early and repeated calls.
    pub fn handle_timeout(&mut self, now: Instant) {
        for swarm in self.swarms.values_mut() {
            swarm.expire_requests(now, &mut self.out);
            swarm.flush_haves(now, &mut self.out);
        }
        let optimistic_due = self.next_optimistic.is_some_and(|t| t <= now);
        if self.next_rechoke.is_some_and(|t| t <= now) || optimistic_due {
            self.rechoke(now, optimistic_due);
        }
        if self.next_idle_check.is_some_and(|t| t <= now) {
            self.next_idle_check = Some(now + self.config.idle_slot_interval);
            self.reassign_idle_slots();
        }
    }

    /// Next output, until `None`.
    pub fn poll_output(&mut self) -> Option<ExchangeOutput> {
        crate::outputs::pop_output(&mut self.out)
    }

    /// Earliest deadline.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let swarms = self.swarms.values().filter_map(Swarm::poll_timeout);
        swarms.chain(self.next_rechoke).chain(self.next_optimistic).chain(self.next_idle_check).min()
    }

    fn arm_choker(&mut self, now: Instant) {
        if self.next_rechoke.is_none() && !self.swarms.is_empty() {
            self.next_rechoke = Some(now + self.config.rechoke_interval);
            self.next_optimistic = Some(now + self.config.optimistic_unchoke_interval);
            self.next_idle_check = Some(now + self.config.idle_slot_interval);
        }
    }

    fn add_swarm(
        &mut self,
        now: Instant,
        manifest: &FileManifest,
        piece_hashes: Option<Vec<PieceHash>>,
        have: Option<Vec<PieceIndex>>,
    ) {
        let Ok(file) = manifest.validate() else { return };
        if self.swarms.contains_key(&file) {
            return;
        }
        if self.swarms.len() >= self.config.files_max as usize {
            self.stats.dropped_over_limit += 1;
            return;
        }
        let Ok(layout) = manifest.layout() else { return };
        if let Some(hashes) = &piece_hashes
            && (hashes.len() as u64 != u64::from(layout.piece_count())
                || crate::content::merkle_root(hashes) != manifest.root)
        {
            return; // hashes that do not certify this file are never used
        }
        if piece_hashes.is_none() && have.is_none() {
            return; // a seed knows its hashes
        }
        let mut seed = [0u8; 32];
        rand::Rng::fill_bytes(&mut self.rng, &mut seed);
        let verify_ids = VerifyId(self.swarms_added << 32);
        self.swarms_added = self.swarms_added.wrapping_add(1);
        let swarm = Swarm::new(file, layout, manifest.root, piece_hashes, have, &self.config, seed, verify_ids);
        self.swarms.insert(file, swarm);
        self.arm_choker(now);
    }

    fn remove_swarm(&mut self, file: FileId) {
        if self.swarms.remove(&file).is_some() {
            for (&conn, c) in self.conns.iter_mut() {
                if c.files.remove(&file).is_some() {
                    self.out.push_back(ExchangeOutput::Send { conn, message: ExchangeMessage::Leave { file } });
                }
            }
        }
    }

    /// Open a session for `file` on `conn` from our side.
    fn open(&mut self, conn: ConnId, file: FileId) {
        let Some(node) = self.conns.get(&conn).map(|c| c.node) else { return };
        if self.conns.get(&conn).is_some_and(|c| c.files.contains_key(&file)) {
            return;
        }
        let Some(swarm) = self.swarms.get_mut(&file) else { return };
        match swarm.add_peer(conn, node, &mut self.out) {
            Some(slot) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.files.insert(file, slot);
                }
                // No unchoke yet: a slot goes to a peer once it is interested.
            }
            None => self.stats.dropped_over_limit += 1,
        }
    }

    fn on_message(&mut self, now: Instant, conn: ConnId, message: ExchangeMessage) {
        let Some(c) = self.conns.get(&conn) else { return };
        let node = c.node;
        let file = message.file();
        let slot = match c.files.get(&file) {
            Some(&slot) => slot,
            None => {
                // A `Leave` for a session we no longer hold: already gone.
                if matches!(message, ExchangeMessage::Leave { .. }) {
                    return;
                }
                // The peer opens a session. A file we do not serve, no room
                // for another peer, or a banned peer: say so, or the peer
                // would wait on a session nobody serves.
                let leave = ExchangeOutput::Send { conn, message: ExchangeMessage::Leave { file } };
                let Some(swarm) = self.swarms.get_mut(&file) else {
                    self.out.push_back(leave);
                    return;
                };
                let Some(slot) = swarm.add_peer(conn, node, &mut self.out) else {
                    self.stats.dropped_over_limit += 1;
                    self.out.push_back(leave);
                    return;
                };
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.files.insert(file, slot);
                }
                slot
            }
        };
        let Some(swarm) = self.swarms.get_mut(&file) else { return };
        let result = swarm.on_message(now, slot, message, &mut self.out, &mut self.stats);
        match result {
            Ok(swarm::After::Nothing) => {}
            Ok(swarm::After::Left) => self.drop_session(now, conn, file),
            Ok(swarm::After::Redundant) => {
                self.out.push_back(ExchangeOutput::Send { conn, message: ExchangeMessage::Leave { file } });
                self.drop_session(now, conn, file);
            }
            Ok(swarm::After::PeerInterested) => self.unchoke_if_slot_free(now, file, slot),
            Ok(swarm::After::SlotIdle) => {
                if self.swarms.values().any(|s| s.waiting_for_slot().next().is_some())
                    && let Some(swarm) = self.swarms.get_mut(&file)
                {
                    swarm.set_choking(slot, true, &mut self.out);
                    self.fill_free_slots_except(&[(file, slot)]);
                }
            }
            Ok(swarm::After::Banned(banned)) => {
                self.out.push_back(ExchangeOutput::Event(ExchangeEvent::PeerBanned { file, node: banned.1 }));
                self.end_session(now, banned.0, file, GoodbyeReason::Banned);
            }
            Err(violation) => {
                self.stats.violations += 1;
                self.out.push_back(ExchangeOutput::Event(ExchangeEvent::ProtocolViolation { conn, node, violation }));
                self.out.push_back(ExchangeOutput::Disconnect { conn, reason: GoodbyeReason::ProtocolViolation });
                self.close_conn(now, conn);
            }
        }
    }

    /// Drop one file's session on a connection; close the connection if
    /// it carries nothing else, else tell the peer with a `Leave`.
    fn end_session(&mut self, now: Instant, conn: ConnId, file: FileId, reason: GoodbyeReason) {
        self.drop_session(now, conn, file);
        if self.conns.get(&conn).is_some_and(|c| c.files.is_empty()) {
            self.out.push_back(ExchangeOutput::Disconnect { conn, reason });
            self.conns.remove(&conn);
        } else {
            self.out.push_back(ExchangeOutput::Send { conn, message: ExchangeMessage::Leave { file } });
        }
    }

    /// Forget our side of one file's session on a connection, which stays
    /// open (the node closes it once nothing uses it).
    fn drop_session(&mut self, now: Instant, conn: ConnId, file: FileId) {
        let Some(c) = self.conns.get_mut(&conn) else { return };
        if let Some(slot) = c.files.remove(&file)
            && let Some(swarm) = self.swarms.get_mut(&file)
        {
            swarm.remove_peer(now, slot, &mut self.out);
        }
        self.fill_free_slots();
    }

    /// We hold every piece of `file` now: sessions with peers that do
    /// too trade nothing, and end (libtorrent's
    /// `close_redundant_connections`), freeing both sides' peer slots
    /// for peers still downloading.
    fn leave_complete_peers(&mut self, now: Instant, file: FileId) {
        let Some(swarm) = self.swarms.get(&file) else { return };
        let complete: Vec<PeerSlot> = swarm.complete_peers().collect();
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.files.get(&file).is_some_and(|slot| complete.contains(slot)))
            .map(|(&conn, _)| conn)
            .collect();
        for conn in conns {
            self.out.push_back(ExchangeOutput::Send { conn, message: ExchangeMessage::Leave { file } });
            self.drop_session(now, conn, file);
        }
    }

    fn close_conn(&mut self, now: Instant, conn: ConnId) {
        let Some(c) = self.conns.remove(&conn) else { return };
        for (file, slot) in c.files {
            if let Some(swarm) = self.swarms.get_mut(&file) {
                swarm.remove_peer(now, slot, &mut self.out);
            }
        }
        self.fill_free_slots();
    }

    fn unchoked_count(&self) -> usize {
        self.swarms.values().map(Swarm::unchoked_count).sum()
    }

    /// A newly interested peer gets a slot at once if one is free, or
    /// held by a peer that wants nothing from us (libtorrent too unchokes
    /// at once rather than wait for the next rechoke).
    fn unchoke_if_slot_free(&mut self, _now: Instant, file: FileId, slot: PeerSlot) {
        let slots = (self.config.upload_slots + self.config.optimistic_unchoke_slots) as usize;
        if self.unchoked_count() >= slots {
            let idle = self.swarms.iter().find_map(|(&f, s)| s.unchoked_uninterested().map(|s| (f, s)));
            let Some((idle_file, idle_slot)) = idle else { return };
            if let Some(swarm) = self.swarms.get_mut(&idle_file) {
                swarm.set_choking(idle_slot, true, &mut self.out);
            }
        }
        if let Some(swarm) = self.swarms.get_mut(&file) {
            swarm.set_choking(slot, false, &mut self.out);
        }
    }

    /// Give free upload slots to interested peers we choke, chosen at
    /// random (a peer that completed or left frees its slot at once; the
    /// next rechoke ranks everyone again).
    fn fill_free_slots(&mut self) {
        self.fill_free_slots_except(&[]);
    }

    /// Move the slots of unchoked peers that asked for nothing during the
    /// last `idle_slot_interval` to interested peers waiting for one
    /// (config docs); the idle peers wait again, and count again at the
    /// next rechoke.
    fn reassign_idle_slots(&mut self) {
        let mut idle: Vec<(FileId, PeerSlot)> = Vec::new();
        for (&file, swarm) in &mut self.swarms {
            idle.extend(swarm.take_idle_slots().into_iter().map(|slot| (file, slot)));
        }
        let waiting = self.swarms.values().map(|s| s.waiting_for_slot().count()).sum::<usize>();
        if idle.is_empty() || waiting == 0 {
            return;
        }
        for &(file, slot) in idle.iter().take(waiting) {
            if let Some(swarm) = self.swarms.get_mut(&file) {
                swarm.set_choking(slot, true, &mut self.out);
                self.stats.idle_slots_reassigned += 1;
            }
        }
        self.fill_free_slots_except(&idle);
    }

    fn fill_free_slots_except(&mut self, except: &[(FileId, PeerSlot)]) {
        let slots = (self.config.upload_slots + self.config.optimistic_unchoke_slots) as usize;
        let mut free = slots.saturating_sub(self.unchoked_count());
        if free == 0 {
            return;
        }
        let mut waiting: Vec<(FileId, PeerSlot)> = self
            .swarms
            .iter()
            .flat_map(|(&file, swarm)| swarm.waiting_for_slot().map(move |s| (file, s)))
            .filter(|waiting| !except.contains(waiting))
            .collect();
        while free > 0 && !waiting.is_empty() {
            let i = rand::RngExt::random_range(&mut self.rng, 0..waiting.len());
            let (file, slot) = waiting.swap_remove(i);
            if let Some(swarm) = self.swarms.get_mut(&file) {
                swarm.set_choking(slot, false, &mut self.out);
                free -= 1;
            }
        }
    }

    /// Re-choose the regular upload slots across all files, and rotate the
    /// optimistic one when `rotate` (module docs).
    fn rechoke(&mut self, now: Instant, rotate: bool) {
        self.next_rechoke = Some(now + self.config.rechoke_interval);
        if rotate {
            self.next_optimistic = Some(now + self.config.optimistic_unchoke_interval);
        }
        // Score every interested peer: bytes it gave us (downloading) or we
        // gave it (seeding) since the last rechoke. A random tiebreak keeps
        // equal peers from being ranked by slot number.
        let mut candidates: Vec<(u64, u64, FileId, PeerSlot, bool)> = Vec::new();
        for (&file, swarm) in &mut self.swarms {
            for (slot, score, optimistic) in swarm.take_choke_scores() {
                let tiebreak = rand::Rng::next_u64(&mut self.rng);
                candidates.push((score, tiebreak, file, slot, optimistic));
            }
        }
        candidates.sort_by_key(|c| std::cmp::Reverse((c.0, c.1)));
        let regular = self.config.upload_slots as usize;
        let mut unchoke: Vec<(FileId, PeerSlot)> = candidates.iter().take(regular).map(|c| (c.2, c.3)).collect();
        let rest: Vec<_> = candidates.iter().skip(regular).collect();
        // Keep the current optimistic peers unless it is time to rotate.
        let optimistic: Vec<(FileId, PeerSlot)> = if rotate || rest.iter().all(|c| !c.4) {
            let mut pool: Vec<_> = rest.iter().map(|c| (c.2, c.3)).collect();
            let mut chosen = Vec::new();
            for _ in 0..self.config.optimistic_unchoke_slots {
                if pool.is_empty() {
                    break;
                }
                let i = rand::RngExt::random_range(&mut self.rng, 0..pool.len());
                chosen.push(pool.swap_remove(i));
            }
            chosen
        } else {
            rest.iter().filter(|c| c.4).map(|c| (c.2, c.3)).collect()
        };
        unchoke.extend(optimistic.iter().copied());
        for (&file, swarm) in &mut self.swarms {
            swarm.apply_choke(&unchoke, &optimistic, file, &mut self.out);
        }
    }
}
