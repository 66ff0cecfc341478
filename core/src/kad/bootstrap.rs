//! Joining the network (Kademlia §2.3): ask seed addresses for our
//! neighbourhood, look ourselves up, refresh the farther buckets left
//! empty, and retry
//! with exponential backoff while the routing table stays empty.

use super::io::{KadEvent, KadOutput};
use super::routing;
use super::{Goal, KadConfig, Kademlia, Purpose};
use crate::time::Instant;
use crate::wire::{Contact, Request, Response};

impl Kademlia {
    pub(super) fn send_to_seeds(&mut self, now: Instant) {
        let target = self.local.id.0;
        for addr in self.seeds.clone() {
            let id = self.alloc_request();
            self.track(now, id, None, Purpose::Seed);
            self.seeds_pending += 1;
            self.outputs.push_back(KadOutput::SendToAddress { addr, id, request: Request::FindNode { target } });
        }
        if self.seeds.is_empty() {
            self.check_bootstrap_done(now);
        }
    }

    /// A seed answered: continue with a self-lookup seeded by its answer.
    pub(super) fn seed_answered(&mut self, now: Instant, from: Contact, response: Response) {
        self.seeds_pending = self.seeds_pending.saturating_sub(1);
        let closer = match response {
            Response::Nodes { closer } => self.contacts_from_peer(closer),
            _ => Vec::new(),
        };
        match self.bootstrap_query.and_then(|q| self.queries.get_mut(&q)) {
            Some(q) => {
                q.lookup.add_answered(from);
                q.lookup.add(1, closer);
                let id = self.bootstrap_query;
                if let Some(id) = id {
                    self.advance(now, id);
                }
            }
            None => {
                let target = self.local.id.0;
                let id = self.start_query(now, target, Goal::Bootstrap, false, Some((from, closer)));
                if self.queries.contains_key(&id) {
                    self.bootstrap_query = Some(id);
                }
            }
        }
        self.check_bootstrap_done(now);
    }

    /// Once no seed request and no bootstrap lookup is running, report the
    /// outcome and schedule a retry if the table is still empty.
    pub(super) fn check_bootstrap_done(&mut self, now: Instant) {
        if self.seeds_pending > 0 || self.bootstrap_query.is_some() || self.bootstrap_retry_at.is_some() {
            return;
        }
        let contacts = self.table.len();
        self.outputs.push_back(KadOutput::Event(KadEvent::Bootstrapped { contacts }));
        if contacts == 0 && !self.seeds.is_empty() {
            self.bootstrap_retry_at = Some(now + self.bootstrap_backoff);
            let max = KadConfig::ms(self.config.bootstrap_backoff_max_ms);
            self.bootstrap_backoff = (self.bootstrap_backoff * 2).min(max);
        } else {
            self.bootstrap_backoff = KadConfig::ms(self.config.bootstrap_backoff_initial_ms);
        }
    }

    /// Refresh the buckets farther than our closest neighbour that the
    /// self-lookup left empty (Kademlia §2.3 refreshes them all).
    ///
    /// A bucket that already holds contacts routes into its part of the
    /// key space; the requests other nodes send us fill it further, and
    /// the idle refresh (`bucket_refresh_interval_ms`) keeps it. mainline
    /// DHT nodes (libtorrent) join with the self-lookup alone. Each refresh
    /// is a lookup of some 20 requests, most of them a new connection: in
    /// `dht-lookups` at 2,000 nodes, refreshing every short bucket sent
    /// 721k requests against 408k, for the same lookup success.
    pub(super) fn refresh_after_bootstrap(&mut self, now: Instant) {
        let Some(nearest) = self.table.nearest_bucket() else { return };
        for index in nearest + 1..routing::BUCKETS {
            if self.table.bucket(index).is_empty() {
                self.refresh_bucket(now, index);
            } else {
                self.counters.join_refreshes_skipped += 1;
            }
        }
    }

    pub(super) fn refresh_bucket(&mut self, now: Instant, index: usize) {
        let target = self.table.random_id_in(index, &mut self.rng);
        self.start_query(now, target.0, Goal::Refresh, false, None);
    }
}
