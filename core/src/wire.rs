//! The wire protocol: one [`Message`] enum for every protocol family, a
//! versioned envelope and length-prefixed framing.
//!
//! # Frame
//! ```text
//! u32 BE length | u8 WIRE_VERSION | postcard(Message) | trailing payload
//! ```
//! `length` counts everything after itself and is at most
//! `Config::frame_bytes_max`; a longer announced length is rejected before
//! anything is buffered. The trailing payload is the raw data of a
//! [`ExchangeMessage::Block`] (its `data` field is skipped by serde): it is
//! copied at most once on encode ([`encode`]) or not at all ([`encode_parts`],
//! for vectored writes), and never on decode (the block's `data` is a
//! slice of the received frame).
//!
//! # Versioning
//! Every frame carries [`WIRE_VERSION`]; a frame of another version is a
//! [`DecodeError::UnsupportedVersion`]. Appending an enum variant or
//! changing a field changes the encoding, so it bumps `WIRE_VERSION`. The
//! handshake additionally carries [`PROTOCOL_VERSION`] so peers can refuse
//! each other with a reason before exchanging anything else.
//!
//! # Requests
//! A [`Message::Request`] carries a [`RequestId`] chosen by the requester,
//! unique among its requests in flight on that connection (a per-machine
//! counter suffices); the peer answers with exactly one
//! [`Message::Response`] echoing it. A response whose id is not in flight is
//! dropped and counted. Gossip and exchange messages are one-way; exchange
//! blocks are matched by `(file, piece, offset)` as in BEP 3.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::content::{MerkleProof, PieceHash};
use crate::ids::{FileId, NodeId, PieceIndex};
use crate::manifest::FileManifest;

/// Encoding version carried by every frame.
pub const WIRE_VERSION: u8 = 4;
/// Protocol version exchanged in the handshake.
///
/// Version 2: a node is subscribed to [`STANDARD_TOPICS`] from the moment
/// its handshake completes, so neither side sends a `Subscriptions` frame
/// for them; only a difference from that set goes on the wire.
pub const PROTOCOL_VERSION: u16 = 2;
/// Gossip topics the handshake implies (see [`PROTOCOL_VERSION`]): every
/// Shoal node subscribes to all three when it starts. Most connections
/// carry one DHT request and close when idle; at 10,000 nodes the
/// `Subscriptions` frame both ends sent was a third of all frames.
pub const STANDARD_TOPICS: &[Topic] = &[Topic::Peers, Topic::Files, Topic::Swarm];
/// Bytes of the frame length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;

/// Requester-chosen id pairing a [`Message::Request`] with its response.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize)]
pub struct RequestId(pub u64);

/// A node as others reach it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct Contact {
    /// The node's id (SHA-256 of its public key).
    pub id: NodeId,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// An ed25519 signature: 64 bytes, serialised as a byte string.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Signature(pub [u8; 64]);

impl Serialize for Signature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Signature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Signature;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("64 signature bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Signature, E> {
                <[u8; 64]>::try_from(v).map(Signature).map_err(|_| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

/// The first frame each side sends on a new connection.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub protocol_version: u16,
    /// The sender's ed25519 public key; its SHA-256 is the sender's `NodeId`.
    pub public_key: [u8; 32],
    /// Where the sender accepts connections, if it does.
    pub listen_addr: Option<SocketAddr>,
    /// Fresh random challenge the peer must sign in its [`HelloProof`].
    pub nonce: [u8; 32],
}

/// The second frame: proof of possession of the key announced in [`Hello`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct HelloProof {
    /// Signature over the peer's nonce (domain-separated by the driver).
    pub signature: Signature,
}

/// Why a connection is being closed, sent in [`Message::Goodbye`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GoodbyeReason {
    /// Orderly shutdown.
    Shutdown,
    /// Incompatible protocol version.
    VersionMismatch,
    /// The sender has too many connections.
    TooManyConnections,
    /// The peer broke the protocol (bad frame, unsolicited data, flood).
    ProtocolViolation,
    /// The peer sent data that failed verification too often.
    Banned,
    /// A duplicate connection to the same node is being dropped.
    Duplicate,
    /// Nothing has used the connection for a while.
    Idle,
}

/// A key in the DHT's record space (same space as node ids).
pub type RecordKey = [u8; 32];

/// An entry of a keyword record, for name search.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct KeywordEntry {
    /// The file found under the keyword.
    pub file: FileId,
    /// Its display name.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
}

/// A value stored in the DHT.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Record {
    /// A file manifest, keyed by its `FileId`.
    Manifest(FileManifest),
    /// Keyword entries, keyed by a token's hash.
    Keywords(Vec<KeywordEntry>),
}

