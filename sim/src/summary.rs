//! A run's metrics and checks, from the plan and the outcome: the same
//! figures whichever engine ran it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;
use shoal_node::core::ids::NodeId;
use shoal_node::core::node::LookupKind;
use shoal_node::core::wire::MessageId;

use crate::model::{Action, Behaviour, Plan, Scenario};
use crate::observe::{Fact, Outcome};

/// Percentiles of a sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Spread {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// Largest.
    pub max: f64,
}

impl Spread {
    /// Nearest-rank percentiles; zeros for an empty sample.
    #[must_use]
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if v.is_empty() {
                return 0.0;
            }
            let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
            v[rank - 1]
        };
        Self { p50: at(0.5), p90: at(0.9), max: v.last().copied().unwrap_or(0.0) }
    }
}

/// Downloads.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Downloads {
    /// Asks in the plan.
    pub asked: usize,
    /// Manifests found (downloads that ran).
    pub started: usize,
    /// Completed with every piece verified.
    pub completed: usize,
    /// Seconds from ask to completion, of the completed ones.
    pub completion_s: Spread,
}

/// Random node lookups (the `lookups` workload).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Lookups {
    /// Issued to hosts that were up.
    pub count: usize,
    /// Found the closest live node to the target.
    pub succeeded: usize,
    /// succeeded / count (1 when none).
    pub success_ratio: f64,
    /// Hops, median.
    pub rounds_p50: f64,
    /// Hops, 90th percentile.
    pub rounds_p90: f64,
    /// Milliseconds, median.
    pub latency_ms_p50: f64,
}

/// Name searches.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Searches {
    /// Searches issued.
    pub count: usize,
    /// Answers that included the expected file.
    pub succeeded: usize,
}

/// Gossip.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Gossip {
    /// Messages published on the broadcast topic (Files).
    pub published: usize,
    /// Mean fraction of the hosts up at both the publish and the end that
    /// received each message. The broadcast topic only (Files): Peers
    /// announcements and Swarm notices are relayed on a budget, sampled by
    /// design.
    pub delivery_ratio: f64,
    /// Copies of already-seen messages per host.
    pub duplicates_per_node: f64,
}

/// Bytes on the wire.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Traffic {
    /// Block frames.
    pub payload: u64,
    /// Everything else (DHT, gossip, exchange control, handshakes).
    pub overhead: u64,
    /// Block bytes that never became a verified piece (failed, duplicate
    /// or lost in flight).
    pub wasted: u64,
    /// By frame kind.
    pub by_kind: BTreeMap<String, u64>,
}

/// One expectation's verdict.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// The figures behind it.
    pub detail: String,
}

/// Everything a run reports (the `--json` object).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Seed.
    pub seed: u64,
    /// Engine.
    pub engine: String,
    /// Hosts.
    pub hosts: usize,
    /// Simulated seconds run.
    pub sim_seconds: f64,
    /// Wall seconds (set by the runner; 0 in snapshots).
    pub wall_seconds: f64,
    /// Trace fingerprint.
    pub trace_hash: String,
    /// Events in the trace.
    pub events: u64,
    /// Downloads.
    pub downloads: Downloads,
    /// Kumar-Ross minimum distribution time, where it applies.
    pub lower_bound_s: Option<f64>,
    /// Last completion over the lower bound.
    pub bound_ratio: Option<f64>,
    /// Node lookups.
    pub lookups: Lookups,
    /// Searches.
    pub searches: Searches,
    /// Gossip.
    pub gossip: Gossip,
    /// Bytes.
    pub bytes: Traffic,
    /// Pieces verified and failed, over all hosts.
    pub pieces: BTreeMap<String, u64>,
    /// Ban events.
    pub bans: usize,
    /// Engine-specific figures.
    pub engine_stats: BTreeMap<String, f64>,
    /// Expectations.
    pub checks: Vec<Check>,
    /// Every check held.
    pub ok: bool,
}

/// The Kumar-Ross minimum time to distribute one file of `file` bytes
/// from seeders with total upload `seed_up` to downloaders with uploads
/// `ups` and slowest downlink `down_min`:
/// max{F/u_s, F/d_min, N·F/(u_s + Σu_i)}.
#[must_use]
pub fn kumar_ross(file: u64, seed_up: u64, ups: &[u64], down_min: Option<u64>) -> f64 {
    let f = file as f64;
    let n = ups.len() as f64;
    let total = seed_up as f64 + ups.iter().map(|&u| u as f64).sum::<f64>();
    let mut bound = (f / seed_up as f64).max(n * f / total);
    if let Some(d) = down_min {
        bound = bound.max(f / d as f64);
    }
    bound
}

