//! The content model: how a file becomes pieces, piece hashes and a `FileId`.
//!
//! - **Piece size** is a pure function of the file length
//!   ([`piece_bytes_for`]): the smallest power of two, at least
//!   [`PIECE_BYTES_MIN`], that cuts the file into at most
//!   [`PIECES_TARGET`] pieces, capped at [`PIECE_BYTES_MAX`]. Identical
//!   content therefore always gives identical pieces. (A scenario may
//!   override it; the piece size is bound into the `FileId`, so an override
//!   is simply another id.)
//! - **Pieces** are hashed with SHA-256; pieces are cut into
//!   [`BLOCK_BYTES`] blocks for requests (BEP 3's 16 KiB).
//! - **Merkle tree** over the piece hashes, domain separated so a leaf can
//!   never be passed off as an inner node (second-preimage safety,
//!   RFC 6962 §2.1): `leaf = H(0x00 ‖ piece_hash)`,
//!   `inner = H(0x01 ‖ left ‖ right)`. Levels pair nodes left to right; an
//!   odd last node is promoted unchanged, which gives RFC 6962's tree shape.
//!   The empty file's root is `H(0x00)`.
//! - **FileId** binds the root to the layout:
//!   `H(0x02 ‖ "shoal-file-v1" ‖ file_bytes as u64 BE ‖ piece_bytes as u32 BE ‖ root)`,
//!   so a manifest cannot lie about the length or piece size of a file.

use std::io::{self, BufRead, BufReader, Read};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::{FileId, PieceIndex};

/// Request granularity within a piece (BEP 3).
pub const BLOCK_BYTES: u32 = 16 * 1024;
/// Smallest piece: one block.
pub const PIECE_BYTES_MIN: u32 = BLOCK_BYTES;
/// Largest piece. Bounds the memory held for one unverified piece.
pub const PIECE_BYTES_MAX: u32 = 16 * 1024 * 1024;
/// The automatic rule aims for at most this many pieces per file, so that a
/// manifest's hash list (32 B each) fits one DHT record.
pub const PIECES_TARGET: u64 = 1024;
/// Read buffer of the streaming hasher: memory is bounded by this, whatever
/// the file size.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;

const LEAF_TAG: u8 = 0x00;
const INNER_TAG: u8 = 0x01;
const FILE_TAG: u8 = 0x02;
const FILE_DOMAIN: &[u8] = b"shoal-file-v1";

/// SHA-256 of one piece's bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct PieceHash(pub [u8; 32]);

impl std::fmt::Debug for PieceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PieceHash({:02x}{:02x}{:02x}{:02x})", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// Root of the Merkle tree over a file's piece hashes (before length binding).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct MerkleRoot(pub [u8; 32]);

impl std::fmt::Debug for MerkleRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MerkleRoot({:02x}{:02x}{:02x}{:02x})", self.0[0], self.0[1], self.0[2], self.0[3])
    }
}

/// Why a layout or a content stream is not acceptable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// Piece size not a power of two within the allowed range.
    #[error("piece size {piece_bytes} is not a power of two in [{PIECE_BYTES_MIN}, {PIECE_BYTES_MAX}]")]
    BadPieceSize {
        /// The rejected size.
        piece_bytes: u32,
    },
    /// So many pieces that an index would not fit a `u32`.
    #[error("file of {file_bytes} bytes has too many pieces of {piece_bytes} bytes")]
    TooManyPieces {
        /// File length.
        file_bytes: u64,
        /// Piece size.
        piece_bytes: u32,
    },
    /// The stream was longer or shorter than the length it was declared with.
    #[error("content length mismatch: expected {expected} bytes, got {got}")]
    LengthMismatch {
        /// Declared length.
        expected: u64,
        /// Bytes actually seen (stops counting one past `expected`).
        got: u64,
    },
    /// Reading the stream failed.
    #[error("reading content: {0}")]
    Io(#[from] io::Error),
}

/// The deterministic piece size for a file of `file_bytes` (module docs).
#[must_use]
pub fn piece_bytes_for(file_bytes: u64) -> u32 {
    let per_piece = file_bytes.div_ceil(PIECES_TARGET).max(u64::from(PIECE_BYTES_MIN));
    let rounded = per_piece.checked_next_power_of_two().unwrap_or(u64::MAX);
    // Both bounds are u32 values, so the clamped result fits.
    rounded.min(u64::from(PIECE_BYTES_MAX)) as u32
}

