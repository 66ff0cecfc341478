//! The connection handshake, as pure functions the driver calls around its
//! I/O: each side sends a [`Hello`] with a fresh nonce, then a
//! [`HelloProof`] signing the *peer's* nonce together with both public keys
//! (so a proof cannot be replayed to a third party or relayed), and checks
//! the peer's proof. Afterwards the peer's `NodeId` is authenticated.

use std::net::SocketAddr;

use shoal_core::ids::NodeId;
use shoal_core::wire::{Hello, HelloProof, PROTOCOL_VERSION, Signature};

use crate::identity::{Identity, node_id_of, verify};

const TRANSCRIPT_DOMAIN: &[u8] = b"shoal-handshake-v1";

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {theirs}, this node speaks {ours}")]
    VersionMismatch {
        /// Ours.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// The peer's signature does not prove its key.
    #[error("peer failed to prove its identity")]
    BadProof,
    /// We connected to ourselves.
    #[error("connected to ourselves")]
    SelfConnection,
    /// The peer is not the node we meant to reach.
    #[error("expected node {expected}, reached {got}")]
    WrongPeer {
        /// Who we dialled.
        expected: NodeId,
        /// Who answered.
        got: NodeId,
    },
    /// A message out of order, or the peer closed or timed out.
    #[error("handshake interrupted: {0}")]
    Interrupted(&'static str),
}

/// An authenticated peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// Its id.
    pub node: NodeId,
    /// Where it accepts connections, as it announced.
    pub listen_addr: Option<SocketAddr>,
}

/// Our first frame.
#[must_use]
pub fn hello(identity: &Identity, listen_addr: Option<SocketAddr>, nonce: [u8; 32]) -> Hello {
    Hello { protocol_version: PROTOCOL_VERSION, public_key: identity.public_key(), listen_addr, nonce }
}

fn transcript(signer: &[u8; 32], verifier: &[u8; 32], verifier_nonce: &[u8; 32]) -> Vec<u8> {
    [TRANSCRIPT_DOMAIN, signer, verifier, verifier_nonce].concat()
}

/// Our second frame, answering the peer's hello.
pub fn proof(identity: &Identity, peer: &Hello) -> Result<HelloProof, HandshakeError> {
    if peer.protocol_version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch { ours: PROTOCOL_VERSION, theirs: peer.protocol_version });
    }
    if peer.public_key == identity.public_key() {
        return Err(HandshakeError::SelfConnection);
    }
    let message = transcript(&identity.public_key(), &peer.public_key, &peer.nonce);
    Ok(HelloProof { signature: Signature(identity.sign(&message)) })
}

/// Check the peer's proof against our hello.
pub fn verify_peer(
    identity: &Identity,
    ours: &Hello,
    peer: &Hello,
    proof: &HelloProof,
) -> Result<PeerInfo, HandshakeError> {
    let message = transcript(&peer.public_key, &identity.public_key(), &ours.nonce);
    if !verify(&peer.public_key, &message, &proof.signature.0) {
        return Err(HandshakeError::BadProof);
    }
    Ok(PeerInfo { node: node_id_of(&peer.public_key), listen_addr: peer.listen_addr })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Identity, Identity) {
        (Identity::from_secret([1; 32]), Identity::from_secret([2; 32]))
    }

    #[test]
    fn both_sides_authenticate_each_other() {
        let (a, b) = pair();
        let (ha, hb) = (hello(&a, None, [10; 32]), hello(&b, Some("127.0.0.1:4100".parse().unwrap()), [20; 32]));
        let (pa, pb) = (proof(&a, &hb).unwrap(), proof(&b, &ha).unwrap());
        let seen_by_a = verify_peer(&a, &ha, &hb, &pb).unwrap();
        let seen_by_b = verify_peer(&b, &hb, &ha, &pa).unwrap();
        assert_eq!(seen_by_a.node, b.node_id());
        assert_eq!(seen_by_a.listen_addr, hb.listen_addr);
        assert_eq!(seen_by_b.node, a.node_id());
    }

    #[test]
    fn a_node_cannot_claim_another_id() {
        let (a, b) = pair();
        let mallory = Identity::from_secret([3; 32]);
        let ha = hello(&a, None, [10; 32]);
        // Mallory announces b's public key but can only sign with its own.
        let mut fake = hello(&mallory, None, [30; 32]);
        fake.public_key = b.public_key();
        let forged = proof(&mallory, &ha).unwrap();
        assert_eq!(verify_peer(&a, &ha, &fake, &forged), Err(HandshakeError::BadProof));
        // A proof b gave to someone else does not transfer: it signs that
        // node's nonce and key.
        let hc = hello(&mallory, None, [30; 32]);
        let for_mallory = proof(&b, &hc).unwrap();
        let hb = hello(&b, None, [20; 32]);
        assert_eq!(verify_peer(&a, &ha, &hb, &for_mallory), Err(HandshakeError::BadProof));
    }

    #[test]
    fn versions_and_self_connections_are_refused() {
        let (a, b) = pair();
        let mut old = hello(&b, None, [20; 32]);
        old.protocol_version = PROTOCOL_VERSION + 1;
        assert!(matches!(proof(&a, &old), Err(HandshakeError::VersionMismatch { .. })));
        assert_eq!(proof(&a, &hello(&a, None, [1; 32])), Err(HandshakeError::SelfConnection));
    }
}