/// The bound for a plan, when it applies: one file, every ask at the same
/// time, no churn, crash or partition, and every capacity known.
#[must_use]
pub fn lower_bound(scenario: &Scenario, plan: &Plan) -> Option<f64> {
    if plan.files.len() != 1 || plan.gets.is_empty() {
        return None;
    }
    let ask = plan.gets[0].2;
    let faults = plan
        .actions
        .iter()
        .any(|(_, a)| matches!(a, Action::Crash { .. } | Action::Restart { .. } | Action::Split { .. }));
    if faults || plan.gets.iter().any(|g| g.2 != ask) {
        return None;
    }
    let seeders: BTreeSet<usize> = plan
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            // Corrupt uploads deliver nothing: only honest seeders count.
            Action::Share { host, .. } if plan.hosts[*host].behaviour == Behaviour::Honest => Some(*host),
            _ => None,
        })
        .collect();
    let seed_up: u64 = seeders.iter().map(|&h| plan.hosts[h].uplink).sum::<Option<u64>>()?;
    let ups: Option<Vec<u64>> = plan.gets.iter().map(|g| plan.hosts[g.0].uplink).collect();
    let down_min = plan.gets.iter().filter_map(|g| plan.hosts[g.0].downlink).min();
    let _ = scenario;
    Some(kumar_ross(plan.files[0].bytes, seed_up, &ups?, down_min))
}

fn ratio(num: usize, den: usize) -> f64 {
    if den == 0 { 1.0 } else { num as f64 / den as f64 }
}

