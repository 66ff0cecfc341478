//! One file's exchange: our pieces, the sessions of the peers trading it,
//! the download (while incomplete), the buffers of unverified pieces and
//! the complete pieces waiting for the driver's hash.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::{Bytes, BytesMut};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use super::piece_buffers::PieceBuffers;
use super::{
    ExchangeConfig, ExchangeEvent, ExchangeOutput, ExchangeStats, PieceHashed, ServeBlock, StorePiece, VerifyId,
    VerifyPiece, Violation,
};
use crate::content::{BLOCK_BYTES, Layout, MerkleProof, MerkleRoot, MerkleTree, PieceHash, verify_range};
use crate::ids::{ConnId, FileId, NodeId, PieceIndex};
use crate::scheduler::{BlockError, BlockRef, Download, PeerSlot};
use crate::time::Instant;
use crate::wire::ExchangeMessage;

/// What the exchange must do after a message was handled.
#[derive(Debug)]
pub(super) enum After {
    Nothing,
    /// The peer became interested: it may get a free upload slot.
    PeerInterested,
    /// An unchoked peer lost interest: its upload slot serves nobody and
    /// can go to a waiting peer.
    SlotIdle,
    /// These peers reached the strike limit.
    Banned((ConnId, NodeId)),
    /// The peer ended its session (`Leave`): drop ours.
    Left,
    /// Both sides hold every piece: end the session.
    Redundant,
}

/// Pieces in one HAVE batch: 4096 varints are at most 20 KiB, well within
/// a frame, whatever the file's piece count.
const HAVES_PER_MESSAGE_MAX: usize = 4096;

#[derive(Clone, Debug)]
struct Session {
    conn: ConnId,
    node: NodeId,
    am_choking: bool,
    am_interested: bool,
    peer_interested: bool,
    /// The peer sent its Bitfield, HaveAll or HaveNone.
    announced: bool,
    /// The peer announced every piece (kept when our download ends,
    /// which forgets who holds what).
    peer_complete: bool,
    /// Blocks handed to the driver and not yet reported sent.
    queued_serves: u32,
    choked_requests: u32,
    uploaded_bytes: u64,
    downloaded_bytes: u64,
    optimistic: bool,
    /// Requests taken since the last idle-slot check.
    requests_since_check: u32,
    /// Unchoked through the whole interval since the last check.
    unchoked_since_check: bool,
    /// Super seeding only: the peer's pieces, and what we revealed to it
    /// that it does not have yet.
    peer_pieces: Vec<u8>,
    revealed: Vec<PieceIndex>,
    /// Pieces completed since the last HAVE, sent when the session's
    /// batch interval since `haves_sent_at` ends.
    haves_pending: Vec<PieceIndex>,
    /// When the last HAVE went out, if one did.
    haves_sent_at: Option<Instant>,
}

impl Session {
    /// When the HAVEs pending may go: a batch interval after the last,
    /// the shorter one while we unchoke the peer; at once to an unchoked
    /// peer short of pieces to ask us for (`starving`).
    fn haves_due(&self, config: &ExchangeConfig, starving: bool) -> Instant {
        if !self.am_choking && starving {
            return Instant::ZERO;
        }
        let interval = if self.am_choking { config.have_batch_interval } else { config.have_batch_interval_unchoked };
        self.haves_sent_at.map_or(Instant::ZERO, |at| at + interval)
    }

    /// The HAVE for the pieces pending, which are then gone.
    fn send_haves(&mut self, file: FileId) -> ExchangeOutput {
        let pieces = std::mem::take(&mut self.haves_pending);
        ExchangeOutput::Send { conn: self.conn, message: ExchangeMessage::Have { file, pieces } }
    }
}

/// Fetching a manifest's piece hashes from peers, batch by batch.
#[derive(Clone, Debug)]
struct HashFetch {
    batch: u32,
    done: Vec<bool>,
    /// Batch index -> who was asked and until when.
    inflight: BTreeMap<u32, (PeerSlot, Instant)>,
    /// Peers that said they do not know the hashes, or timed out.
    no_source: BTreeSet<PeerSlot>,
}

/// Super seeding: which piece to reveal next (module docs of `Exchange`).
#[derive(Clone, Debug)]
struct SuperSeed {
    /// Pieces in the order they are revealed, drawn from the seeded RNG.
    order: Vec<u32>,
    /// Next position in `order`; wraps, so every piece is revealed once
    /// before any piece is revealed twice.
    cursor: usize,
}

pub(super) struct Swarm {
    file: FileId,
    layout: Layout,
    root: MerkleRoot,
    /// All piece hashes; placeholders until `hash_fetch` completes.
    hashes: Vec<PieceHash>,
    hash_fetch: Option<HashFetch>,
    /// Built on the first hash request we serve.
    tree: Option<MerkleTree>,
    super_seed: Option<SuperSeed>,
    /// Our pieces, packed MSB first as on the wire.
    have: Vec<u8>,
    have_count: u32,
    /// The earliest `have_quiet_until` of a session with HAVEs pending.
    haves_due: Option<Instant>,
    download: Option<Download>,
    sessions: Vec<Option<Session>>,
    /// Blocks of started pieces, until the piece is complete.
    buffers: BTreeMap<PieceIndex, BytesMut>,
    /// Who sent the blocks in `buffers`, per piece (a session's slot is
    /// dropped when it ends).
    buffer_senders: BTreeMap<PieceIndex, Vec<PeerSlot>>,
    /// Complete pieces handed to the driver to hash, until it answers.
    /// Each is still a started piece of the download, so their bytes count
    /// in its `unverified_bytes_max` with the buffers'.
    verifying: BTreeMap<PieceIndex, Verifying>,
    /// The id the next piece to hash gets.
    verify_next: VerifyId,
    /// Memory of pieces handed out, reused for later ones.
    piece_buffers: PieceBuffers,
    strikes: BTreeMap<NodeId, u32>,
    banned: BTreeSet<NodeId>,
    /// `banned` in ban order, to forget the oldest at `bans_per_file_max`.
    ban_order: VecDeque<NodeId>,
    config: ExchangeConfig,
}

