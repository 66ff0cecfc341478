//! One trait-level suite run against both stores, then the disk store's own
//! cases: reopen, locking, shared files, and damaged files on disk.

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::disk::Recovery;
use super::*;
use crate::core::content::{BLOCK_BYTES, Layout, PIECE_BYTES_MIN, hash_buf_read};

/// Content that differs in every piece, so an offset bug cannot hide.
fn bytes_for(len: usize, seed: u64) -> Vec<u8> {
    crate::core::content::synthetic_bytes(seed, len)
}

struct Sample {
    data: Vec<u8>,
    manifest: FileManifest,
    hashes: Vec<PieceHash>,
    id: FileId,
    layout: Layout,
}

impl Sample {
    /// `len` bytes in pieces of `piece_bytes`; `inline` keeps the hashes in
    /// the manifest (else they are stored on their own).
    fn new(len: usize, piece_bytes: u32, seed: u64, inline: bool) -> Self {
        let data = bytes_for(len, seed);
        let layout = Layout::new(len as u64, piece_bytes).unwrap();
        let content = hash_buf_read(&data[..], layout).unwrap();
        let mut manifest = FileManifest::new("sample.bin", &content).unwrap();
        if !inline {
            manifest.piece_hashes = None;
        }
        Self { data, manifest, hashes: content.piece_hashes, id: content.file_id, layout }
    }

    /// 5 pieces of 16 KiB plus a short last one.
    fn small(seed: u64) -> Self {
        Self::new(5 * PIECE_BYTES_MIN as usize + 1234, PIECE_BYTES_MIN, seed, true)
    }

    fn piece(&self, index: u32) -> Bytes {
        let piece = PieceIndex(index);
        let start = self.layout.piece_offset(piece) as usize;
        Bytes::copy_from_slice(&self.data[start..start + self.layout.piece_len(piece) as usize])
    }

    fn block(&self, index: u32, offset: u32, length: u32) -> &[u8] {
        let start = self.layout.piece_offset(PieceIndex(index)) as usize + offset as usize;
        &self.data[start..start + length as usize]
    }

    fn pieces(&self) -> u32 {
        self.layout.piece_count()
    }
}

/// Every whole block of every held piece reads back as the original.
fn assert_blocks_match<S: Store>(store: &mut S, sample: &Sample) {
    for piece in store.held(&sample.id).unwrap().indices() {
        for block in 0..sample.layout.block_count(piece) {
            let length = sample.layout.block_len(piece, block);
            let got = store.read_block(&sample.id, piece, block * BLOCK_BYTES, length).unwrap();
            assert_eq!(&got[..], sample.block(piece.0, block * BLOCK_BYTES, length), "{piece:?} block {block}");
        }
    }
}

// ---- the trait-level suite ----

fn suite_write_then_read<S: Store>(store: &mut S) {
    let sample = Sample::small(1);
    assert_eq!(store.create(&sample.manifest, &sample.hashes).unwrap(), sample.id);
    assert_eq!(store.held(&sample.id).unwrap().count(), 0);
    assert_eq!(store.manifest(&sample.id), Some(&sample.manifest));
    assert_eq!(store.piece_hashes(&sample.id), Some(&sample.hashes[..]));
    let order = [3, 0, 5, 1];
    for (written, &index) in order.iter().enumerate() {
        store.write_piece(&sample.id, PieceIndex(index), sample.piece(index)).unwrap();
        let held = store.held(&sample.id).unwrap();
        assert!(held.contains(PieceIndex(index)));
        assert_eq!(held.count() as usize, written + 1);
    }
    let held = store.held(&sample.id).unwrap();
    assert_eq!(held.indices(), vec![PieceIndex(0), PieceIndex(1), PieceIndex(3), PieceIndex(5)]);
    assert_eq!(held.missing(), vec![PieceIndex(2), PieceIndex(4)]);
    assert_blocks_match(store, &sample);
    // An unaligned read inside a piece, and the whole short last piece.
    let got = store.read_block(&sample.id, PieceIndex(1), 1000, 77).unwrap();
    assert_eq!(&got[..], sample.block(1, 1000, 77));
    let got = store.read_block(&sample.id, PieceIndex(5), 0, 1234).unwrap();
    assert_eq!(&got[..], sample.block(5, 0, 1234));
    assert_eq!(store.files(), vec![FileStatus { file: sample.id, held_pieces: 4, piece_count: 6, shared: false }]);
    // Writing a held piece again changes nothing; creating again neither.
    store.write_piece(&sample.id, PieceIndex(3), sample.piece(3)).unwrap();
    assert_eq!(store.create(&sample.manifest, &sample.hashes).unwrap(), sample.id);
    assert_eq!(store.held(&sample.id).unwrap(), held);
    for index in [2, 4] {
        store.write_piece(&sample.id, PieceIndex(index), sample.piece(index)).unwrap();
    }
    assert!(store.held(&sample.id).unwrap().is_complete());
    assert_blocks_match(store, &sample);
}

