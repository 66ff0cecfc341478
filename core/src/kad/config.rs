//! Every limit and interval of the Kademlia machine, units last (STYLE.md
//! §3). Composed into the node's `Config` later; validated on its own.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// Limits and intervals of [`super::Kademlia`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KadConfig {
    /// k: contacts per bucket, and how many closest nodes a lookup converges
    /// on and stores to (Kademlia §2.2 suggests 20).
    pub bucket_size: usize,
    /// Replacement-cache entries kept per bucket (Kademlia §4.1): recently
    /// seen contacts that take the place of a stale entry.
    pub replacements_per_bucket_max: usize,
    /// α: requests in flight per lookup (Kademlia §2.3 suggests 3).
    pub parallelism: usize,
    /// Requests in flight per manifest lookup. A manifest lookup stops at
    /// the first valid manifest (Kademlia §2.3), but every holder asked in
    /// parallel sends its copy, up to 33 KiB, all of it from the k nodes
    /// closest to one file id. One at a time (with `request_stall_ms` to
    /// move past a slow node) sends one copy per lookup: in a flash crowd
    /// of 1,000 peers, α = 3 made each holder send some 3 MB of manifest
    /// copies and left them the last to finish.
    pub value_parallelism: usize,
    /// Times a second one key is answered with its value; past that (and
    /// `value_answer_burst`), the asker gets the closer contacts and moves
    /// on to another of the k holders (`hot.rs`). A holder everyone knows
    /// otherwise answers a whole crowd alone.
    pub value_answers_per_key_per_s: u32,
    /// Value answers one key may get at once, above the steady rate.
    pub value_answer_burst: u32,
    /// The same rate for a manifest we published ourselves (`put_manifest`),
    /// one at a time: its file's pieces start out with us alone, our
    /// uplink belongs to them, and the other k − 1 holders can answer the
    /// crowd. Only the originator: a peer that completed the download is
    /// one seed of many, and if every holder were held to this rate, a
    /// later crowd could run out of manifest lookups
    /// (`manifest_lookup_attempts`).
    pub origin_value_answers_per_s: u32,
    /// Keys whose answer rate is tracked; only keys answered faster than
    /// the rate in the last moments take a place.
    pub value_answer_keys_max: usize,
    /// Failed requests after which a contact is dropped even without a
    /// replacement; with one, it is replaced at the first failure
    /// (Kademlia §4.1: tolerate transient loss when nobody can take over).
    pub contact_failures_max: u32,
    /// A bucket head heard from within this time is not pinged when a
    /// newcomer wants its place; the newcomer waits in the replacement
    /// cache (BEP 5: nodes seen in the last 15 minutes are "good").
    pub contact_fresh_ms: u64,
    /// How long a single request may take before it counts as failed.
    pub request_timeout_ms: u64,
    /// How long a lookup waits for one answer before it stops counting the
    /// request against α and moves on (Kademlia §2.3: "nodes that fail to
    /// respond quickly are removed from consideration until and unless
    /// they do respond"). The request itself still lives until
    /// `request_timeout_ms`.
    pub request_stall_ms: u64,
    /// How long a whole lookup may take before it ends unsuccessfully.
    pub query_timeout_ms: u64,
    /// Lookups running at once (user and internal); new ones beyond it are
    /// refused with a failed result, so a busy node cannot grow without end.
    pub queries_max: usize,
    /// Background requests (pings before eviction, replication to newly
    /// closer nodes) in flight; lookups are bounded by `queries_max` × k.
    pub background_requests_inflight_max: usize,
    /// Candidates a lookup tracks; farther ones are dropped (libp2p kad
    /// keeps a bounded closest-peers iterator the same way).
    pub query_candidates_max: usize,
    /// A bucket not looked up for this long is refreshed with a lookup of a
    /// random id in its range (Kademlia §2.3: one hour).
    pub bucket_refresh_interval_ms: u64,
    /// A bucket refresh (at join and hourly) ends when this many contacts
    /// closest to its random target have answered (at most k), not k.
    /// Its purpose is live contacts in the bucket, and every answer from
    /// the bucket's range lands in it; the k closest to a random point
    /// are of no use.
    /// With 3 (α), `dht-lookups` at 10,000 nodes sent 253k refresh
    /// requests instead of 773k, with the same lookup success (100%) and
    /// rounds (p50 3, p90 4).
    pub refresh_closest: usize,
    /// Period of the maintenance tick: expiry, republish, replication,
    /// refresh. Coarse on purpose: these are hour-scale duties.
    pub maintenance_interval_ms: u64,
    /// First retry delay for a bootstrap that left the table empty; doubles
    /// on each retry up to `bootstrap_backoff_max_ms`.
    pub bootstrap_backoff_initial_ms: u64,
    /// Longest delay between bootstrap retries.
    pub bootstrap_backoff_max_ms: u64,
    /// Seed addresses remembered for bootstrap retries.
    pub bootstrap_seeds_max: usize,
    /// Records (manifests) held for others, in total.
    pub records_max: usize,
    /// Largest encoded manifest record accepted, in bytes. The biggest
    /// honest one (1024 inline hashes, 255-byte name) is about 33 KiB.
    pub record_bytes_max: usize,
    /// Stored items (manifests + keyword entries + provider entries) that
    /// one sending peer may occupy, so one peer cannot fill our store.
    pub records_per_peer_max: usize,
    /// How long a stored record or keyword entry lives without being stored
    /// again (Kademlia §2.5: 24 h).
    pub record_ttl_ms: u64,
    /// How often holders push the records they hold to the current k
    /// closest nodes (Kademlia §2.5: every hour), so data survives holders
    /// leaving and reaches newly closer nodes.
    pub record_replicate_interval_ms: u64,
    /// How often the originator stores its records again (Kademlia §2.5:
    /// every 24 h; kept below the TTL so records never lapse).
    pub record_republish_interval_ms: u64,
    /// Files for which we hold provider records.
    pub provider_keys_max: usize,
    /// Providers kept per file; the oldest is dropped first.
    pub providers_per_key_max: usize,
    /// Provider-record lifetime (libp2p kad: 48 h; shorter here because a
    /// provider that left should vanish quickly).
    pub provider_ttl_ms: u64,
    /// How often a provider re-announces itself, below `provider_ttl_ms`.
    pub provider_republish_interval_ms: u64,
    /// Providers returned in one `GetProviders` answer.
    pub providers_returned_max: usize,
    /// Keyword keys held in total.
    pub keyword_keys_max: usize,
    /// Entries kept per keyword key; when full the stalest is dropped, so
    /// fresh (republished) entries win.
    pub keyword_entries_per_key_max: usize,
    /// Entries accepted in one keyword `Store` request.
    pub keyword_entries_per_store_max: usize,
    /// Records, provider announcements and keyword sets this node
    /// originates and keeps republishing.
    pub published_max: usize,
    /// Tokens used from one search query; more are ignored.
    pub search_tokens_max: usize,
}

