use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::collection::vec;
use proptest::prelude::*;

use super::*;
use crate::config::Config;
use crate::content::{BLOCK_BYTES, Content, Layout, PIECE_BYTES_MIN};

const MAX: u32 = 256 * 1024;

fn round_trip(message: &Message) -> Message {
    let mut buf = BytesMut::new();
    encode(message, MAX, &mut buf).unwrap();
    let decoded = decode_frame(&mut buf, MAX).unwrap().unwrap();
    assert!(buf.is_empty(), "frame fully consumed");
    decoded
}

fn arb_key() -> impl Strategy<Value = [u8; 32]> {
    any::<[u8; 32]>()
}

fn arb_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

fn arb_contact() -> impl Strategy<Value = Contact> {
    (arb_key(), arb_addr()).prop_map(|(id, addr)| Contact { id: NodeId(id), addr })
}

fn arb_file() -> impl Strategy<Value = FileId> {
    arb_key().prop_map(FileId)
}

fn arb_piece() -> impl Strategy<Value = PieceIndex> {
    any::<u32>().prop_map(PieceIndex)
}

fn arb_manifest() -> impl Strategy<Value = FileManifest> {
    ("[a-z]{1,20}\\.bin", 0u64..(1 << 24)).prop_map(|(name, size)| {
        let layout = Layout::for_file(size);
        let hashes = (0..layout.piece_count()).map(|i| PieceHash([i as u8; 32])).collect();
        FileManifest::new(&name, &Content::from_piece_hashes(layout, hashes)).unwrap()
    })
}

fn arb_entry() -> impl Strategy<Value = KeywordEntry> {
    (arb_file(), ".{0,40}", any::<u64>()).prop_map(|(file, name, size)| KeywordEntry { file, name, size })
}

fn arb_record() -> impl Strategy<Value = Record> {
    prop_oneof![arb_manifest().prop_map(Record::Manifest), vec(arb_entry(), 0..5).prop_map(Record::Keywords),]
}

fn arb_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        arb_key().prop_map(|target| Request::FindNode { target }),
        arb_key().prop_map(|key| Request::FindValue { key }),
        (arb_key(), arb_record(), any::<u32>()).prop_map(|(key, record, ttl_s)| Request::Store { key, record, ttl_s }),
        (arb_file(), arb_contact()).prop_map(|(file, provider)| Request::AddProvider { file, provider }),
        arb_file().prop_map(|file| Request::GetProviders { file }),
    ]
}

fn arb_response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Pong),
        vec(arb_contact(), 0..20).prop_map(|closer| Response::Nodes { closer }),
        arb_record().prop_map(|record| Response::Value { record }),
        Just(Response::Stored),
        (vec(arb_contact(), 0..8), vec(arb_contact(), 0..8))
            .prop_map(|(providers, closer)| Response::Providers { providers, closer }),
        prop_oneof![Just(ErrorCode::NotFound), Just(ErrorCode::Invalid), Just(ErrorCode::Overloaded)]
            .prop_map(|code| Response::Error { code }),
    ]
}

fn arb_topic() -> impl Strategy<Value = Topic> {
    prop_oneof![Just(Topic::Peers), Just(Topic::Files), Just(Topic::Swarm)]
}

fn arb_announcement() -> impl Strategy<Value = Announcement> {
    prop_oneof![
        arb_contact().prop_map(Announcement::Peer),
        arb_entry().prop_map(Announcement::File),
        (arb_file(), arb_contact(), any::<bool>()).prop_map(|(file, node, seeding)| Announcement::Swarm {
            file,
            node,
            seeding
        }),
    ]
}

fn arb_gossip() -> impl Strategy<Value = GossipMessage> {
    let ids = || vec(arb_key().prop_map(MessageId), 0..10);
    prop_oneof![
        arb_topic().prop_map(GossipMessage::Subscribe),
        arb_topic().prop_map(GossipMessage::Unsubscribe),
        vec(arb_topic(), 0..4).prop_map(GossipMessage::Subscriptions),
        arb_topic().prop_map(GossipMessage::Graft),
        (arb_topic(), any::<u32>(), vec(arb_contact(), 0..4))
            .prop_map(|(topic, backoff_s, peers)| GossipMessage::Prune { topic, backoff_s, peers }),
        (arb_topic(), arb_key(), any::<u64>(), arb_announcement()).prop_map(|(topic, origin, seq, payload)| {
            GossipMessage::Publish { topic, origin: NodeId(origin), seq, payload }
        }),
        (arb_topic(), ids()).prop_map(|(topic, ids)| GossipMessage::IHave { topic, ids }),
        ids().prop_map(|ids| GossipMessage::IWant { ids }),
    ]
}

