//! The rarest-first piece picker: which piece to start next for a peer.
//!
//! Availability is counted per piece over the non-seed peers; seeds are
//! counted once ([`PiecePicker::seeds`]): a seed raises every piece equally
//! and so never changes which piece is rarest (BEP 6 `HaveAll`). libtorrent
//! instead increments every piece for every seed.
//!
//! Free pieces (missing and not started) are kept in one array sorted by
//! availability, split into buckets by boundaries (libtorrent
//! `piece_picker.cpp`'s layout). Within a bucket the order starts as a
//! permutation drawn from the machine's seeded RNG, so ties fall to it and
//! different downloaders start different pieces.
//! - A HAVE moves its piece across one bucket boundary: one swap, O(1). A
//!   bitfield is one such move per set bit, and a complete bitfield (or
//!   `HaveAll`) makes a seed in O(1). Nothing is ever re-sorted, so a flood
//!   of bitfields leaves no dirty state to rebuild (libtorrent re-sorts its
//!   whole piece list then).
//! - A pick scans the array from the peer's *floor*: a lower bound on the
//!   rarest level among the free pieces the peer has. The floor starts at
//!   the top for a new peer and each of its HAVEs lowers it to that piece's
//!   level, so it is exact once its bitfield is in; a pick sets it to the
//!   level found. Availability only rises on HAVE, and a departure lowers
//!   it by at most one (floors drop by one). So a peer holding only common
//!   pieces never rescans the rare buckets, which is libtorrent's
//!   O(pieces) case.
//! - A peer holding few pieces (`|P|`) would need about `pieces / |P|`
//!   steps of scanning to meet one. Past a budget of `2·|P|` steps the pick
//!   iterates the peer's own pieces instead. A pick thus costs
//!   O(min(rank from floor, 2·|P| + pieces/4096)), and never a scan of all
//!   pieces.

use rand::{Rng, RngExt};

use super::PeerSlot;
use super::bitset::HierBitset;
use crate::ids::PieceIndex;

/// What the picker knows about one of our pieces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PieceState {
    /// Missing and not started: a candidate for [`PiecePicker::pick`].
    Free,
    /// Started: its blocks are being fetched (the download scheduler owns it).
    Partial,
    /// Verified and stored.
    Have,
}

/// A peer message the picker cannot accept; the exchange turns it into a
/// disconnect with this reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PickerError {
    /// The slot is outside `0..peers_max`.
    #[error("peer slot {0} is out of range")]
    SlotOutOfRange(u16),
    /// The slot is already registered.
    #[error("peer slot {0} is already in use")]
    SlotInUse(u16),
    /// No peer registered at this slot.
    #[error("no peer at slot {0}")]
    UnknownPeer(u16),
    /// A piece index past the end of the file.
    #[error("piece {0} does not exist")]
    NoSuchPiece(u32),
    /// A bitfield of the wrong length or with spare bits set.
    #[error("bitfield does not match the file's {pieces} pieces")]
    BadBitfield {
        /// Pieces in the file.
        pieces: u32,
    },
    /// A bitfield after the peer already announced pieces (BEP 3 allows
    /// it only as the first message).
    #[error("bitfield after pieces were announced")]
    LateBitfield,
}

/// Whether every piece bit is set: whole words compared against all-ones
/// (a seed's bitfield is checked at memory speed, then costs O(1)).
fn is_complete_bitfield(packed: &[u8], spare_bits: u32) -> bool {
    let Some((&last, body)) = packed.split_last() else { return false };
    let mut words = body.chunks_exact(8);
    let full_words = words.by_ref().all(|w| w == [0xff; 8]);
    full_words && words.remainder().iter().all(|&b| b == 0xff) && last == 0xffu8 << spare_bits
}

/// How [`PiecePicker::pick`] chooses among the free pieces a peer has.
///
/// Rarest-first is the protocol's policy; the others exist so scenarios can
/// measure it against the classic alternatives (`slow-seed`). They scan the
/// peer's pieces, O(pieces) per pick, which is fine for experiments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PickPolicy {
    /// Least available first; ties to the seeded order (module docs).
    #[default]
    RarestFirst,
    /// Uniformly random among the peer's free pieces: the first in a seeded
    /// permutation fixed for the download, availability ignored.
    Random,
    /// Lowest index first (a streaming player's order).
    Sequential,
}

