//! Throughput and memory of real daemons on loopback, measured and
//! printed, never asserted (STYLE.md §7: wall-clock figures are reported,
//! not tested). Run in release mode:
//!
//! ```sh
//! cargo test --release -p shoal-node --test perf -- --ignored --nocapture
//! ```
//!
//! `SHOAL_PERF_MIB` sets the file size (default 1024). Three runs on the
//! same file, in the same process:
//! 1. a plain TCP copy of the file into a file on the same disk (the
//!    reference: read, send, receive, write, fsync);
//! 2. one daemon to another (the downloader writes and fsyncs every
//!    verified piece), with the ratio to (1) and each daemon's peak RSS
//!    (`VmHWM` in /proc/PID/status);
//! 3. four seeders limited to 25 MB/s upload each, feeding one downloader.

// Test setup that fails should panic loudly.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use common::{Daemon, share};
use hyper::Method;
use shoal_node::control::{FileState, FileView};
use tokio::time::Instant;

const MIB: u64 = 1 << 20;
const COPY_BUFFER_BYTES: usize = 1 << 20;
/// Upload limit of each of the four seeders: 25 MB/s.
const SEEDER_UPLOAD_BYTES_PER_S: u64 = 25_000_000;

/// Peak resident set of a process, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time a process has used (user + system), in seconds.
fn cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks as f64 / 100.0)
}

/// Send `source` over a loopback TCP connection into `target`, fsynced.
fn plain_tcp_copy(source: &Path, target: &Path) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = target.to_path_buf();
    let started = Instant::now();
    let receiver = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let file = std::fs::File::create(&target).unwrap();
        let mut out = BufWriter::with_capacity(COPY_BUFFER_BYTES, file);
        let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
        loop {
            let n = stream.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            out.write_all(&buffer[..n]).unwrap();
        }
        out.into_inner().unwrap().sync_all().unwrap();
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut file = std::fs::File::open(source).unwrap();
    let mut buffer = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        let n = file.read(&mut buffer).unwrap();
        if n == 0 {
            break;
        }
        stream.write_all(&buffer[..n]).unwrap();
    }
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    receiver.join().unwrap();
    started.elapsed()
}

/// Ask `leech` for `id` and wait until it holds every piece.
async fn timed_download(leech: &Daemon, id: &str) -> Duration {
    let started = Instant::now();
    let _: FileView = leech.api.send(Method::POST, "/v1/downloads", &serde_json::json!({ "id": id })).await.unwrap();
    leech.wait_file(id, "download complete", |v| v.state == FileState::Complete).await;
    started.elapsed()
}

fn mb_per_s(bytes: u64, took: Duration) -> f64 {
    bytes as f64 / took.as_secs_f64() / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, minutes long: run in release with --ignored --nocapture"]
async fn measure_loopback_transfer_against_plain_tcp() {
    let mib: u64 = std::env::var("SHOAL_PERF_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    let size = mib * MIB;
    let tmp = tempfile::tempdir().unwrap();
    let original = tmp.path().join("perf.bin");
    // Written in 64 MiB slices: the test never holds the file in memory.
    {
        let mut out = BufWriter::new(std::fs::File::create(&original).unwrap());
        let slice = 64 * MIB;
        let mut written = 0;
        while written < size {
            let n = slice.min(size - written);
            out.write_all(&shoal_node::core::content::synthetic_bytes(written, n as usize)).unwrap();
            written += n;
        }
        out.flush().unwrap();
    }
    println!("file: {mib} MiB");

    let tcp = plain_tcp_copy(&original, &tmp.path().join("tcp.out"));
    std::fs::remove_file(tmp.path().join("tcp.out")).unwrap();
    println!("plain TCP copy:        {:7.2} s  {:8.1} MB/s", tcp.as_secs_f64(), mb_per_s(size, tcp));

    let seeder = Daemon::start(&tmp.path().join("seeder"), 20, &[], &[]);
    let leech = Daemon::start(&tmp.path().join("leech"), 21, &[seeder.listen], &[]);
    leech.wait_peers(1).await;
    let id = share(&seeder, &original);
    let one = timed_download(&leech, &id).await;
    println!(
        "daemon -> daemon:      {:7.2} s  {:8.1} MB/s  ({:.0}% of plain TCP)",
        one.as_secs_f64(),
        mb_per_s(size, one),
        100.0 * tcp.as_secs_f64() / one.as_secs_f64()
    );
    for (name, daemon) in [("seeder", &seeder), ("downloader", &leech)] {
        let kib = peak_rss_kib(daemon.child.id()).unwrap_or(0);
        let cpu = cpu_s(daemon.child.id()).unwrap_or(0.0);
        println!("peak RSS {name:<11} {:7.1} MiB, CPU {cpu:.2} s", kib as f64 / 1024.0);
    }
    seeder.kill();
    leech.kill();

    let limit = SEEDER_UPLOAD_BYTES_PER_S.to_string();
    let mut seeders: Vec<Daemon> = Vec::new();
    for i in 0..4u8 {
        let bootstrap: Vec<_> = seeders.first().map(|s: &Daemon| s.listen).into_iter().collect();
        let dir = tmp.path().join(format!("seed{i}"));
        seeders.push(Daemon::start(&dir, 22 + i, &bootstrap, &["--max-upload", &limit]));
    }
    for seed in &seeders {
        assert_eq!(share(seed, &original), id);
    }
    let addrs: Vec<_> = seeders.iter().map(|s| s.listen).collect();
    let leech = Daemon::start(&tmp.path().join("leech4"), 26, &addrs, &[]);
    leech.wait_peers(4).await;
    let four = timed_download(&leech, &id).await;
    println!(
        "4 seeders x 25 MB/s:   {:7.2} s  {:8.1} MB/s  (limit sum 100 MB/s)",
        four.as_secs_f64(),
        mb_per_s(size, four)
    );
    let kib = peak_rss_kib(leech.child.id()).unwrap_or(0);
    println!("peak RSS downloader  {:7.1} MiB", kib as f64 / 1024.0);
    for (i, seed) in seeders.iter().enumerate() {
        let status = seed.status().await;
        let sent: u64 = status.traffic.iter().filter(|t| t.kind == "block").map(|t| t.sent_bytes).sum();
        let kib = peak_rss_kib(seed.child.id()).unwrap_or(0);
        println!(
            "  seeder {i}: {:8.1} MiB of blocks sent, peak RSS {:6.1} MiB",
            sent as f64 / MIB as f64,
            kib as f64 / 1024.0
        );
    }
}
