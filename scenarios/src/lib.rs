//! Shoal scenarios: the TOML scenario format ([`spec`]), the named
//! [`catalog`], the runner behind `shoal-sim` ([`runner`]), seed sweeps
//! ([`sweep`]) and the HTML report ([`report`]).

pub use shoal_sim as sim;

pub mod catalog;
pub mod report;
pub mod runner;
pub mod spec;
pub mod sweep;