/// Metrics and checks of a finished run.
#[must_use]
pub fn summarize(scenario: &Scenario, plan: &Plan, outcome: &Outcome) -> Summary {
    let records = &outcome.records;

    // Downloads: first completion per (host, file), from its ask.
    let asks: BTreeMap<(usize, usize), Duration> = plan.gets.iter().map(|&(h, f, at)| ((h, f), at)).collect();
    let mut started = BTreeSet::new();
    let mut completed: BTreeMap<(usize, usize), Duration> = BTreeMap::new();
    for r in records {
        let key = |file: u16| (r.host as usize, usize::from(file));
        match r.fact {
            Fact::DownloadStarted { file } => {
                started.insert(key(file));
            }
            Fact::DownloadCompleted { file } if asks.contains_key(&key(file)) => {
                completed.entry(key(file)).or_insert(r.at);
            }
            _ => {}
        }
    }
    let completion: Vec<f64> = completed.iter().map(|(k, at)| at.saturating_sub(asks[k]).as_secs_f64()).collect();
    let downloads = Downloads {
        asked: asks.len(),
        started: started.len(),
        completed: completed.len(),
        completion_s: Spread::of(&completion),
    };
    let lower_bound_s = lower_bound(scenario, plan);
    let bound_ratio = lower_bound_s
        .filter(|_| downloads.completed == downloads.asked && downloads.asked > 0)
        .map(|bound| downloads.completion_s.max / bound);

    // Lookups: each planned lookup against the closest node up at its ask.
    let lookups = lookup_metrics(plan, outcome);

    // Searches.
    let mut searches = Searches::default();
    let mut pending: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (_, action) in &plan.actions {
        if let Action::Search { host, search } = action {
            searches.count += 1;
            pending.entry(*host).or_default().push(*search);
        }
    }
    for r in records {
        if let Fact::SearchResults { files } = &r.fact
            && let Some(queue) = pending.get_mut(&(r.host as usize))
            && !queue.is_empty()
        {
            let search = queue.remove(0);
            let want = plan.files.iter().position(|f| f.name == scenario.searches[search].expect_file);
            if want.is_some_and(|w| files.contains(&(w as u16))) {
                searches.succeeded += 1;
            }
        }
    }

    // Gossip.
    let end = outcome.sim_time;
    let mut published: BTreeMap<MessageId, (usize, Duration)> = BTreeMap::new();
    let mut delivered: BTreeMap<MessageId, BTreeSet<usize>> = BTreeMap::new();
    for r in records {
        match r.fact {
            Fact::GossipPublished { id, broadcast: true } => {
                published.entry(id).or_insert((r.host as usize, r.at));
            }
            Fact::GossipDelivered { id } => {
                delivered.entry(id).or_default().insert(r.host as usize);
            }
            _ => {}
        }
    }
    let ratios: Vec<f64> = published
        .iter()
        .map(|(id, &(origin, at))| {
            let eligible: Vec<usize> =
                (0..plan.hosts.len()).filter(|&h| h != origin && plan.is_up(h, at) && plan.is_up(h, end)).collect();
            let got = delivered.get(id);
            let reached = eligible.iter().filter(|h| got.is_some_and(|g| g.contains(h))).count();
            ratio(reached, eligible.len())
        })
        .collect();
    let gossip = Gossip {
        published: published.len(),
        delivery_ratio: if ratios.is_empty() { 1.0 } else { ratios.iter().sum::<f64>() / ratios.len() as f64 },
        duplicates_per_node: outcome.gossip_duplicates as f64 / plan.hosts.len() as f64,
    };

    // Bytes and pieces.
    let mut verified_bytes = 0u64;
    let (mut verified, mut failed, mut bans) = (0u64, 0u64, 0usize);
    for r in records {
        match r.fact {
            Fact::PieceVerified { file, piece } => {
                verified += 1;
                if let Some(f) = plan.files.get(usize::from(file)) {
                    let start = u64::from(piece) * u64::from(f.piece_bytes);
                    verified_bytes += f.bytes.saturating_sub(start).min(u64::from(f.piece_bytes));
                }
            }
            Fact::PieceFailed { .. } => failed += 1,
            Fact::Banned { .. } => bans += 1,
            _ => {}
        }
    }
    let payload = outcome.bytes_by_kind.get("block").copied().unwrap_or(0);
    let total: u64 = outcome.bytes_by_kind.values().sum();
    let bytes = Traffic {
        payload,
        overhead: total - payload,
        wasted: payload.saturating_sub(verified_bytes),
        by_kind: outcome.bytes_by_kind.clone(),
    };
    let pieces = BTreeMap::from([("verified".to_owned(), verified), ("failed".to_owned(), failed)]);

    let mut summary = Summary {
        scenario: scenario.name.clone(),
        seed: scenario.seed,
        engine: outcome.engine.to_string(),
        hosts: plan.hosts.len(),
        sim_seconds: outcome.sim_time.as_secs_f64(),
        wall_seconds: 0.0,
        trace_hash: outcome.trace_hex(),
        events: outcome.events,
        downloads,
        lower_bound_s,
        bound_ratio,
        lookups,
        searches,
        gossip,
        bytes,
        pieces,
        bans,
        engine_stats: outcome.engine_stats.clone(),
        checks: Vec::new(),
        ok: true,
    };
    summary.checks = checks(scenario, plan, outcome, &summary);
    summary.ok = summary.checks.iter().all(|c| c.ok);
    summary
}

/// Host ids in order, for "the closest host to a target that passes a
/// test" without measuring every host (10,000 lookups at 100,000 hosts
/// are 10^9 distances otherwise).
struct ById {
    /// (id, host), sorted by id.
    sorted: Vec<(NodeId, usize)>,
}

impl ById {
    fn new(ids: &[NodeId]) -> Self {
        let mut sorted: Vec<(NodeId, usize)> = ids.iter().copied().zip(0..).collect();
        sorted.sort_unstable();
        Self { sorted }
    }

    /// The id closest to `target` (XOR) among the hosts `ok` accepts.
    fn closest(&self, target: &NodeId, ok: impl Fn(usize) -> bool) -> Option<NodeId> {
        self.descend(0, self.sorted.len(), 0, target, &ok)
    }

