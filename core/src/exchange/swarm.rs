//! One file's exchange: our pieces, the sessions of the peers trading it,
//! the download (while incomplete) and the buffers of unverified pieces.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use super::{ExchangeConfig, ExchangeEvent, ExchangeOutput, ExchangeStats, Violation};
use crate::content::{BLOCK_BYTES, Layout, PieceHash, hash_piece};
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
    /// These peers reached the strike limit.
    Banned((ConnId, NodeId)),
}

#[derive(Clone, Debug)]
struct Session {
    conn: ConnId,
    node: NodeId,
    am_choking: bool,
    am_interested: bool,
    peer_interested: bool,
    /// The peer sent its Bitfield, HaveAll or HaveNone.
    announced: bool,
    /// Blocks handed to the driver and not yet reported sent.
    queued_serves: u32,
    choked_requests: u32,
    uploaded_bytes: u64,
    downloaded_bytes: u64,
    optimistic: bool,
}

pub(super) struct Swarm {
    file: FileId,
    layout: Layout,
    hashes: Vec<PieceHash>,
    /// Our pieces, packed MSB first as on the wire.
    have: Vec<u8>,
    have_count: u32,
    download: Option<Download>,
    sessions: Vec<Option<Session>>,
    /// Blocks of started pieces, until the piece is verified or fails.
    buffers: BTreeMap<PieceIndex, Vec<u8>>,
    strikes: BTreeMap<NodeId, u32>,
    banned: BTreeSet<NodeId>,
    config: ExchangeConfig,
}

fn bitfield_is_valid(pieces: u32, packed: &[u8]) -> bool {
    let spare = (8 - pieces % 8) % 8;
    packed.len() == pieces.div_ceil(8) as usize
        && (spare == 0 || packed.last().is_none_or(|&last| last & ((1u8 << spare) - 1) == 0))
}

