//! A real crash test of the disk store: a child process (this test binary,
//! re-executed with `SHOAL_STORE_CRASH_DIR` set) downloads a multi-MiB file
//! piece by piece into a `DiskStore`, and the parent `SIGKILL`s it at
//! several moments. After every kill the parent reopens the store and
//! checks the crash contract: nothing on disk is reported damaged, every
//! held piece hashes to its manifest hash, the held set only grows and
//! includes every piece whose `write_piece` had returned `Ok`, and the next
//! child writes only the missing pieces. The last child runs to completion
//! and the data file must equal the original bytes.
//!
//! `SIGKILL` ends the process but not the kernel: it tests the ordering of
//! the store's writes and renames, not the power-loss durability of fsync.

// Helpers outside #[test] fns are test code too (clippy.toml allows unwrap
// only inside tests).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use shoal_node::core::content::{self, BLOCK_BYTES, Layout, verify_piece};
use shoal_node::core::ids::{FileId, PieceIndex};
use shoal_node::core::manifest::FileManifest;
use shoal_node::store::{DiskStore, Store};

/// Set in the child: the data directory to download into.
const CHILD_DIR_ENV: &str = "SHOAL_STORE_CRASH_DIR";
/// Prefix of the child's protocol lines (the test harness prints too).
const REPORT: &str = "@@store-crash ";
/// 8 MiB and a short tail in 64 KiB pieces: 129 pieces.
const FILE_BYTES: usize = 8 * 1024 * 1024 + 777;
const PIECE_BYTES: u32 = 64 * 1024;

struct Fixture {
    data: Vec<u8>,
    manifest: FileManifest,
    layout: Layout,
    id: FileId,
}

/// The same file in parent and child.
fn fixture() -> Fixture {
    let data = content::synthetic_bytes(0x5eed, FILE_BYTES);
    let layout = Layout::new(FILE_BYTES as u64, PIECE_BYTES).unwrap();
    let content = content::hash_buf_read(&data[..], layout).unwrap();
    let manifest = FileManifest::new("crash.bin", &content).unwrap();
    Fixture { data, manifest, layout, id: content.file_id }
}

impl Fixture {
    fn piece(&self, piece: PieceIndex) -> &[u8] {
        let start = self.layout.piece_offset(piece) as usize;
        &self.data[start..start + self.layout.piece_len(piece) as usize]
    }

    fn hashes(&self) -> &[content::PieceHash] {
        self.manifest.piece_hashes.as_deref().unwrap()
    }
}

/// The child: resume the download and report each piece once `write_piece`
/// has returned `Ok`. Ignored in normal runs: `crash_and_resume` runs it by
/// re-executing this binary with `--ignored`.
#[test]
#[ignore = "child process of crash_and_resume"]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR_ENV) else {
        panic!("run by crash_and_resume, with {CHILD_DIR_ENV} set");
    };
    let fixture = fixture();
    let mut store = DiskStore::open(&dir).unwrap_or_else(|error| {
        println!("{REPORT}error open: {error}");
        panic!("open: {error}");
    });
    println!("{REPORT}opened");
    store.create(&fixture.manifest, fixture.hashes()).unwrap();
    let missing = store.held(&fixture.id).unwrap().missing();
    println!("{REPORT}resume {}", missing.len());
    // Not in index order, as a swarm download would not be.
    let mut order = missing;
    order.sort_by_key(|piece| (piece.0.wrapping_mul(37)) % 101);
    for piece in order {
        let data = Bytes::copy_from_slice(fixture.piece(piece));
        if let Err(error) = store.write_piece(&fixture.id, piece, data) {
            println!("{REPORT}error write {piece}: {error}");
            panic!("write {piece}: {error}");
        }
        println!("{REPORT}wrote {}", piece.0);
    }
    println!("{REPORT}done");
}

/// When the parent kills a child.
#[derive(Clone, Copy, Debug)]
enum Kill {
    /// This long after spawning (may land before, during or after create).
    AfterMs(u64),
    /// As soon as the child has opened the store (about to create the file).
    AtOpen,
    /// As soon as the child has reported this many written pieces.
    AfterPieces(usize),
    /// This long after the child reported this many written pieces: lands
    /// anywhere inside a later `write_piece`.
    AfterPiecesThenMs(usize, u64),
    /// Never: let it finish.
    Never,
}

/// What one child run reported.
#[derive(Debug, Default)]
struct Run {
    opened: bool,
    resumed_missing: Option<usize>,
    wrote: Vec<u32>,
    done: bool,
    errors: Vec<String>,
}

