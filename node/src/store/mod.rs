//! The node's piece storage: what a node holds of each file it downloads or
//! shares, behind one [`Store`] trait with two implementations:
//!
//! - [`MemoryStore`]: pieces as shared [`Bytes`], for the simulator (a
//!   thousand hosts holding one file can hold one copy of it);
//! - [`DiskStore`]: the `shoal` daemon's crash-safe store under a data
//!   directory (layout and ordering rules in its docs).
//!
//! Both stores check everything against the file's validated manifest and
//! piece hashes: a piece is stored only if it hashes to its manifest hash,
//! and a block is served only from a held piece and within its bounds.

mod disk;
mod memory;
mod read_ahead;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::core::content::{self, BLOCK_BYTES, Layout, PieceHash};
use crate::core::ids::{FileId, PieceIndex};
use crate::core::manifest::{FileManifest, ManifestError};

pub use disk::{DiskStore, LoadIssue, PieceWrite, Recovery};
pub use memory::MemoryStore;

/// Piece storage for the node's driver. The driver loop calls it
/// synchronously, so every call holds up the loop: the per-block and
/// per-piece calls must be short, and the slow part of storing a piece
/// (writing, syncing) runs off the loop through
/// [`prepare_write`](Store::prepare_write).
///
/// Contract, for every implementation:
/// - A file is tracked from [`create`](Store::create) (a download) or
///   [`add_shared`](Store::add_shared) (a local file, every piece held) until
///   [`remove`](Store::remove). Both validate the manifest and check that the
///   piece hashes fold to its root before remembering anything.
/// - [`write_piece`](Store::write_piece) stores a piece only if it has the
///   right length and hashes to its manifest hash; when it returns `Ok` the
///   piece is durable (for the disk store: data fsynced, then marked held)
///   and [`held`](Store::held) includes it. Writing a held piece again is a
///   no-op, so a shared file's bytes are never written to.
/// - [`read_block`](Store::read_block) serves at most [`BLOCK_BYTES`] from
///   one held piece, never past the piece's end.
/// - Errors name the file, piece or path involved; nothing panics on bad
///   input or bad on-disk state.
pub trait Store {
    /// What [`add_shared`](Store::add_shared) shares: a path for the disk
    /// store (served in place, never copied), the bytes for the memory store.
    type SharedSource;

    /// Start tracking a download: remember its manifest and hashes and
    /// create (preallocate) its data. Returns the file's id. Creating a file
    /// that is already tracked changes nothing and returns `Ok`, so a driver
    /// can call it again on resume.
    fn create(&mut self, manifest: &FileManifest, piece_hashes: &[PieceHash]) -> Result<FileId, StoreError>;

    /// Share a complete local file: every piece is held from the start. The
    /// source must be exactly `manifest.size` bytes long; its content is
    /// trusted to match the hashes (the caller just computed them). Fails
    /// with [`StoreError::AlreadyTracked`] if the file is tracked.
    fn add_shared(
        &mut self,
        source: Self::SharedSource,
        manifest: &FileManifest,
        piece_hashes: &[PieceHash],
    ) -> Result<FileId, StoreError>;

    /// Share the complete local file at `path` (the daemon's `share`): the
    /// disk store serves it in place, the memory store reads it. Stores
    /// that cannot share a path (the simulator's wrappers) keep this
    /// default, which refuses.
    fn share_path(
        &mut self,
        path: &Path,
        manifest: &FileManifest,
        piece_hashes: &[PieceHash],
    ) -> Result<FileId, StoreError> {
        let _ = (manifest, piece_hashes);
        let unsupported = io::Error::new(io::ErrorKind::Unsupported, "this store cannot share a local path");
        Err(StoreError::Io { op: "share", path: path.to_path_buf(), source: unsupported })
    }

    /// Store one piece; `Ok` means durable and counted as held.
    fn write_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> Result<(), StoreError>;

    /// [`write_piece`](Store::write_piece) for a piece the caller has
    /// already checked against this file's piece hash (the driver, for the
    /// exchange's `StorePiece`, which only carries verified pieces): a
    /// store may skip hashing it a second time. Index and length are still
    /// checked. The default hashes again.
    fn write_verified_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> Result<(), StoreError> {
        self.write_piece(file, piece, data)
    }

