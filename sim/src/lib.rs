//! Shoal's simulator: one typed scenario model ([`model`]) run by a turmoil
//! engine that hosts the node's own driver on a simulated network, and by
//! a discrete-event engine that drives the core machines directly for
//! 10^4–10^5 nodes. Both report into the same collector ([`observe`]) and
//! the same metrics ([`summary`]).

pub use shoal_node as node;

pub mod des;
pub mod model;
pub mod observe;
pub mod stores;
pub mod summary;
pub mod transport;
pub mod turmoil_engine;

use model::{EngineKind, Plan, Scenario};
use observe::Outcome;
use summary::Summary;

/// A finished run: what was planned, what happened, what it means.
#[derive(Clone, Debug)]
pub struct Run {
    /// The plan both engines follow.
    pub plan: Plan,
    /// What the engine observed.
    pub outcome: Outcome,
    /// Metrics and checks.
    pub summary: Summary,
}

/// Plan and run a scenario on its engine, and summarize it.
pub fn run(scenario: &Scenario, progress: Option<&mut dyn FnMut(turmoil_engine::Progress)>) -> Result<Run, String> {
    let plan = scenario.plan()?;
    let outcome = match scenario.engine {
        EngineKind::Turmoil => turmoil_engine::run(scenario, &plan, progress)?,
        EngineKind::Des => des::run(scenario, &plan, progress)?,
    };
    let summary = summary::summarize(scenario, &plan, &outcome);
    Ok(Run { plan, outcome, summary })
}
