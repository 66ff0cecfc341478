//! Scenarios and checks both engines' tests share.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use shoal_sim::model::{Dur, LookupSpec, Scenario, SearchSpec};
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
