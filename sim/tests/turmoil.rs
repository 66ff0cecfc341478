//! The turmoil engine on the scenario model: the node's own driver in a
//! simulated network, with faults.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shoal_sim::model::*;

mod common;
use common::{MIB, all_completed, secs, small};
use shoal_sim::observe::{Fact, Outcome};
use shoal_sim::summary::Summary;

fn run(scenario: &Scenario) -> (Outcome, Summary) {
    let run = shoal_sim::run(scenario, None).unwrap();
    (run.outcome, run.summary)
}

#[test]
fn a_flash_crowd_completes_with_verified_data_and_replays() {
    let (first, summary) = run(&small(7));
    all_completed(&summary);
    let (again, _) = run(&small(7));
    assert_eq!(first.trace_hash, again.trace_hash, "same seed, same trace");
    let (other, _) = run(&small(8));
    assert_ne!(first.trace_hash, other.trace_hash, "another seed, another trace");
    eprintln!(
        "turmoil flash crowd: {} downloads, last {:.2} s, bound {:?}, {} events",
        summary.downloads.completed, summary.downloads.completion_s.max, summary.lower_bound_s, summary.events
    );
}

/// The flash crowd: 30 hosts, one seed with a 2 MB/s uplink, an
/// 8 MiB file.
#[test]
fn thirty_hosts_fetch_eight_mib_from_a_two_mb_per_s_seed() {
    let (_, summary) = run(&Scenario::flash_crowd(29, 8 * MIB, 11));
    all_completed(&summary);
    assert!(summary.bytes.payload >= 29 * 8 * MIB, "every leecher got the file as blocks: {:?}", summary.bytes);
    let bound = summary.lower_bound_s.unwrap();
    assert!(summary.downloads.completion_s.max >= bound, "nobody beats the Kumar-Ross bound");
    eprintln!(
        "turmoil 30 hosts / 8 MiB: last {:.2} s, p50 {:.2} s, bound {bound:.2} s (ratio {:.2}); bytes {:?}",
        summary.downloads.completion_s.max,
        summary.downloads.completion_s.p50,
        summary.bound_ratio.unwrap(),
        summary.bytes.by_kind
    );
}

/// A corrupting host is banned by its peers and nobody keeps bad data.
#[test]
fn a_corrupting_host_is_banned_and_data_stays_verified() {
    let (_, summary) = run(&common::with_corrupting_host(12));
    common::corrupting_host_banned(&summary);
    eprintln!("turmoil bad peer: {} bans, {} failed pieces", summary.bans, summary.pieces["failed"]);
}

/// Half the hosts are cut off for 60 s right after asking; after the heal
/// every download still completes.
#[test]
fn downloads_complete_after_a_partition_heals() {
    let (_, summary) = run(&common::half_partitioned(13));
    all_completed(&summary);
    assert!(summary.downloads.completion_s.max > 60.0, "the cut-off half waited for the heal");
    eprintln!("turmoil partition: last {:.1} s after asking", summary.downloads.completion_s.max);
}

/// Two regions 80 ms apart (10 ms inside, 5 ms jitter): the crowd still
/// completes, later than in one region, and the jittered run replays.
#[test]
fn region_latencies_apply_and_replay() {
    let mut s = small(15);
    s.network.regions = vec!["eu".into(), "us".into()];
    s.network.matrix = vec![vec![Dur(Duration::from_millis(10)), Dur(Duration::from_millis(80))]; 2];
    s.network.matrix[1] = vec![Dur(Duration::from_millis(80)), Dur(Duration::from_millis(10))];
    s.network.jitter = Dur(Duration::from_millis(5));
    s.hosts[1].region = Some("us".into());
    let (far, far_summary) = run(&s);
    all_completed(&far_summary);
    let (_, near) = run(&small(15));
    assert!(
        far_summary.downloads.completion_s.max > near.downloads.completion_s.max,
        "80 ms links are slower: {} vs {}",
        far_summary.downloads.completion_s.max,
        near.downloads.completion_s.max
    );
    assert_eq!(far.trace_hash, run(&s).0.trace_hash, "jitter is seeded");
}

/// A downloader crashes mid-transfer and restarts with its store: it
/// resumes, fetching only the pieces it had not verified.
#[test]
fn a_restarted_downloader_resumes_from_its_store() {
    let (outcome, summary) = run(&common::with_restart(14));
    let (before, after) = common::resumed_from_store(&outcome, &summary);
    eprintln!("turmoil restart: {before} pieces before the crash, {after} after");
}

/// Churn from a session-length distribution, with Poisson arrivals:
/// downloaders come and go, restarting from their stores, and all finish;
/// the run replays exactly.
#[test]
fn churn_and_poisson_arrivals_still_complete_and_replay() {
    let mut s = small(16);
    s.hosts[1].count = 12;
    s.hosts[1].arrival = Arrival::Poisson { rate_per_s: 2.0, from: secs(1) };
    s.churn.push(ChurnSpec {
        class: "leechers".into(),
        session: Dist::Exponential { mean: secs(6) },
        downtime: Some(Dist::Uniform { min: secs(1), max: secs(3) }),
    });
    s.duration = secs(240);
    let plan = s.plan().unwrap();
    let crashes = plan.actions.iter().filter(|(_, a)| matches!(a, Action::Crash { .. })).count();
    let (outcome, summary) = run(&s);
    all_completed(&summary);
    let restarts = outcome.records.iter().filter(|r| r.fact == Fact::Restarted).count();
    assert!(restarts > 0, "hosts restarted ({crashes} crashes planned)");
    assert_eq!(outcome.trace_hash, run(&s).0.trace_hash, "churn is seeded");
    eprintln!(
        "turmoil churn: {restarts} restarts, last {:.1} s, p50 {:.1} s",
        summary.downloads.completion_s.max, summary.downloads.completion_s.p50
    );
}

/// Random node lookups and a name search over the driver: lookups find the
/// closest live node, searches find the file.
#[test]
fn lookups_and_searches_answer() {
    let (_, summary) = run(&common::lookups_and_search(17));
    common::lookups_and_searches_answered(&summary);
    eprintln!("turmoil lookups: {:?}; gossip {:?}", summary.lookups, summary.gossip);
}

/// Wall time per simulated second, for the record (release mode):
/// `cargo test --release -p shoal-sim --test turmoil -- --ignored --nocapture wall_time`.
/// `SHOAL_SIM_HOSTS` picks the sizes (default 25,50,100). It fails only if
/// a run does not complete with exact bytes.
#[allow(clippy::disallowed_methods)] // measuring wall time is the point
#[test]
#[ignore = "a measurement in release mode, minutes long"]
fn wall_time_per_simulated_second() {
    let sizes = std::env::var("SHOAL_SIM_HOSTS").unwrap_or_else(|_| "25,50,100".to_owned());
    for hosts in sizes.split(',').filter_map(|n| n.trim().parse::<usize>().ok()) {
        let mut scenario = Scenario::flash_crowd(hosts - 1, 8 * MIB, 21);
        scenario.duration = secs(600);
        let started = std::time::Instant::now();
        let (_, summary) = run(&scenario);
        let wall = started.elapsed().as_secs_f64();
        all_completed(&summary);
        eprintln!(
            "hosts {hosts}: last {:.2} s (bound {:.2} s); sim {:.1} s in wall {wall:.1} s: {:.2} wall s per sim s",
            summary.downloads.completion_s.max,
            summary.lower_bound_s.unwrap_or(f64::NAN),
            summary.sim_seconds,
            wall / summary.sim_seconds
        );
    }
}