fn suite_rejects_bad_pieces<S: Store>(store: &mut S) {
    let sample = Sample::small(2);
    store.create(&sample.manifest, &sample.hashes).unwrap();
    let mut tampered = sample.piece(2).to_vec();
    tampered[100] ^= 1;
    assert!(matches!(
        store.write_piece(&sample.id, PieceIndex(2), tampered.into()),
        Err(StoreError::PieceHashMismatch { piece: PieceIndex(2), .. })
    ));
    // Another piece's (valid) bytes are not this piece.
    assert!(matches!(
        store.write_piece(&sample.id, PieceIndex(2), sample.piece(1)),
        Err(StoreError::PieceHashMismatch { .. })
    ));
    assert!(matches!(
        store.write_piece(&sample.id, PieceIndex(5), sample.piece(4)),
        Err(StoreError::WrongPieceLength { expected: 1234, got, .. }) if got == PIECE_BYTES_MIN as usize
    ));
    assert!(matches!(
        store.write_piece(&sample.id, PieceIndex(6), sample.piece(5)),
        Err(StoreError::PieceOutOfRange { piece_count: 6, .. })
    ));
    let unknown = FileId([9; 32]);
    assert!(matches!(
        store.write_piece(&unknown, PieceIndex(0), sample.piece(0)),
        Err(StoreError::UnknownFile { file }) if file == unknown
    ));
    assert!(matches!(store.held(&unknown), Err(StoreError::UnknownFile { .. })));
    assert!(matches!(store.read_block(&unknown, PieceIndex(0), 0, 1), Err(StoreError::UnknownFile { .. })));
    assert_eq!(store.held(&sample.id).unwrap().count(), 0, "a rejected piece was counted");
    // A piece the caller verified skips the hash, not the other checks.
    assert!(matches!(
        store.write_verified_piece(&sample.id, PieceIndex(5), sample.piece(4)),
        Err(StoreError::WrongPieceLength { .. })
    ));
    assert!(matches!(
        store.write_verified_piece(&sample.id, PieceIndex(6), sample.piece(5)),
        Err(StoreError::PieceOutOfRange { .. })
    ));
    store.write_verified_piece(&sample.id, PieceIndex(1), sample.piece(1)).unwrap();
    assert!(store.held(&sample.id).unwrap().contains(PieceIndex(1)));
    assert_eq!(store.read_block(&sample.id, PieceIndex(1), 0, 16).unwrap(), sample.block(1, 0, 16));
}

fn suite_block_bounds<S: Store>(store: &mut S) {
    let sample = Sample::small(3);
    store.create(&sample.manifest, &sample.hashes).unwrap();
    assert!(matches!(store.read_block(&sample.id, PieceIndex(0), 0, 16), Err(StoreError::NotHeld { .. })));
    for index in [0, 5] {
        store.write_piece(&sample.id, PieceIndex(index), sample.piece(index)).unwrap();
    }
    let bad = [
        (0, 0, 0),                  // empty
        (0, 0, BLOCK_BYTES + 1),    // longer than a block
        (0, 1, BLOCK_BYTES),        // past the piece end
        (0, PIECE_BYTES_MIN, 1),    // starts at the piece end
        (5, 0, 1235),               // past the short last piece
        (5, 1234, 1),               // starts at its end
        (0, u32::MAX, BLOCK_BYTES), // would overflow u32
    ];
    for (piece, offset, length) in bad {
        let result = store.read_block(&sample.id, PieceIndex(piece), offset, length);
        assert!(matches!(result, Err(StoreError::BadBlock { .. })), "({piece}, {offset}, {length}): {result:?}");
    }
    assert!(matches!(store.read_block(&sample.id, PieceIndex(6), 0, 1), Err(StoreError::PieceOutOfRange { .. })));
    // The largest legal reads do succeed.
    assert_eq!(store.read_block(&sample.id, PieceIndex(0), 0, BLOCK_BYTES).unwrap().len(), BLOCK_BYTES as usize);
    assert_eq!(store.read_block(&sample.id, PieceIndex(5), 1233, 1).unwrap()[..], *sample.block(5, 1233, 1));
}

fn suite_create_validates<S: Store>(store: &mut S) {
    let sample = Sample::small(4);
    assert!(matches!(
        store.create(&sample.manifest, &sample.hashes[1..]),
        Err(StoreError::WrongHashCount { expected: 6, got: 5, .. })
    ));
    let mut swapped = sample.hashes.clone();
    swapped.swap(0, 1);
    // A manifest without inline hashes is checked against the given list.
    let mut bare = sample.manifest.clone();
    bare.piece_hashes = None;
    assert!(matches!(store.create(&bare, &swapped), Err(StoreError::HashesMismatchRoot { .. })));
    let mut unsafe_name = sample.manifest.clone();
    unsafe_name.name = "../escape".into();
    assert!(matches!(store.create(&unsafe_name, &sample.hashes), Err(StoreError::InvalidManifest { .. })));
    let mut forged = sample.manifest.clone();
    forged.piece_hashes.as_mut().unwrap()[0].0[0] ^= 1;
    assert!(matches!(store.create(&forged, &sample.hashes), Err(StoreError::InvalidManifest { .. })));
    assert!(store.files().is_empty(), "a rejected file was tracked");
    // The bare manifest with the right hashes is accepted.
    assert_eq!(store.create(&bare, &sample.hashes).unwrap(), sample.id);
    store.write_piece(&sample.id, PieceIndex(4), sample.piece(4)).unwrap();
    assert_blocks_match(store, &sample);
}

