//! The daemon's crash-safe store: [`DiskStore`].

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::read_ahead::{READ_AHEAD_BYTES, ReadAhead};
use super::{FileMeta, FileStatus, HeldPieces, Store, StoreError};
use crate::core::content::{self, PieceHash};
use crate::core::ids::{FileId, PieceIndex};
use crate::core::manifest::FileManifest;

const FILES_DIR: &str = "files";
const LOCK_FILE: &str = "lock";
const MANIFEST_FILE: &str = "manifest";
const HASHES_FILE: &str = "hashes";
const DATA_FILE: &str = "data";
const HELD_FILE: &str = "held";
const HELD_TMP_FILE: &str = "held.tmp";
const SHARED_FILE: &str = "shared";
const STAGING_PREFIX: &str = ".staging-";
const REMOVING_PREFIX: &str = ".removing-";

/// A manifest is at most a name (255 B) and 1024 inline hashes (32 KiB);
/// anything much larger on disk is not one, and is not read into memory.
const MANIFEST_BYTES_MAX: u64 = 1 << 20;
/// A shared-file record is a path plus three integers.
const SHARED_RECORD_BYTES_MAX: u64 = 64 * 1024;
const HELD_MAGIC: &[u8; 8] = b"shoalhv1";
/// Files kept open for reading blocks: serving opens a file once, not once
/// per 16 KiB block; past the limit the oldest id's handle is closed.
const READ_HANDLES_MAX: usize = 64;
const CHECKSUM_BYTES: usize = 32;

/// The slow part of writing one verified piece, to run off the driver loop
/// ([`Store::prepare_write`]): write the bytes, sync them, then replace the
/// bitfield with one that includes the piece. Jobs run one at a time in
/// the order they were prepared, so each job's bitfield names only pieces
/// whose bytes earlier jobs (or this one) already synced; pieces whose job
/// failed are passed to later jobs to leave out.
#[derive(Debug)]
pub struct PieceWrite {
    file: FileId,
    piece: PieceIndex,
    data_path: PathBuf,
    offset: u64,
    data: Bytes,
    dir: PathBuf,
    /// Held pieces, earlier queued pieces and this one.
    held: HeldPieces,
}

impl PieceWrite {
    /// The file.
    #[must_use]
    pub fn file(&self) -> FileId {
        self.file
    }

    /// The piece.
    #[must_use]
    pub fn piece(&self) -> PieceIndex {
        self.piece
    }

    /// The piece's length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the piece is empty (a zero-length file's only piece).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Write, sync, and record the piece (blocking; run it on a blocking
    /// thread). `failed` are earlier pieces of this file whose job failed:
    /// they are left out of the bitfield.
    pub fn run(self, failed: &[PieceIndex]) -> Result<(), StoreError> {
        let file = self.file;
        let skip = BTreeMap::from([(file, failed.to_vec())]);
        Self::run_batch(vec![self], &skip).pop().map_or(Ok(()), |(_, _, result)| result)
    }

    /// Run consecutive jobs as one: every piece's bytes written, one sync
    /// per data file, then one bitfield per file (the last job's, which
    /// names every earlier queued piece). A slow disk then costs a few
    /// syncs per batch, not three per piece. `failed` are earlier pieces
    /// whose job failed, by file; pieces failing here are left out too.
    /// Returns each job's file, piece and result, in order.
    #[must_use]
    pub fn run_batch(
        jobs: Vec<PieceWrite>,
        failed: &BTreeMap<FileId, Vec<PieceIndex>>,
    ) -> Vec<(FileId, PieceIndex, Result<(), StoreError>)> {
        let mut results: Vec<(FileId, PieceIndex, Result<(), StoreError>)> = Vec::with_capacity(jobs.len());
        let mut handles: BTreeMap<PathBuf, File> = BTreeMap::new();
        for job in &jobs {
            let path = &job.data_path;
            let written = match handles.get(path) {
                Some(handle) => Ok(handle),
                None => OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_error("open", path))
                    .map(|handle| &*handles.entry(path.clone()).or_insert(handle)),
            }
            .and_then(|handle| handle.write_all_at(&job.data, job.offset).map_err(io_error("write", path)));
            results.push((job.file, job.piece, written));
        }
        // Only with the bytes durable may their bits become durable.
        for (path, handle) in &handles {
            if let Err(source) = handle.sync_data() {
                for (job, result) in jobs.iter().zip(results.iter_mut()) {
                    if job.data_path == *path && result.2.is_ok() {
                        let source = io::Error::new(source.kind(), source.to_string());
                        result.2 = Err(StoreError::Io { op: "fsync", path: path.clone(), source });
                    }
                }
            }
        }
        let mut last_of_file: BTreeMap<FileId, usize> = BTreeMap::new();
        for (index, job) in jobs.iter().enumerate() {
            last_of_file.insert(job.file, index);
        }
        for (file, last) in last_of_file {
            let job = &jobs[last];
            let mut held = job.held.clone();
            for &piece in failed.get(&file).into_iter().flatten() {
                held.remove(piece);
            }
            for (_, piece, result) in results.iter().filter(|(f, _, _)| *f == file) {
                if result.is_err() {
                    held.remove(*piece);
                }
            }
            if let Err(error) = replace_atomically(&job.dir, HELD_FILE, HELD_TMP_FILE, &encode_held(&held)) {
                let message = error.to_string();
                for result in results.iter_mut().filter(|(f, _, r)| *f == file && r.is_ok()) {
                    let source = io::Error::other(message.clone());
                    result.2 = Err(StoreError::Io { op: "record held pieces in", path: job.dir.clone(), source });
                }
            }
        }
        results
    }
}

