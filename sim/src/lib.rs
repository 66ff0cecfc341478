//! Shoal's simulator: a turmoil engine that runs the node's own driver on a
//! simulated network, and a discrete-event engine that drives the core
//! machines directly for 10^4-10^5 nodes. Built by the turmoil and des
//! engine issues; this crate currently only fixes its place in the
//! workspace (`core <- node <- sim <- scenarios`).

pub use shoal_node as node;