/// A complete piece whose hash the driver was asked for.
#[derive(Clone, Debug)]
struct Verifying {
    id: VerifyId,
    data: Bytes,
}

fn bitfield_is_valid(pieces: u32, packed: &[u8]) -> bool {
    let spare = (8 - pieces % 8) % 8;
    packed.len() == pieces.div_ceil(8) as usize
        && (spare == 0 || packed.last().is_none_or(|&last| last & ((1u8 << spare) - 1) == 0))
}

impl Swarm {
    /// `have: None` seeds (every piece held); `Some(pieces)` downloads.
    /// Pieces to hash are numbered from `verify_ids`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        file: FileId,
        layout: Layout,
        root: MerkleRoot,
        hashes: Option<Vec<PieceHash>>,
        have: Option<Vec<PieceIndex>>,
        config: &ExchangeConfig,
        seed: [u8; 32],
        verify_ids: VerifyId,
    ) -> Self {
        let pieces = layout.piece_count();
        let batch = config.hash_batch_max;
        let hash_fetch = hashes.is_none().then(|| HashFetch {
            batch,
            done: vec![false; pieces.div_ceil(batch) as usize],
            inflight: BTreeMap::new(),
            no_source: BTreeSet::new(),
        });
        let mut swarm = Self {
            file,
            layout,
            root,
            hashes: hashes.unwrap_or_else(|| vec![PieceHash::default(); pieces as usize]),
            hash_fetch,
            tree: None,
            super_seed: None,
            have: vec![0; pieces.div_ceil(8) as usize],
            have_count: 0,
            haves_due: None,
            download: None,
            sessions: vec![None; usize::from(config.peers_per_file_max)],
            buffers: BTreeMap::new(),
            buffer_senders: BTreeMap::new(),
            verifying: BTreeMap::new(),
            verify_next: verify_ids,
            piece_buffers: PieceBuffers::default(),
            strikes: BTreeMap::new(),
            banned: BTreeSet::new(),
            ban_order: VecDeque::new(),
            config: config.clone(),
        };
        match have {
            None => {
                (0..pieces).for_each(|p| swarm.set_have(PieceIndex(p)));
                if config.super_seeding {
                    let mut rng = ChaCha8Rng::from_seed(seed);
                    let mut order: Vec<u32> = (0..pieces).collect();
                    for i in (1..order.len()).rev() {
                        order.swap(i, rand::RngExt::random_range(&mut rng, 0..=i));
                    }
                    swarm.super_seed = Some(SuperSeed { order, cursor: 0 });
                }
            }
            Some(held) => {
                for piece in held.into_iter().filter(|p| p.0 < pieces) {
                    swarm.set_have(piece);
                }
                if swarm.have_count < pieces {
                    let held = (0..pieces).map(PieceIndex).filter(|&p| swarm.has(p));
                    let mut rng = ChaCha8Rng::from_seed(seed);
                    swarm.download =
                        Some(Download::new(layout, config.peers_per_file_max, config.download.clone(), held, &mut rng));
                }
            }
        }
        swarm
    }

    fn has(&self, piece: PieceIndex) -> bool {
        packed_has(&self.have, piece)
    }

    fn set_have(&mut self, piece: PieceIndex) {
        if !self.has(piece) {
            packed_set(&mut self.have, piece);
            self.have_count += 1;
        }
    }

    pub(super) fn is_complete(&self) -> bool {
        self.have_count == self.layout.piece_count()
    }

    pub(super) fn progress(&self) -> (u32, u32) {
        (self.have_count, self.layout.piece_count())
    }

    /// Every piece hash, once known (given, or fetched and proven).
    pub(super) fn piece_hashes(&self) -> Option<&[PieceHash]> {
        self.hash_fetch.is_none().then_some(self.hashes.as_slice())
    }

    /// Complete pieces waiting for their hash.
    pub(super) fn verifying_count(&self) -> usize {
        self.verifying.len()
    }

    pub(super) fn peer_count(&self) -> usize {
        self.sessions.iter().flatten().count()
    }

    /// A peer that announced every piece, when we hold every piece too,
    /// has nothing to trade with us.
    fn redundancy(&self, slot: PeerSlot) -> After {
        if self.is_complete() && self.session(slot).is_some_and(|s| s.peer_complete) {
            After::Redundant
        } else {
            After::Nothing
        }
    }

    /// Peers that announced every piece.
    pub(super) fn complete_peers(&self) -> impl Iterator<Item = PeerSlot> + '_ {
        self.sessions
            .iter()
            .enumerate()
            .filter_map(|(index, session)| session.as_ref().filter(|s| s.peer_complete).map(|_| PeerSlot(index as u16)))
    }

    /// Upload slots in use: the peers we unchoke, interested or not (a
    /// peer that lost interest keeps its slot until a waiting peer needs
    /// it, so interest that comes and goes costs no choke round trip).
    pub(super) fn unchoked_count(&self) -> usize {
        self.sessions.iter().flatten().filter(|s| !s.am_choking).count()
    }

    /// An unchoked peer that wants nothing from us: its slot can go to a
    /// waiting peer.
    pub(super) fn unchoked_uninterested(&self) -> Option<PeerSlot> {
        self.sessions
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| !s.am_choking && !s.peer_interested))
            .map(|i| PeerSlot(i as u16))
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        let hashes = self.hash_fetch.iter().flat_map(|f| f.inflight.values().map(|&(_, at)| at));
        let download = self.download.as_ref().and_then(Download::poll_timeout);
        download.into_iter().chain(hashes).chain(self.haves_due).min()
    }

    pub(super) fn set_priority(&mut self, priority: u8) {
        if let Some(download) = &mut self.download {
            download.set_priority(priority);
        }
    }

    pub(super) fn set_streaming(&mut self, from: Option<PieceIndex>) {
        if let Some(download) = &mut self.download {
            download.set_streaming(from);
        }
    }

    fn session(&self, slot: PeerSlot) -> Option<&Session> {
        self.sessions.get(usize::from(slot.0))?.as_ref()
    }

    fn session_mut(&mut self, slot: PeerSlot) -> Option<&mut Session> {
        self.sessions.get_mut(usize::from(slot.0))?.as_mut()
    }

    fn send(&self, out: &mut VecDeque<ExchangeOutput>, slot: PeerSlot, message: ExchangeMessage) {
        if let Some(session) = self.session(slot) {
            out.push_back(ExchangeOutput::Send { conn: session.conn, message });
        }
    }

    /// A new session: announce what we hold. `None` if the file's peer
    /// limit is reached or the node is banned from it.
    pub(super) fn add_peer(
        &mut self,
        conn: ConnId,
        node: NodeId,
        out: &mut VecDeque<ExchangeOutput>,
    ) -> Option<PeerSlot> {
        if self.banned.contains(&node) {
            return None;
        }
        let index = self.sessions.iter().position(Option::is_none)?;
        let slot = PeerSlot(u16::try_from(index).ok()?);
        if let Some(download) = &mut self.download {
            download.add_peer(slot).ok()?;
        }
        self.sessions[index] = Some(Session {
            conn,
            node,
            am_choking: true,
            am_interested: false,
            peer_interested: false,
            announced: false,
            peer_complete: false,
            queued_serves: 0,
            choked_requests: 0,
            uploaded_bytes: 0,
            downloaded_bytes: 0,
            optimistic: false,
            requests_since_check: 0,
            unchoked_since_check: false,
            peer_pieces: if self.super_seed.is_some() { vec![0; self.have.len()] } else { Vec::new() },
            revealed: Vec::new(),
            haves_pending: Vec::new(),
            haves_sent_at: None,
        });
        let file = self.file;
        let announcement = if self.super_seed.is_some() {
            ExchangeMessage::HaveNone { file } // pieces are revealed one by one
        } else if self.is_complete() && self.layout.piece_count() > 0 {
            ExchangeMessage::HaveAll { file }
        } else if self.have_count == 0 {
            ExchangeMessage::HaveNone { file }
        } else {
            ExchangeMessage::Bitfield { file, bits: self.have.clone() }
        };
        self.send(out, slot, announcement);
        Some(slot)
    }

    pub(super) fn remove_peer(&mut self, now: Instant, slot: PeerSlot, out: &mut VecDeque<ExchangeOutput>) {
        if self.sessions.get_mut(usize::from(slot.0)).and_then(Option::take).is_none() {
            return;
        }
        if let Some(download) = &mut self.download {
            // The slot was registered when the session was created.
            let _ = download.remove_peer(slot);
        }
        for senders in self.buffer_senders.values_mut() {
            senders.retain(|&s| s != slot);
        }
        if let Some(fetch) = &mut self.hash_fetch {
            fetch.inflight.retain(|_, (asked, _)| *asked != slot);
            fetch.no_source.remove(&slot);
        }
        self.refill_all(now, out);
    }

    /// Whether the peer at `slot` announced `piece` (or every piece).
    fn peer_holds(&self, slot: PeerSlot, piece: PieceIndex) -> bool {
        self.download.as_ref().is_some_and(|d| d.picker().peer_has(slot, piece))
    }

    pub(super) fn block_sent(&mut self, slot: PeerSlot) {
        if let Some(session) = self.session_mut(slot) {
            session.queued_serves = session.queued_serves.saturating_sub(1);
        }
    }

    pub(super) fn set_choking(&mut self, slot: PeerSlot, choking: bool, out: &mut VecDeque<ExchangeOutput>) {
        let file = self.file;
        let Some(session) = self.session_mut(slot) else { return };
        if session.am_choking == choking {
            return;
        }
        session.am_choking = choking;
        session.choked_requests = 0;
        session.unchoked_since_check = false;
        if !choking && !session.haves_pending.is_empty() {
            out.push_back(session.send_haves(file)); // it may ask for them now
        }
        let message = if choking { ExchangeMessage::Choke { file } } else { ExchangeMessage::Unchoke { file } };
        self.send(out, slot, message);
    }

    /// Interested peers we choke: who a freed upload slot can go to.
    pub(super) fn waiting_for_slot(&self) -> impl Iterator<Item = PeerSlot> + '_ {
        self.sessions.iter().enumerate().filter_map(|(index, session)| {
            session.as_ref().filter(|s| s.peer_interested && s.am_choking).map(|_| PeerSlot(index as u16))
        })
    }

    /// Unchoked peers that asked for nothing since the last check although
    /// unchoked before it; starts the next interval.
    pub(super) fn take_idle_slots(&mut self) -> Vec<PeerSlot> {
        let mut idle = Vec::new();
        for (index, session) in self.sessions.iter_mut().enumerate() {
            let Some(session) = session.as_mut().filter(|s| !s.am_choking) else { continue };
            if session.unchoked_since_check && session.requests_since_check == 0 {
                idle.push(PeerSlot(index as u16));
            }
            session.unchoked_since_check = true;
            session.requests_since_check = 0;
        }
        idle
    }

    /// `(slot, score, optimistic)` of every interested peer, and reset the
    /// byte counters for the next round.
    pub(super) fn take_choke_scores(&mut self) -> Vec<(PeerSlot, u64, bool)> {
        let seeding = self.is_complete();
        let mut scores = Vec::new();
        for (index, session) in self.sessions.iter_mut().enumerate() {
            let Some(session) = session else { continue };
            let score = if seeding { session.uploaded_bytes } else { session.downloaded_bytes };
            session.uploaded_bytes = 0;
            session.downloaded_bytes = 0;
            if session.peer_interested {
                scores.push((PeerSlot(index as u16), score, session.optimistic));
            }
        }
        scores
    }

    pub(super) fn apply_choke(
        &mut self,
        unchoke: &[(FileId, PeerSlot)],
        optimistic: &[(FileId, PeerSlot)],
        file: FileId,
        out: &mut VecDeque<ExchangeOutput>,
    ) {
        for index in 0..self.sessions.len() {
            let slot = PeerSlot(index as u16);
            let Some(session) = self.session_mut(slot) else { continue };
            session.optimistic = optimistic.contains(&(file, slot));
            let keep = unchoke.contains(&(file, slot));
            self.set_choking(slot, !keep, out);
        }
    }

    /// Super seeding: reveal pieces to `slot` until it has
    /// `super_seed_reveals_per_peer` it does not hold, taking them in the
    /// global reveal order so that no piece is revealed twice before all
    /// were revealed once (skipping pieces the peer already has).
    fn reveal(&mut self, slot: PeerSlot, out: &mut VecDeque<ExchangeOutput>) {
        let per_peer = self.config.super_seed_reveals_per_peer as usize;
        let file = self.file;
        let Some(superseed) = &mut self.super_seed else { return };
        let Some(session) = self.sessions.get_mut(usize::from(slot.0)).and_then(Option::as_mut) else { return };
        let pieces = superseed.order.len();
        let mut reveals = Vec::new();
        let mut offset = 0;
        while session.revealed.len() < per_peer && offset < pieces {
            let at = (superseed.cursor + offset) % pieces;
            let piece = superseed.order[at];
            if packed_has(&session.peer_pieces, PieceIndex(piece)) || session.revealed.contains(&PieceIndex(piece)) {
                offset += 1;
                continue;
            }
            // Move the chosen piece to the cursor: this round's reveals stay
            // a prefix of `order`, and skipped pieces keep their turn.
            superseed.order.swap(superseed.cursor % pieces, at);
            superseed.cursor += 1;
            session.revealed.push(PieceIndex(piece));
            reveals.push(PieceIndex(piece));
        }
        if !reveals.is_empty() {
            self.send(out, slot, ExchangeMessage::Have { file, pieces: reveals });
        }
    }

    /// Super seeding: the peer at `slot` holds `pieces` now. Those pieces
    /// have spread, so no peer waits on us for them any more: every peer
    /// they were revealed to (the announcer, and others still fetching
    /// them) is shown the next pieces in their place. That is BEP 16's
    /// signal, a revealed piece seen at another peer, and it matters
    /// because a peer that fetched its revealed piece from a neighbour
    /// never tells us: we hold the piece, so its HAVE to us is redundant
    /// and suppressed. Waiting on that HAVE left a 200-peer crowd (des,
    /// seed 3) with every peer revealed pieces it already had, and four
    /// pieces never revealed at all.
    fn super_seed_peer_has(&mut self, slot: PeerSlot, pieces: &[PieceIndex], out: &mut VecDeque<ExchangeOutput>) {
        if self.super_seed.is_none() {
            return;
        }
        let Some(announcer) = self.sessions.get_mut(usize::from(slot.0)).and_then(Option::as_mut) else { return };
        for &piece in pieces {
            packed_set(&mut announcer.peer_pieces, piece);
        }
        // Borrowed out while the other sessions are edited, then put back.
        let spread = std::mem::take(&mut announcer.peer_pieces);
        let mut short = Vec::new();
        for (index, session) in self.sessions.iter_mut().enumerate() {
            let Some(session) = session.as_mut() else { continue };
            let before = session.revealed.len();
            session.revealed.retain(|&p| !packed_has(&spread, p));
            if index == usize::from(slot.0) || session.revealed.len() < before {
                short.push(PeerSlot(index as u16));
            }
        }
        if let Some(announcer) = self.session_mut(slot) {
            announcer.peer_pieces = spread;
        }
        for slot in short {
            self.reveal(slot, out);
        }
    }

    /// Tell the peer at `slot` we hold `piece`: at once if its session
    /// sent no HAVE for a batch interval, else with the batch due at the
    /// interval's end. A peer we unchoke may ask for the piece now, so
    /// its interval is the shorter `have_batch_interval_unchoked`.
    fn announce_piece(&mut self, now: Instant, slot: PeerSlot, piece: PieceIndex, out: &mut VecDeque<ExchangeOutput>) {
        let unchoked = self.session(slot).is_some_and(|s| !s.am_choking);
        let starving = unchoked && self.starving(slot);
        let (file, config) = (self.file, &self.config);
        let Some(session) = self.sessions.get_mut(usize::from(slot.0)).and_then(Option::as_mut) else { return };
        session.haves_pending.push(piece);
        let due = session.haves_due(config, starving);
        if due <= now || session.haves_pending.len() >= HAVES_PER_MESSAGE_MAX {
            session.haves_sent_at = Some(now);
            return out.push_back(session.send_haves(file));
        }
        self.haves_due = Some(self.haves_due.map_or(due, |d| d.min(due)));
    }

    /// Whether the peer at `slot` lacks fewer than `have_at_once_below`
    /// of our pieces, so a new one may be most of what it could ask us
    /// for next.
    fn starving(&self, slot: PeerSlot) -> bool {
        let below = self.config.have_at_once_below;
        self.download.as_ref().is_some_and(|d| !d.picker().peer_lacks_ours_at_least(slot, below))
    }

    /// Send the HAVE batches whose interval ended.
    pub(super) fn flush_haves(&mut self, now: Instant, out: &mut VecDeque<ExchangeOutput>) {
        if self.haves_due.is_none_or(|due| due > now) {
            return;
        }
        let (file, config) = (self.file, &self.config);
        let mut next: Option<Instant> = None;
        for session in self.sessions.iter_mut().flatten().filter(|s| !s.haves_pending.is_empty()) {
            let due = session.haves_due(config, false);
            if due <= now {
                session.haves_sent_at = Some(now);
                out.push_back(session.send_haves(file));
            } else {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        self.haves_due = next;
    }

    /// Send requests to fill `slot`'s pipeline: hash batches while the
    /// hashes are unknown, blocks after.
    fn refill(&mut self, now: Instant, slot: PeerSlot, out: &mut VecDeque<ExchangeOutput>) {
        if !self.sessions.get(usize::from(slot.0)).is_some_and(Option::is_some) {
            return;
        }
        if self.hash_fetch.is_some() {
            self.request_hashes(now, slot, out);
            return;
        }
        let Some(download) = &mut self.download else { return };
        for block in download.next_requests(slot, now) {
            let length = self.layout.block_len(block.piece, block.block);
            let message =
                ExchangeMessage::Request { file: self.file, piece: block.piece, offset: block.offset(), length };
            self.send(out, slot, message);
        }
    }

    pub(super) fn refill_all(&mut self, now: Instant, out: &mut VecDeque<ExchangeOutput>) {
        for index in 0..self.sessions.len() {
            self.refill(now, PeerSlot(index as u16), out);
        }
    }

    /// Tell the peer whether we want something it has.
    fn update_interest(&mut self, slot: PeerSlot, out: &mut VecDeque<ExchangeOutput>) {
        let interesting = self.download.as_ref().is_some_and(|d| d.picker().is_interesting(slot));
        let file = self.file;
        let Some(session) = self.session_mut(slot) else { return };
        if session.am_interested != interesting {
            session.am_interested = interesting;
            let message = if interesting {
                ExchangeMessage::Interested { file }
            } else {
                ExchangeMessage::NotInterested { file }
            };
            self.send(out, slot, message);
        }
    }

    /// Ask `slot` for the next missing hash batch, one batch per peer at
    /// a time, from peers that announced pieces (so may know the hashes).
    /// Hash requests are metadata: not subject to choking (as BEP 9).
    fn request_hashes(&mut self, now: Instant, slot: PeerSlot, out: &mut VecDeque<ExchangeOutput>) {
        let has_pieces = self.download.as_ref().is_some_and(|d| d.picker().peer_piece_count(slot) > 0);
        let timeout = self.config.download.request_timeout_min;
        let Some(fetch) = &mut self.hash_fetch else { return };
        if !has_pieces || fetch.no_source.contains(&slot) || fetch.inflight.values().any(|&(s, _)| s == slot) {
            return;
        }
        let Some(batch) =
            (0..fetch.done.len() as u32).find(|b| !fetch.done[*b as usize] && !fetch.inflight.contains_key(b))
        else {
            return;
        };
        fetch.inflight.insert(batch, (slot, now + timeout));
        let (file, count) = (self.file, fetch.batch);
        self.send(out, slot, ExchangeMessage::HashRequest { file, first: PieceIndex(batch * count), count });
    }

    /// A peer asks for a batch of piece hashes.
    fn on_hash_request(
        &mut self,
        slot: PeerSlot,
        first: PieceIndex,
        count: u32,
        out: &mut VecDeque<ExchangeOutput>,
    ) -> Result<After, Violation> {
        let pieces = self.layout.piece_count();
        if !count.is_power_of_two()
            || count > self.config.hash_batch_max
            || !first.0.is_multiple_of(count)
            || first.0 >= pieces
        {
            return Err(Violation::BadRange);
        }
        let file = self.file;
        let (hashes, proof) = if self.hash_fetch.is_some() {
            (Vec::new(), MerkleProof::default()) // we do not know them yet
        } else {
            let tree = self.tree.get_or_insert_with(|| MerkleTree::new(&self.hashes));
            let end = (first.0 + count).min(pieces) as usize;
            let proof = tree.range_proof(first, count).unwrap_or_default();
            (self.hashes[first.0 as usize..end].to_vec(), proof)
        };
        self.send(out, slot, ExchangeMessage::Hashes { file, first, count, hashes, proof });
        Ok(After::Nothing)
    }

    /// A batch of hashes arrived: check it against the root.
    #[allow(clippy::too_many_arguments)]
    fn on_hashes(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        first: PieceIndex,
        count: u32,
        hashes: Vec<PieceHash>,
        proof: &MerkleProof,
        out: &mut VecDeque<ExchangeOutput>,
    ) -> Result<After, Violation> {
        let pieces = self.layout.piece_count();
        let Some(fetch) = &mut self.hash_fetch else { return Err(Violation::UnsolicitedHashes) };
        let batch = first.0 / fetch.batch.max(1);
        let asked = fetch.inflight.get(&batch).is_some_and(|&(s, _)| s == slot);
        if !asked || count != fetch.batch || !first.0.is_multiple_of(fetch.batch) {
            return Err(Violation::UnsolicitedHashes);
        }
        fetch.inflight.remove(&batch);
        if hashes.is_empty() {
            fetch.no_source.insert(slot);
            self.refill_all(now, out);
            return Ok(After::Nothing);
        }
        if !verify_range(&self.root, pieces, first, count, &hashes, proof) {
            return Err(Violation::BadHashes);
        }
        fetch.done[batch as usize] = true;
        let start = first.0 as usize;
        self.hashes[start..start + hashes.len()].copy_from_slice(&hashes);
        if fetch.done.iter().all(|&d| d) {
            self.hash_fetch = None;
            self.refill_all(now, out);
        } else {
            self.refill(now, slot, out);
        }
        Ok(After::Nothing)
    }

    pub(super) fn expire_requests(&mut self, now: Instant, out: &mut VecDeque<ExchangeOutput>) {
        if let Some(fetch) = &mut self.hash_fetch {
            let expired: Vec<(u32, PeerSlot)> =
                fetch.inflight.iter().filter(|(_, (_, at))| *at <= now).map(|(&b, &(s, _))| (b, s)).collect();
            for (batch, slot) in &expired {
                fetch.inflight.remove(batch);
                fetch.no_source.insert(*slot);
            }
            if !expired.is_empty() {
                self.refill_all(now, out);
            }
        }
        let Some(download) = &mut self.download else { return };
        let expired = download.handle_timeout(now);
        if expired.is_empty() {
            return;
        }
        for (slot, block) in expired {
            self.send_cancel(slot, block, out);
        }
        self.refill_all(now, out);
    }

    fn send_cancel(&self, slot: PeerSlot, block: BlockRef, out: &mut VecDeque<ExchangeOutput>) {
        let length = self.layout.block_len(block.piece, block.block);
        let message = ExchangeMessage::Cancel { file: self.file, piece: block.piece, offset: block.offset(), length };
        self.send(out, slot, message);
    }

    /// Handle one message of an open session.
    pub(super) fn on_message(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        message: ExchangeMessage,
        out: &mut VecDeque<ExchangeOutput>,
        stats: &mut ExchangeStats,
    ) -> Result<After, Violation> {
        let pieces = self.layout.piece_count();
        match message {
            ExchangeMessage::Request { piece, offset, length, .. } => {
                return self.on_request(slot, piece, offset, length, out, stats);
            }
            ExchangeMessage::HashRequest { first, count, .. } => return self.on_hash_request(slot, first, count, out),
            ExchangeMessage::Hashes { first, count, hashes, proof, .. } => {
                return self.on_hashes(now, slot, first, count, hashes, &proof, out);
            }
            _ => {}
        }
        let Some(session) = self.session_mut(slot) else { return Err(Violation::NoSession) };
        match message {
            ExchangeMessage::Bitfield { bits, .. } => {
                if std::mem::replace(&mut session.announced, true) || !bitfield_is_valid(pieces, &bits) {
                    return Err(Violation::BadBitfield);
                }
                session.peer_complete = bits.iter().map(|b| b.count_ones()).sum::<u32>() == pieces;
                if let Some(download) = &mut self.download {
                    download.peer_bitfield(slot, &bits).map_err(|_| Violation::BadBitfield)?;
                }
                if self.super_seed.is_some() {
                    let held: Vec<PieceIndex> = (0..pieces).map(PieceIndex).filter(|&p| packed_has(&bits, p)).collect();
                    self.super_seed_peer_has(slot, &held, out);
                }
                self.update_interest(slot, out);
                return Ok(self.redundancy(slot));
            }
            ExchangeMessage::HaveAll { .. } => {
                if std::mem::replace(&mut session.announced, true) {
                    return Err(Violation::BadBitfield);
                }
                session.peer_complete = true;
                if let Some(download) = &mut self.download {
                    download.peer_has_all(slot).map_err(|_| Violation::BadBitfield)?;
                }
                self.update_interest(slot, out);
                return Ok(self.redundancy(slot));
            }
            ExchangeMessage::Leave { .. } => return Ok(After::Left),
            ExchangeMessage::HaveNone { .. } => {
                if std::mem::replace(&mut session.announced, true) {
                    return Err(Violation::BadBitfield);
                }
                self.reveal(slot, out);
            }
            ExchangeMessage::Have { pieces: held, .. } => {
                if held.is_empty() || held.len() > pieces as usize || held.iter().any(|p| p.0 >= pieces) {
                    return Err(Violation::BadRange);
                }
                session.announced = true; // a HAVE first implies HaveNone before it
                if let Some(download) = &mut self.download {
                    for &piece in &held {
                        download.peer_have(slot, piece).map_err(|_| Violation::BadRange)?;
                    }
                    // Counted only while downloading; a seed learns of a
                    // peer's completion from the peer's `Leave`.
                    let complete = download.picker().peer_piece_count(slot) == pieces;
                    if let Some(session) = self.session_mut(slot) {
                        session.peer_complete = complete;
                    }
                }
                self.super_seed_peer_has(slot, &held, out);
                self.update_interest(slot, out);
                self.refill(now, slot, out);
            }
            ExchangeMessage::Interested { .. } => {
                let was = std::mem::replace(&mut session.peer_interested, true);
                if !was {
                    return Ok(After::PeerInterested);
                }
            }
            ExchangeMessage::NotInterested { .. } => {
                session.peer_interested = false;
                // Its upload slot serves nobody now (a peer that completed,
                // or holds all we have): the exchange hands it to a waiting
                // peer, if any, rather than wait for the next rechoke.
                if !session.am_choking {
                    return Ok(After::SlotIdle);
                }
            }
            ExchangeMessage::Choke { .. } => {
                if let Some(download) = &mut self.download {
                    download.set_choked(slot, true);
                }
                // Its requests were dropped; others may take the blocks.
                self.refill_all(now, out);
            }
            ExchangeMessage::Unchoke { .. } => {
                if let Some(download) = &mut self.download {
                    download.set_choked(slot, false);
                }
                self.refill(now, slot, out);
            }
            ExchangeMessage::Request { .. } | ExchangeMessage::HashRequest { .. } | ExchangeMessage::Hashes { .. } => {
                unreachable!("handled above")
            }
            ExchangeMessage::Cancel { .. } => {
                // The driver takes back a block still in its send queue;
                // one already written is sent anyway and counted as waste
                // by the peer (BEP 3 allows it).
            }
            ExchangeMessage::Reject { piece, offset, length, .. } => {
                if !self.layout.is_block(piece, offset, length) {
                    return Err(Violation::BadRange);
                }
                if let Some(download) = &mut self.download
                    && download.on_reject(slot, BlockRef { piece, block: offset / BLOCK_BYTES })
                {
                    self.refill_all(now, out);
                }
            }
            ExchangeMessage::Block { piece, offset, data, .. } => {
                return self.on_block(now, slot, piece, offset, data, out, stats);
            }
        }
        Ok(After::Nothing)
    }

    /// A peer asks us for a block.
    #[allow(clippy::too_many_arguments)]
    fn on_request(
        &mut self,
        slot: PeerSlot,
        piece: PieceIndex,
        offset: u32,
        length: u32,
        out: &mut VecDeque<ExchangeOutput>,
        stats: &mut ExchangeStats,
    ) -> Result<After, Violation> {
        if !self.layout.is_block(piece, offset, length) {
            return Err(Violation::BadRange);
        }
        let file = self.file;
        let have = self.has(piece);
        let (queue_max, choked_max) = (self.config.requests_queued_per_peer_max, self.config.choked_requests_max);
        let Some(session) = self.session_mut(slot) else { return Err(Violation::NoSession) };
        let reject = ExchangeMessage::Reject { file, piece, offset, length };
        if session.am_choking {
            // Requests race a choke on the wire; a stream of them after it
            // is a flood.
            session.choked_requests += 1;
            if session.choked_requests > choked_max {
                return Err(Violation::RequestFlood);
            }
            stats.requests_rejected += 1;
            self.send(out, slot, reject);
            return Ok(After::Nothing);
        }
        if !have || session.queued_serves >= queue_max {
            stats.requests_rejected += 1;
            self.send(out, slot, reject);
            return Ok(After::Nothing);
        }
        session.queued_serves += 1;
        session.requests_since_check = session.requests_since_check.saturating_add(1);
        session.uploaded_bytes += u64::from(length);
        stats.blocks_served += 1;
        out.push_back(ExchangeOutput::ServeBlock(ServeBlock { conn: session.conn, file, piece, offset, length }));
        Ok(After::Nothing)
    }

    #[allow(clippy::too_many_arguments)]
    fn on_block(
        &mut self,
        now: Instant,
        slot: PeerSlot,
        piece: PieceIndex,
        offset: u32,
        data: Bytes,
        out: &mut VecDeque<ExchangeOutput>,
        stats: &mut ExchangeStats,
    ) -> Result<After, Violation> {
        let length = u32::try_from(data.len()).map_err(|_| Violation::BadRange)?;
        if !self.layout.is_block(piece, offset, length) {
            return Err(Violation::BadRange);
        }
        let Some(download) = &mut self.download else {
            // Complete already: a late endgame copy.
            stats.wasted_bytes += u64::from(length);
            return Ok(After::Nothing);
        };
        let block = BlockRef { piece, block: offset / BLOCK_BYTES };
        let accepted = match download.on_block(slot, block, now) {
            Ok(accepted) => accepted,
            Err(BlockError::Duplicate) => {
                stats.wasted_bytes += u64::from(length);
                return Ok(After::Nothing);
            }
            Err(_) => return Err(Violation::UnsolicitedBlock),
        };
        stats.blocks_received += 1;
        stats.payload_bytes_received += u64::from(length);
        if let Some(session) = self.session_mut(slot) {
            session.downloaded_bytes += u64::from(length);
        }
        let piece_len = self.layout.piece_len(piece) as usize;
        let buffer = match self.buffers.entry(piece) {
            std::collections::btree_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::btree_map::Entry::Vacant(entry) => entry.insert(self.piece_buffers.take(piece_len)),
        };
        buffer[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        let senders = self.buffer_senders.entry(piece).or_default();
        if !senders.contains(&slot) {
            senders.push(slot);
        }
        for (other, block) in accepted.cancels {
            self.send_cancel(other, block, out);
        }
        if accepted.piece_complete {
            self.request_verify(piece, out);
        }
        self.refill(now, slot, out);
        Ok(After::Nothing)
    }

    /// Count a strike against `node`; returns whether it is now banned.
    /// Identities are cheap, so both tables are bounded: strike counts by
    /// forgetting some unbanned node, bans by forgetting the oldest.
    fn strike(&mut self, node: NodeId) -> bool {
        let strikes_tracked_max = usize::from(self.config.peers_per_file_max) * 4;
        if !self.strikes.contains_key(&node) && self.strikes.len() >= strikes_tracked_max {
            self.strikes.pop_first();
        }
        let strikes = self.strikes.entry(node).or_insert(0);
        *strikes += 1;
        if *strikes < self.config.strikes_max || self.banned.contains(&node) {
            return false;
        }
        self.strikes.remove(&node);
        if self.ban_order.len() >= self.config.bans_per_file_max as usize
            && let Some(oldest) = self.ban_order.pop_front()
        {
            self.banned.remove(&oldest);
        }
        self.banned.insert(node);
        self.ban_order.push_back(node);
        true
    }

    /// A piece is complete: ask the driver for its hash. Its blocks are
    /// all received, so nothing changes it until the answer.
    fn request_verify(&mut self, piece: PieceIndex, out: &mut VecDeque<ExchangeOutput>) {
        self.buffer_senders.remove(&piece);
        let Some(buffer) = self.buffers.remove(&piece) else { return };
        let data = buffer.freeze();
        let id = self.verify_next;
        // Wraps within the file's half of the id (module docs of `VerifyId`).
        self.verify_next = VerifyId((id.0 & !u64::from(u32::MAX)) | u64::from((id.0 as u32).wrapping_add(1)));
        assert!(!self.verifying.contains_key(&piece), "{piece:?} is hashed once at a time");
        self.verifying.insert(piece, Verifying { id, data: data.clone() });
        out.push_back(ExchangeOutput::VerifyPiece(VerifyPiece { file: self.file, piece, id, data }));
    }

    /// The driver's answer: store the piece if its hash is right, refetch
    /// it and blame its senders if not. An answer to no question (or to an
    /// earlier one) is dropped.
    pub(super) fn on_piece_hashed(
        &mut self,
        now: Instant,
        hashed: PieceHashed,
        out: &mut VecDeque<ExchangeOutput>,
        stats: &mut ExchangeStats,
    ) -> After {
        let piece = hashed.piece;
        if self.verifying.get(&piece).is_none_or(|v| v.id != hashed.id) {
            return After::Nothing;
        }
        let Some(Verifying { data, .. }) = self.verifying.remove(&piece) else { return After::Nothing };
        let Some(download) = &mut self.download else { return After::Nothing };
        let file = self.file;
        if hashed.hash == self.hashes[piece.0 as usize] {
            stats.pieces_verified += 1;
            let senders = download.piece_passed(piece);
            let complete = download.is_complete();
            self.piece_buffers.retire(&data);
            out.push_back(ExchangeOutput::StorePiece(StorePiece { file, piece, data }));
            out.push_back(ExchangeOutput::Event(ExchangeEvent::PieceVerified { file, piece }));
            self.set_have(piece);
            for index in 0..self.sessions.len() {
                let slot = PeerSlot(index as u16);
                // A peer that holds the piece has no use for the HAVE (it
                // only feeds the availability of pieces one lacks): skipping
                // it saves about half the HAVE traffic of a flash crowd
                // (libtorrent's `send_redundant_have = false`). Those who
                // sent the piece still hear of it: a super seed (BEP 16)
                // reveals more to a peer once it announces what it got.
                // Our interest in a peer can only end if it holds the piece
                // we no longer want.
                let holds = self.peer_holds(slot, piece);
                if !holds || senders.contains(&slot) {
                    self.announce_piece(now, slot, piece, out);
                }
                if holds {
                    self.update_interest(slot, out);
                }
            }
            if complete {
                self.download = None;
                self.buffers.clear();
                self.buffer_senders.clear();
                self.piece_buffers.clear();
                for index in 0..self.sessions.len() {
                    self.update_interest(PeerSlot(index as u16), out);
                }
                out.push_back(ExchangeOutput::Event(ExchangeEvent::DownloadComplete { file }));
            } else {
                // Its bytes left the unverified budget: a download that
                // waited on the budget (every peer idle) starts new pieces.
                self.refill_all(now, out);
            }
            return After::Nothing;
        }
        stats.pieces_failed += 1;
        self.piece_buffers.retire(&data);
        let culprits = download.piece_failed(piece);
        let nodes: Vec<(ConnId, NodeId)> =
            culprits.iter().filter_map(|&slot| self.session(slot).map(|s| (s.conn, s.node))).collect();
        out.push_back(ExchangeOutput::Event(ExchangeEvent::PieceFailed {
            file,
            piece,
            culprits: nodes.iter().map(|n| n.1).collect(),
        }));
        let mut banned = None;
        for (conn, node) in nodes {
            if self.strike(node) {
                self.discard_blocks_of(node);
                banned = banned.or(Some((conn, node)));
            }
        }
        self.refill_all(now, out);
        banned.map_or(After::Nothing, After::Banned)
    }

    /// `node` is banned: the pieces still being assembled with its blocks
    /// start over without them. Left in, they would fail their hash once
    /// others finished them and, its session gone, blame only those others
    /// and shut them out of the piece: with hashing off the driver's loop
    /// a bad peer has several pieces under way when its strikes land.
    fn discard_blocks_of(&mut self, node: NodeId) {
        let Some(slot) = (0..self.sessions.len())
            .map(|index| PeerSlot(index as u16))
            .find(|&slot| self.session(slot).is_some_and(|s| s.node == node))
        else {
            return;
        };
        let Some(download) = &mut self.download else { return };
        let tainted: Vec<PieceIndex> = self
            .buffer_senders
            .iter()
            .filter(|(_, senders)| senders.contains(&slot))
            .map(|(&piece, _)| piece)
            .collect();
        for piece in tainted {
            // Its senders are shut out of the piece, as for a bad hash; no
            // strikes: nothing was hashed.
            download.piece_failed(piece);
            self.buffer_senders.remove(&piece);
            if let Some(buffer) = self.buffers.remove(&piece) {
                self.piece_buffers.retire(&buffer.freeze());
            }
        }
    }
}

/// Whether `piece`'s bit is set in a bitfield packed MSB first, as on the
/// wire (false past its end).
fn packed_has(bits: &[u8], piece: PieceIndex) -> bool {
    bits.get((piece.0 / 8) as usize).is_some_and(|byte| byte & (0x80 >> (piece.0 % 8)) != 0)
}

/// Set `piece`'s bit in a bitfield packed MSB first (nothing past its end).
fn packed_set(bits: &mut [u8], piece: PieceIndex) {
    if let Some(byte) = bits.get_mut((piece.0 / 8) as usize) {
        *byte |= 0x80 >> (piece.0 % 8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::PIECE_BYTES_MIN;

    fn swarm(config: &ExchangeConfig) -> Swarm {
        let layout = Layout::new(u64::from(PIECE_BYTES_MIN), PIECE_BYTES_MIN).unwrap();
        Swarm::new(
            FileId([1; 32]),
            layout,
            MerkleRoot::default(),
            Some(vec![PieceHash::default()]),
            None,
            config,
            [0; 32],
            VerifyId(0),
        )
    }

    fn node(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    #[test]
    fn strikes_and_bans_are_bounded() {
        let config =
            ExchangeConfig { peers_per_file_max: 1, strikes_max: 3, bans_per_file_max: 2, ..ExchangeConfig::default() };
        let mut s = swarm(&config);
        // One strike each from 10 identities: at most 4 (peers × 4) tracked.
        for n in 0..10 {
            assert!(!s.strike(node(n)));
        }
        assert_eq!(s.strikes.len(), 4);
        // Three strikes ban; only the 2 newest bans are remembered.
        for n in [20, 21, 22] {
            let bans: Vec<bool> = (0..3).map(|_| s.strike(node(n))).collect();
            assert_eq!(bans, [false, false, true], "banned on the third strike");
        }
        assert_eq!(s.ban_order.iter().copied().collect::<Vec<_>>(), [node(21), node(22)]);
        assert!(!s.banned.contains(&node(20)) && s.banned.contains(&node(22)));
        assert!(s.strikes.len() <= 4);
    }
}
