//! Read-ahead for serving blocks from disk: a peer fetching a piece asks
//! for its 16 KiB blocks in order (the scheduler pipelines a piece's
//! blocks to one peer), so the disk store reads up to
//! [`READ_AHEAD_BYTES`] of the piece at once and serves the following
//! requests as slices of that read. One `pread` then serves sixteen
//! requests instead of one, and no block is allocated or zeroed on its own.
//!
//! Memory is bounded: at most [`READ_AHEAD_CHUNKS_MAX`] chunks are kept for
//! serving and [`READ_AHEAD_SPARE_MAX`] retired ones for reuse. A retired
//! chunk is reused only once every block sliced from it has been sent and
//! dropped ([`Bytes::try_into_mut`]), so its memory goes round instead of
//! through the allocator (and the kernel's page faults) for every chunk.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::core::ids::{FileId, PieceIndex};

/// Bytes of a piece read at once.
pub(super) const READ_AHEAD_BYTES: u32 = 256 * 1024;
/// Chunks kept for serving.
const READ_AHEAD_CHUNKS_MAX: usize = 4;
/// Retired chunks kept for reuse: a writer gathering 512 KiB and the
/// frames queued behind it hold a few chunks' blocks at once.
const READ_AHEAD_SPARE_MAX: usize = 8;

/// Bytes of one piece read from disk, from `offset` on.
#[derive(Debug)]
struct Chunk {
    file: FileId,
    piece: PieceIndex,
    offset: u32,
    /// Bytes read (at most [`READ_AHEAD_BYTES`]).
    len: u32,
    /// The whole buffer, [`READ_AHEAD_BYTES`] long; `len` of it were read.
    buffer: Bytes,
}

/// The chunks read ahead, newest last, and retired buffers for reuse.
#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    chunks: VecDeque<Chunk>,
    spare: VecDeque<Bytes>,
}

impl ReadAhead {
    /// The block at `offset..offset + length` of `piece`, if a chunk read
    /// earlier covers it.
    pub(super) fn block(&self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> Option<Bytes> {
        let end = offset.checked_add(length)?;
        let chunk = self.chunks.iter().rev().find(|chunk| {
            chunk.file == *file && chunk.piece == piece && chunk.offset <= offset && end <= chunk.offset + chunk.len
        })?;
        let start = (offset - chunk.offset) as usize;
        Some(chunk.buffer.slice(start..start + length as usize))
    }

    /// A buffer of [`READ_AHEAD_BYTES`] to read a chunk into: a retired one
    /// nobody holds a block of any more, else a new one.
    pub(super) fn buffer(&mut self) -> BytesMut {
        for _ in 0..self.spare.len() {
            let Some(candidate) = self.spare.pop_front() else { break };
            match candidate.try_into_mut() {
                Ok(buffer) => return buffer,
                // Blocks of it are still queued for sending: try it later.
                Err(candidate) => self.spare.push_back(candidate),
            }
        }
        BytesMut::zeroed(READ_AHEAD_BYTES as usize)
    }

    /// Keep `buffer`, of which the first `len` bytes are `piece` from
    /// `offset` on, for the requests that follow.
    pub(super) fn insert(&mut self, file: FileId, piece: PieceIndex, offset: u32, len: u32, buffer: Bytes) {
        assert!(len <= READ_AHEAD_BYTES, "a chunk of {len} bytes is past the read-ahead size");
        assert_eq!(buffer.len(), READ_AHEAD_BYTES as usize, "a chunk buffer has the read-ahead size");
        if self.chunks.len() >= READ_AHEAD_CHUNKS_MAX
            && let Some(oldest) = self.chunks.pop_front()
        {
            self.retire(oldest.buffer);
        }
        self.chunks.push_back(Chunk { file, piece, offset, len, buffer });
    }

    /// Forget what was read of `file` (removed, or its original replaced).
    pub(super) fn forget(&mut self, file: &FileId) {
        let (gone, kept): (Vec<Chunk>, Vec<Chunk>) = self.chunks.drain(..).partition(|chunk| chunk.file == *file);
        self.chunks = kept.into();
        for chunk in gone {
            self.retire(chunk.buffer);
        }
    }

    /// Keep `buffer` for reuse unless as many are kept: the kept ones are
    /// older, so the first whose blocks are all sent. (One not kept is
    /// freed once its last block has been sent.)
    fn retire(&mut self, buffer: Bytes) {
        if self.spare.len() < READ_AHEAD_SPARE_MAX {
            self.spare.push_back(buffer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: FileId = FileId([7; 32]);

    fn chunk(read_ahead: &mut ReadAhead, piece: u32, offset: u32, len: u32, fill: u8) {
        let mut buffer = read_ahead.buffer();
        buffer[..len as usize].fill(fill);
        read_ahead.insert(FILE, PieceIndex(piece), offset, len, buffer.freeze());
    }

    #[test]
    fn blocks_inside_a_chunk_are_served_and_others_are_not() {
        let mut read_ahead = ReadAhead::default();
        chunk(&mut read_ahead, 1, 16_384, 65_536, 9);
        let block = read_ahead.block(&FILE, PieceIndex(1), 32_768, 16_384).unwrap();
        assert_eq!(block.len(), 16_384);
        assert!(block.iter().all(|&b| b == 9));
        assert!(read_ahead.block(&FILE, PieceIndex(1), 0, 16_384).is_none(), "before the chunk");
        assert!(read_ahead.block(&FILE, PieceIndex(1), 81_920, 1).is_none(), "past what was read");
        assert!(read_ahead.block(&FILE, PieceIndex(2), 16_384, 1).is_none(), "another piece");
        assert!(read_ahead.block(&FileId([8; 32]), PieceIndex(1), 16_384, 1).is_none(), "another file");
        read_ahead.forget(&FILE);
        assert!(read_ahead.block(&FILE, PieceIndex(1), 32_768, 1).is_none(), "forgotten");
    }

    #[test]
    fn a_retired_buffer_is_reused_only_once_its_blocks_are_dropped() {
        let mut read_ahead = ReadAhead::default();
        for piece in 0..=READ_AHEAD_CHUNKS_MAX as u32 {
            chunk(&mut read_ahead, piece, 0, READ_AHEAD_BYTES, piece as u8 + 1);
        }
        // Piece 0's chunk was retired; a block of piece 1 is still out.
        let held = read_ahead.block(&FILE, PieceIndex(1), 0, 16).unwrap();
        assert!(read_ahead.block(&FILE, PieceIndex(0), 0, 16).is_none());
        let reused = read_ahead.buffer();
        assert!(reused.iter().all(|&b| b == 1), "piece 0's buffer, whose blocks are all gone");
        read_ahead.insert(FILE, PieceIndex(9), 0, 16, reused.freeze());
        // Piece 1's chunk is retired now, but `held` keeps it from reuse.
        let fresh = read_ahead.buffer();
        assert_eq!(fresh.len(), READ_AHEAD_BYTES as usize);
        assert!(fresh.iter().all(|&b| b == 0), "a new buffer");
        assert!(held.iter().all(|&b| b == 2), "a block out is never overwritten");
        assert!(read_ahead.spare.len() <= READ_AHEAD_SPARE_MAX);
        assert!(read_ahead.chunks.len() <= READ_AHEAD_CHUNKS_MAX);
    }
}