fn suite_remove<S: Store>(store: &mut S) {
    let kept = Sample::small(5);
    let dropped = Sample::small(6);
    for sample in [&kept, &dropped] {
        store.create(&sample.manifest, &sample.hashes).unwrap();
        store.write_piece(&sample.id, PieceIndex(1), sample.piece(1)).unwrap();
    }
    assert_eq!(store.files().len(), 2);
    store.remove(&dropped.id).unwrap();
    assert!(matches!(store.remove(&dropped.id), Err(StoreError::UnknownFile { .. })));
    assert!(store.manifest(&dropped.id).is_none());
    assert!(matches!(store.held(&dropped.id), Err(StoreError::UnknownFile { .. })));
    assert_eq!(store.files().iter().map(|status| status.file).collect::<Vec<_>>(), vec![kept.id]);
    assert_blocks_match(store, &kept);
    // A removed download starts from nothing when created again.
    store.create(&dropped.manifest, &dropped.hashes).unwrap();
    assert_eq!(store.held(&dropped.id).unwrap().count(), 0);
}

/// `source` must hold `sample`'s bytes.
fn suite_shared<S: Store>(store: &mut S, sample: &Sample, source: S::SharedSource) {
    assert_eq!(store.add_shared(source, &sample.manifest, &sample.hashes).unwrap(), sample.id);
    let held = store.held(&sample.id).unwrap();
    assert!(held.is_complete());
    assert_eq!(
        store.files(),
        vec![FileStatus { file: sample.id, held_pieces: sample.pieces(), piece_count: sample.pieces(), shared: true }]
    );
    assert_blocks_match(store, sample);
    store.write_piece(&sample.id, PieceIndex(0), sample.piece(0)).unwrap();
    assert!(matches!(store.create(&sample.manifest, &sample.hashes), Ok(id) if id == sample.id));
    assert_blocks_match(store, sample);
}

fn suite_empty_file<S: Store>(store: &mut S) {
    let sample = Sample::new(0, PIECE_BYTES_MIN, 9, true);
    assert_eq!(store.create(&sample.manifest, &sample.hashes).unwrap(), sample.id);
    let held = store.held(&sample.id).unwrap();
    assert_eq!((held.count(), held.piece_count(), held.is_complete()), (0, 0, true));
    assert!(matches!(store.read_block(&sample.id, PieceIndex(0), 0, 1), Err(StoreError::PieceOutOfRange { .. })));
    assert!(matches!(
        store.write_piece(&sample.id, PieceIndex(0), Bytes::new()),
        Err(StoreError::PieceOutOfRange { .. })
    ));
    store.remove(&sample.id).unwrap();
}

macro_rules! suite {
    ($store:ident, $make:expr) => {
        mod $store {
            use super::*;

            #[test]
            fn write_then_read() {
                let (_dir, mut store) = $make;
                suite_write_then_read(&mut store);
            }

            #[test]
            fn rejects_bad_pieces() {
                let (_dir, mut store) = $make;
                suite_rejects_bad_pieces(&mut store);
            }

            #[test]
            fn block_bounds() {
                let (_dir, mut store) = $make;
                suite_block_bounds(&mut store);
            }

            #[test]
            fn create_validates() {
                let (_dir, mut store) = $make;
                suite_create_validates(&mut store);
            }

            #[test]
            fn empty_file() {
                let (_dir, mut store) = $make;
                suite_empty_file(&mut store);
            }

            #[test]
            fn remove() {
                let (_dir, mut store) = $make;
                suite_remove(&mut store);
            }
        }
    };
}

suite!(memory_suite, ((), MemoryStore::new()));
suite!(disk_suite, {
    let dir = tempfile::tempdir().unwrap();
    let store = DiskStore::open(dir.path()).unwrap();
    (dir, store)
});

#[test]
fn held_pieces_pack_msb_first() {
    for piece_count in [0, 1, 7, 8, 9, 16, 17] {
        let all = HeldPieces::all(piece_count);
        let mut built = HeldPieces::none(piece_count);
        for index in 0..piece_count {
            assert!(built.insert(PieceIndex(index)));
            assert!(!built.insert(PieceIndex(index)));
        }
        assert_eq!(all, built, "{piece_count} pieces");
        assert!(all.is_complete());
        assert_eq!(HeldPieces::from_packed(piece_count, all.packed().to_vec()), Some(all));
    }
    let mut held = HeldPieces::none(10);
    held.insert(PieceIndex(0));
    held.insert(PieceIndex(9));
    assert_eq!(held.packed(), [0x80, 0x40]);
    assert_eq!(held.indices(), [PieceIndex(0), PieceIndex(9)]);
    assert!(held.remove(PieceIndex(0)));
    assert!(!held.remove(PieceIndex(0)));
    assert!(!held.remove(PieceIndex(10)));
    assert_eq!((held.packed(), held.count()), (&[0x00, 0x40][..], 1));
    assert!(!held.contains(PieceIndex(10)));
    // Wrong length or spare bits set: refused.
    assert_eq!(HeldPieces::from_packed(10, vec![0xff]), None);
    assert_eq!(HeldPieces::from_packed(10, vec![0xff, 0x20]), None);
    assert_eq!(HeldPieces::from_packed(10, vec![0xff, 0xc0]).map(|held| held.count()), Some(10));
}