/// Steps a pick always scans before considering the peer's own pieces.
const SCAN_STEPS_MIN: u32 = 32;
/// `index_of` value of a piece that is not free.
const NOT_FREE: u32 = u32::MAX;

#[derive(Clone, Debug)]
enum PeerPieces {
    Seed,
    /// Allocated on the first piece, so seeds and empty peers cost nothing.
    Partial(Option<HierBitset>),
}

#[derive(Clone, Debug)]
struct Peer {
    pieces: PeerPieces,
    /// Lower bound on the availability of the rarest free piece the peer has.
    floor: u16,
}

/// Rarest-first selection over one file's pieces (module docs).
#[derive(Clone, Debug)]
pub struct PiecePicker {
    piece_count: u32,
    state: Vec<PieceState>,
    /// Non-seed peers holding each piece.
    avail: Vec<u16>,
    seeds: u32,
    /// Free pieces, sorted by `avail`; bucket `a` is
    /// `order[bucket_start(a)..bucket_end[a]]`.
    order: Vec<u32>,
    bucket_end: Vec<u32>,
    /// piece -> index in `order`, or `NOT_FREE`.
    index_of: Vec<u32>,
    /// Pieces we do not have: "is this peer interesting?".
    wanted: HierBitset,
    peers: Vec<Option<Peer>>,
    peer_count: u32,
    policy: PickPolicy,
    /// For [`PickPolicy::Random`]: each piece's rank in a fixed permutation.
    random_rank: Vec<u32>,
}

impl PiecePicker {
    /// A picker for `piece_count` pieces, all missing, serving up to
    /// `peers_max` peers. Ties are broken by a permutation drawn from `rng`.
    pub fn new(piece_count: u32, peers_max: u16, rng: &mut impl Rng) -> Self {
        // Fisher-Yates, written out so the order depends only on the RNG
        // stream, not on a library's shuffle algorithm.
        let mut order: Vec<u32> = (0..piece_count).collect();
        for i in (1..order.len()).rev() {
            let j = rng.random_range(0..=i);
            order.swap(i, j);
        }
        let mut index_of = vec![0u32; piece_count as usize];
        for (index, &piece) in order.iter().enumerate() {
            index_of[piece as usize] = index as u32;
        }
        let mut wanted = HierBitset::new(piece_count);
        for piece in 0..piece_count {
            wanted.insert(piece);
        }
        // Levels 0..=peers_max: availability never exceeds the non-seed peers.
        let levels = usize::from(peers_max) + 1;
        Self {
            piece_count,
            state: vec![PieceState::Free; piece_count as usize],
            avail: vec![0; piece_count as usize],
            seeds: 0,
            order,
            bucket_end: vec![piece_count; levels],
            index_of,
            wanted,
            peers: vec![None; usize::from(peers_max)],
            peer_count: 0,
            policy: PickPolicy::RarestFirst,
            random_rank: Vec::new(),
        }
    }

    /// A picker choosing by `policy` (see [`PickPolicy`]); [`Self::new`] is
    /// rarest-first. Availability is tracked whatever the policy.
    pub fn with_policy(piece_count: u32, peers_max: u16, policy: PickPolicy, rng: &mut impl Rng) -> Self {
        let mut picker = Self::new(piece_count, peers_max, rng);
        picker.policy = policy;
        if policy == PickPolicy::Random {
            // The seeded tie order is itself a uniform permutation; freeze it
            // before HAVEs start moving pieces between buckets.
            picker.random_rank = picker.index_of.clone();
        }
        picker
    }

    /// The policy [`Self::pick`] applies.
    #[must_use]
    pub fn policy(&self) -> PickPolicy {
        self.policy
    }

    /// Pieces in the file.
    #[must_use]
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    /// Seeds connected (counted once, not per piece).
    #[must_use]
    pub fn seeds(&self) -> u32 {
        self.seeds
    }

    /// Peers registered, seeds included.
    #[must_use]
    pub fn peer_count(&self) -> u32 {
        self.peer_count
    }

    /// Free pieces: missing and not started.
    #[must_use]
    pub fn free(&self) -> u32 {
        self.order.len() as u32
    }

