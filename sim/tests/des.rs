//! The discrete-event engine on the scenario model: determinism, faults,
//! and agreement with the turmoil engine (which runs the real driver).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use shoal_sim::model::*;
use shoal_sim::observe::{Fact, Outcome};
use shoal_sim::summary::Summary;

const MIB: u64 = 1024 * 1024;

fn secs(s: u64) -> Dur {
    Dur(Duration::from_secs(s))
}

fn on(engine: EngineKind, scenario: &Scenario) -> (Outcome, Summary) {
    let mut s = scenario.clone();
    s.engine = engine;
    shoal_sim::run(&s, None).unwrap()
}

fn des(scenario: &Scenario) -> (Outcome, Summary) {
    on(EngineKind::Des, scenario)
}

fn all_completed(s: &Summary) {
    assert_eq!(s.downloads.completed, s.downloads.asked, "every download completed: {:?}", s.downloads);
    assert!(s.checks[0].ok, "{:?}", s.checks[0]);
}

#[test]
fn probe_flash_crowd() {
    let s = Scenario::flash_crowd(29, 8 * MIB, 11);
    let (d_out, d) = des(&s);
    eprintln!("des: {:?} bound {:?} bytes {:?} stats {:?}", d.downloads, d.lower_bound_s, d.bytes.by_kind, d_out.engine_stats);
    let (_, t) = on(EngineKind::Turmoil, &s);
    eprintln!("turmoil: {:?} bound {:?} bytes {:?}", t.downloads, t.lower_bound_s, t.bytes.by_kind);
    all_completed(&d);
}
