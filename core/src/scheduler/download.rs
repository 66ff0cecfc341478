//! Block-level scheduling of one file's download: which blocks to request
//! from which peer, how many at once, and what to do when requests stall.
//!
//! Policy, in the order [`Download::next_requests`] applies it per block:
//! 1. the streaming window (pieces ahead of a read position, in order), for
//!    `cat` and HTTP Range reads;
//! 2. pieces this peer already owns: a started piece is finished by one
//!    peer where possible, so a bad piece has one culprit;
//! 3. a started piece without a live owner (it left, timed out, or sent
//!    bad data) or whose owner is far slower than average (slow-peer
//!    takeover), rarest first: partial pieces are finished before new ones
//!    are started. The taker becomes the owner; a peer that already sent
//!    bad data for the piece never gets it again;
//! 4. a new piece, rarest first ([`PiecePicker`]), while the bytes of
//!    started-but-unverified pieces stay under `unverified_bytes_max`;
//! 5. endgame: when no free piece and no free block is left, blocks already
//!    requested from another peer are requested again (at most
//!    `endgame_requests_per_block_max` times); the losers are cancelled when
//!    the first copy arrives.
//!
//! Pipelining: a peer's request depth is its measured rate × 0.5 s / 16 KiB
//! (libtorrent `peer_connection.cpp` uses a 3 s queue), clamped to
//! `[requests_inflight_per_peer_min, requests_inflight_per_peer_max]`;
//! before a rate is known it is `requests_inflight_initial`. A request not
//! answered in time (three times its expected queue time, at least
//! `request_timeout_min`) is freed for others and the peer is snubbed: its
//! depth drops to one until a block arrives.

use std::cell::OnceCell;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::PeerSlot;
use super::picker::{PickPolicy, PickerError, PiecePicker, PieceState};
use crate::content::{BLOCK_BYTES, Layout};
use crate::ids::PieceIndex;
use crate::time::Instant;

/// Limits and timings of the download scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    /// Requests in flight to one peer before its rate is known.
    pub requests_inflight_initial: u32,
    /// Lower clamp of the adaptive depth (keeps a slow link busy).
    pub requests_inflight_per_peer_min: u32,
    /// Upper clamp of the adaptive depth: bounds what one peer can hold of
    /// our request state (libtorrent caps at 500; 256 × 16 KiB = 4 MiB).
    pub requests_inflight_per_peer_max: u32,
    /// Seconds of transfer the request queue should cover. Enough to keep
    /// a link busy over several round trips, and no more: a piece is
    /// picked when it is requested, so a deep queue picks on stale
    /// knowledge. In a flash crowd the peers a seed unchokes each queued
    /// 2 s of picks, all "rarest" because nobody near them had them yet,
    /// and the seed sent many twice: at 2 s, half the pieces first
    /// reached a peer 5.7 s into a 1,000-peer crowd (4.2 s if each was
    /// sent once) and the median peer finished at 1.18 × the Kumar-Ross
    /// bound; at 0.5 s the median finished at 1.06 × (README, the
    /// 1,000-peer flash crowd).
    pub request_queue_time: Duration,
    /// Shortest request timeout, whatever the measured rate.
    pub request_timeout_min: Duration,
    /// Bytes of started pieces not yet verified, across the file: bounds
    /// the memory a download holds (anacrolix's 64 MiB).
    pub unverified_bytes_max: u64,
    /// How many peers one block may be requested from in endgame.
    pub endgame_requests_per_block_max: u8,
    /// A piece owner slower than average / this ratio loses its piece's
    /// free blocks to faster peers.
    pub slow_peer_ratio: u32,
    /// Pieces ahead of the read position fetched first in streaming mode.
    pub streaming_window_pieces: u32,
    /// Which free piece to start next (rarest-first; the others are for
    /// experiments).
    pub pick_policy: PickPolicy,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            requests_inflight_initial: 8,
            requests_inflight_per_peer_min: 2,
            requests_inflight_per_peer_max: 256,
            request_queue_time: Duration::from_millis(500),
            request_timeout_min: Duration::from_secs(5),
            unverified_bytes_max: 64 * 1024 * 1024,
            endgame_requests_per_block_max: 2,
            slow_peer_ratio: 4,
            streaming_window_pieces: 8,
            pick_policy: PickPolicy::RarestFirst,
        }
    }
}

