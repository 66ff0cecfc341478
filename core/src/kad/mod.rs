//! The Kademlia DHT (Maymounkov & Mazières, 2002) as a sans-IO state
//! machine: routing table, iterative lookups, and the manifest, provider and
//! keyword records Shoal keeps in it.
//!
//! [`Kademlia`] never touches a socket or a clock. The driver feeds it
//! messages and the time; it answers with [`KadOutput`]s: requests to send,
//! responses to send, and [`KadEvent`]s reporting query results.
//!
//! Contacts are learned from every message that arrives: the sender of each
//! request, and every peer that answers one of ours. Contacts merely named
//! in a `Nodes` answer are used as lookup candidates but enter the routing
//! table only once they answer themselves, so a peer cannot fill our table
//! with made-up entries (libp2p kad does the same).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use crate::config::ConfigError;
use crate::ids::{FileId, NodeId};
use crate::manifest::{FileManifest, ManifestError};
use crate::time::Instant;
use crate::wire::{Contact, ErrorCode, KeywordEntry, Record, RecordKey, Request, RequestId, Response};

mod bootstrap;
pub mod config;
mod hot;
mod io;
pub mod keywords;
mod lookup;
mod republish;
pub mod routing;
pub mod store;
#[cfg(test)]
mod tests;

pub use config::KadConfig;
use hot::ValueThrottle;
pub use io::{KadCounters, KadEvent, KadInput, KadOutput, QueryId, QueryResult, QueryStats};
use lookup::Lookup;
use routing::{Observed, RoutingTable};
use store::RecordStore;

/// What a query does with its lookup.
#[derive(Clone, Debug)]
enum Goal {
    FindNode,
    GetManifest,
    /// One token of a search; `search` is the aggregate's id. Keyword
    /// lookups do not stop at the first value: entries are spread over the
    /// k closest (each publisher stores its own), so all answers are merged.
    GetKeywords {
        search: QueryId,
        found: BTreeMap<FileId, KeywordEntry>,
    },
    /// Ends by the Kademlia rule, or as soon as `enough` are found.
    GetProviders {
        found: BTreeMap<NodeId, Contact>,
        enough: usize,
    },
    /// Store `request` on the k closest once the lookup ends.
    Store {
        request: Request,
    },
    Bootstrap,
    Refresh,
}

/// What a lookup's answers are expected to carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Nodes,
    Manifest,
    Keywords,
    Providers,
}

#[derive(Clone, Debug)]
enum Phase {
    Lookup,
    Storing { outstanding: usize, stored: usize },
}

#[derive(Clone, Debug)]
struct Query {
    goal: Goal,
    lookup: Lookup,
    phase: Phase,
    started: Instant,
    deadline: Instant,
    /// Whether a [`KadEvent::QueryFinished`] is owed.
    user: bool,
    store_messages: u32,
}

/// A multi-token search: one keyword lookup per token, then intersect.
#[derive(Clone, Debug)]
struct Search {
    started: Instant,
    remaining: usize,
    results: Vec<Vec<KeywordEntry>>,
    rounds: u32,
    messages: u32,
    success: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    /// A lookup request of a query.
    Lookup(QueryId),
    /// The final STORE / ADD_PROVIDER of a query. Kept apart from
    /// `Lookup`: lookup answers may still arrive once storing has begun.
    Store(QueryId),
    /// Ping-before-evict of the head of a full bucket.
    Ping,
    /// Replicating a held record to a newly closer node.
    Replicate,
    /// First contact with a bootstrap seed address.
    Seed,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    /// `None` for a bootstrap address whose id is unknown.
    to: Option<NodeId>,
    purpose: Purpose,
    deadline: Instant,
    /// For lookup requests: when the lookup stops waiting for the answer.
    stall_at: Option<Instant>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    Request(RequestId),
    /// A lookup request is slow: stop counting it against α.
    Stall(RequestId),
    Query(QueryId),
}

/// Something this node originated and republishes (Kademlia §2.5).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Publication {
    Manifest(FileId),
    Provider(FileId),
    /// The keyword entries of one file, one record per token.
    Keywords(FileId),
}

#[derive(Clone, Debug)]
struct Published {
    /// The manifest, or the keyword entry; `None` for a provider record.
    manifest: Option<FileManifest>,
    entry: Option<KeywordEntry>,
    next_at: Instant,
}