/// DHT requests (Kademlia §2.3).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Request {
    /// Liveness check.
    Ping,
    /// The k contacts closest to `target`.
    FindNode {
        /// Key to approach.
        target: RecordKey,
    },
    /// The record under `key`, or closer contacts.
    FindValue {
        /// Record key.
        key: RecordKey,
    },
    /// Store a record under `key`.
    Store {
        /// Record key.
        key: RecordKey,
        /// The value.
        record: Record,
        /// Seconds the record should live from now: the originator sends
        /// the full TTL, a replicating holder what is left of it, so a
        /// record lapses once its originator stops republishing (libp2p
        /// kad carries a record expiry the same way). Receivers clamp it
        /// to their own maximum.
        ttl_s: u32,
    },
    /// Register `provider` as serving `file`.
    AddProvider {
        /// The file.
        file: FileId,
        /// Who serves it.
        provider: Contact,
    },
    /// Who serves `file`?
    GetProviders {
        /// The file.
        file: FileId,
    },
}

/// Error codes a responder may answer with.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// Nothing known under that key.
    NotFound,
    /// The request was malformed or invalid.
    Invalid,
    /// The responder is over a limit; try elsewhere.
    Overloaded,
}

/// DHT and hash responses, one per [`Request`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Response {
    /// Answer to `Ping`.
    Pong,
    /// Closer contacts (answer to `FindNode`, or `FindValue` without value).
    Nodes {
        /// Up to k contacts.
        closer: Vec<Contact>,
    },
    /// The value asked for by `FindValue`.
    Value {
        /// The record.
        record: Record,
    },
    /// `Store` or `AddProvider` accepted.
    Stored,
    /// Answer to `GetProviders`.
    Providers {
        /// Known providers.
        providers: Vec<Contact>,
        /// Closer contacts to continue the lookup.
        closer: Vec<Contact>,
    },
    /// The request failed.
    Error {
        /// Why.
        code: ErrorCode,
    },
}

/// Gossip topics.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Topic {
    /// New nodes.
    Peers,
    /// New files.
    Files,
    /// Nodes starting or stopping to seed a file.
    Swarm,
}

/// A gossip message id: SHA-256 of origin, sequence number, topic and
/// payload, computed by every receiver (never trusted from the wire), see
/// [`crate::gossip::check_message`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 32]);

/// What a gossip message announces.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Announcement {
    /// A node joined.
    Peer(Contact),
    /// A file was shared.
    File(KeywordEntry),
    /// `node` started (`seeding`) or stopped serving `file`.
    Swarm {
        /// The file.
        file: FileId,
        /// The node.
        node: Contact,
        /// Whether it now serves the file.
        seeding: bool,
    },
}

/// Gossip messages (GossipSub v1.1).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum GossipMessage {
    /// The sender subscribed to a topic.
    Subscribe(Topic),
    /// The sender unsubscribed.
    Unsubscribe(Topic),
    /// All the sender's topics, sent once to each new peer: one frame
    /// where a `Subscribe` per topic would take several (every DHT
    /// connection carries gossip's hello too). At most
    /// `gossip::SUBSCRIPTIONS_MAX` topics.
    Subscriptions(Vec<Topic>),
    /// Join the sender's mesh for a topic.
    Graft(Topic),
    /// Leave the mesh; do not graft again for `backoff_s`.
    Prune {
        /// Topic.
        topic: Topic,
        /// Back-off in seconds.
        backoff_s: u32,
        /// Other peers to try (peer exchange).
        peers: Vec<Contact>,
    },
    /// A published message.
    Publish {
        /// Topic.
        topic: Topic,
        /// The original publisher.
        origin: NodeId,
        /// The origin's sequence number.
        seq: u64,
        /// The content.
        payload: Announcement,
    },
    /// Ids of recent messages the sender has.
    IHave {
        /// Topic.
        topic: Topic,
        /// Message ids.
        ids: Vec<MessageId>,
    },
    /// Please send these messages.
    IWant {
        /// Message ids.
        ids: Vec<MessageId>,
    },
}

