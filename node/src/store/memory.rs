//! The simulator's store: [`MemoryStore`].

use std::collections::BTreeMap;

use bytes::Bytes;

use super::{FileMeta, FileStatus, HeldPieces, Store, StoreError};
use crate::core::content::PieceHash;
use crate::core::ids::{FileId, PieceIndex};
use crate::core::manifest::FileManifest;

/// One tracked file.
#[derive(Clone, Debug)]
struct MemoryFile {
    meta: FileMeta,
    /// One slot per piece; `Some` exactly for held pieces.
    pieces: Vec<Option<Bytes>>,
    held: HeldPieces,
    shared: bool,
}

/// The simulator's store: pieces as [`Bytes`], so storing or serving a
/// piece is a reference-count bump, and hosts that hold the same file can
/// share one buffer per piece ([`MemoryStore::piece`] hands it out). Memory
/// is bounded only by what is added; a crashed host that "keeps its store"
/// keeps this value.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    files: BTreeMap<FileId, MemoryFile>,
}

impl MemoryStore {
    /// An empty store.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// A held piece's bytes (a cheap clone), to hand to another host's
    /// store without copying.
    #[must_use]
    pub fn piece(&self, file: &FileId, piece: PieceIndex) -> Option<Bytes> {
        self.files.get(file)?.pieces.get(piece.0 as usize)?.clone()
    }

    /// [`Store::write_piece`] for a caller that already knows the bytes'
    /// SHA-256: the store compares `hash` with the manifest's instead of
    /// hashing the bytes again. The simulator passes the hash it memoised
    /// for the plan file's exact bytes.
    ///
    /// # Errors
    /// As [`Store::write_piece`].
    pub fn write_hashed_piece(
        &mut self,
        file: &FileId,
        piece: PieceIndex,
        data: Bytes,
        hash: &PieceHash,
    ) -> Result<(), StoreError> {
        self.insert_piece(file, piece, data, Some(hash))
    }

    /// Keep a verified piece: range and length checked, then the hash,
    /// `known` or computed from the bytes. A piece held already is kept
    /// as it is.
    fn insert_piece(
        &mut self,
        file: &FileId,
        piece: PieceIndex,
        data: Bytes,
        known: Option<&PieceHash>,
    ) -> Result<(), StoreError> {
        let entry = self.file_mut(file)?;
        entry.meta.check_piece_index(piece)?;
        if entry.held.contains(piece) {
            return Ok(());
        }
        entry.meta.check_piece(piece, &data, known.is_none())?;
        if known.is_some_and(|hash| *hash != entry.meta.hashes[piece.0 as usize]) {
            return Err(StoreError::PieceHashMismatch { file: *file, piece });
        }
        entry.pieces[piece.0 as usize] = Some(data);
        entry.held.insert(piece);
        Ok(())
    }

    fn file_mut(&mut self, file: &FileId) -> Result<&mut MemoryFile, StoreError> {
        self.files.get_mut(file).ok_or(StoreError::UnknownFile { file: *file })
    }
}

impl Store for MemoryStore {
    /// The whole file; pieces are zero-copy slices of it.
    type SharedSource = Bytes;

    fn create(&mut self, manifest: &FileManifest, piece_hashes: &[PieceHash]) -> Result<FileId, StoreError> {
        let meta = FileMeta::new(manifest, piece_hashes, None)?;
        let id = meta.id;
        let piece_count = meta.layout.piece_count();
        self.files.entry(id).or_insert_with(|| MemoryFile {
            meta,
            pieces: vec![None; piece_count as usize],
            held: HeldPieces::none(piece_count),
            shared: false,
        });
        Ok(id)
    }

    fn add_shared(
        &mut self,
        source: Bytes,
        manifest: &FileManifest,
        piece_hashes: &[PieceHash],
    ) -> Result<FileId, StoreError> {
        let meta = FileMeta::new(manifest, piece_hashes, None)?;
        let id = meta.id;
        if self.files.contains_key(&id) {
            return Err(StoreError::AlreadyTracked { file: id });
        }
        let layout = meta.layout;
        if source.len() as u64 != layout.file_bytes() {
            return Err(StoreError::SharedLength {
                path: format!("<memory:{}>", id.short()).into(),
                expected: layout.file_bytes(),
                got: source.len() as u64,
            });
        }
        let pieces = (0..layout.piece_count())
            .map(|index| {
                let piece = PieceIndex(index);
                // Offsets are within the source, whose length was checked.
                let start = layout.piece_offset(piece) as usize;
                Some(source.slice(start..start + layout.piece_len(piece) as usize))
            })
            .collect();
        let held = HeldPieces::all(layout.piece_count());
        self.files.insert(id, MemoryFile { meta, pieces, held, shared: true });
        Ok(id)
    }

    /// Reads the whole file into memory (tests and the simulator only).
    fn share_path(
        &mut self,
        path: &std::path::Path,
        manifest: &FileManifest,
        piece_hashes: &[PieceHash],
    ) -> Result<FileId, StoreError> {
        let bytes =
            std::fs::read(path).map_err(|source| StoreError::Io { op: "read", path: path.to_path_buf(), source })?;
        self.add_shared(Bytes::from(bytes), manifest, piece_hashes)
    }

    fn write_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> Result<(), StoreError> {
        self.insert_piece(file, piece, data, None)
    }

    fn read_block(&mut self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> Result<Bytes, StoreError> {
        let entry = self.file_mut(file)?;
        entry.meta.check_block(piece, offset, length)?;
        let bytes = entry.pieces[piece.0 as usize].as_ref().ok_or(StoreError::NotHeld { file: *file, piece })?;
        Ok(bytes.slice(offset as usize..(offset + length) as usize))
    }

    fn held(&self, file: &FileId) -> Result<HeldPieces, StoreError> {
        self.files.get(file).map(|entry| entry.held.clone()).ok_or(StoreError::UnknownFile { file: *file })
    }

    fn manifest(&self, file: &FileId) -> Option<&FileManifest> {
        self.files.get(file).map(|entry| &entry.meta.manifest)
    }

    fn piece_hashes(&self, file: &FileId) -> Option<&[PieceHash]> {
        self.files.get(file).map(|entry| entry.meta.hashes.as_slice())
    }

    fn files(&self) -> Vec<FileStatus> {
        self.files
            .values()
            .map(|entry| FileStatus {
                file: entry.meta.id,
                held_pieces: entry.held.count(),
                piece_count: entry.held.piece_count(),
                shared: entry.shared,
            })
            .collect()
    }

    fn remove(&mut self, file: &FileId) -> Result<(), StoreError> {
        self.files.remove(file).map(|_| ()).ok_or(StoreError::UnknownFile { file: *file })
    }
}