    /// Pieces we do not have yet (free or partial).
    #[must_use]
    pub fn missing(&self) -> u32 {
        self.wanted.count()
    }

    /// State of a piece.
    #[must_use]
    pub fn state(&self, piece: PieceIndex) -> Option<PieceState> {
        self.state.get(piece.0 as usize).copied()
    }

    /// Peers holding `piece`, seeds included.
    #[must_use]
    pub fn availability(&self, piece: PieceIndex) -> u32 {
        self.avail.get(piece.0 as usize).map_or(0, |&a| u32::from(a) + self.seeds)
    }

    /// Whether the peer at `slot` is a seed.
    #[must_use]
    pub fn is_seed(&self, slot: PeerSlot) -> bool {
        matches!(self.peer(slot), Ok(Peer { pieces: PeerPieces::Seed, .. }))
    }

    /// Whether the peer at `slot` has `piece`.
    #[must_use]
    pub fn peer_has(&self, slot: PeerSlot, piece: PieceIndex) -> bool {
        if piece.0 >= self.piece_count {
            return false;
        }
        match self.peer(slot).map(|p| &p.pieces) {
            Ok(PeerPieces::Seed) => true,
            Ok(PeerPieces::Partial(Some(bits))) => bits.contains(piece.0),
            _ => false,
        }
    }

    /// Pieces the peer at `slot` has (all of them for a seed).
    #[must_use]
    pub fn peer_piece_count(&self, slot: PeerSlot) -> u32 {
        match self.peer(slot).map(|p| &p.pieces) {
            Ok(PeerPieces::Seed) => self.piece_count,
            Ok(PeerPieces::Partial(Some(bits))) => bits.count(),
            _ => 0,
        }
    }

    /// Whether the peer at `slot` lacks at least `n` of the pieces we
    /// have: pieces it could ask us for (a seed lacks none).
    #[must_use]
    pub fn peer_lacks_ours_at_least(&self, slot: PeerSlot, n: u32) -> bool {
        match self.peer(slot).map(|p| &p.pieces) {
            Ok(PeerPieces::Seed) | Err(_) => false,
            Ok(PeerPieces::Partial(Some(bits))) => self.wanted.absent_from_both_at_least(bits, n),
            Ok(PeerPieces::Partial(None)) => self.piece_count - self.wanted.count() >= n,
        }
    }

    /// Whether the peer has any piece we lack (BEP 3 "interested").
    #[must_use]
    pub fn is_interesting(&self, slot: PeerSlot) -> bool {
        match self.peer(slot).map(|p| &p.pieces) {
            Ok(PeerPieces::Seed) => !self.wanted.is_empty(),
            Ok(PeerPieces::Partial(Some(bits))) => self.wanted.first_common(bits).is_some(),
            _ => false,
        }
    }

    fn peer(&self, slot: PeerSlot) -> Result<&Peer, PickerError> {
        self.peers
            .get(usize::from(slot.0))
            .ok_or(PickerError::SlotOutOfRange(slot.0))?
            .as_ref()
            .ok_or(PickerError::UnknownPeer(slot.0))
    }

    fn peer_mut(&mut self, slot: PeerSlot) -> Result<&mut Peer, PickerError> {
        self.peers
            .get_mut(usize::from(slot.0))
            .ok_or(PickerError::SlotOutOfRange(slot.0))?
            .as_mut()
            .ok_or(PickerError::UnknownPeer(slot.0))
    }

    /// Register a peer that has announced nothing yet.
    pub fn add_peer(&mut self, slot: PeerSlot) -> Result<(), PickerError> {
        let entry = self.peers.get_mut(usize::from(slot.0)).ok_or(PickerError::SlotOutOfRange(slot.0))?;
        if entry.is_some() {
            return Err(PickerError::SlotInUse(slot.0));
        }
        // No pieces: "no free piece below the top level" holds vacuously,
        // and every HAVE lowers the floor to its piece's level, so after a
        // bitfield the floor is exact and the first pick does not scan.
        let top = u16::try_from(self.bucket_end.len()).unwrap_or(u16::MAX);
        *entry = Some(Peer { pieces: PeerPieces::Partial(None), floor: top });
        self.peer_count += 1;
        Ok(())
    }