    /// Split a verified piece's write so that its slow part (writing and
    /// syncing) can run off the driver loop: `None` means this store
    /// writes synchronously (call [`write_verified_piece`](Store::write_verified_piece));
    /// `Some(Ok(None))` that there is nothing to write (held or queued).
    /// A queued piece is served by [`read_block`](Store::read_block) from
    /// memory but is not [`held`](Store::held) until
    /// [`commit_write`](Store::commit_write) reports its job done: a piece
    /// counts only once durable. Jobs must run one at a time, in order.
    fn prepare_write(
        &mut self,
        file: &FileId,
        piece: PieceIndex,
        data: Bytes,
    ) -> Option<Result<Option<PieceWrite>, StoreError>> {
        let _ = (file, piece, data);
        None
    }

    /// A job from [`prepare_write`](Store::prepare_write) finished with
    /// `result`: on success the piece is held from now on.
    fn commit_write(
        &mut self,
        file: &FileId,
        piece: PieceIndex,
        result: Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let _ = (file, piece);
        result
    }

    /// Read `length` bytes (1 ..= [`BLOCK_BYTES`]) at `offset` within a held
    /// piece. Reads at most a bounded stretch of that piece (the disk store
    /// reads ahead for the requests that usually follow).
    fn read_block(&mut self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> Result<Bytes, StoreError>;

    /// Which pieces of `file` are held (for resume and bitfield messages).
    fn held(&self, file: &FileId) -> Result<HeldPieces, StoreError>;

    /// The validated manifest of a tracked file.
    fn manifest(&self, file: &FileId) -> Option<&FileManifest>;

    /// The piece hashes of a tracked file, one per piece, checked against
    /// its manifest root.
    fn piece_hashes(&self, file: &FileId) -> Option<&[PieceHash]>;

    /// Every tracked file, ordered by id.
    fn files(&self) -> Vec<FileStatus>;

    /// Stop tracking `file` and delete what the store created for it. A
    /// shared file's original is never deleted.
    fn remove(&mut self, file: &FileId) -> Result<(), StoreError>;
}

/// One tracked file, as listed by [`Store::files`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct FileStatus {
    /// The file.
    pub file: FileId,
    /// Pieces held.
    pub held_pieces: u32,
    /// Pieces in the file.
    pub piece_count: u32,
    /// Whether it is a shared local file (rather than a download).
    pub shared: bool,
}

/// The set of held pieces of one file, packed MSB first as on the wire
/// (bit `i` of the packed bytes is piece `i`).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HeldPieces {
    piece_count: u32,
    packed: Vec<u8>,
    held_count: u32,
}

impl HeldPieces {
    /// No piece held.
    #[must_use]
    pub fn none(piece_count: u32) -> Self {
        Self { piece_count, packed: vec![0; piece_count.div_ceil(8) as usize], held_count: 0 }
    }

    /// Every piece held.
    #[must_use]
    pub fn all(piece_count: u32) -> Self {
        let mut packed = vec![0xff; piece_count.div_ceil(8) as usize];
        let spare = (8 - piece_count % 8) % 8;
        if let Some(last) = packed.last_mut() {
            *last &= 0xff << spare;
        }
        Self { piece_count, packed, held_count: piece_count }
    }

    /// Adopt packed bits; `None` unless there is exactly one byte per eight
    /// pieces and the spare bits of the last byte are clear.
    #[must_use]
    pub fn from_packed(piece_count: u32, packed: Vec<u8>) -> Option<Self> {
        let spare = (8 - piece_count % 8) % 8;
        let spare_clear = spare == 0 || packed.last().is_none_or(|&last| last & ((1u8 << spare) - 1) == 0);
        if packed.len() != piece_count.div_ceil(8) as usize || !spare_clear {
            return None;
        }
        let held_count = packed.iter().map(|byte| byte.count_ones()).sum();
        Some(Self { piece_count, packed, held_count })
    }

    /// Whether `piece` is held (false past the end).
    #[must_use]
    pub fn contains(&self, piece: PieceIndex) -> bool {
        piece.0 < self.piece_count && self.packed[(piece.0 / 8) as usize] & (0x80 >> (piece.0 % 8)) != 0
    }

