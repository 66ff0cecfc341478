//! The records a node holds for the network: manifests, provider records and
//! keyword entries, each bounded in count and bytes, per key and per
//! sending peer (STYLE.md §3). Everything here arrives from peers, so every
//! check is a `Result`, never a panic.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::ids::{FileId, NodeId};
use crate::kad::config::KadConfig;
use crate::kad::keywords;
use crate::manifest::{FileManifest, validate_name};
use crate::time::Instant;
use crate::wire::{Contact, ErrorCode, KeywordEntry, RecordKey};
use rand::{Rng, RngExt};

/// Why a store was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The record is forged, malformed or does not belong under its key.
    #[error("invalid record")]
    Invalid,
    /// A count or byte limit is reached; the record was dropped.
    #[error("store limit reached")]
    Overloaded,
}

impl StoreError {
    /// The wire code answering a refused store.
    #[must_use]
    pub fn code(self) -> ErrorCode {
        match self {
            StoreError::Invalid => ErrorCode::Invalid,
            StoreError::Overloaded => ErrorCode::Overloaded,
        }
    }
}

/// A manifest held for the network.
#[derive(Clone, Debug)]
pub struct HeldManifest {
    /// The manifest, validated against its key when stored.
    pub manifest: FileManifest,
    /// Who stored it first (charged against their allowance).
    pub from: NodeId,
    /// When it lapses unless stored again.
    pub expires: Instant,
    /// Last time it was stored to us or replicated by us: a holder skips
    /// replication when another holder just did it (Kademlia §2.5).
    pub replicated_at: Instant,
}

#[derive(Clone, Debug)]
struct HeldProvider {
    contact: Contact,
    expires: Instant,
}

/// A keyword entry held for the network.
#[derive(Clone, Debug)]
pub struct HeldKeyword {
    /// The entry.
    pub entry: KeywordEntry,
    /// Who stored it (charged against their allowance).
    pub from: NodeId,
    /// When it lapses unless stored again.
    pub expires: Instant,
}

#[derive(Clone, Debug, Default)]
struct HeldKeywords {
    entries: Vec<HeldKeyword>,
    replicated_at: Instant,
}

/// Counters of what the store refused or dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Records refused as forged or malformed.
    pub rejected_invalid: u64,
    /// Records refused at a count or byte limit.
    pub rejected_limit: u64,
    /// Entries evicted to make room for fresher ones.
    pub evicted: u64,
    /// Records and entries removed at expiry.
    pub expired: u64,
}

/// Manifest, provider and keyword records, with their limits.
#[derive(Clone, Debug)]
pub struct RecordStore {
    local: NodeId,
    config: KadConfig,
    manifests: BTreeMap<FileId, HeldManifest>,
    providers: BTreeMap<FileId, Vec<HeldProvider>>,
    keywords: BTreeMap<RecordKey, HeldKeywords>,
    /// Items each peer occupies, for `records_per_peer_max`.
    per_peer: BTreeMap<NodeId, usize>,
    counters: StoreCounters,
}

impl RecordStore {
    /// An empty store for node `local` (whose own records bypass the
    /// per-peer allowance).
    #[must_use]
    pub fn new(local: NodeId, config: KadConfig) -> Self {
        Self {
            local,
            config,
            manifests: BTreeMap::new(),
            providers: BTreeMap::new(),
            keywords: BTreeMap::new(),
            per_peer: BTreeMap::new(),
            counters: StoreCounters::default(),
        }
    }

    /// What was refused so far.
    #[must_use]
    pub fn counters(&self) -> StoreCounters {
        self.counters
    }

    fn charge(&mut self, peer: NodeId) -> Result<(), StoreError> {
        if peer == self.local {
            return Ok(());
        }
        let used = self.per_peer.entry(peer).or_insert(0);
        if *used >= self.config.records_per_peer_max {
            self.counters.rejected_limit += 1;
            return Err(StoreError::Overloaded);
        }
        *used += 1;
        Ok(())
    }

    fn refund(&mut self, peer: NodeId) {
        if let Some(used) = self.per_peer.get_mut(&peer) {
            *used = used.saturating_sub(1);
            if *used == 0 {
                self.per_peer.remove(&peer);
            }
        }
    }

    /// Items `peer` occupies.
    #[must_use]
    pub fn charged_to(&self, peer: &NodeId) -> usize {
        self.per_peer.get(peer).copied().unwrap_or(0)
    }

