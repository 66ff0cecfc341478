//! What the gossip machine counts: every drop, refusal and eviction the
//! limits in [`GossipConfig`](super::GossipConfig) cause, plus the traffic
//! the simulator's metrics report (STYLE.md §3: overflow is counted).

/// Monotonic counters of one [`Gossip`](super::Gossip) machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GossipCounters {
    /// Heartbeats run.
    pub heartbeats: u64,
    /// Messages published by the local application.
    pub published: u64,
    /// Publish commands refused (invalid announcement).
    pub publish_rejected: u64,
    /// Local publishes that found no peer to send to (they still reach
    /// peers later through IHAVE).
    pub publish_no_peers: u64,
    /// Held local publishes sent at a later heartbeat.
    pub publish_sent_late: u64,
    /// Held local publishes dropped (queue full, or evicted from the
    /// message cache before any peer was known).
    pub publish_pending_dropped: u64,
    /// PUBLISH frames received (first copies and duplicates).
    pub messages_received: u64,
    /// First copies delivered to the application.
    pub delivered: u64,
    /// Copies of messages already seen.
    pub duplicates: u64,
    /// First copies that had been requested by IWANT.
    pub delivered_after_iwant: u64,
    /// First copies on a topic we do not subscribe to (dropped).
    pub unsubscribed_dropped: u64,
    /// Messages forwarded to mesh peers (one per copy).
    pub forwarded: u64,
    /// Invalid messages received (see `InvalidMessage`).
    pub invalid: u64,
    /// Frames dropped because the peer was over its rate budget.
    pub rate_limited: u64,
    /// Frames ignored because the peer is graylisted.
    pub graylisted_ignored: u64,
    /// Peers that crossed the graylist threshold.
    pub graylisted: u64,
    /// Peers disconnected for their penalty.
    pub disconnected: u64,
    /// Frames on a connection gossip does not track.
    pub unknown_conn: u64,
    /// Connections not tracked because `peers_max` was reached.
    pub peers_rejected: u64,
    /// GRAFTs sent.
    pub grafts_sent: u64,
    /// PRUNEs sent.
    pub prunes_sent: u64,
    /// GRAFTs received during a back-off we set.
    pub graft_in_backoff: u64,
    /// GRAFTs refused (full mesh, not subscribed, back-off).
    pub grafts_refused: u64,
    /// IHAVE messages sent.
    pub ihave_sent: u64,
    /// IHAVE messages ignored (over the per-heartbeat limit).
    pub ihave_ignored: u64,
    /// Message ids requested by IWANT.
    pub iwant_ids_sent: u64,
    /// Messages sent in answer to IWANT.
    pub iwant_served: u64,
    /// IWANT ids not in the message cache.
    pub iwant_missing: u64,
    /// IWANT ids refused by the per-peer retransmission limit.
    pub iwant_over_retransmissions: u64,
    /// Ids not requested because `iwant_pending_max` was reached.
    pub iwant_pending_dropped: u64,
    /// Seen-cache entries evicted by its size limit.
    pub seen_evicted: u64,
    /// Message-cache entries evicted by its size limit.
    pub message_cache_evicted: u64,
    /// Back-off entries not stored because the table was full.
    pub backoff_dropped: u64,
    /// PRUNE peer-exchange entries ignored (Shoal learns peers from the DHT
    /// and the Peers topic instead).
    pub prune_peers_ignored: u64,
    /// File-index entries evicted by its size limit.
    pub file_index_evicted: u64,
    /// Outputs dropped because the queue was full.
    pub outputs_dropped: u64,
    /// Peers announcements and Swarm notices delivered but not relayed:
    /// over `peers_relay_per_min` or `swarm_relay_per_min`.
    pub relay_budget_exceeded: u64,
}