/// What open did about a file directory it could not fully trust.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Recovery {
    /// The directory is not tracked (left on disk untouched; creating the
    /// same file again replaces it).
    Skipped,
    /// The file is tracked with nothing held (bad or missing bitfield).
    HeldReset,
    /// The data file was missing or had the wrong length; it was recreated
    /// empty and nothing is held.
    DataRecreated,
    /// A leftover staging or removal directory that could not be deleted.
    LeftoverKept,
}

/// One problem found by [`DiskStore::open`], and what was done about it.
#[derive(Debug)]
pub struct LoadIssue {
    /// The directory or file concerned.
    pub path: PathBuf,
    /// What was wrong.
    pub error: StoreError,
    /// What open did about it.
    pub recovery: Recovery,
}

/// How a shared file looked when it was shared; it is served only while it
/// still looks the same.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
struct SharedRecord {
    /// The absolute path, as raw bytes (Unix paths need not be UTF-8).
    path: Vec<u8>,
    file_bytes: u64,
    mtime_s: i64,
    mtime_ns: i64,
}

impl SharedRecord {
    fn path(&self) -> PathBuf {
        PathBuf::from(OsStr::from_bytes(&self.path))
    }
}

#[derive(Clone, Debug)]
enum Source {
    /// A download into `<dir>/data`.
    Download { data: PathBuf },
    /// A local file served in place.
    Shared { path: PathBuf, record: SharedRecord },
}

#[derive(Debug)]
struct DiskFile {
    meta: FileMeta,
    dir: PathBuf,
    held: HeldPieces,
    source: Source,
}

/// The daemon's crash-safe store, one per data directory.
///
/// Layout under the data directory:
/// ```text
/// lock                         flock'd while a DiskStore is open (one process per data dir)
/// files/<file-id-hex>/
///     manifest                 postcard FileManifest::to_bytes; re-validated on load
///     hashes                   32 B per piece, only when the manifest lacks them;
///                              checked against the manifest root on load
///     data                     a download's bytes, preallocated to the file length
///     held                     a download's held-pieces bitfield (format below)
///     shared                   instead of data + held: a shared file's original path,
///                              length and mtime
/// files/.staging-<hex>/        a file being created; deleted on open
/// files/.removing-<hex>/       a file being removed; deleted on open
/// ```
///
/// Crash safety (a `kill -9` or power loss at any moment):
/// - A file directory appears whole or not at all: it is built under
///   `.staging-`, every file in it fsynced, then renamed into place and the
///   parent directory fsynced.
/// - A piece is written with `pwrite`, `sync_data`ed, and only then is its
///   bit set and the bitfield replaced atomically (write `held.tmp`, fsync
///   it, rename over `held`, fsync the directory). A crash therefore loses
///   at most the piece in flight, and a held bit always names bytes that
///   reached the disk after their hash was checked.
/// - Everything read back is untrusted: a manifest that fails validation or
///   hashes that miss the root make the file skipped and reported in
///   [`DiskStore::load_issues`]; a missing or corrupt bitfield means
///   "nothing held"; a missing or wrong-length data file is recreated empty.
///
/// Memory is bounded whatever the file size: pieces are written as given,
/// blocks are read with `pread` a bounded chunk of their piece at a time
/// ([`ReadAhead`]), shared files are never loaded whole.
///
/// Bitfield format: `"shoalhv1"`, piece count (u32 LE), the packed bits
/// (MSB first), then SHA-256 of everything before it. The shared record is
/// postcard, then SHA-256 of it.
#[derive(Debug)]
pub struct DiskStore {
    data_dir: PathBuf,
    files_dir: PathBuf,
    /// Holds the flock for as long as the store is open.
    _lock: File,
    files: BTreeMap<FileId, DiskFile>,
    issues: Vec<LoadIssue>,
    /// Open read handles (at most [`READ_HANDLES_MAX`]).
    readers: BTreeMap<FileId, File>,
    /// Blocks read ahead of the requests for them (bounded; see
    /// [`ReadAhead`]).
    read_ahead: ReadAhead,
    /// Pieces handed out as [`PieceWrite`] jobs and not yet committed:
    /// served from here, not yet held. Bounded by the caller's queue.
    queued: BTreeMap<(FileId, PieceIndex), Bytes>,
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// fsync a directory, so that entries created or renamed in it persist.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|handle| handle.sync_all()).map_err(io_error("fsync directory", dir))
}