/// How a file of a given length is cut into pieces and blocks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Layout {
    file_bytes: u64,
    piece_bytes: u32,
    piece_count: u32,
}

impl Layout {
    /// A layout with an explicit piece size (power of two in range).
    pub fn new(file_bytes: u64, piece_bytes: u32) -> Result<Self, ContentError> {
        if !piece_bytes.is_power_of_two() || !(PIECE_BYTES_MIN..=PIECE_BYTES_MAX).contains(&piece_bytes) {
            return Err(ContentError::BadPieceSize { piece_bytes });
        }
        let piece_count = u32::try_from(file_bytes.div_ceil(u64::from(piece_bytes)))
            .map_err(|_| ContentError::TooManyPieces { file_bytes, piece_bytes })?;
        Ok(Self { file_bytes, piece_bytes, piece_count })
    }

    /// The layout the automatic piece-size rule gives.
    #[must_use]
    pub fn for_file(file_bytes: u64) -> Self {
        let piece_bytes = piece_bytes_for(file_bytes);
        // The rule caps pieces at 16 MiB, so a u64 length needs at most
        // 2^40 pieces... which does not fit u32; only lengths under 64 PiB
        // reach here in practice. Saturate rather than panic.
        Self::new(file_bytes, piece_bytes).unwrap_or(Self { file_bytes, piece_bytes, piece_count: u32::MAX })
    }

    /// File length in bytes.
    #[must_use]
    pub fn file_bytes(&self) -> u64 {
        self.file_bytes
    }

    /// Nominal piece size (all pieces but possibly the last).
    #[must_use]
    pub fn piece_bytes(&self) -> u32 {
        self.piece_bytes
    }

    /// Number of pieces; 0 for an empty file.
    #[must_use]
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    /// Byte offset of a piece within the file.
    #[must_use]
    pub fn piece_offset(&self, piece: PieceIndex) -> u64 {
        u64::from(piece.0) * u64::from(self.piece_bytes)
    }

    /// Length of a piece (the last may be short); 0 for an index past the end.
    #[must_use]
    pub fn piece_len(&self, piece: PieceIndex) -> u32 {
        let start = self.piece_offset(piece);
        let end = (start + u64::from(self.piece_bytes)).min(self.file_bytes);
        // end - start <= piece_bytes, a u32.
        end.saturating_sub(start) as u32
    }

    /// Number of blocks in a piece.
    #[must_use]
    pub fn block_count(&self, piece: PieceIndex) -> u32 {
        self.piece_len(piece).div_ceil(BLOCK_BYTES)
    }

    /// Length of block `block` of `piece` (the last block may be short).
    #[must_use]
    pub fn block_len(&self, piece: PieceIndex, block: u32) -> u32 {
        let start = block.saturating_mul(BLOCK_BYTES);
        self.piece_len(piece).saturating_sub(start).min(BLOCK_BYTES)
    }

    /// Whether `(offset, length)` names exactly one whole block of `piece`.
    /// Requests and blocks from peers are checked with this.
    #[must_use]
    pub fn is_block(&self, piece: PieceIndex, offset: u32, length: u32) -> bool {
        piece.0 < self.piece_count
            && offset.is_multiple_of(BLOCK_BYTES)
            && length != 0
            && length == self.block_len(piece, offset / BLOCK_BYTES)
    }
}

/// Deterministic, incompressible-looking content of `len` bytes from
/// `seed` (xorshift64): the files of simulations, tests and benches. Every
/// piece differs, so an offset bug cannot hide.
#[must_use]
pub fn synthetic_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed | 1; // xorshift's state must not be zero
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Hash of one piece's bytes.
#[must_use]
pub fn hash_piece(data: &[u8]) -> PieceHash {
    PieceHash(Sha256::digest(data).into())
}

/// Whether `data` is the piece whose hash is `expected`.
#[must_use]
pub fn verify_piece(expected: &PieceHash, data: &[u8]) -> bool {
    hash_piece(data) == *expected
}

/// Incremental chunk-and-hash: feed the file's bytes in any slicing; memory
/// is one SHA-256 state plus 32 bytes per piece.
pub struct ContentHasher {
    layout: Layout,
    piece: Sha256,
    piece_filled: u32,
    seen_bytes: u64,
    hashes: Vec<PieceHash>,
}

