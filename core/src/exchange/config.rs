//! Limits and timings of the piece exchange.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::scheduler::DownloadConfig;

/// Piece-exchange limits (STYLE.md §3: every bound named, units last).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExchangeConfig {
    /// Block scheduling of downloads.
    pub download: DownloadConfig,
    /// Files served or fetched at once.
    pub files_max: u32,
    /// Peers exchanging one file with us; bounds per-file state and the
    /// picker's availability levels.
    pub peers_per_file_max: u16,
    /// Regular upload slots (peers unchoked for their merit).
    pub upload_slots: u32,
    /// Extra slots given at random, rotated every
    /// `optimistic_unchoke_interval` (BEP 3's optimistic unchoke).
    pub optimistic_unchoke_slots: u32,
    /// How often the regular slots are re-chosen.
    pub rechoke_interval: Duration,
    /// How often the optimistic slot rotates.
    pub optimistic_unchoke_interval: Duration,
    /// An unchoked peer that requests nothing for a whole interval gives
    /// its slot to an interested peer waiting for one: a slot is for
    /// uploading, and a peer interested in pieces it fetches elsewhere
    /// would hold it idle until the next rechoke.
    pub idle_slot_interval: Duration,
    /// HAVEs are batched, Nagle-style: a completed piece is announced at
    /// once if the session sent no HAVE in the last interval, else it
    /// waits for the interval's end and goes out with the others
    /// completed meanwhile, in one message. A choked peer cannot ask for
    /// the piece, so its interval is long; it hears at once the moment
    /// it is unchoked. A peer finishing a 16 KiB piece every 16 ms
    /// otherwise sends a frame per piece to every session: in a 200-peer
    /// flash crowd (des, seed 21) HAVEs were 90% of all frames. Batching
    /// only choked sessions, at 250 ms, cut the events from 15.0 M to
    /// 5.3 M; batching them at 500 ms and unchoked ones at 100 ms (with
    /// `have_at_once_below`) cuts the 1,000-peer crowd's events from
    /// 23.0 M to 16.1 M (README, "The 1,000-peer flash crowd"). Zero
    /// sends every HAVE at once.
    pub have_batch_interval: Duration,
    /// The same for a peer we unchoke, which may ask for a piece the
    /// moment it hears of it: short, so it does not run out of pieces to
    /// ask us for. Zero sends every HAVE at once.
    pub have_batch_interval_unchoked: Duration,
    /// An unchoked peer lacking fewer than this many of our pieces hears
    /// of a new one at once: the piece may be most of what it could ask
    /// us for (in a 20-host swarm, batching them all at 100 ms put the
    /// last completion 3% later). Zero batches them all.
    pub have_at_once_below: u32,
    /// Requests from one peer we hold before rejecting more: bounds the
    /// outgoing block queue per peer (libtorrent's
    /// `max_allowed_in_request_queue` is 500).
    pub requests_queued_per_peer_max: u32,
    /// Failed pieces a peer may send before it is banned from the file.
    pub strikes_max: u32,
    /// Nodes banned from one file that are remembered; past it the oldest
    /// ban is forgotten (identities are cheap, memory is not).
    pub bans_per_file_max: u32,
    /// Piece hashes asked for in one `HashRequest` (a power of two):
    /// 512 × 32 B = 16 KiB plus one proof path per batch.
    pub hash_batch_max: u32,
    /// A seed started with this set reveals pieces one by one (super
    /// seeding: no piece is served twice before every piece was served
    /// once; Bharambe et al. 2006 show it helps a slow seed).
    pub super_seeding: bool,
    /// Pieces a super seed reveals to one peer at a time.
    pub super_seed_reveals_per_peer: u32,
    /// Requests while choked we tolerate (they race a choke on the wire)
    /// before treating a peer as misbehaving.
    pub choked_requests_max: u32,
}

impl Default for ExchangeConfig {
    fn default() -> Self {
        Self {
            download: DownloadConfig::default(),
            files_max: 1024,
            peers_per_file_max: 64,
            upload_slots: 8,
            optimistic_unchoke_slots: 1,
            rechoke_interval: Duration::from_secs(10),
            optimistic_unchoke_interval: Duration::from_secs(30),
            idle_slot_interval: Duration::from_secs(1),
            have_batch_interval: Duration::from_millis(500),
            have_batch_interval_unchoked: Duration::from_millis(100),
            have_at_once_below: 64,
            requests_queued_per_peer_max: 256,
            strikes_max: 3,
            bans_per_file_max: 1024,
            hash_batch_max: 512,
            super_seeding: false,
            super_seed_reveals_per_peer: 2,
            choked_requests_max: 64,
        }
    }
}

impl ExchangeConfig {
    /// Reject values the exchange cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let check = |ok: bool, field, value: u64, why| {
            if ok { Ok(()) } else { Err(ConfigError::OutOfRange { field, value, why }) }
        };
        let d = &self.download;
        check(self.peers_per_file_max >= 1, "peers_per_file_max", self.peers_per_file_max.into(), "at least 1")?;
        check(self.upload_slots >= 1, "upload_slots", self.upload_slots.into(), "at least 1")?;
        check(self.strikes_max >= 1, "strikes_max", self.strikes_max.into(), "at least 1")?;
        check(
            d.requests_inflight_per_peer_min >= 1
                && d.requests_inflight_per_peer_min <= d.requests_inflight_per_peer_max,
            "download.requests_inflight_per_peer_min",
            d.requests_inflight_per_peer_min.into(),
            "between 1 and requests_inflight_per_peer_max",
        )?;
        check(
            d.unverified_bytes_max >= u64::from(crate::content::PIECE_BYTES_MAX),
            "download.unverified_bytes_max",
            d.unverified_bytes_max,
            "must hold the largest piece (16 MiB)",
        )?;
        for (field, interval) in
            [("rechoke_interval", self.rechoke_interval), ("idle_slot_interval", self.idle_slot_interval)]
        {
            check(!interval.is_zero(), field, interval.as_secs(), "must be positive")?;
        }
        Ok(())
    }
}
