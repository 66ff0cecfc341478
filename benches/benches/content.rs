//! Chunk + hash throughput of the streaming content hasher against raw
//! SHA-256 over the same bytes, in one run so the ratio is the figure.
//!
//! `cargo bench -p shoal-benches --bench content`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sha2::{Digest, Sha256};
use shoal_core::content::{Layout, hash_buf_read, hash_reader, synthetic_bytes};

const FILE_BYTES: usize = 256 * 1024 * 1024;

fn content(c: &mut Criterion) {
    let data = synthetic_bytes(0x9e37_79b9_7f4a_7c15, FILE_BYTES);
    let layout = Layout::for_file(data.len() as u64);
    let mut group = c.benchmark_group("content");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.sample_size(10);
    group.measurement_time(std::time::Duration::from_secs(10));
    group.bench_function("raw_sha256", |b| b.iter(|| black_box(Sha256::digest(black_box(&data[..])))));
    group.bench_function("chunk_hash_bufread", |b| {
        b.iter(|| black_box(hash_buf_read(black_box(&data[..]), layout).map(|c| c.file_id)))
    });
    group.bench_function("chunk_hash_read", |b| {
        b.iter(|| black_box(hash_reader(black_box(&data[..]), layout).map(|c| c.file_id)))
    });
    group.finish();
}

criterion_group!(benches, content);
criterion_main!(benches);