/// One block of one piece: bytes `[block × 16 KiB, …)` of the piece.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct BlockRef {
    /// The piece.
    pub piece: PieceIndex,
    /// Block index within the piece.
    pub block: u32,
}

impl BlockRef {
    /// Byte offset within the piece.
    #[must_use]
    pub fn offset(&self) -> u32 {
        self.block * BLOCK_BYTES
    }
}

/// Why a block from a peer was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BlockError {
    /// We never requested it from this peer: a protocol violation.
    #[error("unsolicited block")]
    Unsolicited,
    /// We had asked for it but already had it (endgame, or a cancel that
    /// crossed the block on the wire): wasted bytes, not a violation.
    #[error("duplicate block")]
    Duplicate,
}

/// What an accepted block means.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockAccepted {
    /// Every block of the piece has arrived: hash it now.
    pub piece_complete: bool,
    /// Other requests for the same block to cancel (endgame losers).
    pub cancels: Vec<(PeerSlot, BlockRef)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BlockState {
    Free,
    /// Requested from one peer, and in endgame perhaps from a second.
    Requested(PeerSlot, Option<PeerSlot>),
    Received,
}

#[derive(Clone, Debug)]
struct Partial {
    owner: Option<PeerSlot>,
    blocks: Vec<BlockState>,
    free: u32,
    received: u32,
    /// Peers that delivered blocks of the current attempt.
    contributors: Vec<PeerSlot>,
    /// Peers whose data for this piece failed verification.
    excluded: Vec<PeerSlot>,
}

impl Partial {
    fn first_free(&self) -> Option<u32> {
        if self.free == 0 {
            return None;
        }
        self.blocks.iter().position(|b| *b == BlockState::Free).map(|i| i as u32)
    }
}

/// Receive-rate estimate: a one-second window folded into an average.
#[derive(Clone, Copy, Debug, Default)]
struct Rate {
    window_start: Option<Instant>,
    window_bytes: u64,
    bytes_per_s: Option<u64>,
}

impl Rate {
    fn record(&mut self, now: Instant, bytes: u64) {
        let start = *self.window_start.get_or_insert(now);
        self.window_bytes += bytes;
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Duration::from_secs(1) {
            let sample = self.window_bytes.saturating_mul(1_000_000) / elapsed.as_micros().max(1) as u64;
            self.bytes_per_s = Some(self.bytes_per_s.map_or(sample, |old| (old + sample) / 2));
            self.window_start = Some(now);
            self.window_bytes = 0;
        }
    }
}

#[derive(Clone, Debug, Default)]
struct PeerState {
    /// Requests in flight and when each expires.
    inflight: BTreeMap<BlockRef, Instant>,
    /// Requests we cancelled whose block may still cross on the wire.
    cancelled: BTreeSet<BlockRef>,
    rate: Rate,
    /// The peer chokes us: no requests.
    choked: bool,
    /// A request timed out: one request at a time until a block arrives.
    snubbed: bool,
    /// Started pieces this peer owns.
    owned: Vec<PieceIndex>,
}

/// Scheduler of one file's block requests (module docs).
#[derive(Clone, Debug)]
pub struct Download {
    layout: Layout,
    config: DownloadConfig,
    picker: PiecePicker,
    partials: BTreeMap<PieceIndex, Partial>,
    peers: Vec<Option<PeerState>>,
    deadlines: BTreeSet<(Instant, PeerSlot, BlockRef)>,
    unverified_bytes: u64,
    /// Free blocks of started pieces (the sum of their `free`): with none,
    /// a request search skips the walks over started pieces.
    free_blocks: u64,
    streaming_from: Option<PieceIndex>,
    /// File priority: 0 pauses new requests; 1..=7 scale depth by p/4.
    priority: u8,
}

/// Default file priority: depth as measured.
pub const PRIORITY_NORMAL: u8 = 4;
/// Highest file priority.
pub const PRIORITY_MAX: u8 = 7;