    /// The peer has every piece: counted once, in O(1).
    pub fn peer_has_all(&mut self, slot: PeerSlot) -> Result<(), PickerError> {
        let peer = self.peer_mut(slot)?;
        match &peer.pieces {
            PeerPieces::Seed => return Ok(()),
            PeerPieces::Partial(Some(bits)) if !bits.is_empty() => return Err(PickerError::LateBitfield),
            PeerPieces::Partial(_) => {}
        }
        peer.pieces = PeerPieces::Seed;
        self.seeds += 1;
        Ok(())
    }

    /// Apply a peer's bitfield (MSB-first packed bits, BEP 3). A complete
    /// bitfield makes the peer a seed in O(1); otherwise each set bit is
    /// one O(1) availability update.
    pub fn peer_bitfield(&mut self, slot: PeerSlot, packed: &[u8]) -> Result<(), PickerError> {
        let pieces = self.piece_count;
        match &self.peer(slot)?.pieces {
            PeerPieces::Seed => return Err(PickerError::LateBitfield),
            PeerPieces::Partial(Some(bits)) if !bits.is_empty() => return Err(PickerError::LateBitfield),
            PeerPieces::Partial(_) => {}
        }
        if packed.len() != pieces.div_ceil(8) as usize {
            return Err(PickerError::BadBitfield { pieces });
        }
        let spare = (8 - pieces % 8) % 8;
        if spare > 0 && packed.last().is_some_and(|&last| last & ((1u8 << spare) - 1) != 0) {
            return Err(PickerError::BadBitfield { pieces });
        }
        if pieces > 0 && is_complete_bitfield(packed, spare) {
            return self.peer_has_all(slot);
        }
        for (byte_index, &byte) in packed.iter().enumerate() {
            let mut byte = byte;
            while byte != 0 {
                let bit = byte.leading_zeros();
                byte &= !(0x80u8 >> bit);
                self.peer_have(slot, PieceIndex(byte_index as u32 * 8 + bit))?;
            }
        }
        Ok(())
    }

    /// The peer announced `piece` (BEP 3 HAVE). Returns whether it is new
    /// (a repeated HAVE, or any HAVE from a seed, changes nothing).
    pub fn peer_have(&mut self, slot: PeerSlot, piece: PieceIndex) -> Result<bool, PickerError> {
        if piece.0 >= self.piece_count {
            return Err(PickerError::NoSuchPiece(piece.0));
        }
        let piece_count = self.piece_count;
        let Self { peers, order, bucket_end, index_of, avail, .. } = self;
        let peer = peers
            .get_mut(usize::from(slot.0))
            .ok_or(PickerError::SlotOutOfRange(slot.0))?
            .as_mut()
            .ok_or(PickerError::UnknownPeer(slot.0))?;
        let bits = match &mut peer.pieces {
            PeerPieces::Seed => return Ok(false),
            PeerPieces::Partial(bits) => bits.get_or_insert_with(|| HierBitset::new(piece_count)),
        };
        if !bits.insert(piece.0) {
            return Ok(false);
        }
        let i = piece.0 as usize;
        let level = avail[i];
        avail[i] = level + 1;
        let index = index_of[i];
        if index != NOT_FREE {
            // The last of bucket `level` becomes the first of `level + 1`.
            let last = bucket_end[usize::from(level)] - 1;
            let displaced = order[last as usize];
            order.swap(index as usize, last as usize);
            index_of[displaced as usize] = index;
            index_of[i] = last;
            bucket_end[usize::from(level)] = last;
            peer.floor = peer.floor.min(level + 1);
        }
        Ok(true)
    }