// ---- memory store ----

#[test]
fn memory_shared_pieces_are_slices_of_the_source() {
    let sample = Sample::small(7);
    let source = Bytes::from(sample.data.clone());
    let mut store = MemoryStore::new();
    suite_shared(&mut store, &sample, source.clone());
    // Zero copy: the stored piece points into the source buffer.
    let piece = store.piece(&sample.id, PieceIndex(2)).unwrap();
    let offset = sample.layout.piece_offset(PieceIndex(2)) as usize;
    assert_eq!(piece.as_ptr(), source[offset..].as_ptr());
    // A second host takes the same buffer.
    let mut other = MemoryStore::new();
    other.create(&sample.manifest, &sample.hashes).unwrap();
    other.write_piece(&sample.id, PieceIndex(2), piece.clone()).unwrap();
    assert_eq!(other.piece(&sample.id, PieceIndex(2)).unwrap().as_ptr(), piece.as_ptr());
    assert_eq!(other.read_block(&sample.id, PieceIndex(2), 16, 16).unwrap().as_ptr(), piece[16..].as_ptr());
    assert!(matches!(
        store.add_shared(source.clone(), &sample.manifest, &sample.hashes),
        Err(StoreError::AlreadyTracked { .. })
    ));
    let short = Sample::small(8);
    assert!(matches!(
        MemoryStore::new().add_shared(source.slice(1..), &short.manifest, &short.hashes),
        Err(StoreError::SharedLength { .. })
    ));
}

#[test]
fn memory_hashed_writes_check_the_given_hash() {
    let sample = Sample::small(9);
    let mut store = MemoryStore::new();
    store.create(&sample.manifest, &sample.hashes).unwrap();
    let (one, two) = (PieceIndex(1), PieceIndex(2));
    // A hash other than the manifest's is refused, whatever the bytes.
    assert!(matches!(
        store.write_hashed_piece(&sample.id, one, sample.piece(1), &sample.hashes[2]),
        Err(StoreError::PieceHashMismatch { .. })
    ));
    // Lengths and ranges are still checked.
    assert!(matches!(
        store.write_hashed_piece(&sample.id, one, sample.piece(1).slice(1..), &sample.hashes[1]),
        Err(StoreError::WrongPieceLength { .. })
    ));
    assert!(matches!(
        store.write_hashed_piece(&sample.id, PieceIndex(sample.pieces()), sample.piece(1), &sample.hashes[1]),
        Err(StoreError::PieceOutOfRange { .. })
    ));
    assert_eq!(store.held(&sample.id).unwrap().count(), 0);
    store.write_hashed_piece(&sample.id, one, sample.piece(1), &sample.hashes[1]).unwrap();
    store.write_piece(&sample.id, two, sample.piece(2)).unwrap();
    assert_eq!(store.held(&sample.id).unwrap().indices(), vec![one, two]);
    assert_blocks_match(&mut store, &sample);
}

// ---- disk store ----

fn open(dir: &Path) -> DiskStore {
    DiskStore::open(dir).unwrap()
}

fn file_dir(data_dir: &Path, id: &FileId) -> PathBuf {
    data_dir.join("files").join(id.to_string())
}

fn recoveries(store: &DiskStore) -> Vec<Recovery> {
    store.load_issues().iter().map(|issue| issue.recovery).collect()
}

#[test]
fn disk_reopen_keeps_state_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let inline = Sample::small(10);
    let empty = Sample::new(0, PIECE_BYTES_MIN, 9, true);
    // More pieces than fit inline: its hashes live in their own file.
    let separate = Sample::new(40 * PIECE_BYTES_MIN as usize + 5, PIECE_BYTES_MIN, 11, false);
    {
        let mut store = open(dir.path());
        for sample in [&inline, &separate] {
            store.create(&sample.manifest, &sample.hashes).unwrap();
            for index in (0..sample.pieces()).step_by(3) {
                store.write_piece(&sample.id, PieceIndex(index), sample.piece(index)).unwrap();
            }
        }
        store.create(&empty.manifest, &empty.hashes).unwrap();
        assert!(file_dir(dir.path(), &separate.id).join("hashes").exists());
        assert!(!file_dir(dir.path(), &inline.id).join("hashes").exists());
    }
    let mut store = open(dir.path());
    assert!(store.load_issues().is_empty(), "{:?}", store.load_issues());
    assert_eq!(store.files().len(), 3);
    assert!(store.held(&empty.id).unwrap().is_complete());
    for sample in [&inline, &separate] {
        assert_eq!(store.manifest(&sample.id), Some(&sample.manifest));
        assert_eq!(store.piece_hashes(&sample.id), Some(&sample.hashes[..]));
        let held = store.held(&sample.id).unwrap();
        assert_eq!(held.indices(), (0..sample.pieces()).step_by(3).map(PieceIndex).collect::<Vec<_>>());
        assert_blocks_match(&mut store, sample);
        for piece in held.missing() {
            store.write_piece(&sample.id, piece, sample.piece(piece.0)).unwrap();
        }
        let data = fs::read(store.data_path(&sample.id).unwrap()).unwrap();
        assert!(data == sample.data, "completed data file differs from the original");
    }
    drop(store);
    let store = open(dir.path());
    assert!(store.files().iter().all(|status| status.held_pieces == status.piece_count));
}

