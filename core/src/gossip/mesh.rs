//! Mesh maintenance: joining and leaving topics, GRAFT/PRUNE with back-off,
//! and the heartbeat that keeps every mesh within [D_lo, D_hi] (spec v1.0
//! §"Heartbeat", v1.1 §"Prune Backoff"; rust-libp2p `behaviour.rs`
//! `join`, `leave`, `heartbeat`).

use std::collections::BTreeSet;
use std::time::Duration;

use super::{Gossip, millis};
use crate::ids::ConnId;
use crate::time::Instant;
use crate::wire::{Contact, GossipMessage, Topic};

impl Gossip {
    /// Record a back-off for (topic, peer on `conn`) until `now + backoff`,
    /// keeping the later of an existing and the new deadline.
    fn add_backoff(&mut self, now: Instant, topic: Topic, conn: ConnId, backoff: Duration) {
        let Some(node) = self.peers.get(&conn).map(|p| p.node) else { return };
        let until = now + backoff;
        let full = self.backoff.len() >= self.config.backoff_entries_max;
        match self.backoff.get_mut(&(topic, node)) {
            Some(existing) => *existing = (*existing).max(until),
            None if full => self.counters.backoff_dropped += 1,
            None => {
                self.backoff.insert((topic, node), until);
            }
        }
    }

    fn send_prune(&mut self, now: Instant, conn: ConnId, topic: Topic) {
        let backoff_s = self.config.prune_backoff_s;
        self.add_backoff(now, topic, conn, Duration::from_secs(u64::from(backoff_s)));
        self.counters.prunes_sent += 1;
        // No peer exchange: see the module docs.
        self.send(conn, GossipMessage::Prune { topic, backoff_s, peers: Vec::new() });
    }

    fn send_graft(&mut self, conn: ConnId, topic: Topic) {
        self.counters.grafts_sent += 1;
        self.send(conn, GossipMessage::Graft(topic));
    }

    /// Eligible for our mesh on `topic`: subscribed, not graylisted, not
    /// in back-off.
    fn graftable(&self, now: Instant, topic: Topic) -> BTreeSet<ConnId> {
        self.peers
            .iter()
            .filter(|(_, p)| p.wants(topic) && self.in_good_standing(p) && !self.in_backoff(now, topic, p.node))
            .map(|(&c, _)| c)
            .collect()
    }

    /// Join `topic`: tell every peer, and build a mesh from the fanout
    /// peers first, then random subscribers (libp2p `join`).
    pub(super) fn subscribe(&mut self, now: Instant, topic: Topic) {
        if !self.subscriptions.insert(topic) {
            return;
        }
        let conns: Vec<ConnId> = self.peers.keys().copied().collect();
        for conn in conns {
            self.send(conn, GossipMessage::Subscribe(topic));
        }
        let eligible = self.graftable(now, topic);
        let mut mesh: BTreeSet<ConnId> = self
            .fanout
            .remove(&topic)
            .map(|f| f.peers.into_iter().filter(|c| eligible.contains(c)).take(self.config.mesh_degree).collect())
            .unwrap_or_default();
        let want = self.config.mesh_degree.saturating_sub(mesh.len());
        let candidates: Vec<ConnId> = eligible.difference(&mesh).copied().collect();
        let mut more = self.shuffled(candidates);
        more.truncate(want);
        mesh.extend(more);
        for &conn in &mesh {
            self.send_graft(conn, topic);
        }
        self.mesh.insert(topic, mesh);
    }

    /// Leave `topic`: tell every peer, PRUNE the mesh (libp2p `leave`).
    pub(super) fn unsubscribe(&mut self, now: Instant, topic: Topic) {
        if !self.subscriptions.remove(&topic) {
            return;
        }
        let conns: Vec<ConnId> = self.peers.keys().copied().collect();
        for conn in conns {
            self.send(conn, GossipMessage::Unsubscribe(topic));
        }
        for conn in self.mesh.remove(&topic).unwrap_or_default() {
            self.send_prune(now, conn, topic);
        }
    }

    /// A peer asks to join our mesh for `topic` (spec v1.1 §"GRAFT").
    pub(super) fn on_graft(&mut self, now: Instant, conn: ConnId, topic: Topic) {
        let Some(node) = self.peers.get(&conn).map(|p| p.node) else { return };
        if self.mesh.get(&topic).is_some_and(|m| m.contains(&conn)) {
            return;
        }
        if !self.subscriptions.contains(&topic) {
            self.counters.grafts_refused += 1;
            return self.send_prune(now, conn, topic);
        }
        if self.in_backoff(now, topic, node) {
            // Spec v1.1: a GRAFT during back-off is penalised and the
            // back-off extended by the PRUNE we answer with.
            self.counters.graft_in_backoff += 1;
            self.counters.grafts_refused += 1;
            self.send_prune(now, conn, topic);
            return self.penalise(now, conn, self.config.penalty_graft_in_backoff);
        }
        let full = self.mesh.get(&topic).is_some_and(|m| m.len() >= self.config.mesh_degree_high);
        if full {
            self.counters.grafts_refused += 1;
            return self.send_prune(now, conn, topic);
        }
        if let Some(peer) = self.peers.get_mut(&conn) {
            peer.topics.insert(topic);
        }
        self.mesh.entry(topic).or_default().insert(conn);
    }