/// A Kademlia node, sans IO.
///
/// Call order (quinn-proto, str0m): one mutation — [`handle_input`],
/// [`handle_timeout`] or a command such as [`find_node`] — then
/// [`poll_output`] until it returns `None`, then arm a timer for
/// [`poll_timeout`]. `now` must never go backwards. `handle_timeout` may be
/// called early or twice: it only acts on deadlines that have passed.
///
/// Commands ([`bootstrap`], [`find_node`], [`get_manifest`],
/// [`put_manifest`], [`add_provider`], [`get_providers`],
/// [`publish_keywords`], [`search`]) are methods rather than inputs so that
/// each returns its [`QueryId`] at once; every query ends with exactly one
/// [`KadEvent::QueryFinished`] carrying that id (bootstrap reports
/// [`KadEvent::Bootstrapped`] instead). Peers are addressed by [`Contact`];
/// only bootstrap seeds, known by address alone, are reached through
/// [`KadOutput::SendToAddress`].
///
/// [`bootstrap`]: Kademlia::bootstrap
/// [`get_manifest`]: Kademlia::get_manifest
/// [`put_manifest`]: Kademlia::put_manifest
/// [`add_provider`]: Kademlia::add_provider
/// [`get_providers`]: Kademlia::get_providers
/// [`publish_keywords`]: Kademlia::publish_keywords
/// [`search`]: Kademlia::search
/// [`handle_input`]: Kademlia::handle_input
/// [`handle_timeout`]: Kademlia::handle_timeout
/// [`find_node`]: Kademlia::find_node
/// [`poll_output`]: Kademlia::poll_output
/// [`poll_timeout`]: Kademlia::poll_timeout
#[derive(Debug)]
pub struct Kademlia {
    config: KadConfig,
    local: Contact,
    rng: ChaCha8Rng,
    table: RoutingTable,
    store: RecordStore,
    value_throttle: ValueThrottle,
    /// For the manifests we published ourselves.
    origin_value_throttle: ValueThrottle,
    queries: BTreeMap<QueryId, Query>,
    searches: BTreeMap<QueryId, Search>,
    pending: BTreeMap<RequestId, Pending>,
    background_inflight: usize,
    timers: BTreeSet<(Instant, Timer)>,
    outputs: VecDeque<KadOutput>,
    published: BTreeMap<Publication, Published>,
    seeds: Vec<SocketAddr>,
    seeds_pending: usize,
    bootstrap_query: Option<QueryId>,
    bootstrap_retry_at: Option<Instant>,
    bootstrap_backoff: Duration,
    next_maintenance: Instant,
    next_request: u64,
    next_query: u64,
    counters: KadCounters,
}

impl Kademlia {
    // ---- construction and getters -------------------------------------

    /// A node with identity `local`, randomness from `seed`, starting at
    /// `now`; refuses a config that does not [`validate`](KadConfig::validate).
    pub fn new(config: KadConfig, local: Contact, seed: [u8; 32], now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut table = RoutingTable::new(
            local.id,
            config.bucket_size,
            config.replacements_per_bucket_max,
            config.contact_failures_max,
            KadConfig::ms(config.contact_fresh_ms),
        );
        table.touch_all(now);
        let store = RecordStore::new(local.id, config.clone());
        let value_throttle = ValueThrottle::new(
            config.value_answers_per_key_per_s,
            config.value_answer_burst,
            config.value_answer_keys_max,
        );
        let origin_value_throttle = ValueThrottle::new(config.origin_value_answers_per_s, 1, config.published_max);
        let next_maintenance = now + KadConfig::ms(config.maintenance_interval_ms);
        let bootstrap_backoff = KadConfig::ms(config.bootstrap_backoff_initial_ms);
        Ok(Self {
            config,
            local,
            rng: ChaCha8Rng::from_seed(seed),
            table,
            store,
            value_throttle,
            origin_value_throttle,
            queries: BTreeMap::new(),
            searches: BTreeMap::new(),
            pending: BTreeMap::new(),
            background_inflight: 0,
            timers: BTreeSet::new(),
            outputs: VecDeque::new(),
            published: BTreeMap::new(),
            seeds: Vec::new(),
            seeds_pending: 0,
            bootstrap_query: None,
            bootstrap_retry_at: None,
            bootstrap_backoff,
            next_maintenance,
            next_request: 0,
            next_query: 0,
            counters: KadCounters::default(),
        })
    }

    /// Our own contact.
    #[must_use]
    pub fn local(&self) -> Contact {
        self.local
    }

    /// The routing table.
    #[must_use]
    pub fn table(&self) -> &RoutingTable {
        &self.table
    }

    /// The records held for the network.
    #[must_use]
    pub fn store(&self) -> &RecordStore {
        &self.store
    }

    /// Counters so far.
    #[must_use]
    pub fn counters(&self) -> KadCounters {
        self.counters
    }