impl Download {
    /// A download of a file with this layout; `have` lists pieces already
    /// verified (resume).
    pub fn new(
        layout: Layout,
        peers_max: u16,
        config: DownloadConfig,
        have: impl IntoIterator<Item = PieceIndex>,
        rng: &mut impl Rng,
    ) -> Self {
        let mut picker = PiecePicker::with_policy(layout.piece_count(), peers_max, config.pick_policy, rng);
        for piece in have {
            // Indices come from our own store; ignore any past the end.
            let _ = picker.complete(piece);
        }
        Self {
            layout,
            config,
            picker,
            partials: BTreeMap::new(),
            peers: vec![None; usize::from(peers_max)],
            deadlines: BTreeSet::new(),
            unverified_bytes: 0,
            free_blocks: 0,
            streaming_from: None,
            priority: PRIORITY_NORMAL,
        }
    }

    /// The piece picker (availability and peer pieces).
    #[must_use]
    pub fn picker(&self) -> &PiecePicker {
        &self.picker
    }

    /// Whether every piece is verified.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.picker.missing() == 0
    }

    /// Bytes of started pieces not yet verified.
    #[must_use]
    pub fn unverified_bytes(&self) -> u64 {
        self.unverified_bytes
    }

    /// Requests in flight to a peer.
    #[must_use]
    pub fn inflight(&self, slot: PeerSlot) -> usize {
        self.peer(slot).map_or(0, |p| p.inflight.len())
    }

    /// Measured receive rate from a peer, bytes per second.
    #[must_use]
    pub fn rate(&self, slot: PeerSlot) -> Option<u64> {
        self.peer(slot).and_then(|p| p.rate.bytes_per_s)
    }

    fn peer(&self, slot: PeerSlot) -> Option<&PeerState> {
        self.peers.get(usize::from(slot.0))?.as_ref()
    }

    /// Register a peer (it starts choking us, as in BEP 3).
    pub fn add_peer(&mut self, slot: PeerSlot) -> Result<(), PickerError> {
        self.picker.add_peer(slot)?;
        self.peers[usize::from(slot.0)] = Some(PeerState { choked: true, ..PeerState::default() });
        Ok(())
    }

    /// The peer announced a piece.
    pub fn peer_have(&mut self, slot: PeerSlot, piece: PieceIndex) -> Result<bool, PickerError> {
        self.picker.peer_have(slot, piece)
    }

    /// The peer sent its bitfield.
    pub fn peer_bitfield(&mut self, slot: PeerSlot, packed: &[u8]) -> Result<(), PickerError> {
        self.picker.peer_bitfield(slot, packed)
    }

    /// The peer has every piece.
    pub fn peer_has_all(&mut self, slot: PeerSlot) -> Result<(), PickerError> {
        self.picker.peer_has_all(slot)
    }

    /// The peer left: its requests are freed and its pieces orphaned (any
    /// peer may finish them). Returns nothing to cancel: the link is gone.
    pub fn remove_peer(&mut self, slot: PeerSlot) -> Result<(), PickerError> {
        self.picker.remove_peer(slot)?;
        self.orphan_pieces(slot);
        let Some(state) = self.peers[usize::from(slot.0)].take() else { return Ok(()) };
        for (block, deadline) in state.inflight {
            self.deadlines.remove(&(deadline, slot, block));
            self.release(slot, block);
        }
        for partial in self.partials.values_mut() {
            partial.contributors.retain(|&c| c != slot);
            partial.excluded.retain(|&c| c != slot);
        }
        Ok(())
    }

    /// The peer choked (`true`) or unchoked us. A choke discards its
    /// pending requests (BEP 3); they are freed for others.
    pub fn set_choked(&mut self, slot: PeerSlot, choked: bool) {
        let Some(state) = self.peers.get_mut(usize::from(slot.0)).and_then(Option::as_mut) else { return };
        state.choked = choked;
        if choked {
            let dropped: Vec<BlockRef> = state.inflight.keys().copied().collect();
            for block in dropped {
                self.forget_request(slot, block);
                self.release(slot, block);
            }
            // A choked owner cannot finish its pieces: left owned, their
            // free blocks would wait for its next unchoke (a rechoke, up to
            // 10 s) and hold off endgame, which starts only when no block
            // is free. Others finish them now.
            self.orphan_pieces(slot);
        }
    }

    /// Fetch pieces from `piece` onward first, in order (`None`: rarest
    /// first everywhere).
    pub fn set_streaming(&mut self, from: Option<PieceIndex>) {
        self.streaming_from = from;
    }

    /// Set the file's priority (clamped to [`PRIORITY_MAX`]): 0 pauses new
    /// requests (those in flight complete); otherwise the request depth is
    /// scaled by `priority / 4`, which is this file's share of each peer's
    /// upload when several files compete for it.
    pub fn set_priority(&mut self, priority: u8) {
        self.priority = priority.min(PRIORITY_MAX);
    }

    /// The request depth for a peer right now (module docs).
    #[must_use]
    pub fn depth(&self, slot: PeerSlot) -> u32 {
        let Some(state) = self.peer(slot) else { return 0 };
        if self.priority == 0 {
            return 0;
        }
        if state.snubbed {
            return 1;
        }
        let config = &self.config;
        let base = match state.rate.bytes_per_s {
            None => config.requests_inflight_initial,
            Some(rate) => {
                let queue = rate.saturating_mul(config.request_queue_time.as_millis() as u64) / 1000;
                let blocks = u32::try_from(queue / u64::from(BLOCK_BYTES)).unwrap_or(u32::MAX);
                blocks.clamp(config.requests_inflight_per_peer_min, config.requests_inflight_per_peer_max)
            }
        };
        (base * u32::from(self.priority) / u32::from(PRIORITY_NORMAL)).clamp(1, config.requests_inflight_per_peer_max)
    }

    /// Requests to send to `slot` now, filling its pipeline to its depth.
    pub fn next_requests(&mut self, slot: PeerSlot, now: Instant) -> Vec<BlockRef> {
        let mut out = Vec::new();
        let Some(state) = self.peer(slot) else { return out };
        if state.choked {
            return out;
        }
        let depth = self.depth(slot) as usize;
        if self.inflight(slot) >= depth {
            // The common case on a HAVE: the pipeline is full.
            return out;
        }
        // Rates only change when blocks arrive: at most once per call, and
        // only if a takeover is considered.
        let average = OnceCell::new();
        while self.inflight(slot) < depth {
            let Some(block) = self.next_block(slot, &average) else { break };
            self.mark_requested(slot, block, now);
            out.push(block);
        }
        out
    }

    /// The next free block of a piece `slot` already owns.
    fn owned_free_block(&self, slot: PeerSlot) -> Option<BlockRef> {
        if self.free_blocks == 0 {
            return None;
        }
        self.peer(slot)?.owned.iter().find_map(|&piece| {
            let block = self.partials.get(&piece).and_then(Partial::first_free)?;
            Some(BlockRef { piece, block })
        })
    }

    fn next_block(&mut self, slot: PeerSlot, average: &OnceCell<Option<u64>>) -> Option<BlockRef> {
        if let Some(block) = self.streaming_block(slot) {
            return Some(block);
        }
        if let Some(block) = self.owned_free_block(slot) {
            return Some(block);
        }
        if let Some(piece) = self.takeover_piece(slot, average) {
            self.set_owner(piece, slot);
            let block = self.partials.get(&piece).and_then(Partial::first_free)?;
            return Some(BlockRef { piece, block });
        }
        if let Some(piece) = self.picker.pick(slot) {
            let piece_bytes = u64::from(self.layout.piece_len(piece));
            if self.unverified_bytes + piece_bytes <= self.config.unverified_bytes_max {
                self.start(piece, slot);
                return Some(BlockRef { piece, block: 0 });
            }
        }
        self.endgame_block(slot)
    }

    /// Make `slot` the owner of a started piece (takeover).
    fn set_owner(&mut self, piece: PieceIndex, slot: PeerSlot) {
        let Some(partial) = self.partials.get_mut(&piece) else { return };
        if let Some(old) = partial.owner.replace(slot)
            && let Some(state) = self.peers[usize::from(old.0)].as_mut()
        {
            state.owned.retain(|&p| p != piece);
        }
        if let Some(state) = self.peers[usize::from(slot.0)].as_mut() {
            state.owned.push(piece);
        }
    }

    /// Drop every piece `slot` owns: others may finish them.
    fn orphan_pieces(&mut self, slot: PeerSlot) {
        let Some(state) = self.peers[usize::from(slot.0)].as_mut() else { return };
        for piece in std::mem::take(&mut state.owned) {
            if let Some(partial) = self.partials.get_mut(&piece) {
                partial.owner = None;
            }
        }
    }

    fn streaming_block(&mut self, slot: PeerSlot) -> Option<BlockRef> {
        let from = self.streaming_from?;
        let end = from.0.saturating_add(self.config.streaming_window_pieces).min(self.layout.piece_count());
        for piece in (from.0..end).map(PieceIndex) {
            if !self.picker.peer_has(slot, piece) {
                continue;
            }
            match self.picker.state(piece) {
                Some(PieceState::Free) => {
                    // The window overrides the memory budget by at most
                    // its own size: streaming must not stall.
                    self.start(piece, slot);
                    return Some(BlockRef { piece, block: 0 });
                }
                Some(PieceState::Partial) => {
                    let partial = self.partials.get(&piece)?;
                    if !partial.excluded.contains(&slot)
                        && let Some(block) = partial.first_free()
                    {
                        return Some(BlockRef { piece, block });
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Average measured rate over peers that have one.
    fn average_rate(&self) -> Option<u64> {
        let (sum, count) = self
            .peers
            .iter()
            .flatten()
            .filter_map(|p| p.rate.bytes_per_s)
            .fold((0u64, 0u64), |(sum, count), rate| (sum.saturating_add(rate), count + 1));
        (count > 0).then(|| sum / count)
    }

    /// Whether a piece owner is far slower than average. An owner without
    /// a rate sample yet is given the benefit of the doubt.
    fn is_slow(&self, owner: PeerSlot, average: &OnceCell<Option<u64>>) -> bool {
        let Some(owner_rate) = self.rate(owner) else { return false };
        let Some(average) = *average.get_or_init(|| self.average_rate()) else { return false };
        owner_rate.saturating_mul(u64::from(self.config.slow_peer_ratio)) < average
    }

    fn takeover_piece(&self, slot: PeerSlot, average: &OnceCell<Option<u64>>) -> Option<PieceIndex> {
        if self.free_blocks == 0 {
            return None;
        }
        self.partials
            .iter()
            .filter(|(piece, partial)| {
                partial.free > 0
                    && partial.owner != Some(slot)
                    && partial.owner.is_none_or(|owner| self.is_slow(owner, average))
                    && !partial.excluded.contains(&slot)
                    && self.picker.peer_has(slot, **piece)
            })
            .min_by_key(|(piece, _)| self.picker.availability(**piece))
            .map(|(&piece, _)| piece)
    }

    fn endgame_block(&self, slot: PeerSlot) -> Option<BlockRef> {
        if self.picker.free() > 0 || self.free_blocks > 0 || self.inflight(slot) > 0 {
            return None;
        }
        let max = self.config.endgame_requests_per_block_max;
        self.partials.iter().filter(|(piece, _)| self.picker.peer_has(slot, **piece)).find_map(|(&piece, partial)| {
            if partial.excluded.contains(&slot) {
                return None;
            }
            partial.blocks.iter().enumerate().find_map(|(i, state)| match *state {
                BlockState::Requested(first, None) if first != slot && max >= 2 => {
                    Some(BlockRef { piece, block: i as u32 })
                }
                _ => None,
            })
        })
    }

    fn start(&mut self, piece: PieceIndex, owner: PeerSlot) {
        self.picker.start(piece);
        let blocks = self.layout.block_count(piece);
        self.unverified_bytes += u64::from(self.layout.piece_len(piece));
        self.free_blocks += u64::from(blocks);
        self.partials.insert(
            piece,
            Partial {
                owner: Some(owner),
                blocks: vec![BlockState::Free; blocks as usize],
                free: blocks,
                received: 0,
                contributors: Vec::new(),
                excluded: Vec::new(),
            },
        );
        if let Some(state) = self.peers[usize::from(owner.0)].as_mut() {
            state.owned.push(piece);
        }
    }

    fn request_timeout(&self, slot: PeerSlot) -> Duration {
        let min = self.config.request_timeout_min;
        let Some(rate) = self.rate(slot).filter(|&r| r > 0) else { return min * 2 };
        let queued = (self.inflight(slot) as u64 + 1) * u64::from(BLOCK_BYTES);
        let expected = Duration::from_micros(queued.saturating_mul(1_000_000) / rate);
        (expected * 3).max(min)
    }

    fn mark_requested(&mut self, slot: PeerSlot, block: BlockRef, now: Instant) {
        let deadline = now + self.request_timeout(slot);
        let Some(partial) = self.partials.get_mut(&block.piece) else { return };
        let state = &mut partial.blocks[block.block as usize];
        *state = match *state {
            BlockState::Free => {
                partial.free -= 1;
                self.free_blocks -= 1;
                BlockState::Requested(slot, None)
            }
            BlockState::Requested(first, None) => BlockState::Requested(first, Some(slot)),
            other => other,
        };
        if let Some(peer) = self.peers[usize::from(slot.0)].as_mut() {
            // A cancelled copy stays remembered: the peer may have served
            // the old request before it saw a choke or cancel, and then
            // this one too; the first copy to come answers this request.
            peer.inflight.insert(block, deadline);
        }
        self.deadlines.insert((deadline, slot, block));
    }

    /// Forget `slot`'s request for `block`: the block is free again unless
    /// another peer still has it requested or it already arrived.
    fn release(&mut self, slot: PeerSlot, block: BlockRef) {
        let Some(partial) = self.partials.get_mut(&block.piece) else { return };
        let state = &mut partial.blocks[block.block as usize];
        *state = match *state {
            BlockState::Requested(first, Some(second)) if first == slot => BlockState::Requested(second, None),
            BlockState::Requested(first, Some(second)) if second == slot => BlockState::Requested(first, None),
            BlockState::Requested(first, None) if first == slot => {
                partial.free += 1;
                self.free_blocks += 1;
                BlockState::Free
            }
            other => other,
        };
    }

    /// A block arrived from `slot`. The caller validated `(piece, offset,
    /// length)` against the layout and stores the data on `Ok`.
    pub fn on_block(&mut self, slot: PeerSlot, block: BlockRef, now: Instant) -> Result<BlockAccepted, BlockError> {
        let Some(peer) = self.peers.get_mut(usize::from(slot.0)).and_then(Option::as_mut) else {
            return Err(BlockError::Unsolicited);
        };
        let length = self.layout.block_len(block.piece, block.block);
        if let Some(deadline) = peer.inflight.remove(&block) {
            peer.snubbed = false;
            peer.rate.record(now, u64::from(length));
            self.deadlines.remove(&(deadline, slot, block));
        } else if peer.cancelled.remove(&block) {
            // A request we dropped (a choke, a cancel, a reject) was served
            // anyway: the bytes are as good as any while the block is still
            // missing (the piece hash vouches for them), and waste if not.
            peer.rate.record(now, u64::from(length));
        } else {
            return Err(BlockError::Unsolicited);
        }
        let Some(partial) = self.partials.get_mut(&block.piece) else {
            return Err(BlockError::Duplicate); // the piece completed meanwhile
        };
        let mut cancels = Vec::new();
        match partial.blocks[block.block as usize] {
            BlockState::Received => return Err(BlockError::Duplicate),
            BlockState::Requested(first, second) => {
                for other in [Some(first), second].into_iter().flatten().filter(|&o| o != slot) {
                    cancels.push((other, block));
                }
            }
            BlockState::Free => {
                partial.free -= 1;
                self.free_blocks -= 1;
            }
        }
        partial.blocks[block.block as usize] = BlockState::Received;
        partial.received += 1;
        if !partial.contributors.contains(&slot) {
            partial.contributors.push(slot);
        }
        let piece_complete = partial.received as usize == partial.blocks.len();
        for &(other, block) in &cancels {
            self.forget_request(other, block);
        }
        Ok(BlockAccepted { piece_complete, cancels })
    }

    /// Drop a request we are cancelling; remember it so its block, should
    /// it still arrive, is taken if still missing and counts as waste if
    /// not, rather than as unsolicited.
    fn forget_request(&mut self, slot: PeerSlot, block: BlockRef) {
        let max = self.config.requests_inflight_per_peer_max as usize;
        if let Some(peer) = self.peers.get_mut(usize::from(slot.0)).and_then(Option::as_mut)
            && let Some(deadline) = peer.inflight.remove(&block)
        {
            self.deadlines.remove(&(deadline, slot, block));
            if peer.cancelled.len() >= max {
                peer.cancelled.pop_first(); // bounded: forget the oldest by order
            }
            peer.cancelled.insert(block);
        }
    }

    /// The peer refused a request (BEP 6 reject): free it for others.
    /// Requests carry no id, so a reject may answer an older request for
    /// the same block (one sent while choked, then asked again after the
    /// unchoke) while the newer one is served: the block, should it still
    /// come, counts as wasted rather than unsolicited.
    pub fn on_reject(&mut self, slot: PeerSlot, block: BlockRef) -> bool {
        if !self.peer(slot).is_some_and(|p| p.inflight.contains_key(&block)) {
            return false;
        }
        self.forget_request(slot, block);
        self.release(slot, block);
        true
    }

    /// Check the counters kept alongside the started pieces (tests only;
    /// O(started pieces + requests)).
    #[cfg(test)]
    pub(crate) fn assert_invariants(&self) {
        let free: u64 = self.partials.values().map(|p| u64::from(p.free)).sum();
        assert_eq!(self.free_blocks, free, "free_blocks is the sum of the started pieces' free blocks");
        for partial in self.partials.values() {
            let counted = partial.blocks.iter().filter(|b| **b == BlockState::Free).count();
            assert_eq!(partial.free as usize, counted, "a piece's free count matches its blocks");
        }
        let unverified: u64 = self.partials.keys().map(|&p| u64::from(self.layout.piece_len(p))).sum();
        assert_eq!(self.unverified_bytes, unverified, "unverified bytes are the started pieces' bytes");
        self.picker.assert_invariants();
    }

    /// The piece hashed correctly and is being stored; returns the peers
    /// that sent its blocks.
    pub fn piece_passed(&mut self, piece: PieceIndex) -> Vec<PeerSlot> {
        let mut contributors = Vec::new();
        if let Some(partial) = self.partials.remove(&piece) {
            contributors = partial.contributors;
            self.unverified_bytes -= u64::from(self.layout.piece_len(piece));
            self.free_blocks -= u64::from(partial.free);
            if let Some(owner) = partial.owner
                && let Some(state) = self.peers[usize::from(owner.0)].as_mut()
            {
                state.owned.retain(|&p| p != piece);
            }
        }
        // An index past the end was rejected when the block was validated.
        let _ = self.picker.complete(piece);
        contributors
    }

    /// The piece failed its hash: discard it, fetch it again from someone
    /// else, and return who sent it (each gets a strike).
    pub fn piece_failed(&mut self, piece: PieceIndex) -> Vec<PeerSlot> {
        let Some(partial) = self.partials.get_mut(&piece) else { return Vec::new() };
        let culprits = std::mem::take(&mut partial.contributors);
        for slot in &culprits {
            if !partial.excluded.contains(slot) {
                partial.excluded.push(*slot);
            }
        }
        partial.blocks.fill(BlockState::Free);
        self.free_blocks += u64::from(partial.blocks.len() as u32 - partial.free);
        partial.free = partial.blocks.len() as u32;
        partial.received = 0;
        if let Some(owner) = partial.owner.take()
            && let Some(state) = self.peers[usize::from(owner.0)].as_mut()
        {
            state.owned.retain(|&p| p != piece);
        }
        culprits
    }

    /// Earliest request deadline.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|&(at, _, _)| at)
    }

    /// Expire overdue requests: each is freed for other peers and its peer
    /// snubbed. Returns them so the caller can send cancels.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<(PeerSlot, BlockRef)> {
        let mut expired = Vec::new();
        while let Some(&(at, slot, block)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.forget_request(slot, block);
            if let Some(peer) = self.peers[usize::from(slot.0)].as_mut() {
                peer.snubbed = true;
            }
            self.release(slot, block);
            // A peer that stopped answering gives up its pieces.
            self.orphan_pieces(slot);
            expired.push((slot, block));
        }
        expired
    }
}