    /// A peer removes us from its mesh; honour its back-off, clamped.
    pub(super) fn on_prune(&mut self, now: Instant, conn: ConnId, topic: Topic, backoff_s: u32, peers: &[Contact]) {
        if peers.len() > self.config.prune_peers_max {
            return self.invalid(now, conn);
        }
        self.counters.prune_peers_ignored += peers.len() as u64;
        if let Some(mesh) = self.mesh.get_mut(&topic) {
            mesh.remove(&conn);
        }
        let backoff_s = backoff_s.min(self.config.prune_backoff_s_max);
        self.add_backoff(now, topic, conn, Duration::from_secs(u64::from(backoff_s)));
    }

    /// Remove a graylisted peer from every mesh and fanout.
    pub(super) fn prune_everywhere(&mut self, now: Instant, conn: ConnId) {
        let topics: Vec<Topic> = self.mesh.iter().filter(|(_, m)| m.contains(&conn)).map(|(&t, _)| t).collect();
        for topic in topics {
            if let Some(mesh) = self.mesh.get_mut(&topic) {
                mesh.remove(&conn);
            }
            self.send_prune(now, conn, topic);
        }
        for fanout in self.fanout.values_mut() {
            fanout.peers.remove(&conn);
        }
    }

    /// The 1 s heartbeat: decay, expire, repair meshes and fanout, emit
    /// IHAVE gossip, shift the message cache (spec v1.0 §"Heartbeat").
    /// Penalties decay and per-heartbeat counters restart by the count
    /// alone: each peer settles when next used ([`Peer`]), so a heartbeat
    /// costs nothing per connection that does not use gossip.
    pub(super) fn heartbeat(&mut self, now: Instant) {
        self.counters.heartbeats += 1;
        self.heartbeat += 1;
        self.backoff.retain(|_, &mut until| until > now);
        self.iwant_pending.retain(|_, &mut until| until > now);
        self.seen.expire(now);

        let topics: Vec<Topic> = self.subscriptions.iter().copied().collect();
        for topic in topics {
            self.repair_mesh(now, topic);
        }
        self.maintain_fanout(now);
        self.flush_unsent(now);
        self.emit_gossip();
        self.cache.shift();
    }

    fn repair_mesh(&mut self, now: Instant, topic: Topic) {
        let mut mesh = self.mesh.remove(&topic).unwrap_or_default();
        // A peer leaves the mesh when it disconnects (`forget_peer`),
        // unsubscribes or is graylisted (`prune_everywhere`), not here: a
        // check per member each second touched every mesh peer's cold
        // state (5% of a 10,000-node des run).
        debug_assert!(
            mesh.iter().all(|c| self.peers.get(c).is_some_and(|p| p.wants(topic) && self.in_good_standing(p))),
            "mesh members are subscribed and not graylisted"
        );
        let (low, target, high) = (self.config.mesh_degree_low, self.config.mesh_degree, self.config.mesh_degree_high);
        if mesh.len() < low {
            let candidates: Vec<ConnId> = self.graftable(now, topic).difference(&mesh).copied().collect();
            let mut add = self.shuffled(candidates);
            add.truncate(target - mesh.len());
            for conn in add {
                self.send_graft(conn, topic);
                mesh.insert(conn);
            }
        }
        if mesh.len() > high {
            // v1.1 keeps the best-scored D_score and D_out outbound peers;
            // without scores or directions, keep a random D.
            let members: Vec<ConnId> = mesh.iter().copied().collect();
            let excess = self.shuffled(members).split_off(target);
            for conn in excess {
                mesh.remove(&conn);
                self.send_prune(now, conn, topic);
            }
        }
        assert!(mesh.len() <= high, "the heartbeat leaves at most D_hi mesh peers");
        self.mesh.insert(topic, mesh);
    }

    fn maintain_fanout(&mut self, now: Instant) {
        let ttl = millis(self.config.fanout_ttl_ms);
        self.fanout.retain(|_, f| f.last_publish + ttl > now);
        let topics: Vec<Topic> = self.fanout.keys().copied().collect();
        for topic in topics {
            let Some(mut fanout) = self.fanout.remove(&topic) else { continue };
            fanout.peers.retain(|c| self.peers.get(c).is_some_and(|p| p.wants(topic) && self.in_good_standing(p)));
            if fanout.peers.len() < self.config.mesh_degree {
                let more = self.pick_peers(topic, self.config.mesh_degree - fanout.peers.len(), &fanout.peers);
                fanout.peers.extend(more);
            }
            self.fanout.insert(topic, fanout);
        }
    }
}
