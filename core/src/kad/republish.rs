//! Keeping records alive (Kademlia §2.5): expiry, republishing by the
//! originator, replication by holders to the current k closest and to newly
//! learned closer nodes, and the periodic maintenance tick that drives them
//! (with bucket refresh).

use std::time::Duration;

use super::io::QueryId;
use super::keywords;
use super::{Goal, KadConfig, Kademlia, Publication, Published, Purpose};
use crate::ids::FileId;
use crate::manifest::FileManifest;
use crate::time::Instant;
use crate::wire::{Contact, KeywordEntry, Record, RecordKey, Request};

impl Kademlia {
    pub(super) fn publish(&mut self, key: Publication, item: Published) {
        if !self.published.contains_key(&key) && self.published.len() >= self.config.published_max {
            self.counters.published_refused += 1;
            return;
        }
        self.published.insert(key, item);
    }

    /// Keep our own copy and store on the k closest, with the full TTL.
    pub(super) fn store_manifest(&mut self, now: Instant, file: FileId, manifest: FileManifest, user: bool) -> QueryId {
        let ttl = KadConfig::ms(self.config.record_ttl_ms);
        // Validated by the caller; a refusal here only means our own store
        // is full, and the network copies still count.
        let _ = self.store.put_manifest(&file.0, manifest.clone(), self.local.id, now, ttl);
        let request = Request::Store { key: file.0, record: Record::Manifest(manifest), ttl_s: secs(ttl) };
        self.start_query(now, file.0, Goal::Store { request }, user, None)
    }

    pub(super) fn store_keywords(&mut self, now: Instant, entry: &KeywordEntry) -> usize {
        let mut tokens = keywords::tokens(&entry.name);
        tokens.truncate(self.config.search_tokens_max);
        for token in &tokens {
            let key = keywords::keyword_key(token);
            let ttl = KadConfig::ms(self.config.record_ttl_ms);
            let _ = self.store.put_keywords(&key, vec![entry.clone()], self.local.id, now, ttl);
            let request = Request::Store { key, record: Record::Keywords(vec![entry.clone()]), ttl_s: secs(ttl) };
            self.start_query(now, key, Goal::Store { request }, false, None);
        }
        tokens.len()
    }

    pub(super) fn maintain(&mut self, now: Instant) {
        self.store.expire(now);
        self.republish(now);
        self.replicate(now);
        let idle = KadConfig::ms(self.config.bucket_refresh_interval_ms);
        for index in self.table.buckets_idle(now, idle) {
            self.refresh_bucket(now, index);
        }
        if self.table.is_empty()
            && !self.seeds.is_empty()
            && self.bootstrap_retry_at.is_none()
            && self.bootstrap_query.is_none()
            && self.seeds_pending == 0
        {
            self.bootstrap_retry_at = Some(now + self.bootstrap_backoff);
        }
    }

    /// The originator stores its records again before they lapse
    /// (Kademlia §2.5).
    pub(super) fn republish(&mut self, now: Instant) {
        let due: Vec<Publication> =
            self.published.iter().filter(|(_, p)| p.next_at <= now).map(|(k, _)| k.clone()).collect();
        for key in due {
            let Some(item) = self.published.get_mut(&key) else { continue };
            let interval = match key {
                Publication::Provider(_) => self.config.provider_republish_interval_ms,
                _ => self.config.record_republish_interval_ms,
            };
            item.next_at = now + KadConfig::ms(interval);
            let (manifest, entry) = (item.manifest.clone(), item.entry.clone());
            match (key, manifest, entry) {
                (Publication::Manifest(file), Some(manifest), _) => {
                    self.store_manifest(now, file, manifest, false);
                }
                (Publication::Provider(file), _, _) => {
                    let _ = self.store.add_provider(file, self.local, now);
                    let request = Request::AddProvider { file, provider: self.local };
                    self.start_query(now, file.0, Goal::Store { request }, false, None);
                }
                (Publication::Keywords(_), _, Some(entry)) => {
                    self.store_keywords(now, &entry);
                }
                _ => {}
            }
        }
    }

    /// Holders push records to the current k closest every
    /// `record_replicate_interval_ms`, unless someone stored it to them in
    /// that time (Kademlia §2.5's optimisation), so a record survives its
    /// holders leaving.
    pub(super) fn replicate(&mut self, now: Instant) {
        let interval = KadConfig::ms(self.config.record_replicate_interval_ms);
        let due = self.held_stores(now, |_, replicated_at| now - replicated_at >= interval);
        for (key, request) in due {
            if self.queries.len() >= self.config.queries_max {
                break; // the rest are still due next tick
            }
            self.store.mark_replicated(&key, now);
            self.start_query(now, key, Goal::Store { request }, false, None);
        }
    }

    /// `Store` requests for the live records we hold that `pick` selects
    /// (given the key and its last replication), each with the TTL it has
    /// left: replication never extends a record's life, only the originator
    /// does.
    pub(super) fn held_stores(
        &self,
        now: Instant,
        pick: impl Fn(&RecordKey, Instant) -> bool,
    ) -> Vec<(RecordKey, Request)> {
        let mut out = Vec::new();
        for (file, held) in self.store.manifests() {
            if held.expires > now && pick(&file.0, held.replicated_at) {
                let record = Record::Manifest(held.manifest.clone());
                out.push((file.0, Request::Store { key: file.0, record, ttl_s: secs(held.expires - now) }));
            }
        }
        for (key, entries, replicated_at) in self.store.keyword_keys() {
            if !pick(key, replicated_at) {
                continue;
            }
            // The freshest entries, as many as one store may carry; they
            // travel with the shortest remaining TTL among them.
            let live: Vec<_> = entries
                .iter()
                .filter(|h| h.expires > now)
                .rev()
                .take(self.config.keyword_entries_per_store_max)
                .collect();
            let Some(ttl) = live.iter().map(|h| h.expires - now).min() else { continue };
            let record = Record::Keywords(live.into_iter().map(|h| h.entry.clone()).collect());
            out.push((*key, Request::Store { key: *key, record, ttl_s: secs(ttl) }));
        }
        out
    }

    /// Kademlia §2.5: a node that learns of a new contact stores to it the
    /// records it is now among the k closest for, but only where this node
    /// is the closest holder it knows of, "to avoid redundant store RPCs for
    /// the same content from different nodes" (the paper's own rule;
    /// without it all k holders push every record to every newcomer).
    pub(super) fn replicate_to_newcomer(&mut self, now: Instant, newcomer: Contact) {
        let k = self.config.bucket_size;
        let table = &self.table;
        let local = self.local.id;
        // The newcomer is already in the table: is it among our k closest,
        // and are we closer than every other contact?
        let is_close = |key: &RecordKey, _| {
            let d = newcomer.id.distance(key);
            let closest = table.closest(key, k);
            let newcomer_close = closest.last().is_none_or(|far| d <= far.id.distance(key));
            let we_are_closest =
                closest.iter().find(|c| c.id != newcomer.id).is_none_or(|c| local.distance(key) < c.id.distance(key));
            newcomer_close && we_are_closest
        };
        let sends = self.held_stores(now, is_close);
        for (_, request) in sends {
            self.send_background(now, newcomer, request, Purpose::Replicate);
        }
    }
}

/// Whole seconds of `ttl` for the wire, saturating.
fn secs(ttl: Duration) -> u32 {
    u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)
}