/// Create or truncate `path` with `bytes`, fsynced.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut file = File::create(path).map_err(io_error("create", path))?;
    file.write_all(bytes).map_err(io_error("write", path))?;
    file.sync_all().map_err(io_error("fsync", path))
}

/// Replace `dir/name` atomically: a crash leaves the old or the new content.
fn replace_atomically(dir: &Path, name: &str, tmp_name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(tmp_name);
    let target = dir.join(name);
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, &target).map_err(io_error("rename over", &target))?;
    sync_dir(dir)
}

/// Read a whole small file, refusing one longer than `max_bytes`.
fn read_capped(path: &Path, max_bytes: u64) -> Result<Vec<u8>, StoreError> {
    let file = File::open(path).map_err(io_error("open", path))?;
    let mut bytes = Vec::new();
    file.take(max_bytes + 1).read_to_end(&mut bytes).map_err(io_error("read", path))?;
    if bytes.len() as u64 > max_bytes {
        return Err(corrupt(path, format!("longer than the {max_bytes}-byte limit")));
    }
    Ok(bytes)
}

/// Give `file` its full length, reserving the blocks where the filesystem
/// can (so a full disk fails here, not in the middle of a download).
fn preallocate(file: &File, path: &Path, file_bytes: u64) -> Result<(), StoreError> {
    if file_bytes > 0 {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, file_bytes) {
            Ok(()) => return Ok(()),
            // Filesystems without fallocate still take a sparse length.
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {}
            Err(errno) => {
                return Err(StoreError::Io { op: "preallocate", path: path.to_path_buf(), source: errno.into() });
            }
        }
    }
    file.set_len(file_bytes).map_err(io_error("set length of", path))
}

/// Create `path` as an empty, preallocated, fsynced data file.
fn create_data_file(path: &Path, file_bytes: u64) -> Result<(), StoreError> {
    let file = File::create(path).map_err(io_error("create", path))?;
    preallocate(&file, path, file_bytes)?;
    file.sync_all().map_err(io_error("fsync", path))
}

fn encode_held(held: &HeldPieces) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HELD_MAGIC.len() + 4 + held.packed().len() + CHECKSUM_BYTES);
    bytes.extend_from_slice(HELD_MAGIC);
    bytes.extend_from_slice(&held.piece_count().to_le_bytes());
    bytes.extend_from_slice(held.packed());
    let checksum = content::hash_piece(&bytes);
    bytes.extend_from_slice(&checksum.0);
    bytes
}

