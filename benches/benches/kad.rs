//! Kademlia routing table at 10^5 contacts: inserting them, and finding the
//! k closest to a random target.
//!
//! Two tables: the default one (k = 20 per bucket: it keeps about 20 × 13
//! of the 10^5 offered contacts, the rest go to replacement caches), and a
//! "wide" one whose buckets are large enough to hold all 10^5, which is the
//! worst case for `closest`.
//!
//! `cargo bench -p shoal-benches --bench kad`

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use shoal_core::ids::NodeId;
use shoal_core::kad::KadConfig;
use shoal_core::kad::routing::RoutingTable;
use shoal_core::time::Instant;
use shoal_core::wire::Contact;

const CONTACTS: usize = 100_000;

/// splitmix64: deterministic ids without a dependency.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn key(state: &mut u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    for chunk in out.chunks_mut(8) {
        chunk.copy_from_slice(&next(state).to_le_bytes());
    }
    out
}

fn contacts(state: &mut u64) -> Vec<Contact> {
    (0..CONTACTS)
        .map(|i| Contact { id: NodeId(key(state)), addr: SocketAddr::from((Ipv4Addr::from(i as u32), 4000)) })
        .collect()
}

fn table(local: NodeId, bucket_size: usize) -> RoutingTable {
    let config = KadConfig::default();
    RoutingTable::new(
        local,
        bucket_size,
        config.replacements_per_bucket_max,
        config.contact_failures_max,
        Duration::from_millis(config.contact_fresh_ms),
    )
}

fn fill(table: &mut RoutingTable, contacts: &[Contact]) {
    for (i, c) in contacts.iter().enumerate() {
        table.observe(*c, Instant::from_micros(i as u64));
    }
}

fn routing(c: &mut Criterion) {
    let mut state = 42;
    let local = NodeId(key(&mut state));
    let all = contacts(&mut state);
    let k = KadConfig::default().bucket_size;

    let mut group = c.benchmark_group("kad_routing");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));

    group.throughput(Throughput::Elements(CONTACTS as u64));
    group.bench_function("insert_1e5_k20", |b| {
        b.iter_batched(|| table(local, k), |mut t| fill(&mut t, black_box(&all)), BatchSize::LargeInput)
    });

    let mut default = table(local, k);
    fill(&mut default, &all);
    let mut wide = table(local, CONTACTS);
    fill(&mut wide, &all);
    eprintln!("default table keeps {} contacts; wide table {}", default.len(), wide.len());
    assert_eq!(wide.len(), CONTACTS);

    group.throughput(Throughput::Elements(1));
    let targets: Vec<[u8; 32]> = (0..1024).map(|_| key(&mut state)).collect();
    let mut at = 0;
    group.bench_function("closest_k20_default_table", |b| {
        b.iter(|| {
            at = (at + 1) % targets.len();
            black_box(default.closest(&targets[at], k))
        })
    });
    group.bench_function("closest_k20_wide_table_1e5", |b| {
        b.iter(|| {
            at = (at + 1) % targets.len();
            black_box(wide.closest(&targets[at], k))
        })
    });
    // Observing a contact: the path every incoming message takes.
    let kept: Vec<Contact> = default.entries().map(|e| e.contact).collect();
    group.bench_function("observe_known_default_table", |b| {
        b.iter(|| {
            at = (at + 1) % kept.len();
            black_box(default.observe(kept[at], Instant::from_micros(1 << 40)))
        })
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
