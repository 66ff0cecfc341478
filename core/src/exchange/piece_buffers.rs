//! Memory for pieces being assembled from blocks. A verified piece leaves
//! the machine as shared [`Bytes`] ([`super::StorePiece`]); the buffer is
//! kept here too, and once the driver has stored the piece and dropped
//! every other handle, the next piece is assembled in the same memory
//! ([`Bytes::try_into_mut`]). A download of 1 GiB otherwise allocates and
//! zeroes a thousand fresh megabytes, each paid again in page faults.
//!
//! Reuse only changes where the bytes live, never what the machine
//! outputs: a reused buffer's old content is overwritten block by block
//! (blocks tile a piece exactly, `Layout::is_block`) before the piece is
//! hashed. A driver whose store keeps every piece (the simulator's memory
//! store) simply never gets one back.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

/// Bytes of retired pieces kept for reuse, per file being downloaded;
/// pieces larger than this are never kept.
const SPARE_BYTES_MAX: usize = 16 << 20;
/// Retired pieces kept for reuse, per file (each is tried on every new
/// piece).
const SPARE_MAX: usize = 16;

/// Retired piece buffers of one file, oldest first.
#[derive(Debug, Default)]
pub(super) struct PieceBuffers {
    spare: VecDeque<Bytes>,
}

impl PieceBuffers {
    /// A buffer of `len` bytes to assemble a piece in; its content is
    /// unspecified.
    pub(super) fn take(&mut self, len: usize) -> BytesMut {
        for _ in 0..self.spare.len() {
            let Some(candidate) = self.spare.pop_front() else { break };
            if candidate.len() != len {
                continue; // the shorter last piece: not worth keeping
            }
            match candidate.try_into_mut() {
                Ok(buffer) => return buffer,
                // Still being stored: try it again later.
                Err(candidate) => self.spare.push_back(candidate),
            }
        }
        BytesMut::zeroed(len)
    }

    /// `piece` was handed out (or failed): keep its memory for reuse,
    /// unless as many are kept already. The kept ones are older, so the
    /// first to be dropped by the driver: a full set is not churned.
    pub(super) fn retire(&mut self, piece: &Bytes) {
        let kept_max = (SPARE_BYTES_MAX / piece.len().max(1)).min(SPARE_MAX);
        if self.spare.len() < kept_max {
            self.spare.push_back(piece.clone());
        }
    }

    /// Keep nothing (the download is complete).
    pub(super) fn clear(&mut self) {
        self.spare.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_piece_is_reused_once_dropped_elsewhere_and_only_then() {
        let mut buffers = PieceBuffers::default();
        let mut first = buffers.take(1024);
        first.fill(7);
        let stored = first.freeze();
        buffers.retire(&stored);
        let second = buffers.take(1024);
        assert!(second.iter().all(|&b| b == 0), "the first piece is still held: a new buffer");
        assert!(stored.iter().all(|&b| b == 7), "and the held piece is untouched");
        drop(stored);
        let third = buffers.take(1024);
        assert!(third.iter().all(|&b| b == 7), "dropped: its memory comes back");
        buffers.retire(&third.freeze());
        let shorter = buffers.take(512);
        assert_eq!(shorter.len(), 512, "a buffer of another length is never handed out");
        assert!(shorter.iter().all(|&b| b == 0));
    }

    #[test]
    fn memory_kept_is_bounded() {
        let mut buffers = PieceBuffers::default();
        let pieces: Vec<Bytes> = (0..2 * SPARE_MAX).map(|_| Bytes::from(vec![1u8; 1024])).collect();
        for piece in &pieces {
            buffers.retire(piece);
        }
        assert_eq!(buffers.spare.len(), SPARE_MAX);
        assert!(buffers.spare.iter().zip(&pieces).all(|(kept, piece)| kept.as_ptr() == piece.as_ptr()), "the oldest");
        buffers.clear();
        let huge = Bytes::from(vec![0u8; SPARE_BYTES_MAX + 1]);
        buffers.retire(&huge);
        assert!(buffers.spare.is_empty(), "a piece past the byte limit is not kept");
    }
}