#[test]
fn disk_data_file_is_preallocated() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::small(12);
    let mut store = open(dir.path());
    store.create(&sample.manifest, &sample.hashes).unwrap();
    let data = store.data_path(&sample.id).unwrap().to_path_buf();
    assert_eq!(fs::metadata(&data).unwrap().len(), sample.data.len() as u64);
    // fallocate reserved the blocks (not a sparse file).
    use std::os::unix::fs::MetadataExt;
    assert!(fs::metadata(&data).unwrap().blocks() * 512 >= sample.data.len() as u64);
    store.remove(&sample.id).unwrap();
    assert!(!file_dir(dir.path(), &sample.id).exists());
}

#[test]
fn disk_store_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(matches!(DiskStore::open(dir.path()), Err(StoreError::Locked { .. })));
    drop(store);
    open(dir.path());
}

#[test]
fn disk_shared_file_is_served_in_place_and_refused_after_change() {
    let dir = tempfile::tempdir().unwrap();
    let originals = tempfile::tempdir().unwrap();
    let sample = Sample::small(13);
    let original = originals.path().join("movie.mkv");
    fs::write(&original, &sample.data).unwrap();
    {
        let mut store = open(dir.path());
        suite_shared(&mut store, &sample, original.clone());
        // Served from the original; the store copied nothing.
        assert_eq!(store.data_path(&sample.id), Some(fs::canonicalize(&original).unwrap().as_path()));
        let kept: Vec<_> = fs::read_dir(file_dir(dir.path(), &sample.id))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        let mut kept = kept;
        kept.sort();
        assert_eq!(kept, ["manifest", "shared"]);
    }
    // Still shared after a restart.
    let mut store = open(dir.path());
    assert!(store.load_issues().is_empty(), "{:?}", store.load_issues());
    assert_blocks_match(&mut store, &sample);

    // Same length, new content and mtime: refused.
    let mut changed = sample.data.clone();
    changed[0] ^= 0xff;
    fs::write(&original, &changed).unwrap();
    let later = fs::metadata(&original).unwrap().modified().unwrap() + std::time::Duration::from_secs(5);
    fs::File::options().write(true).open(&original).unwrap().set_modified(later).unwrap();
    let err = store.read_block(&sample.id, PieceIndex(0), 0, 16).unwrap_err();
    assert!(matches!(err, StoreError::SharedFileChanged { .. }), "{err:?}");
    assert!(err.to_string().contains("movie.mkv"), "error names the path: {err}");
    // Restoring the content does not help: the mtime still differs.
    fs::write(&original, &sample.data).unwrap();
    assert!(matches!(store.read_block(&sample.id, PieceIndex(0), 0, 16), Err(StoreError::SharedFileChanged { .. })));
    // A length change is refused too; a deleted original is an I/O error.
    fs::write(&original, &sample.data[1..]).unwrap();
    assert!(matches!(store.read_block(&sample.id, PieceIndex(3), 0, 16), Err(StoreError::SharedFileChanged { .. })));
    fs::remove_file(&original).unwrap();
    assert!(matches!(store.read_block(&sample.id, PieceIndex(3), 0, 16), Err(StoreError::Io { .. })));

    // Removing a share never deletes the user's file.
    fs::write(&original, &sample.data).unwrap();
    store.remove(&sample.id).unwrap();
    assert!(original.exists());
}

#[test]
fn disk_add_shared_checks_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::small(14);
    let mut store = open(dir.path());
    let wrong = dir.path().join("wrong-length");
    fs::write(&wrong, &sample.data[..100]).unwrap();
    let err = store.add_shared(wrong, &sample.manifest, &sample.hashes).unwrap_err();
    assert!(matches!(err, StoreError::SharedLength { expected, got: 100, .. } if expected == sample.data.len() as u64));
    assert!(matches!(
        store.add_shared(dir.path().join("missing"), &sample.manifest, &sample.hashes),
        Err(StoreError::Io { .. })
    ));
    assert!(matches!(
        store.add_shared(dir.path().to_path_buf(), &sample.manifest, &sample.hashes),
        Err(StoreError::Io { .. })
    ));
    store.create(&sample.manifest, &sample.hashes).unwrap();
    let original = dir.path().join("original");
    fs::write(&original, &sample.data).unwrap();
    assert!(matches!(
        store.add_shared(original, &sample.manifest, &sample.hashes),
        Err(StoreError::AlreadyTracked { .. })
    ));
    assert_eq!(store.files().len(), 1);
}