fn spawn_child(dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn parse(line: &str, run: &mut Run) {
    let Some(at) = line.find(REPORT) else { return };
    let report = &line[at + REPORT.len()..];
    if report == "opened" {
        run.opened = true;
    } else if let Some(count) = report.strip_prefix("resume ") {
        run.resumed_missing = Some(count.parse().unwrap());
    } else if let Some(piece) = report.strip_prefix("wrote ") {
        run.wrote.push(piece.parse().unwrap());
    } else if report == "done" {
        run.done = true;
    } else {
        run.errors.push(report.to_owned());
    }
}

/// Run one child until `kill`, then collect everything it reported.
fn run_child(dir: &Path, kill: Kill) -> Run {
    let mut child = spawn_child(dir);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut run = Run::default();
    match kill {
        Kill::AfterMs(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            child.kill().unwrap();
        }
        Kill::AtOpen => {
            while !run.opened {
                let Some(line) = lines.next() else { break };
                parse(&line.unwrap(), &mut run);
            }
            child.kill().unwrap();
        }
        Kill::AfterPieces(count) | Kill::AfterPiecesThenMs(count, _) => {
            while run.wrote.len() < count {
                let Some(line) = lines.next() else { break };
                parse(&line.unwrap(), &mut run);
            }
            if let Kill::AfterPiecesThenMs(_, ms) = kill {
                std::thread::sleep(Duration::from_millis(ms));
            }
            child.kill().unwrap();
        }
        Kill::Never => {}
    }
    // Every line written before the kill is still in the pipe.
    for line in lines {
        parse(&line.unwrap(), &mut run);
    }
    let status = child.wait().unwrap();
    if matches!(kill, Kill::Never) {
        assert!(status.success(), "the last child failed: {status:?} {run:?}");
    }
    assert!(run.errors.is_empty(), "child reported errors: {:?}", run.errors);
    run
}

/// Reopen the store and check every held piece against its manifest hash
/// by reading it back block by block; returns the held set.
fn check_store(dir: &Path, fixture: &Fixture) -> Vec<u32> {
    let mut store = DiskStore::open(dir).unwrap();
    assert!(store.load_issues().is_empty(), "a crash left damage: {:?}", store.load_issues());
    let Some(manifest) = store.manifest(&fixture.id) else {
        // Killed before the file's directory was committed.
        assert!(store.files().is_empty());
        return Vec::new();
    };
    assert_eq!(manifest, &fixture.manifest);
    let held = store.held(&fixture.id).unwrap().indices();
    for &piece in &held {
        let mut bytes = Vec::with_capacity(fixture.layout.piece_len(piece) as usize);
        for block in 0..fixture.layout.block_count(piece) {
            let length = fixture.layout.block_len(piece, block);
            bytes.extend_from_slice(&store.read_block(&fixture.id, piece, block * BLOCK_BYTES, length).unwrap());
        }
        assert!(verify_piece(&fixture.hashes()[piece.0 as usize], &bytes), "held {piece:?} fails its hash");
    }
    held.into_iter().map(|piece| piece.0).collect()
}

#[test]
fn crash_and_resume() {
    let fixture = fixture();
    let piece_count = fixture.layout.piece_count();
    let dir = tempfile::tempdir().unwrap();
    // Kills are tied to the child's reports, not to wall-clock time alone,
    // so a fast disk cannot let one child finish the whole file early; the
    // millisecond offsets land inside a later write_piece.
    let plan = [
        Kill::AfterMs(0),
        Kill::AtOpen,
        Kill::AtOpen,
        Kill::AfterPieces(1),
        Kill::AfterPiecesThenMs(1, 2),
        Kill::AfterPieces(5),
        Kill::AfterPiecesThenMs(4, 3),
        Kill::AfterPieces(17),
        Kill::AfterPiecesThenMs(10, 5),
        Kill::AfterPieces(20),
        Kill::Never,
    ];
    let mut interrupted_downloads = 0;
    let mut held: Vec<u32> = Vec::new();
    for (step, kill) in plan.into_iter().enumerate() {
        let run = run_child(dir.path(), kill);
        if let Some(missing) = run.resumed_missing {
            assert_eq!(missing, piece_count as usize - held.len(), "step {step}: resumed with a different held set");
        }
        for piece in &run.wrote {
            assert!(!held.contains(piece), "step {step}: piece {piece} was held yet written again");
        }
        let now = check_store(dir.path(), &fixture);
        for piece in &held {
            assert!(now.contains(piece), "step {step} ({kill:?}): held piece {piece} was lost");
        }
        for piece in &run.wrote {
            assert!(now.contains(piece), "step {step} ({kill:?}): piece {piece} returned Ok but is not held");
        }
        eprintln!("step {step} {kill:?}: child wrote {} pieces, {} of {piece_count} held", run.wrote.len(), now.len());
        if !run.done && run.resumed_missing.is_some() {
            interrupted_downloads += 1;
        }
        held = now;
        if run.done {
            break;
        }
    }
    // The piece-count kills must each have cut a download short.
    assert!(interrupted_downloads >= 6, "only {interrupted_downloads} kills interrupted a download");
    assert_eq!(held.len(), piece_count as usize, "download did not complete");
    let store = DiskStore::open(dir.path()).unwrap();
    let data = std::fs::read(store.data_path(&fixture.id).unwrap()).unwrap();
    assert!(data == fixture.data, "the completed data file differs from the original");
}
