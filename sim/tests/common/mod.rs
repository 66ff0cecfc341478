//! Scenarios and checks both engines' tests share.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use shoal_sim::model::{
    Behaviour, CrashSpec, DownloadSpec, Dur, LookupSpec, PartitionSpec, Rate, Scenario, SearchSpec,
};
use shoal_sim::observe::{Fact, Outcome};
use shoal_sim::summary::Summary;

pub const MIB: u64 = 1024 * 1024;

pub fn secs(s: u64) -> Dur {
    Dur(Duration::from_secs(s))
}

/// A 10-host flash crowd of a 2 MiB file.
pub fn small(seed: u64) -> Scenario {
    let mut s = Scenario::flash_crowd(9, 2 * MIB, seed);
    s.duration = secs(120);
    s
}

pub fn all_completed(s: &Summary) {
    assert_eq!(s.downloads.completed, s.downloads.asked, "every download completed: {:?}", s.downloads);
    assert!(s.checks[0].ok, "{:?}", s.checks[0]);
}

/// 20 hosts, no downloads: 40 random node lookups and a search by every
/// leecher for the shared file's words.
pub fn lookups_and_search(seed: u64) -> Scenario {
    let mut s = small(seed);
    s.hosts[1].count = 19;
    s.downloads.clear();
    s.files[0].name = "Ubuntu 24.04 desktop.iso".into();
    s.lookups = Some(LookupSpec { count: 40, from: secs(10), over: secs(10), by: None });
    s.searches.push(SearchSpec {
        by: "leechers".into(),
        text: "ubuntu desktop".into(),
        at: secs(12),
        expect_file: "Ubuntu 24.04 desktop.iso".into(),
    });
    s.duration = secs(60);
    s
}

/// Lookups find the closest live node, searches their file, gossip spreads.
pub fn lookups_and_searches_answered(summary: &Summary) {
    assert_eq!(summary.lookups.count, 40);
    assert!(summary.lookups.success_ratio >= 0.95, "{:?}", summary.lookups);
    assert_eq!(summary.searches.succeeded, summary.searches.count, "{:?}", summary.searches);
    assert!(summary.gossip.published > 0 && summary.gossip.delivery_ratio > 0.9, "{:?}", summary.gossip);
}

/// `small` plus one corrupting host that downloads too; expects it banned.
pub fn with_corrupting_host(seed: u64) -> Scenario {
    let mut s = small(seed);
    let mut bad = s.hosts[1].clone();
    bad.name = "bad".into();
    bad.count = 1;
    bad.behaviour = Behaviour::Corrupt;
    s.hosts.push(bad);
    s.downloads.push(DownloadSpec { file: "flash.bin".into(), by: "bad".into(), after: secs(3) });
    s.expect.bad_peers_banned = Some(true);
    s
}

/// Everyone completed with exact bytes, the corrupting host was banned,
/// and its blocks failed their hash checks.
pub fn corrupting_host_banned(summary: &Summary) {
    all_completed(summary);
    assert!(summary.ok, "{:?}", summary.checks);
    assert!(summary.pieces["failed"] > 0, "the bad blocks failed their hash checks");
}

/// Hosts 8..16 (class `far`) are cut off from 4 s to 64 s, just after
/// asking.
pub fn half_partitioned(seed: u64) -> Scenario {
    let mut s = Scenario::flash_crowd(7, 2 * MIB, seed);
    let mut far = s.hosts[1].clone();
    far.name = "far".into();
    far.count = 8;
    s.hosts.push(far);
    s.downloads.push(DownloadSpec { file: "flash.bin".into(), by: "far".into(), after: secs(3) });
    s.partitions.push(PartitionSpec { side: vec!["far".into()], at: secs(4), heal: Some(secs(64)) });
    s
}

/// When `RESTARTED` crashes (mid-transfer: 400 KB/s downloads make 2 MiB
/// take over 5 s).
pub const CRASH_AT: Duration = Duration::from_secs(4);
/// The host that crashes and restarts (`leechers-4`).
pub const RESTARTED: u32 = 5;

/// `small` where `RESTARTED` crashes at `CRASH_AT` and restarts at 8 s.
pub fn with_restart(seed: u64) -> Scenario {
    let mut s = small(seed);
    s.hosts[1].downlink = Some(Rate(400_000));
    s.crashes.push(CrashSpec { class: "leechers".into(), index: 4, at: Dur(CRASH_AT), restart: Some(secs(8)) });
    s
}

/// When each of a host's pieces was verified.
pub fn verified_at(outcome: &Outcome, host: u32) -> Vec<Duration> {
    outcome
        .records
        .iter()
        .filter(|r| r.host == host && matches!(r.fact, Fact::PieceVerified { .. }))
        .map(|r| r.at)
        .collect()
}

/// The restarted host kept its pieces from before the crash, fetched the
/// rest after, and no piece twice; returns (before, after).
pub fn resumed_from_store(outcome: &Outcome, summary: &Summary) -> (usize, usize) {
    all_completed(summary);
    let times = verified_at(outcome, RESTARTED);
    let before = times.iter().filter(|&&at| at < CRASH_AT).count();
    assert!(before > 0, "it had verified pieces before the crash");
    assert!(times.len() > before, "it fetched the rest after the restart");
    assert_eq!(times.len(), 128, "no verified piece was fetched twice");
    (before, times.len() - before)
}