/// A named way to damage one store file.
type Damage = (&'static str, fn(&Path));

/// A download with pieces 0 and 2 held, the store closed.
fn damaged_fixture(seed: u64) -> (tempfile::TempDir, Sample, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::small(seed);
    let mut store = open(dir.path());
    store.create(&sample.manifest, &sample.hashes).unwrap();
    for index in [0, 2] {
        store.write_piece(&sample.id, PieceIndex(index), sample.piece(index)).unwrap();
    }
    let file_dir = file_dir(dir.path(), &sample.id);
    (dir, sample, file_dir)
}

#[test]
fn disk_corrupt_manifest_is_reported_not_trusted() {
    let damages: [Damage; 4] = [
        ("garbage", |path| fs::write(path, b"\xff\xff\xff\xff not a manifest").unwrap()),
        ("truncated", |path| {
            let bytes = fs::read(path).unwrap();
            fs::write(path, &bytes[..bytes.len() / 2]).unwrap();
        }),
        ("empty", |path| fs::write(path, b"").unwrap()),
        ("missing", |path| fs::remove_file(path).unwrap()),
    ];
    for (what, damage) in damages {
        let (dir, sample, file_dir) = damaged_fixture(20);
        damage(&file_dir.join("manifest"));
        let mut store = open(dir.path());
        assert!(store.files().is_empty(), "{what}: damaged file tracked");
        assert_eq!(recoveries(&store), [Recovery::Skipped], "{what}");
        assert!(store.load_issues()[0].error.to_string().contains(&sample.id.to_string()), "{what}: names the path");
        // Creating it again replaces the damaged directory.
        store.create(&sample.manifest, &sample.hashes).unwrap();
        assert_eq!(store.held(&sample.id).unwrap().count(), 0);
        drop(store);
        assert!(open(dir.path()).load_issues().is_empty(), "{what}");
    }
}

#[test]
fn disk_manifest_of_another_file_is_skipped() {
    let (dir, sample, file_dir) = damaged_fixture(21);
    let other = Sample::small(22);
    fs::write(file_dir.join("manifest"), other.manifest.to_bytes()).unwrap();
    let store = open(dir.path());
    assert!(store.manifest(&sample.id).is_none());
    assert!(store.manifest(&other.id).is_none());
    assert_eq!(recoveries(&store), [Recovery::Skipped]);
}

#[test]
fn disk_corrupt_hashes_file_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::new(3 * PIECE_BYTES_MIN as usize, PIECE_BYTES_MIN, 23, false);
    open(dir.path()).create(&sample.manifest, &sample.hashes).unwrap();
    let hashes = file_dir(dir.path(), &sample.id).join("hashes");
    let mut bytes = fs::read(&hashes).unwrap();
    bytes[40] ^= 1;
    fs::write(&hashes, &bytes).unwrap();
    let store = open(dir.path());
    assert!(store.files().is_empty());
    assert_eq!(recoveries(&store), [Recovery::Skipped]);
    drop(store);
    fs::write(&hashes, &bytes[..31]).unwrap();
    let store = open(dir.path());
    assert!(store.files().is_empty());
    assert_eq!(recoveries(&store), [Recovery::Skipped]);
}

#[test]
fn disk_bad_bitfield_means_nothing_held() {
    let damages: [Damage; 5] = [
        ("truncated", |path| {
            let bytes = fs::read(path).unwrap();
            fs::write(path, &bytes[..bytes.len() - 1]).unwrap();
        }),
        ("bit flipped", |path| {
            let mut bytes = fs::read(path).unwrap();
            bytes[12] ^= 0x20; // claims piece 2 -> also piece 2's neighbour
            fs::write(path, &bytes).unwrap();
        }),
        ("empty", |path| fs::write(path, b"").unwrap()),
        ("missing", |path| fs::remove_file(path).unwrap()),
        ("huge", |path| fs::write(path, vec![0xff; 1 << 20]).unwrap()),
    ];
    for (what, damage) in damages {
        let (dir, sample, file_dir) = damaged_fixture(24);
        damage(&file_dir.join("held"));
        let mut store = open(dir.path());
        assert_eq!(recoveries(&store), [Recovery::HeldReset], "{what}");
        assert_eq!(store.held(&sample.id).unwrap().count(), 0, "{what}");
        // Downloading resumes from scratch and persists again.
        store.write_piece(&sample.id, PieceIndex(1), sample.piece(1)).unwrap();
        drop(store);
        let store = open(dir.path());
        assert!(store.load_issues().is_empty(), "{what}");
        assert_eq!(store.held(&sample.id).unwrap().indices(), [PieceIndex(1)], "{what}");
    }
}

#[test]
fn disk_missing_or_resized_data_file_is_recreated() {
    let damages: [Damage; 3] = [
        ("missing", |path| fs::remove_file(path).unwrap()),
        ("shortened", |path| fs::File::options().write(true).open(path).unwrap().set_len(100).unwrap()),
        ("a directory", |path| {
            fs::remove_file(path).unwrap();
            fs::create_dir(path).unwrap();
        }),
    ];
    for (what, damage) in damages {
        let (dir, sample, file_dir) = damaged_fixture(25);
        damage(&file_dir.join("data"));
        let mut store = open(dir.path());
        if what == "a directory" {
            // Cannot be replaced by a file: skipped and reported with the path.
            assert!(store.files().is_empty());
            assert_eq!(recoveries(&store), [Recovery::Skipped]);
            let err = store.load_issues()[0].error.to_string();
            assert!(err.contains("data") && err.contains("create"), "{err}");
            continue;
        }
        assert_eq!(recoveries(&store), [Recovery::DataRecreated], "{what}");
        assert_eq!(store.held(&sample.id).unwrap().count(), 0, "{what}");
        assert!(matches!(store.read_block(&sample.id, PieceIndex(0), 0, 1), Err(StoreError::NotHeld { .. })));
        store.write_piece(&sample.id, PieceIndex(0), sample.piece(0)).unwrap();
        assert_blocks_match(&mut store, &sample);
    }
}