/// Piece exchange messages (after BEP 3 and BEP 6), per file.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ExchangeMessage {
    /// The sender wants pieces of `file`.
    Interested {
        /// The file.
        file: FileId,
    },
    /// The sender no longer wants pieces.
    NotInterested {
        /// The file.
        file: FileId,
    },
    /// Which pieces the sender has: bit i (MSB first) = piece i.
    Bitfield {
        /// The file.
        file: FileId,
        /// Packed bits, `ceil(pieces / 8)` bytes.
        bits: Vec<u8>,
    },
    /// The sender has every piece (BEP 6: a seed costs O(1) to announce).
    HaveAll {
        /// The file.
        file: FileId,
    },
    /// The sender has no piece of `file`, or does not know it (BEP 6).
    HaveNone {
        /// The file.
        file: FileId,
    },
    /// The sender completed these pieces (one, or a batch completed
    /// within `ExchangeConfig::have_batch_interval`). Not empty, and no
    /// longer than the file's piece count.
    Have {
        /// The file.
        file: FileId,
        /// The pieces.
        pieces: Vec<PieceIndex>,
    },
    /// Ask for one block.
    Request {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Byte offset within the piece.
        offset: u32,
        /// Length (one block).
        length: u32,
    },
    /// One block of data; `data` travels as the frame's trailing payload.
    Block {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Byte offset within the piece.
        offset: u32,
        /// The bytes.
        #[serde(skip)]
        data: Bytes,
    },
    /// Withdraw a request.
    Cancel {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Byte offset.
        offset: u32,
        /// Length.
        length: u32,
    },
    /// A request will not be served (BEP 6).
    Reject {
        /// The file.
        file: FileId,
        /// The piece.
        piece: PieceIndex,
        /// Byte offset.
        offset: u32,
        /// Length.
        length: u32,
    },
    /// Ask for the piece hashes `first..first + count` (an aligned
    /// power-of-two batch) when the manifest did not carry them.
    HashRequest {
        /// The file.
        file: FileId,
        /// First piece of the batch.
        first: PieceIndex,
        /// Batch size.
        count: u32,
    },
    /// The answer to a `HashRequest`: the batch and one Merkle range proof
    /// for it; an empty `hashes` means the sender does not know them.
    Hashes {
        /// The file.
        file: FileId,
        /// First piece of the batch.
        first: PieceIndex,
        /// Batch size as requested.
        count: u32,
        /// The hashes, `min(count, pieces - first)` of them.
        hashes: Vec<PieceHash>,
        /// Proof from the batch's subtree to the root.
        proof: MerkleProof,
    },
    /// The sender will not serve requests for `file` for now.
    Choke {
        /// The file.
        file: FileId,
    },
    /// The sender will serve requests for `file`.
    Unchoke {
        /// The file.
        file: FileId,
    },
    /// The sender ended its session for `file` and keeps the connection:
    /// it has no room for another peer of the file, banned the receiver,
    /// does not serve the file, or both sides hold every piece. The
    /// receiver drops its side; a `Leave` is never answered and never
    /// opens a session.
    Leave {
        /// The file.
        file: FileId,
    },
}

/// Everything that travels on a Shoal connection.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Handshake, first frame in each direction.
    Hello(Hello),
    /// Handshake, second frame: key possession proof.
    HelloProof(HelloProof),
    /// Keeps an idle connection alive; any frame resets the idle timer.
    Keepalive,
    /// A request expecting exactly one [`Message::Response`].
    Request {
        /// Pairs the response with this request.
        id: RequestId,
        /// The request.
        body: Request,
    },
    /// The answer to a request.
    Response {
        /// The request's id.
        id: RequestId,
        /// The answer.
        body: Response,
    },
    /// Gossip.
    Gossip(GossipMessage),
    /// Piece exchange.
    Exchange(ExchangeMessage),
    /// The sender is closing the connection.
    Goodbye {
        /// Why.
        reason: GoodbyeReason,
    },
}

impl ExchangeMessage {
    /// The file the message is about.
    #[must_use]
    pub fn file(&self) -> FileId {
        match self {
            Self::Interested { file }
            | Self::NotInterested { file }
            | Self::Bitfield { file, .. }
            | Self::HaveAll { file }
            | Self::HaveNone { file }
            | Self::Have { file, .. }
            | Self::Request { file, .. }
            | Self::Block { file, .. }
            | Self::Cancel { file, .. }
            | Self::Reject { file, .. }
            | Self::HashRequest { file, .. }
            | Self::Hashes { file, .. }
            | Self::Choke { file }
            | Self::Unchoke { file }
            | Self::Leave { file } => *file,
        }
    }
}

impl Message {
    fn trailing_payload(&self) -> Option<&Bytes> {
        match self {
            Message::Exchange(ExchangeMessage::Block { data, .. }) => Some(data),
            _ => None,
        }
    }
}

/// Why a frame could not be decoded. Peer bytes are untrusted: every one of
/// these is a counted protocol violation, never a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The announced length exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// `frame_bytes_max`.
        max: u32,
    },
    /// A frame with no version byte.
    #[error("empty frame")]
    EmptyFrame,
    /// A frame of a wire version this build does not speak.
    #[error("unsupported wire version {got} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion {
        /// The version byte received.
        got: u8,
    },
    /// The body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(#[from] postcard::Error),
    /// Bytes after a message that carries no payload.
    #[error("{count} unexpected trailing bytes")]
    TrailingBytes {
        /// How many.
        count: usize,
    },
}

