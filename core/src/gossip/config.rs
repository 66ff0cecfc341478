//! Every limit and interval of the gossip layer, units last (STYLE.md §3).
//!
//! Defaults follow the GossipSub v1.1 spec's recommended parameters and
//! rust-libp2p's `gossipsub/src/config.rs` (named in each field's doc), scaled
//! down where Shoal's three small topics need less. This struct is meant to
//! be composed into the node-wide `crate::config::Config` later; it reuses
//! its [`ConfigError`].

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Limits and intervals of the [`Gossip`](super::Gossip) machine.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GossipConfig {
    /// Target mesh degree D (spec §"Parameters"; libp2p `mesh_n` = 6).
    pub mesh_degree: usize,
    /// Below this the heartbeat grafts up to D (libp2p `mesh_n_low` = 5).
    pub mesh_degree_low: usize,
    /// Above this the heartbeat prunes down to D, and GRAFTs are refused
    /// (libp2p `mesh_n_high` = 12).
    pub mesh_degree_high: usize,
    /// Minimum number of non-mesh peers sent IHAVE per topic per heartbeat,
    /// D_lazy (libp2p `gossip_lazy` = 6).
    pub gossip_lazy_peers: usize,
    /// Percentage of eligible non-mesh peers sent IHAVE when that is more
    /// than D_lazy (libp2p `gossip_factor` = 0.25). Shoal's default is 0:
    /// every connection counts as a topic peer (the handshake implies the
    /// topics), DHT requests and swarm sessions included, so a quarter of
    /// them was 20 to 40 IHAVE per topic per heartbeat, each listing every
    /// id of the last three heartbeats. In a 200-peer flash crowd that was
    /// 60% of gossip bytes and 4% of all bytes, on the lane ahead of
    /// blocks; D_lazy random peers a heartbeat still advertise each id to
    /// 18 peers per node.
    pub gossip_factor_percent: u8,
    /// Also send IHAVE to mesh peers, listing only the ids they have not
    /// sent us. A departure from the spec (which gossips to non-mesh peers
    /// only): a mesh push lost to a partition or a silent crash is never
    /// resent, and a node whose other neighbours are all in its mesh or
    /// unsubscribed would otherwise never hear of the message (seen in the
    /// 50-node partition test). Costs about one IHAVE per mesh peer per
    /// heartbeat while messages are recent (7.0 instead of 3.5 IHAVE per
    /// node per heartbeat in the 500-node test); never an extra copy, as
    /// IWANT asks only for unseen ids.
    pub gossip_to_mesh_peers: bool,
    /// Mesh maintenance period (spec: 1 s; libp2p `heartbeat_interval`).
    pub heartbeat_interval_ms: u64,
    /// Heartbeats a message stays in the message cache, answerable by IWANT
    /// (libp2p `history_length` = 5).
    pub message_cache_heartbeats: usize,
    /// Most recent heartbeats whose message ids are advertised in IHAVE
    /// (libp2p `history_gossip` = 3). At most `message_cache_heartbeats`.
    pub message_cache_gossip_heartbeats: usize,
    /// Messages held in the message cache; the oldest are evicted first.
    /// `peer_messages_per_s` (500/s) for 5 heartbeats is 2500.
    pub message_cache_entries_max: usize,
    /// How long a message id is remembered, so a message is delivered once
    /// (libp2p `duplicate_cache_time` = 60 s).
    pub seen_ttl_ms: u64,
    /// Ids in the seen cache; the oldest are evicted first and counted. An
    /// evicted message that comes back is delivered again, so this must
    /// exceed the message rate times the time duplicates keep arriving: the
    /// mesh delivers them within a second, IWANT within
    /// `message_cache_heartbeats`; 32768 covers 60 s at over 500/s.
    pub seen_entries_max: usize,
    /// How long fanout peers for a topic we publish to without subscribing
    /// are kept after the last publish (libp2p `fanout_ttl` = 60 s).
    pub fanout_ttl_ms: u64,
    /// Back-off sent with a PRUNE and honoured after receiving one
    /// (libp2p `prune_backoff` = 60 s; spec v1.1 §"Prune Backoff").
    pub prune_backoff_s: u32,
    /// Largest back-off accepted from a peer; longer ones are clamped so a
    /// peer cannot keep us out of its mesh for days.
    pub prune_backoff_s_max: u32,
    /// (topic, peer) back-off entries kept; overflow is dropped and counted.
    pub backoff_entries_max: usize,
    /// Gossip peers tracked; further connections are ignored by gossip and
    /// counted (they may still serve other protocols).
    pub peers_max: usize,
    /// Largest postcard-encoded announcement accepted or published
    /// (libp2p `max_transmit_size`, scaled to Shoal's small announcements:
    /// a 255-byte name plus ids and an address fit well within 1 KiB).
    pub message_bytes_max: usize,
    /// Ids in one IHAVE or IWANT; more is a protocol violation
    /// (libp2p `max_ihave_length` = 5000, scaled to the message cache).
    pub ihave_ids_max: usize,
    /// IHAVE messages accepted from one peer per heartbeat; later ones are
    /// ignored (libp2p `max_ihave_messages` = 10).
    pub ihave_per_peer_per_heartbeat_max: u32,
    /// Message ids requested by IWANT from one peer per heartbeat (libp2p
    /// bounds this by `max_ihave_length`).
    pub iwant_ids_per_peer_per_heartbeat_max: usize,
    /// Times one message is resent to one peer in answer to IWANT
    /// (libp2p `gossip_retransimission` = 3).
    pub iwant_retransmissions_max: u8,
    /// How long a requested id is not requested again (libp2p
    /// `iwant_followup_time` = 3 s).
    pub iwant_followup_ms: u64,
    /// Outstanding IWANT ids tracked; overflow is not requested and counted.
    pub iwant_pending_max: usize,
    /// Peers listed in a PRUNE for peer exchange (libp2p `prune_peers` = 16);
    /// a longer list is a violation.
    pub prune_peers_max: usize,
    /// Sustained gossip frames per second accepted from one peer; over this
    /// a frame is dropped and penalised. Stands in for libp2p's per-RPC
    /// limits and score, which Shoal does not have. A mesh peer forwards
    /// every message of our topics once, so this must exceed the
    /// network-wide publish rate (joins, shares and seeding changes of all
    /// nodes) plus a few control frames, or honest peers get penalised.
    pub peer_messages_per_s: u64,
    /// Token-bucket depth for `peer_messages_per_s`: a burst this big is
    /// accepted from an idle peer.
    pub peer_messages_burst: u64,
    /// Penalty points at which a peer is pruned from every mesh and its
    /// GRAFTs refused (spec v1.1 §"Graylisting", simplified to a counter).
    pub penalty_graylist: u32,
    /// Penalty points at which the peer is disconnected.
    pub penalty_disconnect: u32,
    /// Penalty points forgiven each heartbeat (spec v1.1 score decay).
    pub penalty_decay_per_heartbeat: u32,
    /// Points for an invalid message: oversized, wrong topic, bad name,
    /// over-long id or peer list (spec v1.1 score P4, "invalid messages").
    pub penalty_invalid_message: u32,
    /// Points for a frame over the peer's rate budget (flooding).
    pub penalty_over_rate: u32,
    /// Peer announcements (the Peers topic) this node relays per minute,
    /// sustained; past the budget an announcement is still delivered here
    /// but neither forwarded nor advertised in IHAVE. Every node joining
    /// announces itself, so unbounded relay costs each node a frame per
    /// mesh peer per join in the whole network, O(N) per node: at 10^4
    /// nodes joining at 500/s that is ~3000 frames/s per node for
    /// contacts its routing table mostly cannot hold (the node pings only
    /// those whose bucket has room). Bitcoin Core rate limits address relay
    /// the same way (0.1 addresses/s per peer since v22). Peers
    /// announcements are therefore sampled, not broadcast: a burst of joins
    /// that fits in `peers_relay_burst` still reaches everyone.
    pub peers_relay_per_min: u64,
    /// Token-bucket depth for `peers_relay_per_min`.
    pub peers_relay_burst: u64,
    /// Swarm notices (a node joined or seeds a file's swarm) this node
    /// relays per minute, sustained, sampled like Peers announcements. A
    /// notice only matters to the file's swarm, and the DHT's provider
    /// records are the swarm's directory; broadcast, every notice cost
    /// every node a frame per mesh peer: in a 1,000-peer flash crowd each
    /// peer announces twice (joined, then seeding), and relaying them was
    /// 12.7 M frames, 2.1 GB, 12% of all bytes and a quarter of the
    /// events. Notices within the budget are still repaired by IHAVE.
    pub swarm_relay_per_min: u64,
    /// Token-bucket depth for `swarm_relay_per_min`: a swarm of up to this
    /// many joining at once still reaches every node.
    pub swarm_relay_burst: u64,
    /// Points for a GRAFT during the back-off we set (spec v1.1 score P7,
    /// "behavioural penalty").
    pub penalty_graft_in_backoff: u32,
    /// Announcements in the local file index; the oldest are evicted first.
    pub file_index_entries_max: usize,
    /// Results returned by one `search`.
    pub search_results_max: usize,
    /// Local publishes that found no peer to send to, held and sent at the
    /// next heartbeats once peers are known (a joining node's own Peers
    /// notice is published before any peer's SUBSCRIBE has arrived); the
    /// oldest is dropped and counted. rust-libp2p instead fails such a
    /// publish with `InsufficientPeers` and leaves the retry to the caller.
    pub publish_pending_max: usize,
    /// Outputs queued between drains; overflow is dropped and counted (the
    /// driver drains after every input, so this is a safety net).
    pub output_queue_max: usize,
}