#[test]
fn disk_corrupt_shared_record_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::small(26);
    let original = dir.path().join("original");
    fs::write(&original, &sample.data).unwrap();
    open(dir.path()).add_shared(original, &sample.manifest, &sample.hashes).unwrap();
    let record = file_dir(dir.path(), &sample.id).join("shared");
    let good = fs::read(&record).unwrap();
    // A path byte changed (it would name another file), a truncation, junk.
    let mut retargeted = good.clone();
    retargeted[3] ^= 1;
    for damaged in [retargeted, good[..good.len() - 1].to_vec(), b"\x80\x80\x80".to_vec()] {
        fs::write(&record, &damaged).unwrap();
        let store = open(dir.path());
        assert!(store.files().is_empty());
        assert_eq!(recoveries(&store), [Recovery::Skipped]);
    }
    fs::write(&record, &good).unwrap();
    assert_eq!(open(dir.path()).files().len(), 1);
}

#[test]
fn disk_leftovers_and_strangers_are_handled() {
    let (dir, sample, _) = damaged_fixture(27);
    let files = dir.path().join("files");
    // An interrupted create and remove: deleted, never loaded.
    fs::create_dir(files.join(format!(".staging-{}", Sample::small(28).id))).unwrap();
    fs::create_dir_all(files.join(".removing-x").join("inner")).unwrap();
    // A directory that is not a file id: reported and left alone.
    fs::create_dir(files.join("not-an-id")).unwrap();
    let store = open(dir.path());
    assert_eq!(recoveries(&store), [Recovery::Skipped]);
    assert!(files.join("not-an-id").exists());
    assert!(!files.join(".removing-x").exists());
    assert_eq!(store.files().len(), 1);
    assert_eq!(store.held(&sample.id).unwrap().count(), 2);
}

/// Deterministic damage to every kind of store file, many times over: open
/// never panics, and whatever it still calls held reads back verified.
#[test]
fn disk_random_damage_never_panics_or_serves_bad_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let inline = Sample::small(30);
    let separate = Sample::new(3 * PIECE_BYTES_MIN as usize + 9, PIECE_BYTES_MIN, 31, false);
    let shared = Sample::small(32);
    let original = dir.path().join("shared-original");
    fs::write(&original, &shared.data).unwrap();
    let data_dir = dir.path().join("store");
    {
        let mut store = open(&data_dir);
        for sample in [&inline, &separate] {
            store.create(&sample.manifest, &sample.hashes).unwrap();
            for index in [0, 2] {
                store.write_piece(&sample.id, PieceIndex(index), sample.piece(index)).unwrap();
            }
        }
        store.add_shared(original.clone(), &shared.manifest, &shared.hashes).unwrap();
    }
    let mut targets = Vec::new();
    for sample in [&inline, &separate, &shared] {
        for name in ["manifest", "hashes", "held", "shared", "data"] {
            let path = file_dir(&data_dir, &sample.id).join(name);
            if path.exists() {
                targets.push((path.clone(), fs::read(&path).unwrap()));
            }
        }
    }
    assert_eq!(targets.len(), 3 + 1 + 2 + 1 + 2);
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound.max(1) as u64) as usize
    };
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..150 {
        let (path, good) = &targets[next(targets.len())];
        let is_data = path.ends_with("data");
        let mut bytes = good.clone();
        let damage = next(5);
        match damage {
            // A flipped bit in a data file is silent disk corruption, which
            // no crash produces; only the metadata files are flipped.
            0 if !is_data && !bytes.is_empty() => {
                let at = next(bytes.len());
                bytes[at] ^= 1 << next(8);
            }
            1 => bytes.truncate(next(bytes.len())),
            2 => bytes = (0..next(300)).map(|_| next(256) as u8).collect(),
            3 => bytes.extend((0..1 + next(40)).map(|_| next(256) as u8)),
            _ => {}
        }
        if damage == 4 {
            fs::remove_file(path).unwrap();
        } else {
            fs::write(path, &bytes).unwrap();
        }
        let mut store = open(&data_dir);
        seen.extend(recoveries(&store));
        for status in store.files() {
            let sample = [&inline, &separate, &shared].into_iter().find(|sample| sample.id == status.file).unwrap();
            // The name is not part of the id, so a damaged name that is
            // still a safe name loads; everything the id certifies is exact.
            let mut manifest = store.manifest(&sample.id).unwrap().clone();
            manifest.name.clone_from(&sample.manifest.name);
            assert_eq!(manifest, sample.manifest, "round {round} {path:?}");
            for piece in store.held(&sample.id).unwrap().indices() {
                for block in 0..sample.layout.block_count(piece) {
                    let length = sample.layout.block_len(piece, block);
                    let got = store.read_block(&sample.id, piece, block * BLOCK_BYTES, length).unwrap();
                    assert_eq!(&got[..], sample.block(piece.0, block * BLOCK_BYTES, length), "round {round} {path:?}");
                }
            }
        }
        drop(store);
        // Put everything back as it was, including files open recreated.
        for (path, good) in &targets {
            fs::write(path, good).unwrap();
        }
    }
    // The rounds reached every way of recovering.
    for recovery in [Recovery::Skipped, Recovery::HeldReset, Recovery::DataRecreated] {
        assert!(seen.contains(&recovery), "{recovery:?} never happened");
    }
}

