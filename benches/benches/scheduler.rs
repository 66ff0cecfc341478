//! The rarest-first picker against the naive reference scan, in one run.
//!
//! `cargo bench -p shoal-benches --bench scheduler`
//!
//! - `pick/{rarest_first,naive_scan}/{pieces}/{profile}`: one pick for a
//!   peer holding 1%, 50% or 100% of the pieces, in a swarm of 40 other
//!   peers of random density (10-90%) where we already have 20% of the
//!   file. `common_only` is the adversarial profile: the peer holds exactly
//!   the most common half of the pieces, so every rarer level must be
//!   searched before its first candidate (libtorrent's full-scan case).
//!   `rarest_first` is the real case (a peer's floor is exact from its
//!   bitfield on); `rarest_first_cold` forces every floor to zero first,
//!   the worst case a floor ever degrades to.
//! - `have/rarest_first/{pieces}`: one HAVE (availability update).
//! - `bitfield/rarest_first/{pieces}/{full,half}`: a peer joining with a
//!   bitfield (and leaving again, so the state stays the same).

// A bench that hits a setup bug should stop loudly.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use shoal_core::ids::PieceIndex;
use shoal_core::scheduler::reference::NaivePicker;
use shoal_core::scheduler::{PeerSlot, PiecePicker, PieceState};

const PEERS_MAX: u16 = 64;
const BACKGROUND_PEERS: u16 = 40;
const PROBES: u16 = 8;

/// Both pickers fed the same events.
struct Swarm {
    fast: PiecePicker,
    naive: NaivePicker,
}

impl Swarm {
    fn new(pieces: u32, rng: &mut ChaCha8Rng, with_naive: bool) -> Self {
        let fast = PiecePicker::new(pieces, PEERS_MAX, rng);
        let naive = NaivePicker::new(if with_naive { pieces } else { 0 }, PEERS_MAX);
        Self { fast, naive }
    }

    fn add_peer(&mut self, slot: u16, has: impl Fn(u32) -> bool, pieces: u32, with_naive: bool) {
        let slot = PeerSlot(slot);
        self.fast.add_peer(slot).unwrap();
        let mut packed = vec![0u8; pieces.div_ceil(8) as usize];
        for p in 0..pieces {
            if has(p) {
                packed[(p / 8) as usize] |= 0x80 >> (p % 8);
            }
        }
        self.fast.peer_bitfield(slot, &packed).unwrap();
        if with_naive {
            self.naive.add_peer(slot);
            for p in 0..pieces {
                if has(p) {
                    self.naive.peer_have(slot, PieceIndex(p));
                }
            }
        }
    }

    fn complete(&mut self, piece: u32, with_naive: bool) {
        self.fast.complete(PieceIndex(piece)).unwrap();
        if with_naive {
            self.naive.set_state(PieceIndex(piece), PieceState::Have);
        }
    }
}

fn random_set(pieces: u32, density: f64, rng: &mut ChaCha8Rng) -> Vec<bool> {
    (0..pieces).map(|_| rng.random_bool(density)).collect()
}

