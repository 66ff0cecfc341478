//! Shoal scenarios: the engine-neutral scenario format, the named catalog,
//! and the `shoal-sim` runner (run, sweep, reports). Built by the scenarios
//! issue; this crate currently only fixes its place in the workspace.

pub use shoal_sim as sim;