impl Default for KadConfig {
    fn default() -> Self {
        const HOUR_MS: u64 = 3_600_000;
        Self {
            bucket_size: 20,
            replacements_per_bucket_max: 10,
            parallelism: 3,
            value_parallelism: 1,
            value_answers_per_key_per_s: 64,
            value_answer_burst: 64,
            origin_value_answers_per_s: 2,
            value_answer_keys_max: 256,
            contact_failures_max: 3,
            contact_fresh_ms: 15 * 60_000,
            request_timeout_ms: 2_000,
            request_stall_ms: 500,
            query_timeout_ms: 60_000,
            queries_max: 256,
            background_requests_inflight_max: 256,
            query_candidates_max: 200,
            bucket_refresh_interval_ms: HOUR_MS,
            refresh_closest: 3,
            maintenance_interval_ms: 60_000,
            bootstrap_backoff_initial_ms: 1_000,
            bootstrap_backoff_max_ms: 300_000,
            bootstrap_seeds_max: 16,
            records_max: 4_096,
            record_bytes_max: 40 * 1024,
            records_per_peer_max: 256,
            record_ttl_ms: 24 * HOUR_MS,
            record_replicate_interval_ms: HOUR_MS,
            record_republish_interval_ms: 12 * HOUR_MS,
            provider_keys_max: 4_096,
            providers_per_key_max: 32,
            provider_ttl_ms: 12 * HOUR_MS,
            provider_republish_interval_ms: 6 * HOUR_MS,
            providers_returned_max: 20,
            keyword_keys_max: 4_096,
            keyword_entries_per_key_max: 64,
            keyword_entries_per_store_max: 16,
            published_max: 1_024,
            search_tokens_max: 8,
        }
    }
}

fn positive(field: &'static str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::OutOfRange { field, value, why: "must be at least 1" });
    }
    Ok(())
}