impl Swarm {
    /// `have: None` seeds (every piece held); `Some(pieces)` downloads.
    pub(super) fn new(
        file: FileId,
        layout: Layout,
        hashes: Vec<PieceHash>,
        have: Option<Vec<PieceIndex>>,
        config: &ExchangeConfig,
        seed: [u8; 32],
    ) -> Self {
        let pieces = layout.piece_count();
        let mut swarm = Self {
            file,
            layout,
            hashes,
            have: vec![0; pieces.div_ceil(8) as usize],
            have_count: 0,
            download: None,
            sessions: vec![None; usize::from(config.peers_per_file_max)],
            buffers: BTreeMap::new(),
            strikes: BTreeMap::new(),
            banned: BTreeSet::new(),
            config: config.clone(),
        };
        match have {
            None => (0..pieces).for_each(|p| swarm.set_have(PieceIndex(p))),
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
        self.have.get((piece.0 / 8) as usize).is_some_and(|byte| byte & (0x80 >> (piece.0 % 8)) != 0)
    }

    fn set_have(&mut self, piece: PieceIndex) {
        if !self.has(piece) {
            self.have[(piece.0 / 8) as usize] |= 0x80 >> (piece.0 % 8);
            self.have_count += 1;
        }
    }

    pub(super) fn is_complete(&self) -> bool {
        self.have_count == self.layout.piece_count()
    }

    pub(super) fn progress(&self) -> (u32, u32) {
        (self.have_count, self.layout.piece_count())
    }

    pub(super) fn peer_count(&self) -> usize {
        self.sessions.iter().flatten().count()
    }

    pub(super) fn unchoked_count(&self) -> usize {
        self.sessions.iter().flatten().filter(|s| !s.am_choking).count()
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.download.as_ref().and_then(Download::poll_timeout)
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
            queued_serves: 0,
            choked_requests: 0,
            uploaded_bytes: 0,
            downloaded_bytes: 0,
            optimistic: false,
        });
        let file = self.file;
        let announcement = if self.is_complete() && self.layout.piece_count() > 0 {
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
        self.refill_all(now, out);
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
        let message = if choking { ExchangeMessage::Choke { file } } else { ExchangeMessage::Unchoke { file } };
        self.send(out, slot, message);
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

    /// Send requests to fill `slot`'s pipeline.
    fn refill(&mut self, now: Instant, slot: PeerSlot, out: &mut VecDeque<ExchangeOutput>) {
        let Some(download) = &mut self.download else { return };
        if !self.sessions.get(usize::from(slot.0)).is_some_and(Option::is_some) {
            return;
        }
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

    pub(super) fn expire_requests(&mut self, now: Instant, out: &mut VecDeque<ExchangeOutput>) {
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
        if let ExchangeMessage::Request { piece, offset, length, .. } = message {
            return self.on_request(slot, piece, offset, length, out, stats);
        }
        let Some(session) = self.session_mut(slot) else { return Err(Violation::NoSession) };
        match message {
            ExchangeMessage::Bitfield { bits, .. } => {
                if std::mem::replace(&mut session.announced, true) || !bitfield_is_valid(pieces, &bits) {
                    return Err(Violation::BadBitfield);
                }
                if let Some(download) = &mut self.download {
                    download.peer_bitfield(slot, &bits).map_err(|_| Violation::BadBitfield)?;
                }
                self.update_interest(slot, out);
            }
            ExchangeMessage::HaveAll { .. } => {
                if std::mem::replace(&mut session.announced, true) {
                    return Err(Violation::BadBitfield);
                }
                if let Some(download) = &mut self.download {
                    download.peer_has_all(slot).map_err(|_| Violation::BadBitfield)?;
                }
                self.update_interest(slot, out);
            }
            ExchangeMessage::HaveNone { .. } => {
                if std::mem::replace(&mut session.announced, true) {
                    return Err(Violation::BadBitfield);
                }
            }
            ExchangeMessage::Have { piece, .. } => {
                if piece.0 >= pieces {
                    return Err(Violation::BadRange);
                }
                session.announced = true; // a HAVE first implies HaveNone before it
                if let Some(download) = &mut self.download {
                    download.peer_have(slot, piece).map_err(|_| Violation::BadRange)?;
                }
                self.update_interest(slot, out);
                self.refill(now, slot, out);
            }
            ExchangeMessage::Interested { .. } => {
                let was = std::mem::replace(&mut session.peer_interested, true);
                if !was {
                    return Ok(After::PeerInterested);
                }
            }
            ExchangeMessage::NotInterested { .. } => session.peer_interested = false,
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
            ExchangeMessage::Request { .. } => unreachable!("handled above"),
            ExchangeMessage::Cancel { .. } => {
                // The driver sends queued blocks in order; a block already
                // handed over is sent anyway and counted as waste by the
                // peer (BEP 3 allows it).
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
        session.uploaded_bytes += u64::from(length);
        stats.blocks_served += 1;
        out.push_back(ExchangeOutput::ServeBlock { conn: session.conn, file, piece, offset, length });
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
        let buffer = self.buffers.entry(piece).or_insert_with(|| vec![0; piece_len]);
        buffer[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        for (other, block) in accepted.cancels {
            self.send_cancel(other, block, out);
        }
        let mut after = After::Nothing;
        if accepted.piece_complete {
            after = self.verify(now, piece, out, stats);
        }
        self.refill(now, slot, out);
        Ok(after)
    }

    /// Hash a complete piece: store it if good, refetch and blame if bad.
    fn verify(
        &mut self,
        now: Instant,
        piece: PieceIndex,
        out: &mut VecDeque<ExchangeOutput>,
        stats: &mut ExchangeStats,
    ) -> After {
        let file = self.file;
        let Some(buffer) = self.buffers.remove(&piece) else { return After::Nothing };
        let Some(download) = &mut self.download else { return After::Nothing };
        if hash_piece(&buffer) == self.hashes[piece.0 as usize] {
            stats.pieces_verified += 1;
            download.piece_passed(piece);
            let complete = download.is_complete();
            out.push_back(ExchangeOutput::StorePiece { file, piece, data: Bytes::from(buffer) });
            out.push_back(ExchangeOutput::Event(ExchangeEvent::PieceVerified { file, piece }));
            self.set_have(piece);
            for index in 0..self.sessions.len() {
                let slot = PeerSlot(index as u16);
                self.send(out, slot, ExchangeMessage::Have { file, piece });
                self.update_interest(slot, out);
            }
            if complete {
                self.download = None;
                self.buffers.clear();
                for index in 0..self.sessions.len() {
                    self.update_interest(PeerSlot(index as u16), out);
                }
                out.push_back(ExchangeOutput::Event(ExchangeEvent::DownloadComplete { file }));
            }
            return After::Nothing;
        }
        stats.pieces_failed += 1;
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
            let strikes = self.strikes.entry(node).or_insert(0);
            *strikes += 1;
            if *strikes >= self.config.strikes_max && self.banned.insert(node) && banned.is_none() {
                banned = Some((conn, node));
            }
        }
        self.refill_all(now, out);
        banned.map_or(After::Nothing, After::Banned)
    }
}