    /// Store a manifest under `key` on behalf of `from`. A forged manifest
    /// (one that does not hash to `key`) is refused: it is never stored, so
    /// never served.
    pub fn put_manifest(
        &mut self,
        key: &RecordKey,
        manifest: FileManifest,
        from: NodeId,
        now: Instant,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let file = FileId(*key);
        if manifest.to_bytes().len() > self.config.record_bytes_max || manifest.validate_for(&file).is_err() {
            self.counters.rejected_invalid += 1;
            return Err(StoreError::Invalid);
        }
        let expires = now + ttl.min(KadConfig::ms(self.config.record_ttl_ms));
        if let Some(held) = self.manifests.get_mut(&file) {
            held.expires = held.expires.max(expires);
            held.replicated_at = now;
            return Ok(());
        }
        if self.manifests.len() >= self.config.records_max {
            self.counters.rejected_limit += 1;
            return Err(StoreError::Overloaded);
        }
        self.charge(from)?;
        self.manifests.insert(file, HeldManifest { manifest, from, expires, replicated_at: now });
        Ok(())
    }

    /// The manifest under `key`, re-validated before it is served.
    #[must_use]
    pub fn manifest(&self, key: &RecordKey, now: Instant) -> Option<&FileManifest> {
        let file = FileId(*key);
        let held = self.manifests.get(&file).filter(|h| h.expires > now)?;
        held.manifest.validate_for(&file).is_ok().then_some(&held.manifest)
    }

    /// Every held manifest.
    pub fn manifests(&self) -> impl Iterator<Item = (&FileId, &HeldManifest)> {
        self.manifests.iter()
    }

    /// Note that the record under `key` was just replicated by us.
    pub fn mark_replicated(&mut self, key: &RecordKey, now: Instant) {
        if let Some(held) = self.manifests.get_mut(&FileId(*key)) {
            held.replicated_at = now;
        }
        if let Some(held) = self.keywords.get_mut(key) {
            held.replicated_at = now;
        }
    }

    /// Record that `provider` serves `file`. Providers announce only
    /// themselves (the machine checks `provider.id` is the sender), and
    /// a full list refuses newcomers rather than evicting providers that
    /// keep republishing: a flood cannot push honest providers out.
    pub fn add_provider(&mut self, file: FileId, provider: Contact, now: Instant) -> Result<(), StoreError> {
        let expires = now + KadConfig::ms(self.config.provider_ttl_ms);
        if let Some(list) = self.providers.get_mut(&file) {
            if let Some(held) = list.iter_mut().find(|p| p.contact.id == provider.id) {
                held.contact = provider;
                held.expires = expires;
                return Ok(());
            }
            if list.len() >= self.config.providers_per_key_max {
                self.counters.rejected_limit += 1;
                return Err(StoreError::Overloaded);
            }
        } else if self.providers.len() >= self.config.provider_keys_max {
            self.counters.rejected_limit += 1;
            return Err(StoreError::Overloaded);
        }
        self.charge(provider.id)?;
        self.providers.entry(file).or_default().push(HeldProvider { contact: provider, expires });
        Ok(())
    }

    /// Live providers of `file`: all of them, or a random
    /// `providers_returned_max` of them when there are more (as a
    /// BitTorrent tracker answers with a random subset of its peers, so a
    /// crowd of askers spreads over the swarm rather than all dialling
    /// the first few providers).
    #[must_use]
    pub fn providers(&self, file: &FileId, now: Instant, rng: &mut impl Rng) -> Vec<Contact> {
        let Some(list) = self.providers.get(file) else { return Vec::new() };
        let mut live: Vec<Contact> = list.iter().filter(|p| p.expires > now).map(|p| p.contact).collect();
        let returned = self.config.providers_returned_max;
        if live.len() > returned {
            // A partial Fisher-Yates shuffle picks the first `returned`.
            for i in 0..returned {
                let j = rng.random_range(i..live.len());
                live.swap(i, j);
            }
            live.truncate(returned);
        }
        live
    }

    /// Number of providers held for `file` (expired included until swept).
    #[must_use]
    pub fn provider_count(&self, file: &FileId) -> usize {
        self.providers.get(file).map_or(0, Vec::len)
    }

