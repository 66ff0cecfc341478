//! The Shoal node: THE driver that runs `shoal-core`'s machines over a
//! transport (tokio TCP for the `shoal` binary, turmoil's simulated network
//! in `shoal-sim`), plus the disk and memory stores, the CLI and the REST
//! API. Its place in the workspace: `core <- node <- sim <- scenarios`;
//! the README's "The node" section lists what each module does.

pub use shoal_core as core;

pub mod api;
pub mod client;
pub mod control;
pub mod driver;
pub mod framing;
pub mod handshake;
pub mod identity;
pub mod outbox;
pub mod ratelimit;
pub mod store;
pub mod transport;