#[test]
fn disk_verify_held_drops_corrupted_pieces() {
    let (dir, sample, file_dir) = damaged_fixture(40);
    let mut store = open(dir.path());
    assert_eq!(store.verify_held(&sample.id).unwrap(), []);
    drop(store);
    // Silent corruption inside held piece 2, as a lying disk might leave.
    let data = file_dir.join("data");
    let mut bytes = fs::read(&data).unwrap();
    bytes[2 * PIECE_BYTES_MIN as usize + 500] ^= 0x10;
    fs::write(&data, &bytes).unwrap();
    let mut store = open(dir.path());
    assert_eq!(store.verify_held(&sample.id).unwrap(), [PieceIndex(2)]);
    assert_eq!(store.held(&sample.id).unwrap().indices(), [PieceIndex(0)]);
    drop(store);
    let mut store = open(dir.path());
    assert_eq!(store.held(&sample.id).unwrap().indices(), [PieceIndex(0)], "the drop was not persisted");
    store.write_piece(&sample.id, PieceIndex(2), sample.piece(2)).unwrap();
    assert_eq!(store.verify_held(&sample.id).unwrap(), []);
    assert_blocks_match(&mut store, &sample);
    assert!(matches!(store.verify_held(&FileId([1; 32])), Err(StoreError::UnknownFile { .. })));
}

#[test]
fn disk_verify_held_catches_a_shared_change_the_mtime_check_misses() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::small(41);
    let original = dir.path().join("original");
    fs::write(&original, &sample.data).unwrap();
    let mtime = fs::metadata(&original).unwrap().modified().unwrap();
    let mut store = open(&dir.path().join("store"));
    store.add_shared(original.clone(), &sample.manifest, &sample.hashes).unwrap();
    assert_eq!(store.verify_held(&sample.id).unwrap(), []);
    // Same length, mtime put back: read_block cannot tell...
    let mut changed = sample.data.clone();
    changed[3 * PIECE_BYTES_MIN as usize] ^= 1;
    fs::write(&original, &changed).unwrap();
    fs::File::options().write(true).open(&original).unwrap().set_modified(mtime).unwrap();
    assert!(store.read_block(&sample.id, PieceIndex(3), 0, 16).is_ok());
    // ...a scrub can. The user's file is not touched.
    assert_eq!(store.verify_held(&sample.id).unwrap(), [PieceIndex(3)]);
    assert_eq!(fs::read(&original).unwrap(), changed);
}

#[test]
fn disk_background_writes_serve_at_once_and_count_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let sample = Sample::small(21);
    {
        let mut store = open(dir.path());
        store.create(&sample.manifest, &sample.hashes).unwrap();
        let first = store.prepare_write(&sample.id, PieceIndex(1), sample.piece(1)).unwrap().unwrap().unwrap();
        let second = store.prepare_write(&sample.id, PieceIndex(3), sample.piece(3)).unwrap().unwrap().unwrap();
        assert!(
            store.prepare_write(&sample.id, PieceIndex(1), sample.piece(1)).unwrap().unwrap().is_none(),
            "queued once"
        );
        // Served from memory while queued, but not held yet.
        assert_eq!(store.read_block(&sample.id, PieceIndex(3), 16, 100).unwrap(), sample.block(3, 16, 100));
        assert_eq!(store.held(&sample.id).unwrap().count(), 0);
        // The first job fails; the second leaves its piece out of the bitfield.
        store
            .commit_write(&sample.id, first.piece(), Err(StoreError::NotHeld { file: sample.id, piece: PieceIndex(1) }))
            .unwrap_err();
        second.run(&[PieceIndex(1)]).unwrap();
        store.commit_write(&sample.id, PieceIndex(3), Ok(())).unwrap();
        assert_eq!(store.held(&sample.id).unwrap().indices(), [PieceIndex(3)]);
        assert!(matches!(store.read_block(&sample.id, PieceIndex(1), 0, 16), Err(StoreError::NotHeld { .. })));
        drop(first);
    }
    // What the job wrote is what a restart finds.
    let mut store = open(dir.path());
    assert_eq!(store.held(&sample.id).unwrap().indices(), [PieceIndex(3)]);
    assert_eq!(store.read_block(&sample.id, PieceIndex(3), 0, 16).unwrap(), sample.block(3, 0, 16));
}