    /// Store keyword entries under `key` on behalf of `from`. Every entry
    /// must have a safe name with a token hashing to `key`, or the whole
    /// request is refused. A full key evicts its stalest entry, so fresh
    /// (republished) entries are preferred.
    pub fn put_keywords(
        &mut self,
        key: &RecordKey,
        entries: Vec<KeywordEntry>,
        from: NodeId,
        now: Instant,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let valid = |e: &KeywordEntry| validate_name(&e.name).is_ok() && keywords::entry_belongs_to(e, key);
        if entries.is_empty() || entries.len() > self.config.keyword_entries_per_store_max || !entries.iter().all(valid)
        {
            self.counters.rejected_invalid += 1;
            return Err(StoreError::Invalid);
        }
        if !self.keywords.contains_key(key) && self.keywords.len() >= self.config.keyword_keys_max {
            self.counters.rejected_limit += 1;
            return Err(StoreError::Overloaded);
        }
        let expires = now + ttl.min(KadConfig::ms(self.config.record_ttl_ms));
        for entry in entries {
            let held = self.keywords.entry(*key).or_default();
            held.replicated_at = now;
            if let Some(existing) = held.entries.iter_mut().find(|h| h.entry.file == entry.file) {
                existing.entry = entry;
                existing.expires = existing.expires.max(expires);
                continue;
            }
            let evict = if held.entries.len() >= self.config.keyword_entries_per_key_max {
                held.entries.iter().enumerate().min_by_key(|(_, h)| h.expires).map(|(at, _)| at)
            } else {
                None
            };
            self.charge(from)?;
            let held = self.keywords.entry(*key).or_default();
            if let Some(at) = evict {
                let old = held.entries.remove(at);
                self.counters.evicted += 1;
                self.refund(old.from);
            }
            let held = self.keywords.entry(*key).or_default();
            held.entries.push(HeldKeyword { entry, from, expires });
        }
        Ok(())
    }

    /// Live keyword entries under `key`.
    #[must_use]
    pub fn keywords(&self, key: &RecordKey, now: Instant) -> Vec<KeywordEntry> {
        self.keywords.get(key).map_or_else(Vec::new, |held| {
            held.entries.iter().filter(|h| h.expires > now).map(|h| h.entry.clone()).collect()
        })
    }

    /// Every keyword key held, with its entries and last replication.
    pub fn keyword_keys(&self) -> impl Iterator<Item = (&RecordKey, &[HeldKeyword], Instant)> {
        self.keywords.iter().map(|(k, h)| (k, &h.entries[..], h.replicated_at))
    }

