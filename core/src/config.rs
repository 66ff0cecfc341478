//! Every limit and interval of the protocol core, named with its unit last
//! (STYLE.md §3). Each field says why it has the value it has; overflow of
//! any of them drops or disconnects and is counted, never grows memory.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::content::BLOCK_BYTES;
use crate::exchange::ExchangeConfig;
use crate::gossip::GossipConfig;
use crate::kad::KadConfig;

/// Protocol limits and intervals shared by every machine of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Largest frame accepted from or sent to a peer, excluding the 4-byte
    /// length prefix. The biggest legitimate frames are a manifest record
    /// with 1024 inline hashes (~33 KiB) and a 16 KiB block; 256 KiB leaves
    /// room while bounding what one peer can make us buffer.
    pub frame_bytes_max: u32,
    /// Connections open at once; bounds per-connection state in every
    /// machine (the driver refuses more and counts them).
    pub connections_max: u32,
    /// Past this many open connections the node closes the least recently
    /// used ones that carry only DHT traffic (no exchange session, no
    /// gossip mesh, no request of ours in flight), keeping room under
    /// `connections_max` for peers that dial us. A node bootstrapping into
    /// a large network dials ~10 lookups' worth of contacts at once.
    pub connections_target: u32,
    /// A connection with no exchange session, in no gossip mesh and with
    /// no DHT request in flight is closed after this long without DHT
    /// traffic (libp2p's idle connection timeout; its Kademlia handler
    /// keeps a connection 10 s past the last request). Long enough that
    /// a lookup's round trips and the next few lookups reuse it, short
    /// enough that a node stays far below `connections_max` while it
    /// answers lookups from a network of 10^5.
    pub connection_idle_timeout: Duration,
    /// DHT requests waiting for a connection to be dialled, over all
    /// addresses, and addresses with a dial pending; more fail at once
    /// (counted) rather than queue.
    pub dial_pending_max: u32,
    /// DHT requests in flight the node remembers the connection of (to
    /// fail them when it drops); Kademlia times out the rest itself.
    pub requests_tracked_max: u32,
    /// Providers a download connects to from one provider lookup.
    pub providers_per_lookup_max: u32,
    /// Every `provider_refresh_interval`, a running download with fewer
    /// peers than this looks for providers again; a provider lookup ends
    /// as soon as it knows this many.
    pub download_peers_target: u32,
    /// See `download_peers_target`.
    pub provider_refresh_interval: Duration,
    /// Swarm members a download remembers to dial (providers found,
    /// swarm notices heard).
    pub swarm_candidates_max: u32,
    /// Swarm members dialled per round, picked at random among those
    /// remembered, while the swarm has room.
    pub swarm_dials_per_round: u32,
    /// Time between dial rounds.
    pub swarm_dial_interval: Duration,
    /// Manifest lookups a `get` makes before it reports the file not found
    /// (a node asked to fetch right after it starts may not have joined
    /// yet); retries back off from 1 s, doubling, up to 30 s.
    pub manifest_lookup_attempts: u32,
    /// Kademlia limits and timings.
    pub kad: KadConfig,
    /// Gossip limits and timings.
    pub gossip: GossipConfig,
    /// Piece-exchange limits and timings.
    pub exchange: ExchangeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            frame_bytes_max: 256 * 1024,
            connections_max: 256,
            connections_target: 192,
            connection_idle_timeout: Duration::from_secs(20),
            dial_pending_max: 1024,
            requests_tracked_max: 4096,
            providers_per_lookup_max: 32,
            download_peers_target: 8,
            provider_refresh_interval: Duration::from_secs(30),
            swarm_candidates_max: 256,
            swarm_dials_per_round: 8,
            swarm_dial_interval: Duration::from_millis(100),
            manifest_lookup_attempts: 6,
            kad: KadConfig::default(),
            gossip: GossipConfig::default(),
            exchange: ExchangeConfig::default(),
        }
    }
}

/// A configuration value out of its usable range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A field is outside the range the protocol can work with.
    #[error("{field} = {value} is out of range: {why}")]
    OutOfRange {
        /// Field name, as in the config file.
        field: &'static str,
        /// The rejected value.
        value: u64,
        /// What it must satisfy.
        why: &'static str,
    },
}

impl Config {
    /// Reject values the protocol cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // A block plus its header must fit in a frame.
        if self.frame_bytes_max < 2 * BLOCK_BYTES {
            return Err(ConfigError::OutOfRange {
                field: "frame_bytes_max",
                value: u64::from(self.frame_bytes_max),
                why: "must hold a 16 KiB block with its header (>= 32768)",
            });
        }
        if self.manifest_lookup_attempts == 0 {
            return Err(ConfigError::OutOfRange { field: "manifest_lookup_attempts", value: 0, why: "at least 1" });
        }
        for (field, value) in [
            ("connections_max", self.connections_max),
            ("swarm_candidates_max", self.swarm_candidates_max),
            ("swarm_dials_per_round", self.swarm_dials_per_round),
        ] {
            if value == 0 {
                return Err(ConfigError::OutOfRange { field, value: 0, why: "at least 1" });
            }
        }
        if self.swarm_dial_interval.is_zero() {
            return Err(ConfigError::OutOfRange { field: "swarm_dial_interval", value: 0, why: "must be positive" });
        }
        if self.connections_target == 0 || self.connections_target > self.connections_max {
            return Err(ConfigError::OutOfRange {
                field: "connections_target",
                value: u64::from(self.connections_target),
                why: "between 1 and connections_max",
            });
        }
        self.kad.validate()?;
        self.gossip.validate()?;
        self.exchange.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_tiny_frames_are_not() {
        Config::default().validate().unwrap();
        let tiny = Config { frame_bytes_max: 1024, ..Config::default() };
        assert!(tiny.validate().is_err());
        let no_dials = Config { swarm_dials_per_round: 0, ..Config::default() };
        assert!(matches!(no_dials.validate(), Err(ConfigError::OutOfRange { field: "swarm_dials_per_round", .. })));
        let no_wait = Config { swarm_dial_interval: std::time::Duration::ZERO, ..Config::default() };
        assert!(matches!(no_wait.validate(), Err(ConfigError::OutOfRange { field: "swarm_dial_interval", .. })));
    }

    #[test]
    fn zero_choker_intervals_are_rejected_by_name() {
        for field in ["rechoke_interval", "idle_slot_interval"] {
            let mut config = Config::default();
            match field {
                "rechoke_interval" => config.exchange.rechoke_interval = std::time::Duration::ZERO,
                _ => config.exchange.idle_slot_interval = std::time::Duration::ZERO,
            }
            let error = config.validate().unwrap_err();
            assert!(matches!(error, ConfigError::OutOfRange { field: f, .. } if f == field), "{field}: {error:?}");
        }
    }
}