impl ContentHasher {
    /// A hasher for content of the given layout.
    #[must_use]
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            piece: Sha256::new(),
            piece_filled: 0,
            seen_bytes: 0,
            // The hash list is the output; reserve it up front, bounded by
            // the layout (at most 32 B per piece).
            hashes: Vec::with_capacity(layout.piece_count().min(1 << 20) as usize),
        }
    }

    /// Feed the next bytes of the file.
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), ContentError> {
        let file_bytes = self.layout.file_bytes();
        if self.seen_bytes + data.len() as u64 > file_bytes {
            return Err(ContentError::LengthMismatch {
                expected: file_bytes,
                got: self.seen_bytes + data.len() as u64,
            });
        }
        self.seen_bytes += data.len() as u64;
        while !data.is_empty() {
            let room = (self.layout.piece_bytes() - self.piece_filled) as usize;
            let take = room.min(data.len());
            self.piece.update(&data[..take]);
            // take <= room <= piece_bytes, a u32.
            self.piece_filled += take as u32;
            data = &data[take..];
            if self.piece_filled == self.layout.piece_bytes() {
                self.finish_piece();
            }
        }
        Ok(())
    }

    fn finish_piece(&mut self) {
        let digest = std::mem::take(&mut self.piece).finalize();
        self.hashes.push(PieceHash(digest.into()));
        self.piece_filled = 0;
    }

    /// Close the stream: fails unless exactly `file_bytes` were fed.
    pub fn finish(mut self) -> Result<Content, ContentError> {
        if self.seen_bytes != self.layout.file_bytes() {
            return Err(ContentError::LengthMismatch { expected: self.layout.file_bytes(), got: self.seen_bytes });
        }
        if self.piece_filled > 0 {
            self.finish_piece();
        }
        assert_eq!(self.hashes.len() as u64, u64::from(self.layout.piece_count()));
        Ok(Content::from_piece_hashes(self.layout, self.hashes))
    }
}

/// Chunk and hash a buffered stream without copying: bytes are hashed
/// straight out of the reader's buffer (an in-memory `&[u8]` is hashed in
/// place). Fails if the stream is not exactly `layout.file_bytes()` long.
pub fn hash_buf_read<R: BufRead>(mut reader: R, layout: Layout) -> Result<Content, ContentError> {
    let mut hasher = ContentHasher::new(layout);
    loop {
        let chunk = match reader.fill_buf() {
            Ok([]) => break,
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let n = chunk.len();
        hasher.update(chunk)?;
        reader.consume(n);
    }
    hasher.finish()
}

/// Chunk and hash any reader with bounded memory ([`READ_BUFFER_BYTES`]).
pub fn hash_reader<R: Read>(reader: R, layout: Layout) -> Result<Content, ContentError> {
    hash_buf_read(BufReader::with_capacity(READ_BUFFER_BYTES, reader), layout)
}

/// A file's complete content description: layout, piece hashes, root, id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Content {
    /// How the file is cut.
    pub layout: Layout,
    /// One hash per piece, in order.
    pub piece_hashes: Vec<PieceHash>,
    /// Merkle root over `piece_hashes`.
    pub root: MerkleRoot,
    /// The length-bound root: the file's identity.
    pub file_id: FileId,
}

impl Content {
    /// Derive root and id from a complete hash list.
    ///
    /// # Panics
    /// If the hash count disagrees with the layout (a caller bug; peer data
    /// goes through `FileManifest::validate`).
    #[must_use]
    pub fn from_piece_hashes(layout: Layout, piece_hashes: Vec<PieceHash>) -> Self {
        assert_eq!(piece_hashes.len() as u64, u64::from(layout.piece_count()));
        let root = merkle_root(&piece_hashes);
        let file_id = file_id(layout, &root);
        Self { layout, piece_hashes, root, file_id }
    }
}

/// The `FileId` of content with this layout and Merkle root.
#[must_use]
pub fn file_id(layout: Layout, root: &MerkleRoot) -> FileId {
    let mut h = Sha256::new();
    h.update([FILE_TAG]);
    h.update(FILE_DOMAIN);
    h.update(layout.file_bytes().to_be_bytes());
    h.update(layout.piece_bytes().to_be_bytes());
    h.update(root.0);
    FileId(h.finalize().into())
}

