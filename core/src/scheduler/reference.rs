//! The naive reference picker: a plain scan over every piece, with seeds
//! counted piece by piece. Obviously correct and O(pieces) per pick; the
//! property tests hold [`super::PiecePicker`] to its answers and the
//! `scheduler` bench measures both (`naive_scan` vs `rarest_first`).

use super::PeerSlot;
use super::picker::PieceState;
use crate::ids::PieceIndex;

/// Reference model of the picker's state and choice.
#[derive(Clone, Debug)]
pub struct NaivePicker {
    avail: Vec<u32>,
    state: Vec<PieceState>,
    peers: Vec<Option<Vec<bool>>>,
}

impl NaivePicker {
    /// All pieces missing, no peers.
    #[must_use]
    pub fn new(piece_count: u32, peers_max: u16) -> Self {
        Self {
            avail: vec![0; piece_count as usize],
            state: vec![PieceState::Free; piece_count as usize],
            peers: vec![None; usize::from(peers_max)],
        }
    }

    /// Register a peer with no pieces.
    pub fn add_peer(&mut self, slot: PeerSlot) {
        self.peers[usize::from(slot.0)] = Some(vec![false; self.avail.len()]);
    }

    /// The peer has `piece` (idempotent).
    pub fn peer_have(&mut self, slot: PeerSlot, piece: PieceIndex) {
        if let Some(Some(bits)) = self.peers.get_mut(usize::from(slot.0))
            && !bits[piece.0 as usize]
        {
            bits[piece.0 as usize] = true;
            self.avail[piece.0 as usize] += 1;
        }
    }

    /// The peer has every piece.
    pub fn peer_has_all(&mut self, slot: PeerSlot) {
        for piece in 0..self.avail.len() as u32 {
            self.peer_have(slot, PieceIndex(piece));
        }
    }

    /// The peer left.
    pub fn remove_peer(&mut self, slot: PeerSlot) {
        if let Some(bits) = self.peers[usize::from(slot.0)].take() {
            for (piece, has) in bits.into_iter().enumerate() {
                if has {
                    self.avail[piece] -= 1;
                }
            }
        }
    }

    /// Set a piece's state directly.
    pub fn set_state(&mut self, piece: PieceIndex, state: PieceState) {
        self.state[piece.0 as usize] = state;
    }

    /// Whether the peer has the piece.
    #[must_use]
    pub fn peer_has(&self, slot: PeerSlot, piece: PieceIndex) -> bool {
        matches!(&self.peers[usize::from(slot.0)], Some(bits) if bits[piece.0 as usize])
    }

    /// Availability of a piece.
    #[must_use]
    pub fn availability(&self, piece: PieceIndex) -> u32 {
        self.avail[piece.0 as usize]
    }

    /// Every valid rarest-first answer for this peer: the free pieces it has
    /// with the least availability.
    #[must_use]
    pub fn rarest_choices(&self, slot: PeerSlot) -> Vec<PieceIndex> {
        let Some(Some(bits)) = self.peers.get(usize::from(slot.0)) else { return Vec::new() };
        let candidates = || (0..self.avail.len()).filter(|&i| bits[i] && self.state[i] == PieceState::Free);
        let Some(min) = candidates().map(|i| self.avail[i]).min() else { return Vec::new() };
        candidates().filter(|&i| self.avail[i] == min).map(|i| PieceIndex(i as u32)).collect()
    }

    /// One rarest-first answer by a full scan (lowest index among ties).
    #[must_use]
    pub fn pick(&self, slot: PeerSlot) -> Option<PieceIndex> {
        let Some(Some(bits)) = self.peers.get(usize::from(slot.0)) else { return None };
        let mut best: Option<(u32, usize)> = None;
        for (i, &has) in bits.iter().enumerate() {
            if has && self.state[i] == PieceState::Free && best.is_none_or(|(a, _)| self.avail[i] < a) {
                best = Some((self.avail[i], i));
            }
        }
        best.map(|(_, i)| PieceIndex(i as u32))
    }
}