/// Why a message could not be encoded (a local bug or limit, not a peer's).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The encoded frame would exceed the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Encoded length.
        len: u64,
        /// `frame_bytes_max`.
        max: u32,
    },
    /// Serialisation failed.
    #[error("serialising message: {0}")]
    Serialize(#[from] postcard::Error),
}

/// A frame split for vectored writes: `head` (length prefix, version,
/// header) followed by `payload` (a block's data, not copied).
#[derive(Debug)]
pub struct EncodedFrame {
    /// Length prefix, version byte and serialised message.
    pub head: BytesMut,
    /// The trailing payload, empty for most messages.
    pub payload: Bytes,
}

impl EncodedFrame {
    /// Total bytes on the wire.
    #[must_use]
    pub fn len(&self) -> usize {
        self.head.len() + self.payload.len()
    }

    /// Whether the frame is empty (never, for a real frame).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Encode `message` without copying its payload.
pub fn encode_parts(message: &Message, frame_bytes_max: u32) -> Result<EncodedFrame, EncodeError> {
    let mut head = BytesMut::with_capacity(64);
    head.put_u32(0); // patched below
    head.put_u8(WIRE_VERSION);
    let mut head = postcard::to_extend(message, head)?;
    let payload = message.trailing_payload().cloned().unwrap_or_default();
    let len = (head.len() - LENGTH_PREFIX_BYTES + payload.len()) as u64;
    if len > u64::from(frame_bytes_max) {
        return Err(EncodeError::FrameTooLarge { len, max: frame_bytes_max });
    }
    // len <= frame_bytes_max, a u32.
    head[..LENGTH_PREFIX_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(EncodedFrame { head, payload })
}

/// The length of `message`'s frame as [`encode_parts`] would write it
/// (length prefix included), without writing it: simulators charge
/// bandwidth by it for every frame.
pub fn encoded_len(message: &Message, frame_bytes_max: u32) -> Result<u32, EncodeError> {
    let body = postcard::experimental::serialized_size(message)?;
    let payload = message.trailing_payload().map_or(0, Bytes::len);
    let len = (1 + body + payload) as u64; // the version byte, the body
    if len > u64::from(frame_bytes_max) {
        return Err(EncodeError::FrameTooLarge { len, max: frame_bytes_max });
    }
    Ok(len as u32 + LENGTH_PREFIX_BYTES as u32)
}

/// Encode `message` as one frame appended to `out`; a block's data is
/// copied exactly once, into `out`.
pub fn encode(message: &Message, frame_bytes_max: u32, out: &mut BytesMut) -> Result<(), EncodeError> {
    let frame = encode_parts(message, frame_bytes_max)?;
    out.reserve(frame.len());
    out.extend_from_slice(&frame.head);
    out.extend_from_slice(&frame.payload);
    Ok(())
}

/// Decode one frame body (everything after the length prefix). A block's
/// `data` is a zero-copy slice of `body`.
pub fn decode_body(body: Bytes) -> Result<Message, DecodeError> {
    let (&version, rest) = body.split_first().ok_or(DecodeError::EmptyFrame)?;
    if version != WIRE_VERSION {
        return Err(DecodeError::UnsupportedVersion { got: version });
    }
    let (mut message, trailing): (Message, &[u8]) = postcard::take_from_bytes(rest)?;
    let trailing_len = trailing.len();
    match &mut message {
        Message::Exchange(ExchangeMessage::Block { data, .. }) => {
            *data = body.slice(body.len() - trailing_len..);
        }
        _ if trailing_len > 0 => return Err(DecodeError::TrailingBytes { count: trailing_len }),
        _ => {}
    }
    Ok(message)
}

/// Take one complete frame off the front of a stream buffer.
///
/// Returns `Ok(None)` until a whole frame has arrived. An announced length
/// over `frame_bytes_max` is rejected as soon as the prefix is read, so a
/// peer cannot make us buffer more than one maximal frame.
pub fn decode_frame(buf: &mut BytesMut, frame_bytes_max: u32) -> Result<Option<Message>, DecodeError> {
    let Some(prefix) = buf.first_chunk::<LENGTH_PREFIX_BYTES>() else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(*prefix);
    if len > frame_bytes_max {
        return Err(DecodeError::FrameTooLarge { len: u64::from(len), max: frame_bytes_max });
    }
    let total = LENGTH_PREFIX_BYTES + len as usize;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let body = frame.split_off(LENGTH_PREFIX_BYTES).freeze();
    decode_body(body).map(Some)
}

#[cfg(test)]
mod tests;