    /// Mark `piece` held; returns whether it was newly added.
    ///
    /// # Panics
    /// If `piece` is past the end (callers check the range first).
    pub fn insert(&mut self, piece: PieceIndex) -> bool {
        assert!(piece.0 < self.piece_count, "piece {piece} past the end ({} pieces)", self.piece_count);
        let byte = &mut self.packed[(piece.0 / 8) as usize];
        let bit = 0x80 >> (piece.0 % 8);
        let added = *byte & bit == 0;
        *byte |= bit;
        self.held_count += u32::from(added);
        added
    }

    /// Mark `piece` not held; returns whether it was held.
    pub fn remove(&mut self, piece: PieceIndex) -> bool {
        if !self.contains(piece) {
            return false;
        }
        self.packed[(piece.0 / 8) as usize] &= !(0x80 >> (piece.0 % 8));
        self.held_count -= 1;
        true
    }

    /// Pieces held.
    #[must_use]
    pub fn count(&self) -> u32 {
        self.held_count
    }

    /// Pieces in the file.
    #[must_use]
    pub fn piece_count(&self) -> u32 {
        self.piece_count
    }

    /// Whether every piece is held.
    #[must_use]
    pub fn is_complete(&self) -> bool {
        self.held_count == self.piece_count
    }

    /// The packed bits, `ceil(piece_count / 8)` bytes.
    #[must_use]
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// Held pieces in ascending order.
    #[must_use]
    pub fn indices(&self) -> Vec<PieceIndex> {
        (0..self.piece_count).map(PieceIndex).filter(|&piece| self.contains(piece)).collect()
    }