    /// Drop everything expired at `now`, refunding each peer's allowance.
    pub fn expire(&mut self, now: Instant) {
        let mut refunds = Vec::new();
        self.manifests.retain(|_, h| {
            let keep = h.expires > now;
            if !keep {
                refunds.push(h.from);
            }
            keep
        });
        for list in self.providers.values_mut() {
            list.retain(|p| {
                let keep = p.expires > now;
                if !keep {
                    refunds.push(p.contact.id);
                }
                keep
            });
        }
        self.providers.retain(|_, list| !list.is_empty());
        for held in self.keywords.values_mut() {
            held.entries.retain(|h| {
                let keep = h.expires > now;
                if !keep {
                    refunds.push(h.from);
                }
                keep
            });
        }
        self.keywords.retain(|_, held| !held.entries.is_empty());
        self.counters.expired += refunds.len() as u64;
        for peer in refunds {
            self.refund(peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{Content, Layout, PieceHash};
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;
    use std::net::{Ipv4Addr, SocketAddr};

    fn manifest(name: &str, size: u64) -> (FileManifest, FileId) {
        let layout = Layout::for_file(size);
        let hashes = (0..layout.piece_count()).map(|i| PieceHash([i as u8 ^ size as u8; 32])).collect();
        let content = Content::from_piece_hashes(layout, hashes);
        (FileManifest::new(name, &content).unwrap(), content.file_id)
    }

    const DAY: Duration = Duration::from_secs(86_400);

    fn peer(n: u8) -> NodeId {
        NodeId([n; 32])
    }

    fn contact(n: u8) -> Contact {
        Contact { id: peer(n), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from(n))) }
    }

    fn store(config: KadConfig) -> RecordStore {
        RecordStore::new(peer(0), config)
    }

    #[test]
    fn forged_manifests_are_refused_and_never_served() {
        let mut s = store(KadConfig::default());
        let (m, id) = manifest("a.bin", 100_000);
        let mut forged = m.clone();
        forged.root.0[0] ^= 1;
        let now = Instant::ZERO;
        assert_eq!(s.put_manifest(&id.0, forged, peer(1), now, DAY), Err(StoreError::Invalid));
        let (other, _) = manifest("b.bin", 200_000);
        assert_eq!(
            s.put_manifest(&id.0, other, peer(1), now, DAY),
            Err(StoreError::Invalid),
            "valid but for another id"
        );
        assert!(s.manifest(&id.0, now).is_none());
        s.put_manifest(&id.0, m.clone(), peer(1), now, DAY).unwrap();
        assert_eq!(s.manifest(&id.0, now), Some(&m));
        assert_eq!(s.counters().rejected_invalid, 2);
    }

    #[test]
    fn records_expire_and_refund_the_sender() {
        let config = KadConfig { record_ttl_ms: 10_000, record_republish_interval_ms: 5_000, ..KadConfig::default() };
        let mut s = store(config);
        let (m, id) = manifest("a.bin", 1_000);
        s.put_manifest(&id.0, m, peer(1), Instant::ZERO, DAY).unwrap();
        assert_eq!(s.charged_to(&peer(1)), 1);
        let later = Instant::ZERO + Duration::from_secs(9);
        s.expire(later);
        assert!(s.manifest(&id.0, later).is_some());
        let expired = Instant::ZERO + Duration::from_secs(10);
        assert!(s.manifest(&id.0, expired).is_none(), "not served once expired, even before the sweep");
        s.expire(expired);
        assert_eq!(s.charged_to(&peer(1)), 0);
        assert_eq!(s.counters().expired, 1);
    }

    #[test]
    fn one_peer_cannot_flood_providers() {
        let config = KadConfig { providers_per_key_max: 4, records_per_peer_max: 3, ..KadConfig::default() };
        let mut s = store(config);
        let now = Instant::ZERO;
        for n in 1..=3u8 {
            s.add_provider(FileId([n; 32]), contact(9), now).unwrap();
        }
        assert_eq!(s.add_provider(FileId([4; 32]), contact(9), now), Err(StoreError::Overloaded));
        // Re-announcing an existing record is a refresh, not a new charge.
        s.add_provider(FileId([1; 32]), contact(9), now).unwrap();
        for n in 10..13u8 {
            s.add_provider(FileId([1; 32]), contact(n), now).unwrap();
        }
        assert_eq!(s.add_provider(FileId([1; 32]), contact(20), now), Err(StoreError::Overloaded), "key full");
        assert_eq!(s.providers(&FileId([1; 32]), now, &mut ChaCha8Rng::seed_from_u64(1)).len(), 4);
    }

    /// Past `providers_returned_max`, each answer is a random subset of
    /// the live providers, so askers spread over the swarm.
    #[test]
    fn a_long_provider_list_is_answered_with_random_subsets() {
        let config = KadConfig { providers_per_key_max: 32, providers_returned_max: 8, ..KadConfig::default() };
        let mut s = store(config);
        let file = FileId([1; 32]);
        for n in 1..=32u8 {
            s.add_provider(file, contact(n), Instant::ZERO).unwrap();
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let answer = s.providers(&file, Instant::ZERO, &mut rng);
            let distinct: std::collections::BTreeSet<_> = answer.iter().map(|c| c.id).collect();
            assert_eq!((answer.len(), distinct.len()), (8, 8), "eight distinct providers");
            seen.extend(distinct);
        }
        assert!(seen.len() > 24, "answers cover most of the list, not its first eight: {}", seen.len());
        // At or under the limit, every live provider is returned.
        let mut small = store(KadConfig { providers_returned_max: 40, ..KadConfig::default() });
        for n in 1..=5u8 {
            small.add_provider(file, contact(n), Instant::ZERO).unwrap();
        }
        assert_eq!(small.providers(&file, Instant::ZERO, &mut rng).len(), 5);
    }

    #[test]
    fn keyword_keys_keep_the_freshest_entries_and_refuse_misfiled_ones() {
        let config = KadConfig { keyword_entries_per_key_max: 2, ..KadConfig::default() };
        let mut s = store(config);
        let key = keywords::keyword_key("iso");
        let entry = |n: u8| KeywordEntry { file: FileId([n; 32]), name: format!("file{n}.iso"), size: 1 };
        let at = |s: u64| Instant::ZERO + Duration::from_secs(s);
        s.put_keywords(&key, vec![entry(1)], peer(1), at(0), DAY).unwrap();
        s.put_keywords(&key, vec![entry(2)], peer(2), at(1), DAY).unwrap();
        s.put_keywords(&key, vec![entry(3)], peer(3), at(2), DAY).unwrap();
        let files: Vec<FileId> = s.keywords(&key, at(2)).iter().map(|e| e.file).collect();
        assert_eq!(files, vec![FileId([2; 32]), FileId([3; 32])], "the stalest entry was evicted");
        assert_eq!(s.charged_to(&peer(1)), 0);
        let misfiled = KeywordEntry { file: FileId([4; 32]), name: "debian.img".into(), size: 1 };
        assert_eq!(s.put_keywords(&key, vec![misfiled], peer(4), at(3), DAY), Err(StoreError::Invalid));
        let unsafe_name = KeywordEntry { file: FileId([5; 32]), name: "../x.iso".into(), size: 1 };
        assert_eq!(s.put_keywords(&key, vec![unsafe_name], peer(4), at(3), DAY), Err(StoreError::Invalid));
    }
}