    /// In `sorted[lo..hi]`, whose ids agree with each other on their first
    /// `bit` bits: every id that also agrees with `target` on bit `bit` is
    /// closer than every id that does not, so that half is searched first.
    fn descend(
        &self,
        lo: usize,
        hi: usize,
        bit: usize,
        target: &NodeId,
        ok: &impl Fn(usize) -> bool,
    ) -> Option<NodeId> {
        const SCAN: usize = 8;
        if hi - lo <= SCAN || bit == 8 * target.0.len() {
            return self.sorted[lo..hi]
                .iter()
                .filter(|&&(_, h)| ok(h))
                .map(|&(id, _)| id)
                .min_by_key(|id| id.distance(target));
        }
        let set = |id: &NodeId| id.0[bit / 8] >> (7 - bit % 8) & 1 == 1;
        let mid = lo + self.sorted[lo..hi].partition_point(|(id, _)| !set(id));
        let (near, far) = if set(target) { ((mid, hi), (lo, mid)) } else { ((lo, mid), (mid, hi)) };
        self.descend(near.0, near.1, bit + 1, target, ok).or_else(|| self.descend(far.0, far.1, bit + 1, target, ok))
    }
}

fn lookup_metrics(plan: &Plan, outcome: &Outcome) -> Lookups {
    let mut asked: BTreeMap<(usize, NodeId), Duration> = BTreeMap::new();
    for (at, action) in &plan.actions {
        if let Action::Lookup { host, target } = action {
            asked.insert((*host, *target), *at);
        }
    }
    let by_id = ById::new(&outcome.node_ids);
    let (mut rounds, mut latency) = (Vec::new(), Vec::new());
    let mut succeeded = 0;
    for r in &outcome.records {
        match &r.fact {
            Fact::Lookup { kind: LookupKind::FindNode, rounds: n, duration, .. } => {
                rounds.push(f64::from(*n));
                latency.push(duration.as_secs_f64() * 1e3);
            }
            Fact::NodesFound { target, closest } => {
                let Some(&at) = asked.get(&(r.host as usize, *target)) else { continue };
                let truth = by_id.closest(target, |h| h != r.host as usize && plan.is_up(h, at));
                if truth.is_some() && *closest == truth {
                    succeeded += 1;
                }
            }
            _ => {}
        }
    }
    let rounds = Spread::of(&rounds);
    Lookups {
        count: asked.len(),
        succeeded,
        success_ratio: ratio(succeeded, asked.len()),
        rounds_p50: rounds.p50,
        rounds_p90: rounds.p90,
        latency_ms_p50: Spread::of(&latency).p50,
    }
}

