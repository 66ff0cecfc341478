//! Shoal's simulator: a turmoil engine that runs the node's own driver on a
//! simulated network, and (later) a discrete-event engine that drives the
//! core machines directly for 10^4-10^5 nodes.

pub use shoal_node as node;

pub mod transport;
pub mod turmoil_engine;
