//! Download scheduling: which piece to fetch from which peer, and when.
//!
//! - [`picker`]: rarest-first choice of the next piece for a peer, O(1)
//!   availability updates, seeds counted once.
//! - [`download`]: block requests per peer: ownership, pipelining depth,
//!   timeouts, streaming window, slow-peer takeover and endgame.
//! - `reference` (tests and benches only): the naive scan the picker is
//!   checked and measured against.

mod bitset;
pub mod download;
#[cfg(test)]
mod download_tests;
pub mod picker;
#[cfg(any(test, feature = "testkit"))]
pub mod reference;
#[cfg(test)]
mod tests;

pub use download::{BlockAccepted, BlockError, BlockRef, Download, DownloadConfig, PRIORITY_MAX, PRIORITY_NORMAL};
pub use picker::{PickPolicy, PickerError, PiecePicker, PieceState};

/// A small per-file index for a connected peer, assigned by the exchange,
/// so per-peer state lives in vectors rather than maps.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct PeerSlot(pub u16);