fn leaf_hash(piece: &PieceHash) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([LEAF_TAG]);
    h.update(piece.0);
    h.finalize().into()
}

fn inner_hash(left: &[u8; 32], right: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([INNER_TAG]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

fn empty_root() -> MerkleRoot {
    MerkleRoot(Sha256::digest([LEAF_TAG]).into())
}

/// Fold one tree level into the next: pair left to right, promote an odd
/// last node.
fn next_level(level: &[[u8; 32]]) -> Vec<[u8; 32]> {
    level
        .chunks(2)
        .map(|pair| match pair {
            [left, right] => inner_hash(left, right),
            [lone] => *lone,
            _ => unreachable!("chunks(2) yields one or two items"),
        })
        .collect()
}

/// Merkle root over piece hashes (module docs), in O(n) time and memory.
#[must_use]
pub fn merkle_root(piece_hashes: &[PieceHash]) -> MerkleRoot {
    if piece_hashes.is_empty() {
        return empty_root();
    }
    let mut level: Vec<[u8; 32]> = piece_hashes.iter().map(leaf_hash).collect();
    while level.len() > 1 {
        level = next_level(&level);
    }
    MerkleRoot(level[0])
}

/// The siblings on the path from one leaf to the root, bottom up. Levels
/// where the node was promoted contribute no sibling.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct MerkleProof {
    /// Sibling hashes, leaf level first.
    pub siblings: Vec<[u8; 32]>,
}

/// A full Merkle tree kept in memory to serve proofs in O(log n).
/// Memory: about 2 × 32 B per piece.
#[derive(Clone, Debug)]
pub struct MerkleTree {
    /// `levels[0]` are the leaves; the last level holds the root alone.
    levels: Vec<Vec<[u8; 32]>>,
}

impl MerkleTree {
    /// Build the tree over a file's piece hashes.
    #[must_use]
    pub fn new(piece_hashes: &[PieceHash]) -> Self {
        let mut levels = vec![piece_hashes.iter().map(leaf_hash).collect::<Vec<_>>()];
        while levels.last().is_some_and(|level| level.len() > 1) {
            let next = next_level(levels.last().map_or(&[][..], Vec::as_slice));
            levels.push(next);
        }
        Self { levels }
    }

    /// The root; equals [`merkle_root`] of the same hashes.
    #[must_use]
    pub fn root(&self) -> MerkleRoot {
        match self.levels.last().and_then(|level| level.first()) {
            Some(root) => MerkleRoot(*root),
            None => empty_root(),
        }
    }

    /// The inclusion proof of piece `index`, or `None` past the end: the
    /// range proof of a batch of one.
    #[must_use]
    pub fn proof(&self, index: PieceIndex) -> Option<MerkleProof> {
        self.range_proof(index, 1)
    }
}

impl MerkleTree {
    /// The proof for the aligned range of hashes `first..first + count`
    /// (`count` a power of two, `first` a multiple of it; the last range
    /// may be cut short by the end of the file). Such a range is exactly
    /// the subtree under one node at level `log2(count)`, so one sibling
    /// path from that node to the root proves the whole batch.
    #[must_use]
    pub fn range_proof(&self, first: PieceIndex, count: u32) -> Option<MerkleProof> {
        let leaves = self.levels.first()?.len() as u64;
        if !count.is_power_of_two() || !first.0.is_multiple_of(count) || u64::from(first.0) >= leaves {
            return None;
        }
        let top = self.levels.len() - 1;
        let level = (count.trailing_zeros() as usize).min(top);
        let mut i = (first.0 >> count.trailing_zeros()) as usize;
        let mut siblings = Vec::new();
        for nodes in &self.levels[level..top] {
            let sibling = i ^ 1;
            if sibling < nodes.len() {
                siblings.push(nodes[sibling]);
            }
            i /= 2;
        }
        Some(MerkleProof { siblings })
    }
}

/// Check a batch of piece hashes against the root with a
/// [`MerkleTree::range_proof`]. `hashes` must be the whole aligned range
/// `first..min(first + count, piece_count)`. Never panics.
#[must_use]
pub fn verify_range(
    root: &MerkleRoot,
    piece_count: u32,
    first: PieceIndex,
    count: u32,
    hashes: &[PieceHash],
    proof: &MerkleProof,
) -> bool {
    if !count.is_power_of_two() || !first.0.is_multiple_of(count) || first.0 >= piece_count {
        return false;
    }
    let expected = count.min(piece_count - first.0) as usize;
    if hashes.len() != expected || proof.siblings.len() > PROOF_SIBLINGS_MAX {
        return false;
    }
    // Fold the range to its subtree root; pairing inside an aligned range
    // is the global pairing.
    let mut level: Vec<[u8; 32]> = hashes.iter().map(leaf_hash).collect();
    while level.len() > 1 {
        level = next_level(&level);
    }
    let mut node = level[0];
    let shift = count.trailing_zeros();
    let mut i = u64::from(first.0 >> shift);
    let mut width = u64::from(piece_count).div_ceil(1u64 << shift);
    let mut siblings = proof.siblings.iter();
    while width > 1 {
        if i % 2 == 1 {
            let Some(left) = siblings.next() else { return false };
            node = inner_hash(left, &node);
        } else if i + 1 < width {
            let Some(right) = siblings.next() else { return false };
            node = inner_hash(&node, right);
        } // else: odd last node, promoted unchanged.
        i /= 2;
        width = width.div_ceil(2);
    }
    siblings.next().is_none() && node == root.0
}

/// Longest proof accepted: a tree over `u32::MAX` leaves has 32 levels.
pub const PROOF_SIBLINGS_MAX: usize = 32;

/// Check that `piece_hash` is leaf `index` of a tree over `piece_count`
/// leaves with the given root: a range proof of a batch of one. Never
/// panics on any input.
#[must_use]
pub fn verify_proof(
    root: &MerkleRoot,
    piece_count: u32,
    index: PieceIndex,
    piece_hash: &PieceHash,
    proof: &MerkleProof,
) -> bool {
    verify_range(root, piece_count, index, 1, std::slice::from_ref(piece_hash), proof)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sha(parts: &[&[u8]]) -> [u8; 32] {
        let mut h = Sha256::new();
        for part in parts {
            h.update(part);
        }
        h.finalize().into()
    }

    fn ph(byte: u8) -> PieceHash {
        PieceHash([byte; 32])
    }

    #[test]
    fn piece_size_rule_is_documented_and_monotone() {
        assert_eq!(piece_bytes_for(0), 16 * 1024);
        assert_eq!(piece_bytes_for(1), 16 * 1024);
        assert_eq!(piece_bytes_for(16 * 1024 * 1024), 16 * 1024); // 1024 pieces
        assert_eq!(piece_bytes_for(16 * 1024 * 1024 + 1), 32 * 1024);
        assert_eq!(piece_bytes_for(1 << 30), 1 << 20); // 1 GiB -> 1 MiB x 1024
        assert_eq!(piece_bytes_for(1 << 40), PIECE_BYTES_MAX);
        assert_eq!(piece_bytes_for(u64::MAX), PIECE_BYTES_MAX);
        let mut last = 0;
        for shift in 0..64 {
            let size = piece_bytes_for(1u64 << shift);
            assert!(size >= last);
            last = size;
        }
    }

    #[test]
    fn layout_cuts_pieces_and_blocks() {
        let layout = Layout::new(100_000, 32 * 1024).unwrap();
        assert_eq!(layout.piece_count(), 4);
        assert_eq!(layout.piece_len(PieceIndex(0)), 32 * 1024);
        assert_eq!(layout.piece_len(PieceIndex(3)), 100_000 - 3 * 32 * 1024);
        assert_eq!(layout.piece_len(PieceIndex(4)), 0);
        assert_eq!(layout.block_count(PieceIndex(0)), 2);
        assert_eq!(layout.block_count(PieceIndex(3)), 1);
        assert_eq!(layout.block_len(PieceIndex(3), 0), 1696);
        assert!(layout.is_block(PieceIndex(0), 16 * 1024, 16 * 1024));
        assert!(layout.is_block(PieceIndex(3), 0, 1696));
        assert!(!layout.is_block(PieceIndex(3), 0, 16 * 1024), "past end of file");
        assert!(!layout.is_block(PieceIndex(0), 1, 16 * 1024), "unaligned");
        assert!(!layout.is_block(PieceIndex(4), 0, 16), "no such piece");
        assert!(!layout.is_block(PieceIndex(0), 0, 0), "empty");
        assert!(Layout::new(10, 1000).is_err());
        assert!(Layout::new(10, 8 * 1024).is_err());
        assert!(Layout::new(u64::MAX, PIECE_BYTES_MIN).is_err());
        assert_eq!(Layout::new(0, PIECE_BYTES_MIN).unwrap().piece_count(), 0);
    }

    /// Known answers computed by hand from the definitions, with a plain
    /// SHA-256 and no tree code.
    #[test]
    fn merkle_root_known_answers() {
        let (a, b, c, d, e) = (ph(1), ph(2), ph(3), ph(4), ph(5));
        let leaf = |p: PieceHash| sha(&[&[0x00], &p.0]);
        let inner = |l: [u8; 32], r: [u8; 32]| sha(&[&[0x01], &l, &r]);

        assert_eq!(merkle_root(&[]).0, sha(&[&[0x00]]));
        assert_eq!(merkle_root(&[a]).0, leaf(a));
        assert_eq!(merkle_root(&[a, b]).0, inner(leaf(a), leaf(b)));
        assert_eq!(merkle_root(&[a, b, c]).0, inner(inner(leaf(a), leaf(b)), leaf(c)));
        assert_eq!(
            merkle_root(&[a, b, c, d, e]).0,
            inner(inner(inner(leaf(a), leaf(b)), inner(leaf(c), leaf(d))), leaf(e))
        );
        // Domain separation: a leaf is not the bare piece hash.
        assert_ne!(merkle_root(&[a]).0, a.0);
    }

    /// The whole pipeline on "abc" against digests computed independently
    /// (Python hashlib) from the documented definitions.
    #[test]
    fn file_id_known_answer() {
        let layout = Layout::for_file(3);
        let content = hash_buf_read(&b"abc"[..], layout).unwrap();
        assert_eq!(content.piece_hashes, vec![PieceHash(sha(&[b"abc"]))], "one piece: SHA-256(\"abc\")");
        assert_eq!(content.file_id.to_string(), "d415ed6b59df6b727820b14650dbc7a7187314644bf52f7b9c9b975b052ad144");
    }

    #[test]
    fn file_id_binds_length_and_piece_size() {
        let root = merkle_root(&[ph(7)]);
        let a = file_id(Layout::new(100, PIECE_BYTES_MIN).unwrap(), &root);
        let b = file_id(Layout::new(101, PIECE_BYTES_MIN).unwrap(), &root);
        let c = file_id(Layout::new(100, 2 * PIECE_BYTES_MIN).unwrap(), &root);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn hasher_rejects_wrong_lengths() {
        let layout = Layout::for_file(10);
        assert!(matches!(
            hash_buf_read(&[0u8; 9][..], layout),
            Err(ContentError::LengthMismatch { expected: 10, got: 9 })
        ));
        assert!(matches!(
            hash_buf_read(&[0u8; 11][..], layout),
            Err(ContentError::LengthMismatch { expected: 10, .. })
        ));
    }

    #[test]
    fn empty_file_has_no_pieces_and_a_stable_id() {
        let content = hash_reader(&[][..], Layout::for_file(0)).unwrap();
        assert!(content.piece_hashes.is_empty());
        assert_eq!(content.root, merkle_root(&[]));
        assert_eq!(MerkleTree::new(&[]).root(), content.root);
        assert_eq!(MerkleTree::new(&[]).proof(PieceIndex(0)), None);
    }

    #[test]
    fn proofs_reject_tampering() {
        let hashes: Vec<_> = (0..7).map(ph).collect();
        let tree = MerkleTree::new(&hashes);
        let root = tree.root();
        let proof = tree.proof(PieceIndex(6)).unwrap();
        assert!(verify_proof(&root, 7, PieceIndex(6), &hashes[6], &proof));
        assert!(!verify_proof(&root, 7, PieceIndex(5), &hashes[6], &proof), "wrong index");
        assert!(!verify_proof(&root, 8, PieceIndex(6), &hashes[6], &proof), "wrong count");
        assert!(!verify_proof(&root, 7, PieceIndex(6), &ph(99), &proof), "wrong hash");
        assert!(!verify_proof(&root, 7, PieceIndex(7), &hashes[6], &proof), "past the end");
        let mut long = proof.clone();
        long.siblings.push([0; 32]);
        assert!(!verify_proof(&root, 7, PieceIndex(6), &hashes[6], &long), "extra sibling");
        let mut short = proof;
        short.siblings.pop();
        assert!(!verify_proof(&root, 7, PieceIndex(6), &hashes[6], &short), "missing sibling");
    }

    proptest! {
        /// Any slicing of the input gives the same pieces as hashing each
        /// piece on its own, and the tree agrees with the fold.
        #[test]
        fn chunking_is_independent_of_read_sizes(
            data in proptest::collection::vec(any::<u8>(), 0..200_000),
            cuts in proptest::collection::vec(1usize..70_000, 1..8),
        ) {
            let layout = Layout::new(data.len() as u64, PIECE_BYTES_MIN).unwrap();
            let mut hasher = ContentHasher::new(layout);
            let mut rest = &data[..];
            for cut in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let take = (*cut).min(rest.len());
                hasher.update(&rest[..take]).unwrap();
                rest = &rest[take..];
            }
            let content = hasher.finish().unwrap();
            let expected: Vec<_> = data.chunks(PIECE_BYTES_MIN as usize).map(hash_piece).collect();
            prop_assert_eq!(&content.piece_hashes, &expected);
            prop_assert_eq!(content.root, MerkleTree::new(&expected).root());
            for (i, chunk) in data.chunks(PIECE_BYTES_MIN as usize).enumerate() {
                prop_assert!(verify_piece(&content.piece_hashes[i], chunk));
            }
        }

        #[test]
        fn every_proof_verifies(count in 1u32..300, seed in any::<u8>()) {
            let hashes: Vec<_> = (0..count).map(|i| PieceHash(sha(&[&i.to_le_bytes(), &[seed]]))).collect();
            let tree = MerkleTree::new(&hashes);
            prop_assert_eq!(tree.root(), merkle_root(&hashes));
            for i in 0..count {
                let proof = tree.proof(PieceIndex(i)).unwrap();
                prop_assert!(verify_proof(&tree.root(), count, PieceIndex(i), &hashes[i as usize], &proof));
                let other = (i + 1) % count;
                if other != i {
                    prop_assert!(!verify_proof(&tree.root(), count, PieceIndex(other), &hashes[i as usize], &proof));
                }
            }
        }

        /// Every aligned batch of every size verifies, and no batch
        /// verifies at another position or with one hash changed.
        #[test]
        fn range_proofs_verify_whole_batches(count in 1u32..200, shift in 0u32..9, flip in any::<usize>()) {
            let hashes: Vec<_> = (0..count).map(|i| PieceHash(sha(&[&i.to_le_bytes()]))).collect();
            let tree = MerkleTree::new(&hashes);
            let batch = 1u32 << shift;
            for first in (0..count).step_by(batch as usize) {
                let end = (first + batch).min(count) as usize;
                let proof = tree.range_proof(PieceIndex(first), batch).unwrap();
                let range = &hashes[first as usize..end];
                prop_assert!(verify_range(&tree.root(), count, PieceIndex(first), batch, range, &proof));
                let mut forged = range.to_vec();
                forged[flip % range.len()].0[0] ^= 1;
                prop_assert!(!verify_range(&tree.root(), count, PieceIndex(first), batch, &forged, &proof));
                if first + batch < count {
                    let next = PieceIndex(first + batch);
                    prop_assert!(!verify_range(&tree.root(), count, next, batch, range, &proof), "moved batch");
                }
            }
            prop_assert!(tree.range_proof(PieceIndex(1), 2).is_none(), "unaligned");
            prop_assert!(tree.range_proof(PieceIndex(0), 3).is_none(), "not a power of two");
        }

        #[test]
        fn verify_range_never_panics(
            count in any::<u32>(), first in any::<u32>(), batch in any::<u32>(),
            hashes in proptest::collection::vec(any::<[u8; 32]>(), 0..20),
            siblings in proptest::collection::vec(any::<[u8; 32]>(), 0..40),
        ) {
            let hashes: Vec<_> = hashes.into_iter().map(PieceHash).collect();
            let _ = verify_range(&MerkleRoot([0; 32]), count, PieceIndex(first), batch, &hashes, &MerkleProof { siblings });
        }

        #[test]
        fn verify_proof_never_panics(
            count in any::<u32>(), index in any::<u32>(),
            siblings in proptest::collection::vec(any::<[u8; 32]>(), 0..40),
        ) {
            let _ = verify_proof(&MerkleRoot([0; 32]), count, PieceIndex(index), &ph(0), &MerkleProof { siblings });
        }
    }
}