    /// Pieces not held, in ascending order.
    #[must_use]
    pub fn missing(&self) -> Vec<PieceIndex> {
        (0..self.piece_count).map(PieceIndex).filter(|&piece| !self.contains(piece)).collect()
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The file is not tracked.
    #[error("file {file} is not in the store")]
    UnknownFile {
        /// The file asked for.
        file: FileId,
    },
    /// `add_shared` for a file the store already tracks.
    #[error("file {file} is already in the store")]
    AlreadyTracked {
        /// The file.
        file: FileId,
    },
    /// The manifest failed validation.
    #[error("invalid manifest{}: {source}", path_suffix(path.as_deref()))]
    InvalidManifest {
        /// Where it was read from, for a manifest loaded from disk.
        path: Option<PathBuf>,
        /// What is wrong with it.
        source: ManifestError,
    },
    /// The hash list does not have one hash per piece.
    #[error("file {file}: {got} piece hashes given, the file has {expected} pieces")]
    WrongHashCount {
        /// The file.
        file: FileId,
        /// Pieces in the layout.
        expected: u32,
        /// Hashes given.
        got: usize,
    },
    /// The hash list does not fold to the manifest's Merkle root.
    #[error("file {file}: piece hashes do not match the manifest root")]
    HashesMismatchRoot {
        /// The file.
        file: FileId,
    },
    /// A piece index past the end of the file.
    #[error("file {file}: piece {piece} out of range ({piece_count} pieces)")]
    PieceOutOfRange {
        /// The file.
        file: FileId,
        /// The piece asked for.
        piece: PieceIndex,
        /// Pieces in the file.
        piece_count: u32,
    },
    /// Piece data of the wrong length.
    #[error("file {file}: piece {piece} must be {expected} bytes, got {got}")]
    WrongPieceLength {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Its length in the layout.
        expected: u32,
        /// Bytes given.
        got: usize,
    },
    /// Piece data that does not hash to the piece's manifest hash.
    #[error("file {file}: piece {piece} does not match its hash")]
    PieceHashMismatch {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
    },
    /// A block request outside the piece, empty, or longer than a block.
    #[error(
        "file {file}: block at offset {offset} of {length} bytes is not within piece {piece} \
         ({piece_bytes} bytes, blocks of at most {BLOCK_BYTES})"
    )]
    BadBlock {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Requested offset within the piece.
        offset: u32,
        /// Requested length.
        length: u32,
        /// The piece's length.
        piece_bytes: u32,
    },
    /// A block of a piece the store does not hold.
    #[error("file {file}: piece {piece} is not held")]
    NotHeld {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
    },
    /// A shared source whose length is not the manifest's.
    #[error("shared file {} is {got} bytes, the manifest says {expected}", path.display())]
    SharedLength {
        /// The shared file.
        path: PathBuf,
        /// Length in the manifest.
        expected: u64,
        /// Length found.
        got: u64,
    },
    /// A shared file changed since it was shared: its pieces can no longer
    /// be trusted, so nothing is served from it.
    #[error(
        "shared file {} changed since it was shared (was {expected_bytes} bytes, mtime {expected_mtime:?}; \
         now {got_bytes} bytes, mtime {got_mtime:?}); share it again",
        path.display()
    )]
    SharedFileChanged {
        /// The shared file.
        path: PathBuf,
        /// Recorded length.
        expected_bytes: u64,
        /// Recorded mtime (seconds, nanoseconds).
        expected_mtime: (i64, i64),
        /// Current length.
        got_bytes: u64,
        /// Current mtime (seconds, nanoseconds).
        got_mtime: (i64, i64),
    },
    /// A store file whose content cannot be trusted.
    #[error("corrupt store file {}: {reason}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Another process holds the data directory.
    #[error("data directory {} is in use by another process (lock file {})", dir.display(), lock.display())]
    Locked {
        /// The data directory.
        dir: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// An I/O error, with what was being done to which path.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "write", ...).
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

fn path_suffix(path: Option<&Path>) -> String {
    path.map(|path| format!(" in {}", path.display())).unwrap_or_default()
}

/// A tracked file's validated description, shared by both stores.
#[derive(Clone, Debug)]
struct FileMeta {
    id: FileId,
    manifest: FileManifest,
    layout: Layout,
    hashes: Vec<PieceHash>,
}

impl FileMeta {
    /// Validate a manifest and its hash list (from a caller or from disk).
    fn new(manifest: &FileManifest, piece_hashes: &[PieceHash], path: Option<&Path>) -> Result<Self, StoreError> {
        let invalid = |source| StoreError::InvalidManifest { path: path.map(Path::to_path_buf), source };
        let id = manifest.validate().map_err(invalid)?;
        let layout = manifest.layout().map_err(invalid)?;
        if piece_hashes.len() as u64 != u64::from(layout.piece_count()) {
            return Err(StoreError::WrongHashCount {
                file: id,
                expected: layout.piece_count(),
                got: piece_hashes.len(),
            });
        }
        if content::merkle_root(piece_hashes) != manifest.root {
            return Err(StoreError::HashesMismatchRoot { file: id });
        }
        Ok(Self { id, manifest: manifest.clone(), layout, hashes: piece_hashes.to_vec() })
    }

    fn check_piece_index(&self, piece: PieceIndex) -> Result<(), StoreError> {
        if piece.0 >= self.layout.piece_count() {
            return Err(StoreError::PieceOutOfRange { file: self.id, piece, piece_count: self.layout.piece_count() });
        }
        Ok(())
    }

    /// Range, length and (if `hash`) hash of a piece about to be written.
    fn check_piece(&self, piece: PieceIndex, data: &[u8], hash: bool) -> Result<(), StoreError> {
        self.check_piece_index(piece)?;
        let expected = self.layout.piece_len(piece);
        if data.len() != expected as usize {
            return Err(StoreError::WrongPieceLength { file: self.id, piece, expected, got: data.len() });
        }
        if hash && !content::verify_piece(&self.hashes[piece.0 as usize], data) {
            return Err(StoreError::PieceHashMismatch { file: self.id, piece });
        }
        Ok(())
    }

    /// Bounds of a block request; the caller checks that the piece is held.
    fn check_block(&self, piece: PieceIndex, offset: u32, length: u32) -> Result<(), StoreError> {
        self.check_piece_index(piece)?;
        let piece_bytes = self.layout.piece_len(piece);
        let end = u64::from(offset) + u64::from(length);
        if length == 0 || length > BLOCK_BYTES || end > u64::from(piece_bytes) {
            return Err(StoreError::BadBlock { file: self.id, piece, offset, length, piece_bytes });
        }
        Ok(())
    }
}