fn checks(scenario: &Scenario, plan: &Plan, outcome: &Outcome, s: &Summary) -> Vec<Check> {
    let e = &scenario.expect;
    let mut out = Vec::new();
    if s.downloads.asked > 0 {
        out.push(Check {
            name: "downloaded data is exact".into(),
            ok: outcome.bad_content.is_empty(),
            detail: if outcome.bad_content.is_empty() {
                format!("{} completed downloads hold the file's bytes", s.downloads.completed)
            } else {
                format!("wrong bytes at {}", outcome.bad_content.join(", "))
            },
        });
    }
    let mut check = |name: String, ok: bool, detail: String| out.push(Check { name, ok, detail });
    if let Some(within) = e.downloads_complete_within {
        let ok = s.downloads.completed == s.downloads.asked && s.downloads.completion_s.max <= within.0.as_secs_f64();
        check(
            format!("every download completes within {:.1} s", within.0.as_secs_f64()),
            ok,
            format!(
                "{}/{} completed, slowest {:.2} s",
                s.downloads.completed, s.downloads.asked, s.downloads.completion_s.max
            ),
        );
    }
    if let Some(min) = e.completion_ratio_min {
        let got = ratio(s.downloads.completed, s.downloads.asked);
        check(
            format!("completion ratio ≥ {min}"),
            got >= min,
            format!("{}/{} = {got:.3}", s.downloads.completed, s.downloads.asked),
        );
    }
    if let Some(max) = e.bound_ratio_max {
        let detail = match (s.bound_ratio, s.lower_bound_s) {
            (Some(r), Some(b)) => format!("last {:.2} s / bound {b:.2} s = {r:.3}", s.downloads.completion_s.max),
            _ => "no bound (not every download completed, or the bound does not apply)".into(),
        };
        check(format!("last completion ≤ {max} × lower bound"), s.bound_ratio.is_some_and(|r| r <= max), detail);
    }
    if let Some(min) = e.lookup_success_min {
        check(
            format!("lookup success ≥ {min}"),
            s.lookups.count > 0 && s.lookups.success_ratio >= min,
            format!("{}/{} = {:.4}", s.lookups.succeeded, s.lookups.count, s.lookups.success_ratio),
        );
    }
    if let Some(max) = e.lookup_rounds_p50_max {
        check(
            format!("median lookup rounds ≤ {max}"),
            s.lookups.count > 0 && s.lookups.rounds_p50 <= max,
            format!("p50 {} p90 {}", s.lookups.rounds_p50, s.lookups.rounds_p90),
        );
    }
    if let Some(min) = e.gossip_delivery_min {
        check(
            format!("gossip delivery ≥ {min}"),
            s.gossip.published > 0 && s.gossip.delivery_ratio >= min,
            format!("{} messages, delivery {:.4}", s.gossip.published, s.gossip.delivery_ratio),
        );
    }
    if let Some(min) = e.search_success_min {
        let got = ratio(s.searches.succeeded, s.searches.count);
        check(
            format!("search success ≥ {min}"),
            s.searches.count > 0 && got >= min,
            format!("{}/{} = {got:.3}", s.searches.succeeded, s.searches.count),
        );
    }
    if e.bad_peers_banned == Some(true) {
        let bad: Vec<usize> =
            (0..plan.hosts.len()).filter(|&h| plan.hosts[h].behaviour == Behaviour::Corrupt).collect();
        let banned: BTreeSet<NodeId> = outcome
            .records
            .iter()
            .filter_map(|r| match r.fact {
                Fact::Banned { peer } => Some(peer),
                _ => None,
            })
            .collect();
        let missed: Vec<&str> = bad
            .iter()
            .filter(|&&h| !banned.contains(&outcome.node_ids[h]))
            .map(|&h| plan.hosts[h].name.as_str())
            .collect();
        check(
            "every corrupting host is banned".into(),
            !bad.is_empty() && missed.is_empty(),
            if missed.is_empty() {
                format!("{} corrupting hosts, {} ban events", bad.len(), s.bans)
            } else {
                format!("never banned: {}", missed.join(", "))
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kumar_ross_takes_the_binding_constraint() {
        // Seed-bound: 8 MiB from 2 MB/s, peers with plenty of upload.
        let f = 8 << 20;
        assert!((kumar_ross(f, 2_000_000, &[10_000_000; 3], None) - 4.194304).abs() < 1e-9);
        // Swarm-bound: 29 peers at 1 MB/s: 29·F/(2+29) MB/s.
        let b = kumar_ross(f, 2_000_000, &[1_000_000; 29], Some(10_000_000));
        assert!((b - 29.0 * f as f64 / 31e6).abs() < 1e-9, "{b}");
        // Download-bound.
        assert!((kumar_ross(f, 100_000_000, &[100_000_000; 2], Some(1_000_000)) - f as f64 / 1e6).abs() < 1e-9);
    }

    #[test]
    fn the_closest_passing_host_is_the_one_a_full_scan_finds() {
        use rand::{Rng, RngExt, SeedableRng};
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(3);
        let mut id = || {
            let mut b = [0u8; 32];
            rng.fill_bytes(&mut b);
            NodeId(b)
        };
        let mut ids: Vec<NodeId> = (0..2_000).map(|_| id()).collect();
        // Ids sharing long prefixes, as a lookup's target and its closest do.
        let near = ids[7];
        for n in 0..40 {
            let mut b = near.0;
            b[31 - n / 8] ^= 1 << (n % 8);
            ids.push(NodeId(b));
        }
        let by_id = ById::new(&ids);
        let targets: Vec<NodeId> = (0..300).map(|i| if i % 3 == 0 { ids[i % ids.len()] } else { id() }).collect();
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(4);
        for (i, target) in targets.iter().enumerate() {
            // Hosts down at random, more and more of them.
            let down: BTreeSet<usize> = (0..ids.len()).filter(|_| rng.random_range(0..300) < i).collect();
            let ok = |h: usize| !down.contains(&h) && h != 7;
            let full = (0..ids.len()).filter(|&h| ok(h)).map(|h| ids[h]).min_by_key(|id| id.distance(target));
            assert_eq!(by_id.closest(target, ok), full, "target {i}");
        }
        assert_eq!(by_id.closest(&targets[0], |_| false), None);
    }

    #[test]
    fn spreads_use_nearest_rank() {
        let s = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.p50, s.p90, s.max), (3.0, 5.0, 5.0));
        assert_eq!(Spread::of(&[]), Spread::default());
    }
}