impl Default for GossipConfig {
    fn default() -> Self {
        Self {
            mesh_degree: 6,
            mesh_degree_low: 5,
            mesh_degree_high: 12,
            gossip_lazy_peers: 6,
            gossip_factor_percent: 0,
            gossip_to_mesh_peers: true,
            heartbeat_interval_ms: 1000,
            message_cache_heartbeats: 5,
            message_cache_gossip_heartbeats: 3,
            message_cache_entries_max: 4096,
            seen_ttl_ms: 60_000,
            seen_entries_max: 32_768,
            fanout_ttl_ms: 60_000,
            prune_backoff_s: 60,
            prune_backoff_s_max: 3600,
            backoff_entries_max: 4096,
            peers_max: 1024,
            message_bytes_max: 1024,
            ihave_ids_max: 500,
            ihave_per_peer_per_heartbeat_max: 10,
            iwant_ids_per_peer_per_heartbeat_max: 500,
            iwant_retransmissions_max: 3,
            iwant_followup_ms: 3000,
            iwant_pending_max: 4096,
            prune_peers_max: 16,
            peer_messages_per_s: 500,
            peer_messages_burst: 1000,
            peers_relay_per_min: 6,
            peers_relay_burst: 16,
            swarm_relay_per_min: 60,
            swarm_relay_burst: 64,
            penalty_graylist: 10,
            penalty_disconnect: 50,
            penalty_decay_per_heartbeat: 1,
            penalty_invalid_message: 5,
            penalty_over_rate: 1,
            penalty_graft_in_backoff: 2,
            file_index_entries_max: 10_000,
            search_results_max: 100,
            publish_pending_max: 64,
            output_queue_max: 65_536,
        }
    }
}