    /// The peer left: its pieces no longer count.
    pub fn remove_peer(&mut self, slot: PeerSlot) -> Result<(), PickerError> {
        let entry = self.peers.get_mut(usize::from(slot.0)).ok_or(PickerError::SlotOutOfRange(slot.0))?;
        let peer = entry.take().ok_or(PickerError::UnknownPeer(slot.0))?;
        self.peer_count -= 1;
        match peer.pieces {
            PeerPieces::Seed => self.seeds -= 1,
            PeerPieces::Partial(None) => {}
            PeerPieces::Partial(Some(bits)) => {
                for piece in bits.iter() {
                    let i = piece as usize;
                    let level = self.avail[i];
                    if self.index_of[i] != NOT_FREE {
                        // First of bucket `level` becomes last of `level - 1`.
                        let first = self.bucket_start(level);
                        self.swap_order(self.index_of[i], first);
                        self.bucket_end[usize::from(level) - 1] = first + 1;
                    }
                    self.avail[i] = level - 1;
                }
                // Each piece lost at most one holder: floors stay lower
                // bounds when lowered by one.
                for other in self.peers.iter_mut().flatten() {
                    other.floor = other.floor.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    fn bucket_start(&self, level: u16) -> u32 {
        match level {
            0 => 0,
            _ => self.bucket_end[usize::from(level) - 1],
        }
    }

    fn swap_order(&mut self, a: u32, b: u32) {
        let (pa, pb) = (self.order[a as usize], self.order[b as usize]);
        self.order[a as usize] = pb;
        self.order[b as usize] = pa;
        self.index_of[pa as usize] = b;
        self.index_of[pb as usize] = a;
    }

    /// Take a free piece out of `order`: carry it across every higher
    /// bucket boundary to the end, then drop it. O(levels above it).
    fn remove_free(&mut self, piece: u32) {
        let mut index = self.index_of[piece as usize];
        assert_ne!(index, NOT_FREE, "piece {piece} is not free");
        for level in usize::from(self.avail[piece as usize])..self.bucket_end.len() {
            let last = self.bucket_end[level] - 1;
            self.swap_order(index, last);
            self.bucket_end[level] = last;
            index = last;
        }
        assert_eq!(index as usize, self.order.len() - 1);
        self.order.pop();
        self.index_of[piece as usize] = NOT_FREE;
    }

    /// Put a piece back into `order` at its level: the reverse walk.
    fn insert_free(&mut self, piece: u32) {
        assert_eq!(self.index_of[piece as usize], NOT_FREE, "piece {piece} is already free");
        let mut index = self.order.len() as u32;
        self.order.push(piece);
        self.index_of[piece as usize] = index;
        let top = self.bucket_end.len() - 1;
        self.bucket_end[top] += 1;
        let level = usize::from(self.avail[piece as usize]);
        for upper in (level + 1..=top).rev() {
            let first = self.bucket_end[upper - 1];
            self.swap_order(index, first);
            self.bucket_end[upper - 1] = first + 1;
            index = first;
        }
    }

    /// The rarest free piece the peer at `slot` has; ties fall to the
    /// seeded order. `None` if it has no free piece. Updates the peer's
    /// floor (module docs), hence `&mut self`.
    pub fn pick(&mut self, slot: PeerSlot) -> Option<PieceIndex> {
        if self.policy != PickPolicy::RarestFirst {
            return self.pick_ignoring_availability(slot);
        }
        let Self { order, bucket_end, index_of, avail, state, peers, .. } = self;
        let peer = peers.get_mut(usize::from(slot.0))?.as_mut()?;
        let bits = match &peer.pieces {
            PeerPieces::Seed => return order.first().map(|&p| PieceIndex(p)),
            PeerPieces::Partial(None) => return None,
            PeerPieces::Partial(Some(bits)) => bits,
        };
        // A non-seed peer's pieces have availability >= 1.
        let floor = usize::from(peer.floor.max(1));
        if floor >= bucket_end.len() {
            return None;
        }
        let from = bucket_end[floor - 1] as usize;
        let budget = SCAN_STEPS_MIN.max(bits.count().saturating_mul(2)) as usize;
        let scan_end = order.len().min(from.saturating_add(budget));
        if let Some(&piece) = order[from..scan_end].iter().find(|&&p| bits.contains(p)) {
            peer.floor = avail[piece as usize];
            return Some(PieceIndex(piece));
        }
        if scan_end == order.len() {
            peer.floor = u16::try_from(bucket_end.len()).unwrap_or(u16::MAX);
            return None;
        }
        // Sparse peer: its own free pieces, least (availability, order
        // index) first, which is the answer the scan would have reached.
        let best = bits
            .iter()
            .filter(|&p| state[p as usize] == PieceState::Free)
            .min_by_key(|&p| (avail[p as usize], index_of[p as usize]));
        match best {
            Some(piece) => {
                peer.floor = avail[piece as usize];
                Some(PieceIndex(piece))
            }
            None => {
                peer.floor = u16::try_from(bucket_end.len()).unwrap_or(u16::MAX);
                None
            }
        }
    }

    /// [`PickPolicy::Random`] and [`PickPolicy::Sequential`]: the free piece
    /// of the peer's with the lowest rank (random) or index (sequential).
    fn pick_ignoring_availability(&self, slot: PeerSlot) -> Option<PieceIndex> {
        let peer = self.peers.get(usize::from(slot.0))?.as_ref()?;
        let rank = |p: u32| match self.policy {
            PickPolicy::Random => self.random_rank[p as usize],
            _ => p,
        };
        let free = |&p: &u32| self.state[p as usize] == PieceState::Free;
        let best = match &peer.pieces {
            PeerPieces::Seed => (0..self.piece_count).filter(free).min_by_key(|&p| rank(p)),
            PeerPieces::Partial(None) => None,
            PeerPieces::Partial(Some(bits)) => bits.iter().filter(free).min_by_key(|&p| rank(p)),
        };
        best.map(PieceIndex)
    }

    /// A free piece was started: it leaves the candidates.
    ///
    /// # Panics
    /// If the piece is not free (a scheduler bug).
    pub fn start(&mut self, piece: PieceIndex) {
        let i = piece.0 as usize;
        assert_eq!(self.state[i], PieceState::Free, "start of a non-free {piece:?}");
        self.remove_free(piece.0);
        self.state[i] = PieceState::Partial;
    }

    /// A started piece was given up (its data was bad or its peers left):
    /// it is a candidate again.
    ///
    /// # Panics
    /// If the piece is not partial (a scheduler bug).
    pub fn abandon(&mut self, piece: PieceIndex) {
        let i = piece.0 as usize;
        assert_eq!(self.state[i], PieceState::Partial, "abandon of a non-partial {piece:?}");
        self.insert_free(piece.0);
        self.state[i] = PieceState::Free;
        let level = self.avail[i];
        for peer in self.peers.iter_mut().flatten() {
            peer.floor = peer.floor.min(level);
        }
    }

    /// We have the piece (verified and stored, or found on disk at start).
    /// Idempotent.
    pub fn complete(&mut self, piece: PieceIndex) -> Result<(), PickerError> {
        if piece.0 >= self.piece_count {
            return Err(PickerError::NoSuchPiece(piece.0));
        }
        let i = piece.0 as usize;
        match self.state[i] {
            PieceState::Have => return Ok(()),
            PieceState::Free => self.remove_free(piece.0),
            PieceState::Partial => {}
        }
        self.state[i] = PieceState::Have;
        self.wanted.remove(piece.0);
        Ok(())
    }

    /// Forget every peer's floor, so the next pick for each is a cold one
    /// (benches measure both).
    #[cfg(any(test, feature = "testkit"))]
    pub fn reset_floors(&mut self) {
        for peer in self.peers.iter_mut().flatten() {
            peer.floor = 0;
        }
    }

    /// Heap bytes held (for memory reports).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        let per_piece = 1 + 2 + 4 + 4; // state, avail, order, index_of
        let peers: usize = self
            .peers
            .iter()
            .flatten()
            .map(|p| match &p.pieces {
                PeerPieces::Partial(Some(bits)) => bits.heap_bytes(),
                _ => 0,
            })
            .sum();
        self.piece_count as usize * per_piece + self.bucket_end.len() * 4 + peers + self.wanted.heap_bytes()
    }

    /// Check every internal invariant (tests only; O(pieces)).
    #[cfg(test)]
    pub(crate) fn assert_invariants(&self) {
        let mut previous = 0u16;
        for (index, &piece) in self.order.iter().enumerate() {
            let level = self.avail[piece as usize];
            assert!(level >= previous, "order not sorted at {index}");
            previous = level;
            assert_eq!(self.index_of[piece as usize] as usize, index);
            assert_eq!(self.state[piece as usize], PieceState::Free);
            assert!(self.bucket_start(level) as usize <= index && index < self.bucket_end[usize::from(level)] as usize);
        }
        let free = self.state.iter().filter(|&&s| s == PieceState::Free).count();
        assert_eq!(free, self.order.len());
        assert_eq!(*self.bucket_end.last().unwrap_or(&0) as usize, self.order.len());
    }
}