fn arb_exchange() -> impl Strategy<Value = ExchangeMessage> {
    let span = || (arb_file(), arb_piece(), any::<u32>(), any::<u32>());
    prop_oneof![
        arb_file().prop_map(|file| ExchangeMessage::Interested { file }),
        arb_file().prop_map(|file| ExchangeMessage::NotInterested { file }),
        (arb_file(), vec(any::<u8>(), 0..64)).prop_map(|(file, bits)| ExchangeMessage::Bitfield { file, bits }),
        arb_file().prop_map(|file| ExchangeMessage::HaveAll { file }),
        arb_file().prop_map(|file| ExchangeMessage::HaveNone { file }),
        arb_file().prop_map(|file| ExchangeMessage::Leave { file }),
        (arb_file(), proptest::collection::vec(arb_piece(), 1..8))
            .prop_map(|(file, pieces)| ExchangeMessage::Have { file, pieces }),
        span().prop_map(|(file, piece, offset, length)| ExchangeMessage::Request { file, piece, offset, length }),
        (arb_file(), arb_piece(), any::<u32>(), vec(any::<u8>(), 0..(BLOCK_BYTES as usize + 1))).prop_map(
            |(file, piece, offset, data)| ExchangeMessage::Block { file, piece, offset, data: Bytes::from(data) }
        ),
        span().prop_map(|(file, piece, offset, length)| ExchangeMessage::Cancel { file, piece, offset, length }),
        span().prop_map(|(file, piece, offset, length)| ExchangeMessage::Reject { file, piece, offset, length }),
        (arb_file(), arb_piece(), any::<u32>()).prop_map(|(file, first, count)| ExchangeMessage::HashRequest {
            file,
            first,
            count
        }),
        (arb_file(), arb_piece(), any::<u32>(), vec(arb_key(), 0..8), vec(arb_key(), 0..12)).prop_map(
            |(file, first, count, hashes, siblings)| ExchangeMessage::Hashes {
                file,
                first,
                count,
                hashes: hashes.into_iter().map(PieceHash).collect(),
                proof: MerkleProof { siblings },
            }
        ),
        arb_file().prop_map(|file| ExchangeMessage::Choke { file }),
        arb_file().prop_map(|file| ExchangeMessage::Unchoke { file }),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    let reason = prop_oneof![
        Just(GoodbyeReason::Shutdown),
        Just(GoodbyeReason::VersionMismatch),
        Just(GoodbyeReason::TooManyConnections),
        Just(GoodbyeReason::ProtocolViolation),
        Just(GoodbyeReason::Banned),
        Just(GoodbyeReason::Duplicate),
        Just(GoodbyeReason::Idle),
    ];
    prop_oneof![
        (any::<u16>(), arb_key(), proptest::option::of(arb_addr()), arb_key()).prop_map(
            |(protocol_version, public_key, listen_addr, nonce)| Message::Hello(Hello {
                protocol_version,
                public_key,
                listen_addr,
                nonce
            })
        ),
        (arb_key(), arb_key()).prop_map(|(a, b)| {
            let mut sig = [0u8; 64];
            sig[..32].copy_from_slice(&a);
            sig[32..].copy_from_slice(&b);
            Message::HelloProof(HelloProof { signature: Signature(sig) })
        }),
        Just(Message::Keepalive),
        (any::<u64>(), arb_request()).prop_map(|(id, body)| Message::Request { id: RequestId(id), body }),
        (any::<u64>(), arb_response()).prop_map(|(id, body)| Message::Response { id: RequestId(id), body }),
        arb_gossip().prop_map(Message::Gossip),
        arb_exchange().prop_map(Message::Exchange),
        reason.prop_map(|reason| Message::Goodbye { reason }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(message in arb_message()) {
        prop_assert_eq!(round_trip(&message), message);
    }

    /// `encoded_len` is the length `encode_parts` writes, or the same error.
    #[test]
    fn encoded_len_is_the_written_length(message in arb_message(), max in 64u32..4096) {
        match (encoded_len(&message, max), encode_parts(&message, max)) {
            (Ok(len), Ok(frame)) => prop_assert_eq!(len as usize, frame.len()),
            (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b.map(|f| f.len())),
        }
    }

    /// A stream of frames cut at arbitrary points decodes to the same
    /// messages in order: the decoder never needs a whole stream at once.
    #[test]
    fn frames_survive_arbitrary_stream_cuts(
        messages in vec(arb_message(), 1..6),
        cut in 1usize..97,
    ) {
        let mut stream = BytesMut::new();
        for m in &messages {
            encode(m, MAX, &mut stream).unwrap();
        }
        let mut buf = BytesMut::new();
        let mut decoded = Vec::new();
        for piece in stream.chunks(cut) {
            buf.extend_from_slice(piece);
            while let Some(m) = decode_frame(&mut buf, MAX).unwrap() {
                decoded.push(m);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(decoded, messages);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..2048)) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Drain until the decoder wants more bytes or reports an error.
        while let Ok(Some(_)) = decode_frame(&mut buf, MAX) {}
        let _ = decode_body(Bytes::from(bytes));
    }

    /// Valid-prefix fuzzing: a real frame with bytes flipped still never
    /// panics (reaches deeper decoder states than pure noise).
    #[test]
    fn corrupted_frames_never_panic(message in arb_message(), flips in vec((any::<usize>(), any::<u8>()), 1..8)) {
        let mut buf = BytesMut::new();
        encode(&message, MAX, &mut buf).unwrap();
        let mut body = buf.split_off(LENGTH_PREFIX_BYTES).to_vec();
        for (at, xor) in flips {
            if !body.is_empty() {
                let i = at % body.len();
                body[i] ^= xor;
            }
        }
        let _ = decode_body(Bytes::from(body));
    }
}

#[test]
fn block_payload_is_zero_copy_on_decode_and_parts() {
    let data = Bytes::from(vec![7u8; BLOCK_BYTES as usize]);
    let message = Message::Exchange(ExchangeMessage::Block {
        file: FileId([1; 32]),
        piece: PieceIndex(3),
        offset: BLOCK_BYTES,
        data: data.clone(),
    });
    let parts = encode_parts(&message, MAX).unwrap();
    assert_eq!(parts.payload.as_ptr(), data.as_ptr(), "encode_parts must not copy the block");
    assert!(parts.head.len() < 64, "header is small: {}", parts.head.len());

    let mut buf = BytesMut::new();
    encode(&message, MAX, &mut buf).unwrap();
    let frame_start = buf.as_ptr() as usize;
    let frame_end = frame_start + buf.len();
    let Some(Message::Exchange(ExchangeMessage::Block { data: decoded, .. })) = decode_frame(&mut buf, MAX).unwrap()
    else {
        panic!("not a block");
    };
    let at = decoded.as_ptr() as usize;
    assert!((frame_start..frame_end).contains(&at), "decoded block must borrow the frame buffer");
    assert_eq!(decoded, data);
}

#[test]
fn oversized_frames_are_rejected_before_buffering() {
    let mut buf = BytesMut::new();
    buf.put_u32(MAX + 1);
    buf.put_u8(WIRE_VERSION);
    assert!(matches!(
        decode_frame(&mut buf, MAX),
        Err(DecodeError::FrameTooLarge { len, max: MAX }) if len == u64::from(MAX) + 1
    ));

    let big = Message::Exchange(ExchangeMessage::Bitfield { file: FileId([0; 32]), bits: vec![0; MAX as usize] });
    assert!(matches!(encode_parts(&big, MAX), Err(EncodeError::FrameTooLarge { .. })));
    assert!(matches!(encoded_len(&big, MAX), Err(EncodeError::FrameTooLarge { .. })));
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let mut full = BytesMut::new();
    encode(&Message::Keepalive, MAX, &mut full).unwrap();
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert!(decode_frame(&mut buf, MAX).unwrap().is_none(), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed from a partial frame");
    }
}

#[test]
fn version_and_framing_errors_are_distinct() {
    assert!(matches!(decode_body(Bytes::new()), Err(DecodeError::EmptyFrame)));
    assert!(matches!(
        decode_body(Bytes::from_static(&[WIRE_VERSION + 1, 2])),
        Err(DecodeError::UnsupportedVersion { got }) if got == WIRE_VERSION + 1
    ));
    let mut buf = BytesMut::new();
    encode(&Message::Keepalive, MAX, &mut buf).unwrap();
    let mut body = buf.split_off(LENGTH_PREFIX_BYTES).to_vec();
    body.push(0);
    assert!(matches!(decode_body(Bytes::from(body)), Err(DecodeError::TrailingBytes { count: 1 })));
    assert!(matches!(decode_body(Bytes::from_static(&[WIRE_VERSION, 250])), Err(DecodeError::Malformed(_))));
}

#[test]
fn manifest_records_fit_the_default_frame() {
    // The largest inline manifest (1024 hashes, 255-byte name) inside a
    // Store request must fit `frame_bytes_max`, or records could not travel.
    let layout = Layout::new(1024 * u64::from(PIECE_BYTES_MIN), PIECE_BYTES_MIN).unwrap();
    let content = Content::from_piece_hashes(layout, vec![PieceHash([9; 32]); 1024]);
    let manifest = FileManifest::new(&"n".repeat(255), &content).unwrap();
    assert!(manifest.piece_hashes.is_some());
    let message = Message::Request {
        id: RequestId(u64::MAX),
        body: Request::Store { key: [0; 32], record: Record::Manifest(manifest), ttl_s: u32::MAX },
    };
    let frame = encode_parts(&message, Config::default().frame_bytes_max).unwrap();
    assert!(frame.len() < 40 * 1024, "{} bytes", frame.len());
}
