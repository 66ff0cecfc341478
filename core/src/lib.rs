//! Shoal's protocol core: a fully deterministic, sans-IO implementation of
//! the content model, the wire codec and (as they land) the Kademlia, gossip
//! and piece-exchange state machines.
//!
//! Contract (DESIGN.md, STYLE.md §1-§2):
//! - no networking, no filesystem, no threads, no clock: time arrives as a
//!   `now` parameter and randomness from a seeded RNG owned by each machine;
//! - only ordered containers are iterated, so the same inputs always give
//!   the same outputs (the simulator's trace hash depends on it);
//! - bytes from peers are untrusted: every decode and validation failure is
//!   an `Err`, never a panic. Broken internal invariants are `assert!`s.
//!
//! `core/clippy.toml` turns clock reads, unseeded randomness, thread spawns
//! and randomly-hashed maps into build errors.
#![deny(missing_docs)]

pub mod config;
pub mod content;
pub mod exchange;
pub mod gossip;
pub mod ids;
pub mod kad;
pub mod manifest;
pub mod node;
pub mod outputs;
pub mod scheduler;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod time;
pub mod vec_map;
pub mod wire;
