//! What crosses the machine's boundary: inputs from the driver, outputs to
//! it, user-facing events and results, and counters.

use std::net::SocketAddr;
use std::time::Duration;

use crate::manifest::FileManifest;
use crate::wire::{Contact, KeywordEntry, Request, RequestId, Response};

/// Names one query from start to its [`KadEvent::QueryFinished`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct QueryId(pub u64);

/// What the driver hands the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KadInput {
    /// A peer sent a request; answer with one [`KadOutput::Respond`].
    Request {
        /// The sender, as authenticated by the connection handshake.
        from: Contact,
        /// The peer's request id, echoed in the response.
        id: RequestId,
        /// The request.
        request: Request,
    },
    /// A peer answered one of our requests.
    Response {
        /// The responder, as authenticated by the handshake.
        from: Contact,
        /// Our request id.
        id: RequestId,
        /// The answer.
        response: Response,
    },
    /// The driver could not deliver request `id` (no connection, refused).
    RequestFailed {
        /// Our request id.
        id: RequestId,
    },
}

/// What the machine asks of the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KadOutput {
    /// Send `request` to `to`; its answer comes back as
    /// [`KadInput::Response`] with the same `id`.
    Send {
        /// The peer.
        to: Contact,
        /// Our request id.
        id: RequestId,
        /// The request.
        request: Request,
    },
    /// Send `request` to a bootstrap address whose node id is not known yet;
    /// the driver learns it in the handshake and reports it in the response.
    SendToAddress {
        /// Where to connect.
        addr: SocketAddr,
        /// Our request id.
        id: RequestId,
        /// The request.
        request: Request,
    },
    /// Answer a peer's request.
    Respond {
        /// The peer that asked.
        to: Contact,
        /// The peer's request id.
        id: RequestId,
        /// The answer.
        response: Response,
    },
    /// Something for the user.
    Event(KadEvent),
}

/// How a query went (reported with every result).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueryStats {
    /// Deepest hop the lookup reached: 1 when only contacts from our own
    /// table were asked. 0 when answered locally.
    pub rounds: u32,
    /// Requests sent, including the final STORE/ADD_PROVIDER round.
    pub messages: u32,
    /// From start to result.
    pub duration: Duration,
    /// Whether the query achieved its purpose (found a contact, a value,
    /// a provider, or stored at least once) before its deadline.
    pub success: bool,
}

/// The result of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueryResult {
    /// `find_node`: the closest contacts that answered, closest first.
    FindNode {
        /// Up to k contacts.
        closest: Vec<Contact>,
    },
    /// `get_manifest`: the manifest, validated against its id.
    GetManifest {
        /// `None` when no valid manifest was found.
        manifest: Option<FileManifest>,
    },
    /// `get_providers`: who serves the file.
    GetProviders {
        /// Providers found (bounded by `providers_per_key_max`).
        providers: Vec<Contact>,
    },
    /// `put_manifest` or `add_provider`: how many of the k closest nodes
    /// accepted the record.
    Stored {
        /// Nodes that acknowledged.
        stored: usize,
    },
    /// `search`: entries whose names contain every query token.
    Search {
        /// Matching files, by `FileId` order.
        entries: Vec<KeywordEntry>,
    },
}

/// Notifications for the user of the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KadEvent {
    /// A user query ended.
    QueryFinished {
        /// The id returned when it started.
        id: QueryId,
        /// Rounds, messages, duration, success.
        stats: QueryStats,
        /// What it found.
        result: QueryResult,
    },
    /// A bootstrap attempt ended.
    Bootstrapped {
        /// Contacts in the routing table afterwards; 0 means a retry is
        /// scheduled with backoff.
        contacts: usize,
    },
}

/// Counters of notable events, for metrics. Overflow of every limit is
/// counted here (STYLE.md §3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KadCounters {
    /// Requests received from peers.
    pub requests_received: u64,
    /// Requests we sent.
    pub requests_sent: u64,
    /// Our requests that timed out or could not be delivered.
    pub requests_failed: u64,
    /// Responses with no matching request in flight (late or unsolicited).
    pub responses_unexpected: u64,
    /// Responses from another node than the one asked.
    pub responses_wrong_peer: u64,
    /// Values received that failed validation (forged manifests, misfiled
    /// keyword entries).
    pub values_rejected: u64,
    /// Contact lists truncated to k or candidates dropped from a full set.
    pub contacts_dropped: u64,
    /// Queries refused at `queries_max`.
    pub queries_refused: u64,
    /// Background requests (pings, replication) skipped at
    /// `background_requests_inflight_max`.
    pub background_skipped: u64,
    /// Provider announcements refused because the provider was not the
    /// sender.
    pub providers_spoofed: u64,
    /// Publications refused at `published_max`.
    pub published_refused: u64,
    /// Value requests answered with contacts because the key was asked
    /// for faster than `value_answers_per_key_per_s`.
    pub value_answers_deferred: u64,
    /// Farther buckets the join did not refresh: the self-lookup had put
    /// contacts in them.
    pub join_refreshes_skipped: u64,
}
