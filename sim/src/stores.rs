//! Stores for simulated hosts: one that survives restarts, one that
//! corrupts what it serves, and the scenario's file contents.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use shoal_node::core::content::{Layout, PieceHash, hash_buf_read, synthetic_bytes};
use shoal_node::core::ids::{FileId, PieceIndex};
use shoal_node::core::manifest::FileManifest;
use shoal_node::store::{MemoryStore, Store};

use crate::model::FilePlan;

/// A plan file's bytes, hashes and manifest (synthetic, from its seed).
#[derive(Clone, Debug)]
pub struct FileContent {
    /// Its id.
    pub id: FileId,
    /// Its layout.
    pub layout: Layout,
    /// Its manifest.
    pub manifest: FileManifest,
    /// Its piece hashes.
    pub hashes: Vec<PieceHash>,
    /// Its bytes, shared by every holder.
    pub data: Bytes,
}

impl FileContent {
    /// Generate and hash a plan file.
    pub fn generate(file: &FilePlan) -> Result<Self, String> {
        let len = usize::try_from(file.bytes).map_err(|_| format!("file `{}` is too big", file.name))?;
        let data = Bytes::from(synthetic_bytes(file.content_seed, len));
        let layout = Layout::new(file.bytes, file.piece_bytes).map_err(|e| format!("file `{}`: {e}", file.name))?;
        let content = hash_buf_read(&data[..], layout).map_err(|e| format!("file `{}`: {e}", file.name))?;
        let manifest = FileManifest::new(&file.name, &content).map_err(|e| format!("file `{}`: {e}", file.name))?;
        Ok(Self { id: content.file_id, layout, manifest, hashes: content.piece_hashes, data })
    }

    /// Whether `store` holds exactly this file's bytes.
    pub fn held_exactly(&self, store: &MemoryStore) -> bool {
        (0..self.layout.piece_count()).all(|piece| {
            let piece = PieceIndex(piece);
            let start = self.layout.piece_offset(piece) as usize;
            let end = start + self.layout.piece_len(piece) as usize;
            store.piece(&self.id, piece).is_some_and(|held| held[..] == self.data[start..end])
        })
    }
}

/// A store whose blocks are served with every byte flipped: the
/// misbehaving host class. What it stores for itself is intact.
pub struct CorruptingStore<S>(pub S);

impl<S: Store> Store for CorruptingStore<S> {
    type SharedSource = S::SharedSource;
    fn create(&mut self, manifest: &FileManifest, hashes: &[PieceHash]) -> StoreResult<FileId> {
        self.0.create(manifest, hashes)
    }
    fn add_shared(
        &mut self,
        source: Self::SharedSource,
        manifest: &FileManifest,
        hashes: &[PieceHash],
    ) -> StoreResult<FileId> {
        self.0.add_shared(source, manifest, hashes)
    }
    fn write_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> StoreResult<()> {
        self.0.write_piece(file, piece, data)
    }
    fn read_block(&mut self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> StoreResult<Bytes> {
        let block = self.0.read_block(file, piece, offset, length)?;
        Ok(corrupt_block(&block))
    }
    fn held(&self, file: &FileId) -> StoreResult<shoal_node::store::HeldPieces> {
        self.0.held(file)
    }
    fn manifest(&self, file: &FileId) -> Option<&FileManifest> {
        self.0.manifest(file)
    }
    fn piece_hashes(&self, file: &FileId) -> Option<&[PieceHash]> {
        self.0.piece_hashes(file)
    }
    fn files(&self) -> Vec<shoal_node::store::FileStatus> {
        self.0.files()
    }
    fn remove(&mut self, file: &FileId) -> StoreResult<()> {
        self.0.remove(file)
    }
}

/// What a corrupting host serves for a block: every byte flipped.
#[must_use]
pub fn corrupt_block(block: &[u8]) -> Bytes {
    block.iter().map(|b| !b).collect::<Vec<u8>>().into()
}

type StoreResult<T> = Result<T, shoal_node::store::StoreError>;

/// A host's store that outlives the host: the data lives behind a shared
/// handle kept outside the host factory, so a crash loses only what the
/// driver held in memory. Manifests and hashes are cached per incarnation
/// so the trait's borrowing accessors work through the lock.
pub struct DurableStore {
    inner: Arc<Mutex<MemoryStore>>,
    meta: BTreeMap<FileId, (FileManifest, Vec<PieceHash>)>,
}

impl DurableStore {
    /// Attach to a store that survives restarts.
    #[must_use]
    pub fn attach(inner: Arc<Mutex<MemoryStore>>) -> Self {
        let mut meta = BTreeMap::new();
        {
            let store = lock(&inner);
            for status in store.files() {
                if let (Some(m), Some(h)) = (store.manifest(&status.file), store.piece_hashes(&status.file)) {
                    meta.insert(status.file, (m.clone(), h.to_vec()));
                }
            }
        }
        Self { inner, meta }
    }
}

impl Store for DurableStore {
    type SharedSource = Bytes;
    fn create(&mut self, manifest: &FileManifest, hashes: &[PieceHash]) -> StoreResult<FileId> {
        let id = lock(&self.inner).create(manifest, hashes)?;
        self.meta.insert(id, (manifest.clone(), hashes.to_vec()));
        Ok(id)
    }
    fn add_shared(&mut self, source: Bytes, manifest: &FileManifest, hashes: &[PieceHash]) -> StoreResult<FileId> {
        let id = lock(&self.inner).add_shared(source, manifest, hashes)?;
        self.meta.insert(id, (manifest.clone(), hashes.to_vec()));
        Ok(id)
    }
    fn write_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> StoreResult<()> {
        lock(&self.inner).write_piece(file, piece, data)
    }
    fn read_block(&mut self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> StoreResult<Bytes> {
        lock(&self.inner).read_block(file, piece, offset, length)
    }
    fn held(&self, file: &FileId) -> StoreResult<shoal_node::store::HeldPieces> {
        lock(&self.inner).held(file)
    }
    fn manifest(&self, file: &FileId) -> Option<&FileManifest> {
        self.meta.get(file).map(|(m, _)| m)
    }
    fn piece_hashes(&self, file: &FileId) -> Option<&[PieceHash]> {
        self.meta.get(file).map(|(_, h)| h.as_slice())
    }
    fn files(&self) -> Vec<shoal_node::store::FileStatus> {
        lock(&self.inner).files()
    }
    fn remove(&mut self, file: &FileId) -> StoreResult<()> {
        self.meta.remove(file);
        lock(&self.inner).remove(file)
    }
}

/// The simulation is single-threaded; a poisoned lock only means a host
/// panicked, which the run reports anyway.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
