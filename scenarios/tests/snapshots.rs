//! Snapshots of small catalog scenarios' summaries at fixed seeds: any
//! change in behaviour (a trace hash, a completion time, a byte count)
//! shows up as a snapshot diff to review (`cargo insta review`, or
//! `INSTA_UPDATE=always cargo test -p shoal-scenarios --test snapshots`).
#![allow(clippy::unwrap_used)]

use shoal_scenarios::runner::{self, Options};

fn snapshot(name: &str) {
    let scenario = runner::prepare(name, &Options::default()).unwrap();
    let run = shoal_scenarios::sim::run(&scenario, None).unwrap();
    // Wall time is the one figure that is not a function of the seed.
    assert_eq!(run.summary.wall_seconds, 0.0);
    assert!(run.summary.ok, "{name} passes its expectations: {:?}", run.summary.checks);
    insta::assert_json_snapshot!(name, run.summary);
}

#[test]
fn name_search() {
    snapshot("name-search");
}

#[test]
fn bad_peer() {
    snapshot("bad-peer");
}

#[test]
fn partition_heal() {
    snapshot("partition-heal");
}
