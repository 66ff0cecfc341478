//! Lazy push (spec v1.0 §"Control Messages", v1.1 §"Spam Protection"):
//! each heartbeat advertises recent message ids with IHAVE to a few peers
//! outside the mesh (and, a Shoal addition, to mesh peers for the ids they
//! have not sent us), which fetch what they missed with IWANT. This is what
//! repairs a delivery the eager mesh push lost (a crashed mesh peer, a
//! healed partition).

use std::collections::BTreeSet;
use std::time::Duration;

use super::Gossip;
use super::cache::Serve;
use crate::ids::ConnId;
use crate::time::Instant;
use crate::wire::{GossipMessage, MessageId, Topic};

impl Gossip {
    /// Send IHAVE for every topic we subscribe or fan out to, to
    /// max(D_lazy, gossip_factor * eligible) random non-mesh subscribers
    /// (libp2p `emit_gossip`). Not for Peers: its announcements are
    /// sampled (relayed on a budget, `peers_relay_per_min`), so repairing
    /// their delivery would spend what the budget saves.
    pub(super) fn emit_gossip(&mut self) {
        let topics: BTreeSet<Topic> =
            self.subscriptions.iter().chain(self.fanout.keys()).copied().filter(|&t| t != Topic::Peers).collect();
        for topic in topics {
            let ids = self.cache.gossip_ids(topic);
            if ids.is_empty() {
                continue;
            }
            let mut ids = self.shuffled(ids);
            ids.truncate(self.config.ihave_ids_max);
            let exclude: BTreeSet<ConnId> = self.mesh_peers(topic).chain(self.fanout_peers(topic)).collect();
            let eligible: Vec<ConnId> = self
                .peers
                .iter()
                .filter(|(c, p)| p.wants(topic) && self.in_good_standing(p) && !exclude.contains(c))
                .map(|(&c, _)| c)
                .collect();
            let by_factor = eligible.len() * usize::from(self.config.gossip_factor_percent) / 100;
            let count = self.config.gossip_lazy_peers.max(by_factor);
            let mut targets = self.shuffled(eligible);
            targets.truncate(count);
            for conn in targets {
                self.counters.ihave_sent += 1;
                self.send(conn, GossipMessage::IHave { topic, ids: ids.clone() });
            }
            if self.config.gossip_to_mesh_peers {
                self.gossip_to_mesh(topic, &ids);
            }
        }
    }

    /// IHAVE to each mesh peer for the ids it has not sent us: our eager
    /// push to it may have been lost (see `gossip_to_mesh_peers`).
    fn gossip_to_mesh(&mut self, topic: Topic, ids: &[MessageId]) {
        let mesh: Vec<ConnId> = self.mesh_peers(topic).collect();
        for conn in mesh {
            let unconfirmed: Vec<MessageId> = ids.iter().copied().filter(|id| !self.cache.sent_by(id, conn)).collect();
            if unconfirmed.is_empty() {
                continue;
            }
            self.counters.ihave_sent += 1;
            self.send(conn, GossipMessage::IHave { topic, ids: unconfirmed });
        }
    }

    /// A peer advertises ids: ask for the ones we have not seen and have
    /// not just asked someone else for, within the per-peer budgets.
    pub(super) fn on_ihave(&mut self, now: Instant, conn: ConnId, topic: Topic, ids: Vec<MessageId>) {
        if ids.len() > self.config.ihave_ids_max {
            return self.invalid(now, conn);
        }
        let (ihave_max, iwant_max) =
            (self.config.ihave_per_peer_per_heartbeat_max, self.config.iwant_ids_per_peer_per_heartbeat_max);
        let (heartbeat, decay) = (self.heartbeat, self.config.penalty_decay_per_heartbeat);
        let Some(peer) = self.peers.get_mut(&conn) else { return };
        let (ihaves, iwant_ids) = peer.count_ihave(heartbeat, decay);
        if ihaves > ihave_max {
            self.counters.ihave_ignored += 1;
            return;
        }
        let budget = iwant_max.saturating_sub(iwant_ids);
        if !self.subscriptions.contains(&topic) || budget == 0 {
            return;
        }
        let unique: BTreeSet<MessageId> = ids.into_iter().collect();
        let wanted: Vec<MessageId> = unique
            .into_iter()
            .filter(|id| !self.seen.contains(now, id) && self.iwant_pending.get(id).is_none_or(|&until| until <= now))
            .collect();
        // A random subset, so a peer cannot steer which ids we fetch
        // (spec v1.1 §"Spam Protection Measures").
        let mut wanted = self.shuffled(wanted);
        wanted.truncate(budget);
        let followup = Duration::from_millis(self.config.iwant_followup_ms);
        let mut asked = Vec::with_capacity(wanted.len());
        for id in wanted {
            if self.iwant_pending.len() >= self.config.iwant_pending_max && !self.iwant_pending.contains_key(&id) {
                self.counters.iwant_pending_dropped += 1;
                continue;
            }
            self.iwant_pending.insert(id, now + followup);
            asked.push(id);
        }
        if asked.is_empty() {
            return;
        }
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.count_iwant_ids(heartbeat, decay, asked.len());
        }
        self.counters.iwant_ids_sent += asked.len() as u64;
        self.send(conn, GossipMessage::IWant { ids: asked });
    }

    /// A peer asks for messages: serve them from the message cache, at
    /// most `iwant_retransmissions_max` times each.
    pub(super) fn on_iwant(&mut self, now: Instant, conn: ConnId, ids: &[MessageId]) {
        if ids.len() > self.config.ihave_ids_max {
            return self.invalid(now, conn);
        }
        for id in ids {
            match self.cache.serve(id, conn, self.config.iwant_retransmissions_max) {
                Serve::Message(message) => {
                    self.counters.iwant_served += 1;
                    self.send(conn, message);
                }
                Serve::Missing => self.counters.iwant_missing += 1,
                Serve::RetransmissionLimit => self.counters.iwant_over_retransmissions += 1,
            }
        }
    }
}