fn below(field: &'static str, value: u64, bound: u64, why: &'static str) -> Result<(), ConfigError> {
    if value >= bound {
        return Err(ConfigError::OutOfRange { field, value, why });
    }
    Ok(())
}

impl KadConfig {
    /// Reject values the protocol cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let counts = [
            ("bucket_size", self.bucket_size),
            ("parallelism", self.parallelism),
            ("value_parallelism", self.value_parallelism),
            ("value_answers_per_key_per_s", self.value_answers_per_key_per_s as usize),
            ("value_answer_burst", self.value_answer_burst as usize),
            ("origin_value_answers_per_s", self.origin_value_answers_per_s as usize),
            ("value_answer_keys_max", self.value_answer_keys_max),
            ("refresh_closest", self.refresh_closest),
            ("queries_max", self.queries_max),
            ("background_requests_inflight_max", self.background_requests_inflight_max),
            ("records_max", self.records_max),
            ("record_bytes_max", self.record_bytes_max),
            ("records_per_peer_max", self.records_per_peer_max),
            ("provider_keys_max", self.provider_keys_max),
            ("providers_per_key_max", self.providers_per_key_max),
            ("providers_returned_max", self.providers_returned_max),
            ("keyword_keys_max", self.keyword_keys_max),
            ("keyword_entries_per_key_max", self.keyword_entries_per_key_max),
            ("keyword_entries_per_store_max", self.keyword_entries_per_store_max),
            ("published_max", self.published_max),
            ("search_tokens_max", self.search_tokens_max),
            ("bootstrap_seeds_max", self.bootstrap_seeds_max),
        ];
        for (field, value) in counts {
            positive(field, value as u64)?;
        }
        let intervals = [
            ("request_timeout_ms", self.request_timeout_ms),
            ("request_stall_ms", self.request_stall_ms),
            ("query_timeout_ms", self.query_timeout_ms),
            ("bucket_refresh_interval_ms", self.bucket_refresh_interval_ms),
            ("maintenance_interval_ms", self.maintenance_interval_ms),
            ("bootstrap_backoff_initial_ms", self.bootstrap_backoff_initial_ms),
            ("record_ttl_ms", self.record_ttl_ms),
            ("record_replicate_interval_ms", self.record_replicate_interval_ms),
            ("provider_ttl_ms", self.provider_ttl_ms),
        ];
        for (field, value) in intervals {
            positive(field, value)?;
        }
        // A lookup must be able to converge on k candidates.
        if self.query_candidates_max < self.bucket_size {
            return Err(ConfigError::OutOfRange {
                field: "query_candidates_max",
                value: self.query_candidates_max as u64,
                why: "must be at least bucket_size",
            });
        }
        // Republishing after expiry would let records lapse.
        below(
            "record_republish_interval_ms",
            self.record_republish_interval_ms,
            self.record_ttl_ms,
            "must be below record_ttl_ms",
        )?;
        below(
            "provider_republish_interval_ms",
            self.provider_republish_interval_ms,
            self.provider_ttl_ms,
            "must be below provider_ttl_ms",
        )?;
        below(
            "request_timeout_ms",
            self.request_timeout_ms,
            self.query_timeout_ms.saturating_add(1),
            "must not exceed query_timeout_ms",
        )?;
        below(
            "request_stall_ms",
            self.request_stall_ms,
            self.request_timeout_ms.saturating_add(1),
            "must not exceed request_timeout_ms",
        )?;
        if self.bootstrap_backoff_max_ms < self.bootstrap_backoff_initial_ms {
            return Err(ConfigError::OutOfRange {
                field: "bootstrap_backoff_max_ms",
                value: self.bootstrap_backoff_max_ms,
                why: "must be at least bootstrap_backoff_initial_ms",
            });
        }
        Ok(())
    }

    pub(crate) fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_broken_values_are_named() {
        KadConfig::default().validate().unwrap();
        let zero_k = KadConfig { bucket_size: 0, ..KadConfig::default() };
        assert!(matches!(zero_k.validate(), Err(ConfigError::OutOfRange { field: "bucket_size", .. })));
        let lapsing = KadConfig { record_republish_interval_ms: 48 * 3_600_000, ..KadConfig::default() };
        assert!(matches!(
            lapsing.validate(),
            Err(ConfigError::OutOfRange { field: "record_republish_interval_ms", .. })
        ));
    }
}
