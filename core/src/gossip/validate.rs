//! Message ids and the validity rules every published announcement must
//! pass, whether it comes from a peer or from the local application.
//!
//! The id is computed from content, never taken from the wire (spec v1.1
//! §"Message Identification" allows an application-defined id function): a
//! peer cannot make two different messages collide or one message look new.

use sha2::{Digest, Sha256};

use crate::ids::NodeId;
use crate::manifest::validate_name;
use crate::wire::{Announcement, MessageId, Topic};

/// Domain separation: a gossip id can never equal another Shoal hash.
const ID_DOMAIN: &[u8] = b"shoal-gossip-id-v1";

/// Why a message was refused. From a peer, each is a penalised protocol
/// violation; from the application, a [`PublishRejected`] event.
///
/// [`PublishRejected`]: super::GossipEvent::PublishRejected
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    /// The announcement kind does not belong on this topic.
    #[error("announcement does not belong on topic {topic:?}")]
    WrongTopic {
        /// The topic it was published on.
        topic: Topic,
    },
    /// The encoded announcement exceeds `message_bytes_max`.
    #[error("announcement of {bytes} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Encoded size.
        bytes: usize,
        /// `message_bytes_max`.
        max: usize,
    },
    /// A file announcement with an unusable name.
    #[error("file name rejected: {why}")]
    BadName {
        /// The manifest rule it broke.
        why: String,
    },
    /// The announcement could not be encoded.
    #[error("announcement cannot be encoded")]
    Unencodable,
    /// An IHAVE, IWANT or PRUNE list longer than its limit.
    #[error("list of {count} items exceeds the limit of {max}")]
    TooManyItems {
        /// Items sent.
        count: usize,
        /// The limit.
        max: usize,
    },
}

fn topic_tag(topic: Topic) -> u8 {
    match topic {
        Topic::Peers => 0,
        Topic::Files => 1,
        Topic::Swarm => 2,
    }
}

/// Check `payload` for `topic` and compute its id:
/// `SHA-256("shoal-gossip-id-v1" ‖ origin ‖ seq (u64 BE) ‖ topic tag ‖
/// postcard(payload))`. The topic is bound in so a relay cannot re-file a
/// message under another topic and have it dropped as a duplicate there.
pub fn check_message(
    topic: Topic,
    origin: &NodeId,
    seq: u64,
    payload: &Announcement,
    bytes_max: usize,
) -> Result<MessageId, InvalidMessage> {
    let fits = matches!(
        (topic, payload),
        (Topic::Peers, Announcement::Peer(_))
            | (Topic::Files, Announcement::File(_))
            | (Topic::Swarm, Announcement::Swarm { .. })
    );
    if !fits {
        return Err(InvalidMessage::WrongTopic { topic });
    }
    if let Announcement::File(entry) = payload {
        validate_name(&entry.name).map_err(|e| InvalidMessage::BadName { why: e.to_string() })?;
    }
    let bytes = postcard::to_allocvec(payload).map_err(|_| InvalidMessage::Unencodable)?;
    if bytes.len() > bytes_max {
        return Err(InvalidMessage::TooLarge { bytes: bytes.len(), max: bytes_max });
    }
    let mut h = Sha256::new();
    h.update(ID_DOMAIN);
    h.update(origin.as_bytes());
    h.update(seq.to_be_bytes());
    h.update([topic_tag(topic)]);
    h.update(&bytes);
    Ok(MessageId(h.finalize().into()))
}