fn out_of_range(field: &'static str, value: u64, why: &'static str) -> ConfigError {
    ConfigError::OutOfRange { field, value, why }
}

fn at_least_one(field: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(out_of_range(field, value, "must be at least 1"));
    }
    Ok(())
}

impl GossipConfig {
    /// Reject values the protocol cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let wide = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        // Spec: D_lo <= D <= D_hi; the heartbeat relies on it to terminate
        // with a mesh inside [D_lo, D_hi].
        if self.mesh_degree_low > self.mesh_degree {
            return Err(out_of_range("mesh_degree_low", wide(self.mesh_degree_low), "must be <= mesh_degree"));
        }
        if self.mesh_degree > self.mesh_degree_high {
            return Err(out_of_range("mesh_degree", wide(self.mesh_degree), "must be <= mesh_degree_high"));
        }
        at_least_one("mesh_degree_low", wide(self.mesh_degree_low))?;
        at_least_one("heartbeat_interval_ms", self.heartbeat_interval_ms)?;
        at_least_one("message_cache_heartbeats", wide(self.message_cache_heartbeats))?;
        if self.message_cache_gossip_heartbeats > self.message_cache_heartbeats {
            return Err(out_of_range(
                "message_cache_gossip_heartbeats",
                wide(self.message_cache_gossip_heartbeats),
                "must be <= message_cache_heartbeats: only cached messages can be served",
            ));
        }
        if self.gossip_factor_percent > 100 {
            return Err(out_of_range("gossip_factor_percent", u64::from(self.gossip_factor_percent), "must be <= 100"));
        }
        at_least_one("message_cache_entries_max", wide(self.message_cache_entries_max))?;
        at_least_one("seen_entries_max", wide(self.seen_entries_max))?;
        at_least_one("peers_max", wide(self.peers_max))?;
        at_least_one("ihave_ids_max", wide(self.ihave_ids_max))?;
        at_least_one("peer_messages_per_s", self.peer_messages_per_s)?;
        at_least_one("peer_messages_burst", self.peer_messages_burst)?;
        at_least_one("peers_relay_burst", self.peers_relay_burst)?;
        at_least_one("swarm_relay_burst", self.swarm_relay_burst)?;
        at_least_one("output_queue_max", wide(self.output_queue_max))?;
        // A File announcement carries a name of up to 255 bytes.
        if self.message_bytes_max < 512 {
            return Err(out_of_range(
                "message_bytes_max",
                wide(self.message_bytes_max),
                "must hold a file announcement with a 255-byte name (>= 512)",
            ));
        }
        if self.penalty_graylist == 0 || self.penalty_graylist > self.penalty_disconnect {
            return Err(out_of_range(
                "penalty_graylist",
                u64::from(self.penalty_graylist),
                "must be in 1..=penalty_disconnect",
            ));
        }
        // The seen cache must outlive the message cache, or a message served
        // by IWANT could be delivered twice.
        let cache_ms = self.heartbeat_interval_ms.saturating_mul(wide(self.message_cache_heartbeats));
        if self.seen_ttl_ms < cache_ms {
            return Err(out_of_range(
                "seen_ttl_ms",
                self.seen_ttl_ms,
                "must cover message_cache_heartbeats * heartbeat_interval_ms",
            ));
        }
        Ok(())
    }
}