    /// Queries running (user and internal).
    #[must_use]
    pub fn queries_running(&self) -> usize {
        self.queries.len()
    }

    /// A contact heard of elsewhere (a gossip peer announcement): ping it.
    /// It joins the routing table only if it answers as that id (the
    /// answer's sender is authenticated by the connection), so an
    /// announcement alone cannot poison the table. Skipped for ourselves,
    /// a known contact, or at `background_requests_inflight_max`.
    pub fn probe(&mut self, now: Instant, contact: Contact) {
        if contact.id == self.local.id || self.table.contains(&contact.id) {
            return;
        }
        self.send_background(now, contact, Request::Ping, Purpose::Ping);
    }

    // ---- handle_* ------------------------------------------------------

    /// Feed one input from the network.
    pub fn handle_input(&mut self, now: Instant, input: KadInput) {
        match input {
            KadInput::Request { from, id, request } => self.on_request(now, from, id, request),
            KadInput::Response { from, id, response } => self.on_response(now, from, id, response),
            KadInput::RequestFailed { id } => {
                if let Some(pending) = self.take_pending(id) {
                    self.on_failure(now, pending);
                }
            }
        }
    }

    /// Run every deadline that has passed at `now`; harmless if none has.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, timer)) = self.timers.first() {
            if at > now {
                break;
            }
            self.timers.pop_first();
            match timer {
                Timer::Request(id) => {
                    if let Some(pending) = self.take_pending(id) {
                        self.on_failure(now, pending);
                    }
                }
                Timer::Query(query) => self.query_timed_out(now, query),
                Timer::Stall(id) => self.request_stalled(now, id),
            }
        }
        if self.bootstrap_retry_at.is_some_and(|at| at <= now) {
            self.bootstrap_retry_at = None;
            self.send_to_seeds(now);
        }
        if self.next_maintenance <= now {
            self.next_maintenance = now + KadConfig::ms(self.config.maintenance_interval_ms);
            self.maintain(now);
        }
    }

    // ---- commands (mutators) ------------------------------------------

    /// Join the network through `seeds` (addresses only): ask each for the
    /// nodes closest to us, then look ourselves up and refresh every bucket
    /// farther than our closest neighbour (Kademlia §2.3). If the table is
    /// still empty afterwards, retry with exponential backoff.
    pub fn bootstrap(&mut self, now: Instant, seeds: &[SocketAddr]) {
        self.seeds = seeds.iter().copied().filter(|a| *a != self.local.addr).collect();
        self.seeds.truncate(self.config.bootstrap_seeds_max);
        self.bootstrap_backoff = KadConfig::ms(self.config.bootstrap_backoff_initial_ms);
        self.send_to_seeds(now);
    }

    /// Find the k nodes closest to `target`.
    pub fn find_node(&mut self, now: Instant, target: RecordKey) -> QueryId {
        self.start_query(now, target, Goal::FindNode, true, None)
    }

    /// Find and validate the manifest of `file` (answered locally when held).
    pub fn get_manifest(&mut self, now: Instant, file: FileId) -> QueryId {
        if let Some(manifest) = self.store.manifest(&file.0, now).cloned() {
            return self.answer_locally(QueryResult::GetManifest { manifest: Some(manifest) });
        }
        self.start_query(now, file.0, Goal::GetManifest, true, None)
    }

    /// A query our own store answers: finished at once, no request sent.
    fn answer_locally(&mut self, result: QueryResult) -> QueryId {
        let id = self.alloc_query();
        let stats = QueryStats { rounds: 0, messages: 0, duration: Duration::ZERO, success: true };
        self.emit_finished(id, stats, result);
        id
    }

    /// Store a manifest on the k nodes closest to its `FileId`, keep a copy,
    /// and republish it every `record_republish_interval_ms`.
    pub fn put_manifest(&mut self, now: Instant, manifest: FileManifest) -> Result<QueryId, ManifestError> {
        let file = manifest.validate()?;
        let next_at = now + KadConfig::ms(self.config.record_republish_interval_ms);
        self.publish(Publication::Manifest(file), Published { manifest: Some(manifest.clone()), entry: None, next_at });
        Ok(self.store_manifest(now, file, manifest, true))
    }

    /// Announce that we serve `file` to the k closest nodes; re-announced
    /// every `provider_republish_interval_ms` until [`Self::stop_providing`].
    pub fn add_provider(&mut self, now: Instant, file: FileId) -> QueryId {
        let _ = self.store.add_provider(file, self.local, now);
        let next_at = now + KadConfig::ms(self.config.provider_republish_interval_ms);
        self.publish(Publication::Provider(file), Published { manifest: None, entry: None, next_at });
        let request = Request::AddProvider { file, provider: self.local };
        self.start_query(now, file.0, Goal::Store { request }, true, None)
    }

    /// Stop republishing our provider record for `file` (it lapses at its
    /// TTL on the holders).
    pub fn stop_providing(&mut self, file: FileId) {
        self.published.remove(&Publication::Provider(file));
    }

    /// Find providers of `file` (those we hold ourselves included). The
    /// lookup ends as soon as it knows `enough` of them (IPFS's
    /// `FindProvidersAsync` count), else by the Kademlia rule: in a swarm
    /// every answer from the k closest carries providers, and asking all
    /// k of them for the same list makes those k nodes a hot spot.
    pub fn get_providers(&mut self, now: Instant, file: FileId, enough: usize) -> QueryId {
        let enough = enough.max(1);
        let found: BTreeMap<NodeId, Contact> =
            self.store.providers(&file, now, &mut self.rng).into_iter().map(|c| (c.id, c)).collect();
        if found.len() >= enough {
            return self.answer_locally(QueryResult::GetProviders { providers: found.into_values().collect() });
        }
        let goal = Goal::GetProviders { found, enough };
        self.start_query(now, file.0, goal, true, None)
    }

    /// Make `entry` findable by every token of its name, republishing it
    /// until [`Self::unpublish_keywords`]. Returns the number of tokens
    /// published.
    pub fn publish_keywords(&mut self, now: Instant, entry: KeywordEntry) -> usize {
        let next_at = now + KadConfig::ms(self.config.record_republish_interval_ms);
        let file = entry.file;
        self.publish(Publication::Keywords(file), Published { manifest: None, entry: Some(entry.clone()), next_at });
        self.store_keywords(now, &entry)
    }

    /// Stop republishing the keyword entries of `file`.
    pub fn unpublish_keywords(&mut self, file: FileId) {
        self.published.remove(&Publication::Keywords(file));
    }

    /// Search file names: every token of `text` is looked up and the
    /// results intersected, so "ubuntu iso" finds names containing both.
    pub fn search(&mut self, now: Instant, text: &str) -> QueryId {
        let mut tokens = keywords::tokens(text);
        tokens.truncate(self.config.search_tokens_max);
        let id = self.alloc_query();
        if tokens.is_empty() {
            let stats = QueryStats { rounds: 0, messages: 0, duration: Duration::ZERO, success: false };
            self.emit_finished(id, stats, QueryResult::Search { entries: Vec::new() });
            return id;
        }
        let search = Search {
            started: now,
            remaining: tokens.len(),
            results: Vec::new(),
            rounds: 0,
            messages: 0,
            success: true,
        };
        self.searches.insert(id, search);
        for token in tokens {
            let key = keywords::keyword_key(&token);
            // Our own entries count too; the lookup never asks ourselves.
            let found = self.store.keywords(&key, now).into_iter().map(|e| (e.file, e)).collect();
            self.start_query(now, key, Goal::GetKeywords { search: id, found }, false, None);
        }
        id
    }

    // ---- poll_* --------------------------------------------------------

    /// The next output; drain until `None` after every mutation.
    pub fn poll_output(&mut self) -> Option<KadOutput> {
        crate::outputs::pop_output(&mut self.outputs)
    }

    /// The earliest deadline; call [`Self::handle_timeout`] when it passes.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timers = self.timers.first().map(|&(at, _)| at);
        [timers, self.bootstrap_retry_at, Some(self.next_maintenance)].into_iter().flatten().min()
    }

    // ---- requests from peers -------------------------------------------

    fn on_request(&mut self, now: Instant, from: Contact, id: RequestId, request: Request) {
        self.counters.requests_received += 1;
        self.learn(now, from);
        let k = self.config.bucket_size;
        let response = match request {
            Request::Ping => Response::Pong,
            Request::FindNode { target } => Response::Nodes { closer: self.closest_for(&target, &from, k) },
            Request::FindValue { key } => self.value_answer(now, key, &from),
            Request::Store { key, record, ttl_s } => {
                let ttl = Duration::from_secs(u64::from(ttl_s));
                let result = match record {
                    Record::Manifest(manifest) => self.store.put_manifest(&key, manifest, from.id, now, ttl),
                    Record::Keywords(entries) => self.store.put_keywords(&key, entries, from.id, now, ttl),
                };
                match result {
                    Ok(()) => Response::Stored,
                    Err(e) => Response::Error { code: e.code() },
                }
            }
            Request::AddProvider { file, provider } => {
                if provider.id != from.id {
                    // Only a node may announce itself (libp2p kad checks the
                    // same): otherwise anyone could list victims as providers.
                    self.counters.providers_spoofed += 1;
                    Response::Error { code: ErrorCode::Invalid }
                } else {
                    match self.store.add_provider(file, provider, now) {
                        Ok(()) => Response::Stored,
                        Err(e) => Response::Error { code: e.code() },
                    }
                }
            }
            Request::GetProviders { file } => Response::Providers {
                providers: self.store.providers(&file, now, &mut self.rng),
                closer: self.closest_for(&file.0, &from, k),
            },
        };
        self.outputs.push_back(KadOutput::Respond { to: from, id, response });
    }

    /// The value under `key`, or the closer contacts when we hold none or
    /// have answered `key` at its rate already (`hot.rs`).
    fn value_answer(&mut self, now: Instant, key: RecordKey, from: &Contact) -> Response {
        // A manifest we published is of a file whose pieces start out with
        // us alone: our uplink is theirs (`origin_value_answers_per_s`).
        let ours = self.published.contains_key(&Publication::Manifest(FileId(key)));
        let throttle = if ours { &mut self.origin_value_throttle } else { &mut self.value_throttle };
        // `None`: we hold nothing under `key`; `Some(None)`: we do, but
        // not at this rate (the copy is made only when it is sent).
        let held = if let Some(manifest) = self.store.manifest(&key, now) {
            Some(throttle.allow(&key, now).then(|| Record::Manifest(manifest.clone())))
        } else {
            let mut entries = self.store.keywords(&key, now);
            // Freshest last in the store; a frame holds a bounded answer.
            let skip = entries.len().saturating_sub(self.config.keyword_entries_per_key_max);
            entries.drain(..skip);
            (!entries.is_empty()).then(|| throttle.allow(&key, now).then_some(Record::Keywords(entries)))
        };
        match held {
            Some(Some(record)) => Response::Value { record },
            Some(None) => {
                self.counters.value_answers_deferred += 1;
                Response::Nodes { closer: self.closest_for(&key, from, self.config.bucket_size) }
            }
            None => Response::Nodes { closer: self.closest_for(&key, from, self.config.bucket_size) },
        }
    }

    fn closest_for(&self, target: &RecordKey, asker: &Contact, k: usize) -> Vec<Contact> {
        self.table.closest_except(target, k, Some(&asker.id))
    }

    // ---- responses to our requests -------------------------------------

    fn take_pending(&mut self, id: RequestId) -> Option<Pending> {
        let pending = self.pending.remove(&id)?;
        self.timers.remove(&(pending.deadline, Timer::Request(id)));
        if let Some(at) = pending.stall_at {
            self.timers.remove(&(at, Timer::Stall(id)));
        }
        if matches!(pending.purpose, Purpose::Ping | Purpose::Replicate) {
            self.background_inflight -= 1;
        }
        Some(pending)
    }

    fn on_response(&mut self, now: Instant, from: Contact, id: RequestId, response: Response) {
        let Some(expected) = self.pending.get(&id) else {
            self.counters.responses_unexpected += 1;
            return;
        };
        if expected.to.is_some_and(|to| to != from.id) {
            // Not the node we asked: ignore it; the request times out.
            self.counters.responses_wrong_peer += 1;
            return;
        }
        let Some(pending) = self.take_pending(id) else { return };
        self.learn(now, from);
        match pending.purpose {
            Purpose::Ping | Purpose::Replicate => {}
            Purpose::Seed => self.seed_answered(now, from, response),
            Purpose::Lookup(query) => self.query_response(now, query, from, response),
            Purpose::Store(query) => self.store_settled(now, query, matches!(response, Response::Stored)),
        }
    }

    fn on_failure(&mut self, now: Instant, pending: Pending) {
        self.counters.requests_failed += 1;
        if let Some(to) = pending.to {
            // Unresponsive contacts are marked stale (Kademlia §4.1).
            self.table.failed(&to);
        }
        match pending.purpose {
            Purpose::Ping | Purpose::Replicate => {}
            Purpose::Seed => {
                self.seeds_pending = self.seeds_pending.saturating_sub(1);
                self.check_bootstrap_done(now);
            }
            Purpose::Lookup(query) => {
                let Some(q) = self.queries.get_mut(&query) else { return };
                if let Some(to) = pending.to {
                    q.lookup.failed(&to);
                }
                self.advance(now, query);
            }
            Purpose::Store(query) => self.store_settled(now, query, false),
        }
    }

    /// A lookup request is slow: "nodes that fail to respond quickly are
    /// removed from consideration until and unless they do respond"
    /// (Kademlia §2.3), so the lookup moves on without waiting for it.
    fn request_stalled(&mut self, now: Instant, id: RequestId) {
        let Some(&Pending { to: Some(to), purpose: Purpose::Lookup(query), .. }) = self.pending.get(&id) else {
            return;
        };
        if let Some(q) = self.queries.get_mut(&query) {
            q.lookup.stalled(&to);
            self.advance(now, query);
        }
    }

    /// One STORE / ADD_PROVIDER of `query` was answered or failed.
    fn store_settled(&mut self, now: Instant, query: QueryId, accepted: bool) {
        let Some(Query { phase: Phase::Storing { outstanding, stored }, .. }) = self.queries.get_mut(&query) else {
            return;
        };
        *outstanding = outstanding.saturating_sub(1);
        *stored += usize::from(accepted);
        if *outstanding == 0 {
            self.finish_store(now, query);
        }
    }

    /// A contact sent us something: add or refresh it, ping a bucket head
    /// if needed, and replicate records it should now hold.
    fn learn(&mut self, now: Instant, contact: Contact) {
        match self.table.observe(contact, now) {
            Observed::PingNeeded { ping } => self.send_background(now, ping, Request::Ping, Purpose::Ping),
            Observed::Inserted | Observed::Replaced { .. } => self.replicate_to_newcomer(now, contact),
            Observed::Local | Observed::Refreshed | Observed::Cached => {}
        }
    }

    fn contacts_from_peer(&mut self, mut contacts: Vec<Contact>) -> Vec<Contact> {
        if contacts.len() > self.config.bucket_size {
            self.counters.contacts_dropped += (contacts.len() - self.config.bucket_size) as u64;
            contacts.truncate(self.config.bucket_size);
        }
        contacts
    }

    fn query_response(&mut self, now: Instant, query: QueryId, from: Contact, response: Response) {
        let providers_max = self.config.providers_per_key_max;
        let Some(q) = self.queries.get(&query) else { return };
        if !matches!(q.phase, Phase::Lookup) {
            return; // a late lookup answer: storing has begun
        }
        let key = *q.lookup.target();
        let want = match q.goal {
            Goal::GetManifest => Want::Manifest,
            Goal::GetKeywords { .. } => Want::Keywords,
            Goal::GetProviders { .. } => Want::Providers,
            _ => Want::Nodes,
        };
        let mut closer = Vec::new();
        let mut value = None;
        let mut enough_found = false;
        match (response, want) {
            (Response::Nodes { closer: c }, _) => closer = c,
            (Response::Value { record: Record::Manifest(m) }, Want::Manifest) => {
                if m.validate_for(&FileId(key)).is_ok() {
                    value = Some(QueryResult::GetManifest { manifest: Some(m) });
                } else {
                    // A forged manifest is never accepted (manifest.rs: the
                    // id certifies the manifest).
                    self.counters.values_rejected += 1;
                }
            }
            (Response::Value { record: Record::Keywords(entries) }, Want::Keywords) => {
                let max = self.config.keyword_entries_per_key_max;
                if let Some(Query { goal: Goal::GetKeywords { found, .. }, .. }) = self.queries.get_mut(&query) {
                    for entry in entries {
                        if !keywords::entry_belongs_to(&entry, &key) {
                            self.counters.values_rejected += 1;
                        } else if found.len() < max || found.contains_key(&entry.file) {
                            found.insert(entry.file, entry);
                        } else {
                            self.counters.contacts_dropped += 1;
                        }
                    }
                }
            }
            (Response::Providers { providers, closer: c }, Want::Providers) => {
                closer = c;
                if let Some(Query { goal: Goal::GetProviders { found, enough }, .. }) = self.queries.get_mut(&query) {
                    for p in providers {
                        if found.len() >= providers_max {
                            break;
                        }
                        found.insert(p.id, p);
                    }
                    enough_found = found.len() >= *enough;
                }
            }
            // Errors and mismatched answers: the peer is alive but helped
            // nothing; it counts as answered for termination.
            _ => {}
        }
        let closer = self.contacts_from_peer(closer);
        let Some(q) = self.queries.get_mut(&query) else { return };
        q.lookup.answered(&from.id, closer);
        if let Some(result) = value {
            // FIND_VALUE stops at the first valid value (Kademlia §2.3).
            self.finish_query(now, query, true, Some(result));
            return;
        }
        if enough_found {
            self.finish_query(now, query, true, None);
            return;
        }
        self.advance(now, query);
    }

    // ---- queries -------------------------------------------------------

    fn alloc_query(&mut self) -> QueryId {
        self.next_query += 1;
        QueryId(self.next_query)
    }

    fn start_query(
        &mut self,
        now: Instant,
        target: RecordKey,
        goal: Goal,
        user: bool,
        seed: Option<(Contact, Vec<Contact>)>,
    ) -> QueryId {
        let id = self.alloc_query();
        if self.queries.len() >= self.config.queries_max {
            self.counters.queries_refused += 1;
            let query = Query {
                goal,
                lookup: Lookup::new(target, self.local.id, 1, 1, self.config.query_candidates_max),
                phase: Phase::Lookup,
                started: now,
                deadline: now,
                user,
                store_messages: 0,
            };
            self.report(now, id, query, false, None);
            return id;
        }
        let k = self.config.bucket_size;
        // A refresh converges on fewer than k (`refresh_closest`).
        let closest = if matches!(goal, Goal::Refresh) { self.config.refresh_closest.min(k) } else { k };
        let alpha =
            if matches!(goal, Goal::GetManifest) { self.config.value_parallelism } else { self.config.parallelism };
        let mut lookup = Lookup::new(target, self.local.id, closest, alpha, self.config.query_candidates_max);
        lookup.add(0, self.table.closest(&target, k));
        if let Some((answered, closer)) = seed {
            lookup.add_answered(answered);
            lookup.add(1, closer);
        }
        self.table.touch(&target, now);
        let deadline = now + KadConfig::ms(self.config.query_timeout_ms);
        let query = Query { goal, lookup, phase: Phase::Lookup, started: now, deadline, user, store_messages: 0 };
        self.queries.insert(id, query);
        self.timers.insert((deadline, Timer::Query(id)));
        self.advance(now, id);
        id
    }

    /// Send as many requests as the lookup allows, or finish it.
    fn advance(&mut self, now: Instant, query: QueryId) {
        let Some(q) = self.queries.get_mut(&query) else { return };
        if !matches!(q.phase, Phase::Lookup) {
            return;
        }
        if q.lookup.is_finished() {
            self.lookup_done(now, query);
            return;
        }
        let target = *q.lookup.target();
        let mut sends = Vec::new();
        while let Some((contact, _)) = q.lookup.next() {
            let request = match &q.goal {
                Goal::GetManifest | Goal::GetKeywords { .. } => Request::FindValue { key: target },
                Goal::GetProviders { .. } => Request::GetProviders { file: FileId(target) },
                Goal::FindNode | Goal::Store { .. } | Goal::Bootstrap | Goal::Refresh => Request::FindNode { target },
            };
            sends.push((contact, request));
        }
        for (contact, request) in sends {
            self.send(now, contact, request, Purpose::Lookup(query));
        }
    }

    fn lookup_done(&mut self, now: Instant, query: QueryId) {
        let Some(q) = self.queries.get_mut(&query) else { return };
        let Goal::Store { request } = &q.goal else {
            let success = match &q.goal {
                Goal::FindNode | Goal::Bootstrap | Goal::Refresh => !q.lookup.closest_answered().is_empty(),
                Goal::GetProviders { found, .. } => !found.is_empty(),
                Goal::GetKeywords { found, .. } => !found.is_empty(),
                _ => false,
            };
            self.finish_query(now, query, success, None);
            return;
        };
        // STORE / ADD_PROVIDER to the k closest that answered (Kademlia §2.3).
        let request = request.clone();
        let targets = q.lookup.closest_answered();
        if targets.is_empty() {
            self.finish_store(now, query);
            return;
        }
        q.phase = Phase::Storing { outstanding: targets.len(), stored: 0 };
        q.store_messages = targets.len() as u32;
        if let Request::Store { key, .. } = &request {
            self.store.mark_replicated(key, now);
        }
        for contact in targets {
            self.send(now, contact, request.clone(), Purpose::Store(query));
        }
    }

    fn finish_store(&mut self, now: Instant, query: QueryId) {
        let stored = match self.queries.get(&query).map(|q| &q.phase) {
            Some(Phase::Storing { stored, .. }) => *stored,
            _ => 0,
        };
        self.finish_query(now, query, stored > 0, Some(QueryResult::Stored { stored }));
    }

    fn query_timed_out(&mut self, now: Instant, query: QueryId) {
        let Some(q) = self.queries.get(&query) else { return };
        match q.phase {
            Phase::Storing { .. } => self.finish_store(now, query),
            Phase::Lookup => self.finish_query(now, query, false, None),
        }
    }

    /// End a query: `result` if given, else what its lookup has.
    fn finish_query(&mut self, now: Instant, query: QueryId, success: bool, result: Option<QueryResult>) {
        let Some(q) = self.queries.remove(&query) else { return };
        self.timers.remove(&(q.deadline, Timer::Query(query)));
        // Requests still in flight stay pending and are ignored when they
        // answer or time out (the query is gone).
        match q.goal {
            Goal::Bootstrap => {
                self.bootstrap_query = None;
                self.check_bootstrap_done(now);
                if !self.table.is_empty() {
                    self.refresh_after_bootstrap(now);
                }
            }
            Goal::Refresh => {}
            _ => self.report(now, query, q, success, result),
        }
    }

    fn report(&mut self, now: Instant, id: QueryId, q: Query, success: bool, result: Option<QueryResult>) {
        let stats = QueryStats {
            rounds: q.lookup.rounds,
            messages: q.lookup.messages + q.store_messages,
            duration: now - q.started,
            success,
        };
        self.counters.contacts_dropped += q.lookup.dropped;
        let result = match (q.goal, result) {
            (Goal::GetKeywords { search, found }, _) => {
                let entries = (!found.is_empty()).then(|| found.into_values().collect());
                self.search_part_done(now, search, entries, stats.rounds, stats.messages);
                return;
            }
            (_, Some(result)) => result,
            (Goal::FindNode, None) => QueryResult::FindNode { closest: q.lookup.closest_answered() },
            (Goal::GetManifest, None) => QueryResult::GetManifest { manifest: None },
            (Goal::GetProviders { found, .. }, None) => {
                QueryResult::GetProviders { providers: found.into_values().collect() }
            }
            (Goal::Store { .. }, None) => QueryResult::Stored { stored: 0 },
            (Goal::Bootstrap | Goal::Refresh, None) => return,
        };
        if q.user {
            self.emit_finished(id, stats, result);
        }
    }

    fn search_part_done(
        &mut self,
        now: Instant,
        id: QueryId,
        entries: Option<Vec<KeywordEntry>>,
        rounds: u32,
        messages: u32,
    ) {
        let Some(search) = self.searches.get_mut(&id) else { return };
        search.remaining -= 1;
        search.rounds = search.rounds.max(rounds);
        search.messages += messages;
        search.success &= entries.is_some();
        search.results.push(entries.unwrap_or_default());
        if search.remaining > 0 {
            return;
        }
        let Some(search) = self.searches.remove(&id) else { return };
        // Intersect by file: keep files found under every token.
        let mut matches: BTreeMap<FileId, KeywordEntry> = BTreeMap::new();
        if let Some((first, rest)) = search.results.split_first() {
            for entry in first {
                if rest.iter().all(|set| set.iter().any(|e| e.file == entry.file)) {
                    matches.entry(entry.file).or_insert_with(|| entry.clone());
                }
            }
        }
        let stats = QueryStats {
            rounds: search.rounds,
            messages: search.messages,
            duration: now - search.started,
            success: search.success,
        };
        self.emit_finished(id, stats, QueryResult::Search { entries: matches.into_values().collect() });
    }

    fn emit_finished(&mut self, id: QueryId, stats: QueryStats, result: QueryResult) {
        self.outputs.push_back(KadOutput::Event(KadEvent::QueryFinished { id, stats, result }));
    }

    // ---- sending -------------------------------------------------------

    fn alloc_request(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    fn track(&mut self, now: Instant, id: RequestId, to: Option<NodeId>, purpose: Purpose) {
        let deadline = now + KadConfig::ms(self.config.request_timeout_ms);
        let stall_at = matches!(purpose, Purpose::Lookup(_)).then(|| now + KadConfig::ms(self.config.request_stall_ms));
        self.pending.insert(id, Pending { to, purpose, deadline, stall_at });
        self.timers.insert((deadline, Timer::Request(id)));
        if let Some(at) = stall_at {
            self.timers.insert((at, Timer::Stall(id)));
        }
        self.counters.requests_sent += 1;
    }

    fn send(&mut self, now: Instant, to: Contact, request: Request, purpose: Purpose) {
        let id = self.alloc_request();
        self.track(now, id, Some(to.id), purpose);
        self.outputs.push_back(KadOutput::Send { to, id, request });
    }

    /// Pings and replication: skipped and counted beyond
    /// `background_requests_inflight_max`.
    fn send_background(&mut self, now: Instant, to: Contact, request: Request, purpose: Purpose) {
        if self.background_inflight >= self.config.background_requests_inflight_max {
            self.counters.background_skipped += 1;
            return;
        }
        self.background_inflight += 1;
        self.send(now, to, request, purpose);
    }
}