/// A swarm with background peers and `PROBES` probe peers of `profile`.
fn build(pieces: u32, profile: &str, with_naive: bool) -> Swarm {
    let mut rng = ChaCha8Rng::seed_from_u64(u64::from(pieces));
    let mut swarm = Swarm::new(pieces, &mut rng, with_naive);
    if profile == "common_only" {
        // Half the pieces (set A) are held by every background peer; the
        // other half only sparsely. Probes hold exactly A.
        let in_a: Vec<bool> = random_set(pieces, 0.5, &mut rng);
        for slot in 0..BACKGROUND_PEERS {
            let sparse = random_set(pieces, 0.1, &mut rng);
            swarm.add_peer(slot, |p| in_a[p as usize] || sparse[p as usize], pieces, with_naive);
        }
        for probe in 0..PROBES {
            swarm.add_peer(BACKGROUND_PEERS + probe, |p| in_a[p as usize], pieces, with_naive);
        }
        return swarm;
    }
    for slot in 0..BACKGROUND_PEERS {
        let density = rng.random_range(0.1..0.9);
        let bits = random_set(pieces, density, &mut rng);
        swarm.add_peer(slot, |p| bits[p as usize], pieces, with_naive);
    }
    for p in 0..pieces {
        if rng.random_bool(0.2) {
            swarm.complete(p, with_naive);
        }
    }
    let density = match profile {
        "1pct" => 0.01,
        "50pct" => 0.5,
        _ => 1.0,
    };
    for probe in 0..PROBES {
        let bits = random_set(pieces, density, &mut rng);
        swarm.add_peer(BACKGROUND_PEERS + probe, |p| density >= 1.0 || bits[p as usize], pieces, with_naive);
    }
    swarm
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for pieces in [1_000u32, 10_000, 100_000] {
        for profile in ["1pct", "50pct", "100pct", "common_only"] {
            let mut swarm = build(pieces, profile, true);
            for probe in 0..PROBES {
                let slot = PeerSlot(BACKGROUND_PEERS + probe);
                let fast = swarm.fast.pick(slot).expect("probe has a free piece");
                let valid = swarm.naive.rarest_choices(slot);
                assert!(valid.contains(&fast), "picker disagrees with the reference");
            }
            let id = format!("{pieces}/{profile}");
            let mut probe = 0u16;
            group.bench_function(BenchmarkId::new("rarest_first", &id), |b| {
                b.iter(|| {
                    probe = (probe + 1) % PROBES;
                    black_box(swarm.fast.pick(PeerSlot(BACKGROUND_PEERS + probe)))
                })
            });
            // Worst case: no floor at all (includes resetting 48 floors).
            group.bench_function(BenchmarkId::new("rarest_first_cold", &id), |b| {
                b.iter(|| {
                    probe = (probe + 1) % PROBES;
                    swarm.fast.reset_floors();
                    black_box(swarm.fast.pick(PeerSlot(BACKGROUND_PEERS + probe)))
                })
            });
            group.bench_function(BenchmarkId::new("naive_scan", &id), |b| {
                b.iter(|| {
                    probe = (probe + 1) % PROBES;
                    black_box(swarm.naive.pick(PeerSlot(BACKGROUND_PEERS + probe)))
                })
            });
        }
    }
    group.finish();
}

// Benchmarks time real work: the wall clock is the point here.
#[allow(clippy::disallowed_methods)]
fn have(c: &mut Criterion) {
    let mut group = c.benchmark_group("have");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for pieces in [1_000u32, 10_000, 100_000] {
        let mut swarm = build(pieces, "50pct", false);
        let slot = PeerSlot(PEERS_MAX - 1);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut order: Vec<u32> = (0..pieces).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        swarm.fast.add_peer(slot).unwrap();
        let mut next = 0usize;
        group.bench_function(BenchmarkId::new("rarest_first", pieces), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    if next == order.len() {
                        // The peer has everything: start it over, untimed.
                        swarm.fast.remove_peer(slot).unwrap();
                        swarm.fast.add_peer(slot).unwrap();
                        next = 0;
                    }
                    let batch = left.min((order.len() - next) as u64) as usize;
                    let start = Instant::now();
                    for &piece in &order[next..next + batch] {
                        black_box(swarm.fast.peer_have(slot, PieceIndex(piece)).unwrap());
                    }
                    timed += start.elapsed();
                    next += batch;
                    left -= batch as u64;
                }
                timed
            })
        });
    }
    group.finish();
}

fn bitfield(c: &mut Criterion) {
    let mut group = c.benchmark_group("bitfield");
    group.warm_up_time(Duration::from_millis(500));
    group.measurement_time(Duration::from_secs(2));
    for pieces in [1_000u32, 10_000, 100_000] {
        let mut swarm = build(pieces, "50pct", false);
        let slot = PeerSlot(PEERS_MAX - 1);
        let full = vec![0xffu8; pieces.div_ceil(8) as usize];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let half: Vec<u8> = (0..pieces.div_ceil(8)).map(|_| rng.random::<u8>()).collect();
        for (name, bits) in [("full", &full), ("half", &half)] {
            group.bench_function(BenchmarkId::new("rarest_first", format!("{pieces}/{name}")), |b| {
                b.iter(|| {
                    swarm.fast.add_peer(slot).unwrap();
                    swarm.fast.peer_bitfield(slot, black_box(bits)).unwrap();
                    swarm.fast.remove_peer(slot).unwrap();
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pick, have, bitfield);
criterion_main!(benches);