fn decode_held(bytes: &[u8], piece_count: u32) -> Result<HeldPieces, String> {
    let packed_len = piece_count.div_ceil(8) as usize;
    let expected_len = HELD_MAGIC.len() + 4 + packed_len + CHECKSUM_BYTES;
    if bytes.len() != expected_len {
        return Err(format!("{} bytes, expected {expected_len}", bytes.len()));
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
    if content::hash_piece(body).0 != checksum {
        return Err("checksum mismatch".into());
    }
    let (magic, rest) = body.split_at(HELD_MAGIC.len());
    let (count, packed) = rest.split_at(4);
    if magic != HELD_MAGIC {
        return Err("not a bitfield file".into());
    }
    if count != piece_count.to_le_bytes() {
        return Err("bitfield is for another piece count".into());
    }
    HeldPieces::from_packed(piece_count, packed.to_vec()).ok_or_else(|| "spare bits set".to_string())
}

/// The record, then SHA-256 of it: a damaged record must not point the
/// store at some other file.
fn encode_shared(record: &SharedRecord) -> Vec<u8> {
    // Serialising plain owned data into a Vec cannot fail.
    let mut bytes = postcard::to_allocvec(record).unwrap_or_default();
    let checksum = content::hash_piece(&bytes);
    bytes.extend_from_slice(&checksum.0);
    bytes
}

fn decode_shared(bytes: &[u8]) -> Result<SharedRecord, String> {
    let Some(body_len) = bytes.len().checked_sub(CHECKSUM_BYTES) else {
        return Err(format!("{} bytes is too short", bytes.len()));
    };
    let (body, checksum) = bytes.split_at(body_len);
    if content::hash_piece(body).0 != checksum {
        return Err("checksum mismatch".into());
    }
    let (record, rest) = postcard::take_from_bytes(body).map_err(|error| error.to_string())?;
    if !rest.is_empty() {
        return Err("trailing bytes".into());
    }
    Ok(record)
}

/// Length and mtime, as recorded for a shared file.
fn shape(metadata: &fs::Metadata) -> (u64, (i64, i64)) {
    (metadata.len(), (metadata.mtime(), metadata.mtime_nsec()))
}

impl DiskStore {
    /// Open (creating if needed) the store under `data_dir` and load every
    /// file in it. Fails only if the directory cannot be used or another
    /// process has it open; problems with individual files are recovered
    /// from and listed in [`load_issues`](Self::load_issues).
    pub fn open(data_dir: impl AsRef<Path>) -> Result<Self, StoreError> {
        let data_dir = data_dir.as_ref().to_path_buf();
        let files_dir = data_dir.join(FILES_DIR);
        fs::create_dir_all(&files_dir).map_err(io_error("create directory", &files_dir))?;
        // Make `files/` itself durable before anything is committed in it.
        sync_dir(&data_dir)?;
        let lock_path = data_dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_error("open", &lock_path))?;
        match rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(StoreError::Locked { dir: data_dir, lock: lock_path });
            }
            Err(errno) => return Err(StoreError::Io { op: "lock", path: lock_path, source: errno.into() }),
        }
        let mut store = Self {
            data_dir,
            files_dir,
            _lock: lock,
            files: BTreeMap::new(),
            issues: Vec::new(),
            readers: BTreeMap::new(),
            read_ahead: ReadAhead::default(),
            queued: BTreeMap::new(),
        };
        store.load_all()?;
        Ok(store)
    }

    /// The data directory.
    #[must_use]
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Problems found when the store was opened.
    #[must_use]
    pub fn load_issues(&self) -> &[LoadIssue] {
        &self.issues
    }

    /// Where a file's bytes live: the data file of a download, the original
    /// of a shared file.
    #[must_use]
    pub fn data_path(&self, file: &FileId) -> Option<&Path> {
        self.files.get(file).map(|entry| match &entry.source {
            Source::Download { data } => data.as_path(),
            Source::Shared { path, .. } => path.as_path(),
        })
    }

    /// Re-read every held piece of `file` and check it against its hash
    /// (a scrub, for after a power loss or on an operator's request; a
    /// crash alone never needs it). Memory: one piece buffer. Returns the
    /// pieces that failed. A download stops holding them (persisted); a
    /// shared file is left as it is (share it again), since its pieces are
    /// the user's file.
    pub fn verify_held(&mut self, file: &FileId) -> Result<Vec<PieceIndex>, StoreError> {
        let entry = self.files.get_mut(file).ok_or(StoreError::UnknownFile { file: *file })?;
        let path = match &entry.source {
            Source::Download { data } => data,
            Source::Shared { path, .. } => path,
        };
        let handle = File::open(path).map_err(io_error("open", path))?;
        let layout = entry.meta.layout;
        // Piece 0 is the longest piece (0 bytes for an empty file).
        let mut buffer = vec![0u8; layout.piece_len(PieceIndex(0)) as usize];
        let mut failed = Vec::new();
        for piece in entry.held.indices() {
            let bytes = &mut buffer[..layout.piece_len(piece) as usize];
            let read = handle.read_exact_at(bytes, layout.piece_offset(piece));
            if read.is_err() || !content::verify_piece(&entry.meta.hashes[piece.0 as usize], bytes) {
                failed.push(piece);
            }
        }
        if failed.is_empty() || matches!(entry.source, Source::Shared { .. }) {
            return Ok(failed);
        }
        let mut held = entry.held.clone();
        for &piece in &failed {
            held.remove(piece);
        }
        replace_atomically(&entry.dir, HELD_FILE, HELD_TMP_FILE, &encode_held(&held))?;
        entry.held = held;
        Ok(failed)
    }

    fn load_all(&mut self) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.files_dir).map_err(io_error("list", &self.files_dir))?;
        let mut names = Vec::new();
        for entry in entries {
            names.push(entry.map_err(io_error("list", &self.files_dir))?.file_name());
        }
        names.sort();
        for name in names {
            let path = self.files_dir.join(&name);
            let text = name.to_string_lossy();
            if text.starts_with(STAGING_PREFIX) || text.starts_with(REMOVING_PREFIX) {
                // An interrupted create or remove: never visible as a file.
                if let Err(source) = fs::remove_dir_all(&path) {
                    let error = StoreError::Io { op: "delete leftover", path: path.clone(), source };
                    self.issues.push(LoadIssue { path, error, recovery: Recovery::LeftoverKept });
                }
                continue;
            }
            let Ok(id) = text.parse::<FileId>() else {
                let error = corrupt(&path, "name is not a file id");
                self.issues.push(LoadIssue { path, error, recovery: Recovery::Skipped });
                continue;
            };
            match self.load_file(id, &path) {
                Ok(file) => {
                    self.files.insert(id, file);
                }
                Err(error) => self.issues.push(LoadIssue { path, error, recovery: Recovery::Skipped }),
            }
        }
        Ok(())
    }

    /// Load one file directory; `Err` means it is skipped. Recoverable
    /// problems are pushed to `issues` and the file is loaded.
    fn load_file(&mut self, id: FileId, dir: &Path) -> Result<DiskFile, StoreError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let bytes = read_capped(&manifest_path, MANIFEST_BYTES_MAX)?;
        let (manifest, manifest_id) = FileManifest::from_bytes(&bytes)
            .map_err(|source| StoreError::InvalidManifest { path: Some(manifest_path.clone()), source })?;
        if manifest_id != id {
            return Err(corrupt(&manifest_path, format!("manifest is for file {manifest_id}")));
        }
        let layout = manifest
            .layout()
            .map_err(|source| StoreError::InvalidManifest { path: Some(manifest_path.clone()), source })?;
        let meta = match &manifest.piece_hashes {
            Some(hashes) => FileMeta::new(&manifest, hashes, Some(&manifest_path))?,
            None => {
                let hashes_path = dir.join(HASHES_FILE);
                let expected = u64::from(layout.piece_count()) * 32;
                let on_disk = fs::metadata(&hashes_path).map_err(io_error("stat", &hashes_path))?.len();
                if on_disk != expected {
                    return Err(corrupt(&hashes_path, format!("{on_disk} bytes, expected {expected}")));
                }
                let bytes = read_capped(&hashes_path, expected)?;
                let hashes: Vec<PieceHash> = bytes
                    .chunks_exact(32)
                    .map(|chunk| {
                        let mut hash = [0u8; 32];
                        hash.copy_from_slice(chunk);
                        PieceHash(hash)
                    })
                    .collect();
                FileMeta::new(&manifest, &hashes, Some(&manifest_path))
                    .map_err(|error| corrupt(&hashes_path, error.to_string()))?
            }
        };
        let shared_path = dir.join(SHARED_FILE);
        if shared_path.exists() {
            let bytes = read_capped(&shared_path, SHARED_RECORD_BYTES_MAX)?;
            let record = decode_shared(&bytes).map_err(|reason| corrupt(&shared_path, reason))?;
            if record.file_bytes != layout.file_bytes() {
                return Err(corrupt(&shared_path, "recorded length differs from the manifest"));
            }
            let held = HeldPieces::all(layout.piece_count());
            let source = Source::Shared { path: record.path(), record };
            return Ok(DiskFile { meta, dir: dir.to_path_buf(), held, source });
        }

        let data = dir.join(DATA_FILE);
        let data_ok =
            fs::metadata(&data).is_ok_and(|metadata| metadata.is_file() && metadata.len() == layout.file_bytes());
        let piece_count = layout.piece_count();
        let held = if data_ok {
            let held_path = dir.join(HELD_FILE);
            let decoded = read_capped(&held_path, u64::from(piece_count.div_ceil(8)) + 64)
                .and_then(|bytes| decode_held(&bytes, piece_count).map_err(|reason| corrupt(&held_path, reason)));
            decoded.unwrap_or_else(|error| {
                self.issues.push(LoadIssue { path: held_path, error, recovery: Recovery::HeldReset });
                HeldPieces::none(piece_count)
            })
        } else {
            let none = HeldPieces::none(piece_count);
            // Bitfield first: a crash between the two must not leave old
            // bits over a fresh (zeroed) data file.
            replace_atomically(dir, HELD_FILE, HELD_TMP_FILE, &encode_held(&none))?;
            create_data_file(&data, layout.file_bytes())?;
            sync_dir(dir)?;
            let error = corrupt(&data, format!("missing or not {} bytes long", layout.file_bytes()));
            self.issues.push(LoadIssue { path: data.clone(), error, recovery: Recovery::DataRecreated });
            none
        };
        Ok(DiskFile { meta, dir: dir.to_path_buf(), held, source: Source::Download { data } })
    }

    fn file_dir(&self, id: &FileId) -> PathBuf {
        self.files_dir.join(id.to_string())
    }

    /// Start a file directory under `.staging-`: manifest, and hashes when
    /// the manifest lacks them.
    fn stage(&self, meta: &FileMeta) -> Result<PathBuf, StoreError> {
        let staging = self.files_dir.join(format!("{STAGING_PREFIX}{}", meta.id));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_error("delete leftover", &staging))?;
        }
        fs::create_dir(&staging).map_err(io_error("create directory", &staging))?;
        write_synced(&staging.join(MANIFEST_FILE), &meta.manifest.to_bytes())?;
        if meta.manifest.piece_hashes.is_none() {
            let bytes: Vec<u8> = meta.hashes.iter().flat_map(|hash| hash.0).collect();
            write_synced(&staging.join(HASHES_FILE), &bytes)?;
        }
        Ok(staging)
    }

    /// Move a complete staging directory into place, replacing any
    /// untracked directory of the same id (one that failed to load).
    fn commit_staged(&self, staging: &Path, id: &FileId) -> Result<PathBuf, StoreError> {
        sync_dir(staging)?;
        let target = self.file_dir(id);
        if target.exists() {
            self.delete_dir(&target, id)?;
        }
        fs::rename(staging, &target).map_err(io_error("rename into place", &target))?;
        sync_dir(&self.files_dir)?;
        Ok(target)
    }

    /// Delete a file directory so that a crash midway leaves nothing that
    /// loads: rename it aside first, then delete.
    fn delete_dir(&self, dir: &Path, id: &FileId) -> Result<(), StoreError> {
        let removing = self.files_dir.join(format!("{REMOVING_PREFIX}{id}"));
        if removing.exists() {
            fs::remove_dir_all(&removing).map_err(io_error("delete leftover", &removing))?;
        }
        fs::rename(dir, &removing).map_err(io_error("rename aside", dir))?;
        sync_dir(&self.files_dir)?;
        fs::remove_dir_all(&removing).map_err(io_error("delete", &removing))
    }

    /// Run `build` on a fresh staging directory and move it into place,
    /// deleting the staging directory if anything fails.
    fn create_dir_with(
        &self,
        meta: &FileMeta,
        build: impl FnOnce(&Path) -> Result<(), StoreError>,
    ) -> Result<PathBuf, StoreError> {
        let staging = self.stage(meta)?;
        let result = build(&staging).and_then(|()| self.commit_staged(&staging, &meta.id));
        if result.is_err() {
            // Best effort: open deletes leftovers anyway.
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Write a piece (hash-checked if `hash`), make it durable, then mark
    /// it held.
    fn store_piece(&mut self, file: &FileId, piece: PieceIndex, data: &[u8], hash: bool) -> Result<(), StoreError> {
        let entry = self.files.get_mut(file).ok_or(StoreError::UnknownFile { file: *file })?;
        entry.meta.check_piece_index(piece)?;
        if entry.held.contains(piece) {
            return Ok(());
        }
        entry.meta.check_piece(piece, data, hash)?;
        let Source::Download { data: path } = &entry.source else {
            // Shared files hold every piece, so this is never reached; never
            // write into a user's file regardless.
            return Ok(());
        };
        let handle = OpenOptions::new().write(true).open(path).map_err(io_error("open", path))?;
        handle.write_all_at(data, entry.meta.layout.piece_offset(piece)).map_err(io_error("write", path))?;
        handle.sync_data().map_err(io_error("fsync", path))?;
        // Only now, with the bytes durable, may the bit become durable.
        let mut held = entry.held.clone();
        held.insert(piece);
        replace_atomically(&entry.dir, HELD_FILE, HELD_TMP_FILE, &encode_held(&held))?;
        entry.held = held;
        Ok(())
    }

    fn file(&self, file: &FileId) -> Result<&DiskFile, StoreError> {
        self.files.get(file).ok_or(StoreError::UnknownFile { file: *file })
    }
}

impl Store for DiskStore {
    /// The local file's path; it is served from there, never copied.
    type SharedSource = PathBuf;

    fn create(&mut self, manifest: &FileManifest, piece_hashes: &[PieceHash]) -> Result<FileId, StoreError> {
        let meta = FileMeta::new(manifest, piece_hashes, None)?;
        let id = meta.id;
        if self.files.contains_key(&id) {
            return Ok(id);
        }
        let piece_count = meta.layout.piece_count();
        let held = HeldPieces::none(piece_count);
        let file_bytes = meta.layout.file_bytes();
        let dir = self.create_dir_with(&meta, |staging| {
            create_data_file(&staging.join(DATA_FILE), file_bytes)?;
            write_synced(&staging.join(HELD_FILE), &encode_held(&held))
        })?;
        let source = Source::Download { data: dir.join(DATA_FILE) };
        self.files.insert(id, DiskFile { meta, dir, held, source });
        Ok(id)
    }

    fn add_shared(
        &mut self,
        source: PathBuf,
        manifest: &FileManifest,
        piece_hashes: &[PieceHash],
    ) -> Result<FileId, StoreError> {
        let meta = FileMeta::new(manifest, piece_hashes, None)?;
        let id = meta.id;
        if self.files.contains_key(&id) {
            return Err(StoreError::AlreadyTracked { file: id });
        }
        // Absolute, so the daemon finds it whatever its working directory.
        let path = fs::canonicalize(&source).map_err(io_error("resolve", &source))?;
        let metadata = fs::metadata(&path).map_err(io_error("stat", &path))?;
        if !metadata.is_file() {
            let not_file = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
            return Err(StoreError::Io { op: "share", path, source: not_file });
        }
        let (file_bytes, (mtime_s, mtime_ns)) = shape(&metadata);
        if file_bytes != meta.layout.file_bytes() {
            return Err(StoreError::SharedLength { path, expected: meta.layout.file_bytes(), got: file_bytes });
        }
        let record = SharedRecord { path: path.as_os_str().as_bytes().to_vec(), file_bytes, mtime_s, mtime_ns };
        let encoded = encode_shared(&record);
        let dir = self.create_dir_with(&meta, |staging| write_synced(&staging.join(SHARED_FILE), &encoded))?;
        let held = HeldPieces::all(meta.layout.piece_count());
        self.files.insert(id, DiskFile { meta, dir, held, source: Source::Shared { path, record } });
        Ok(id)
    }

    fn share_path(
        &mut self,
        path: &Path,
        manifest: &FileManifest,
        piece_hashes: &[PieceHash],
    ) -> Result<FileId, StoreError> {
        self.add_shared(path.to_path_buf(), manifest, piece_hashes)
    }

    fn write_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> Result<(), StoreError> {
        self.store_piece(file, piece, &data, true)
    }

    fn write_verified_piece(&mut self, file: &FileId, piece: PieceIndex, data: Bytes) -> Result<(), StoreError> {
        self.store_piece(file, piece, &data, false)
    }

    fn prepare_write(
        &mut self,
        file: &FileId,
        piece: PieceIndex,
        data: Bytes,
    ) -> Option<Result<Option<PieceWrite>, StoreError>> {
        let Some(entry) = self.files.get(file) else { return Some(Err(StoreError::UnknownFile { file: *file })) };
        if let Err(error) = entry.meta.check_piece(piece, &data, false) {
            return Some(Err(error));
        }
        let Source::Download { data: data_path } = &entry.source else {
            return Some(Ok(None)); // a shared file holds every piece
        };
        if entry.held.contains(piece) || self.queued.contains_key(&(*file, piece)) {
            return Some(Ok(None));
        }
        let mut held = entry.held.clone();
        for &(_, queued) in self.queued.range((*file, PieceIndex(0))..=(*file, PieceIndex(u32::MAX))).map(|(k, _)| k) {
            held.insert(queued);
        }
        held.insert(piece);
        let job = PieceWrite {
            file: *file,
            piece,
            data_path: data_path.clone(),
            offset: entry.meta.layout.piece_offset(piece),
            data: data.clone(),
            dir: entry.dir.clone(),
            held,
        };
        self.queued.insert((*file, piece), data);
        Some(Ok(Some(job)))
    }

    fn commit_write(
        &mut self,
        file: &FileId,
        piece: PieceIndex,
        result: Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.queued.remove(&(*file, piece));
        result?;
        if let Some(entry) = self.files.get_mut(file) {
            entry.held.insert(piece);
        }
        Ok(())
    }

    fn read_block(&mut self, file: &FileId, piece: PieceIndex, offset: u32, length: u32) -> Result<Bytes, StoreError> {
        let entry = self.files.get(file).ok_or(StoreError::UnknownFile { file: *file })?;
        entry.meta.check_block(piece, offset, length)?;
        if !entry.held.contains(piece) {
            // Verified and on its way to disk: serve it from memory.
            let Some(data) = self.queued.get(&(*file, piece)) else {
                return Err(StoreError::NotHeld { file: *file, piece });
            };
            return Ok(data.slice(offset as usize..(offset + length) as usize));
        }
        let (path, record) = match &entry.source {
            Source::Download { data } => (data, None),
            Source::Shared { path, record } => (path, Some(record)),
        };
        // A shared original is checked before every read from it (one
        // `fstat` of the open handle); a download's data file is ours.
        let mut checked = None;
        if record.is_some()
            && let Some(cached) = self.readers.get(file)
        {
            let metadata = cached.metadata().map_err(io_error("stat", path))?;
            if metadata.nlink() == 0 {
                // The original was deleted or replaced since it was opened:
                // look at the path again.
                self.readers.remove(file);
                self.read_ahead.forget(file);
            } else {
                checked = Some(metadata);
            }
        }
        if !self.readers.contains_key(file) {
            if self.readers.len() >= READ_HANDLES_MAX {
                self.readers.pop_first();
            }
            self.readers.insert(*file, File::open(path).map_err(io_error("open", path))?);
        }
        let Some(handle) = self.readers.get(file) else {
            return Err(StoreError::UnknownFile { file: *file });
        };
        if let Some(record) = record {
            // Check the opened file itself, so a swap between stat and read
            // cannot slip through.
            let metadata = match checked {
                Some(metadata) => metadata,
                None => handle.metadata().map_err(io_error("stat", path))?,
            };
            let (got_bytes, got_mtime) = shape(&metadata);
            let expected_mtime = (record.mtime_s, record.mtime_ns);
            if got_bytes != record.file_bytes || got_mtime != expected_mtime {
                return Err(StoreError::SharedFileChanged {
                    path: path.clone(),
                    expected_bytes: record.file_bytes,
                    expected_mtime,
                    got_bytes,
                    got_mtime,
                });
            }
        }
        if let Some(block) = self.read_ahead.block(file, piece, offset, length) {
            return Ok(block);
        }
        // `check_block` bounds the block within the piece.
        let chunk_len = READ_AHEAD_BYTES.min(entry.meta.layout.piece_len(piece) - offset);
        let mut buffer = self.read_ahead.buffer();
        let position = entry.meta.layout.piece_offset(piece) + u64::from(offset);
        handle.read_exact_at(&mut buffer[..chunk_len as usize], position).map_err(io_error("read", path))?;
        let buffer = buffer.freeze();
        let block = buffer.slice(..length as usize);
        self.read_ahead.insert(*file, piece, offset, chunk_len, buffer);
        Ok(block)
    }

    fn held(&self, file: &FileId) -> Result<HeldPieces, StoreError> {
        self.file(file).map(|entry| entry.held.clone())
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
                shared: matches!(entry.source, Source::Shared { .. }),
            })
            .collect()
    }

    fn remove(&mut self, file: &FileId) -> Result<(), StoreError> {
        let dir = self.file(file)?.dir.clone();
        self.readers.remove(file);
        self.read_ahead.forget(file);
        self.queued.retain(|(queued, _), _| queued != file);
        // Deletes only the store's own directory: a shared original lives
        // elsewhere and is never touched.
        let result = self.delete_dir(&dir, file);
        // Once renamed aside the file is gone whatever failed after that.
        if !dir.exists() {
            self.files.remove(file);
        }
        result
    }
}
