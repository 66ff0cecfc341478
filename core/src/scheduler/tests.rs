use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use super::reference::NaivePicker;
use super::*;
use crate::ids::PieceIndex;

const PEERS: u16 = 8;

fn picker(pieces: u32, seed: u64) -> PiecePicker {
    PiecePicker::new(pieces, PEERS, &mut ChaCha8Rng::seed_from_u64(seed))
}

fn packed(pieces: u32, has: impl Fn(u32) -> bool) -> Vec<u8> {
    let mut out = vec![0u8; pieces.div_ceil(8) as usize];
    for p in 0..pieces {
        if has(p) {
            out[(p / 8) as usize] |= 0x80 >> (p % 8);
        }
    }
    out
}

#[test]
fn picks_the_rarest_piece_the_peer_has() {
    let mut p = picker(10, 1);
    for slot in 0..3 {
        p.add_peer(PeerSlot(slot)).unwrap();
    }
    // Piece 7 is held by one peer, pieces 0..5 by two, 5..10 by three.
    for piece in 0..10 {
        p.peer_have(PeerSlot(0), PieceIndex(piece)).unwrap();
    }
    for piece in 0..10 {
        if piece != 7 {
            p.peer_have(PeerSlot(1), PieceIndex(piece)).unwrap();
        }
    }
    for piece in 5..10 {
        if piece != 7 {
            p.peer_have(PeerSlot(2), PieceIndex(piece)).unwrap();
        }
    }
    assert_eq!(p.pick(PeerSlot(0)), Some(PieceIndex(7)));
    let second = p.pick(PeerSlot(1)).unwrap();
    assert!(second.0 < 5, "rarest for peer 1 is one of 0..5, got {second:?}");
    assert!(p.pick(PeerSlot(2)).is_some_and(|x| (5..10).contains(&x.0) && x.0 != 7));
    p.start(PieceIndex(7));
    assert_ne!(p.pick(PeerSlot(0)), Some(PieceIndex(7)), "a started piece is not picked again");
    p.abandon(PieceIndex(7));
    assert_eq!(p.pick(PeerSlot(0)), Some(PieceIndex(7)), "an abandoned piece is a candidate again");
    p.complete(PieceIndex(7)).unwrap();
    assert_eq!(p.missing(), 9);
}

#[test]
fn sequential_and_random_policies_ignore_availability() {
    let with = |policy, seed| PiecePicker::with_policy(64, PEERS, policy, &mut ChaCha8Rng::seed_from_u64(seed));
    // Peer 0 holds every even piece; peer 1 makes pieces 0..32 common, so
    // rarest-first would take an even piece >= 32.
    let setup = |p: &mut PiecePicker| {
        p.add_peer(PeerSlot(0)).unwrap();
        p.add_peer(PeerSlot(1)).unwrap();
        p.peer_bitfield(PeerSlot(0), &packed(64, |i| i % 2 == 0)).unwrap();
        p.peer_bitfield(PeerSlot(1), &packed(64, |i| i < 32)).unwrap();
    };
    let mut rarest = with(PickPolicy::RarestFirst, 1);
    setup(&mut rarest);
    assert!(rarest.pick(PeerSlot(0)).is_some_and(|x| x.0 >= 32 && x.0 % 2 == 0));

    let mut sequential = with(PickPolicy::Sequential, 1);
    setup(&mut sequential);
    assert_eq!(sequential.pick(PeerSlot(0)), Some(PieceIndex(0)));
    sequential.start(PieceIndex(0));
    assert_eq!(sequential.pick(PeerSlot(0)), Some(PieceIndex(2)), "the next free piece it has");
    sequential.add_peer(PeerSlot(2)).unwrap();
    sequential.peer_has_all(PeerSlot(2)).unwrap();
    assert_eq!(sequential.pick(PeerSlot(2)), Some(PieceIndex(1)), "a seed offers the lowest free index");

    // Random: always a free piece the peer has, and the choice follows the
    // seed (over 16 seeds, more than one distinct first pick, some < 32).
    let mut firsts = std::collections::BTreeSet::new();
    for seed in 0..16 {
        let mut random = with(PickPolicy::Random, seed);
        setup(&mut random);
        let first = random.pick(PeerSlot(0)).unwrap();
        assert_eq!(first.0 % 2, 0, "a piece peer 0 has");
        random.start(first);
        assert_ne!(random.pick(PeerSlot(0)), Some(first), "a started piece is not picked again");
        firsts.insert(first.0);
    }
    assert!(firsts.len() > 4, "random picks spread: {firsts:?}");
    assert!(firsts.iter().any(|&p| p < 32), "common pieces are picked too: {firsts:?}");
}

#[test]
fn seeds_cost_nothing_per_piece_and_do_not_change_rarity() {
    let mut p = picker(100_000, 2);
    p.add_peer(PeerSlot(0)).unwrap();
    p.peer_bitfield(PeerSlot(0), &packed(100_000, |_| true)).unwrap();
    assert!(p.is_seed(PeerSlot(0)));
    assert_eq!(p.seeds(), 1);
    assert_eq!(p.availability(PieceIndex(99_999)), 1);
    p.add_peer(PeerSlot(1)).unwrap();
    p.peer_have(PeerSlot(1), PieceIndex(42)).unwrap();
    assert_eq!(p.availability(PieceIndex(42)), 2);
    // The seed's rarest is any piece but 42 (availability 1 vs 2).
    assert_ne!(p.pick(PeerSlot(0)), Some(PieceIndex(42)));
    assert_eq!(p.pick(PeerSlot(1)), Some(PieceIndex(42)));
    assert!(!p.peer_have(PeerSlot(0), PieceIndex(3)).unwrap(), "a seed's HAVE changes nothing");
    p.remove_peer(PeerSlot(0)).unwrap();
    assert_eq!(p.seeds(), 0);
    assert_eq!(p.pick(PeerSlot(0)), None);
}

#[test]
fn different_seeds_break_ties_differently() {
    let picks: std::collections::BTreeSet<_> = (0..20)
        .map(|seed| {
            let mut p = picker(1000, seed);
            p.add_peer(PeerSlot(0)).unwrap();
            p.peer_has_all(PeerSlot(0)).unwrap();
            p.pick(PeerSlot(0)).unwrap()
        })
        .collect();
    assert!(picks.len() > 15, "ties broken by the seeded RNG, got {} distinct picks", picks.len());
    // Same seed, same choice.
    let again = |seed| {
        let mut p = picker(1000, seed);
        p.add_peer(PeerSlot(0)).unwrap();
        p.peer_has_all(PeerSlot(0)).unwrap();
        p.pick(PeerSlot(0))
    };
    assert_eq!(again(7), again(7));
}

#[test]
fn bad_peer_input_is_an_error_not_a_panic() {
    let mut p = picker(10, 3);
    assert_eq!(p.peer_have(PeerSlot(0), PieceIndex(0)), Err(PickerError::UnknownPeer(0)));
    assert_eq!(p.add_peer(PeerSlot(PEERS)), Err(PickerError::SlotOutOfRange(PEERS)));
    p.add_peer(PeerSlot(0)).unwrap();
    assert_eq!(p.add_peer(PeerSlot(0)), Err(PickerError::SlotInUse(0)));
    assert_eq!(p.peer_have(PeerSlot(0), PieceIndex(10)), Err(PickerError::NoSuchPiece(10)));
    assert_eq!(p.peer_bitfield(PeerSlot(0), &[0xff]), Err(PickerError::BadBitfield { pieces: 10 }));
    // 10 pieces: the low 6 bits of the second byte are spare and must be 0.
    assert_eq!(p.peer_bitfield(PeerSlot(0), &[0xff, 0x01]), Err(PickerError::BadBitfield { pieces: 10 }));
    p.peer_bitfield(PeerSlot(0), &[0x80, 0x40]).unwrap();
    assert!(p.peer_has(PeerSlot(0), PieceIndex(0)) && p.peer_has(PeerSlot(0), PieceIndex(9)));
    assert_eq!(p.peer_bitfield(PeerSlot(0), &[0x80, 0x40]), Err(PickerError::LateBitfield));
    assert!(p.is_interesting(PeerSlot(0)));
    p.complete(PieceIndex(0)).unwrap();
    p.complete(PieceIndex(9)).unwrap();
    assert!(!p.is_interesting(PeerSlot(0)));
}

#[derive(Clone, Debug)]
enum Op {
    AddPeer(u16),
    Bitfield(u16, Vec<bool>),
    HaveAll(u16),
    Have(u16, u32),
    Remove(u16),
    Start(u32),
    Abandon(u32),
    Complete(u32),
}

fn op(pieces: u32) -> impl Strategy<Value = Op> {
    let slot = 0..PEERS;
    let piece = 0..pieces;
    prop_oneof![
        1 => slot.clone().prop_map(Op::AddPeer),
        1 => (slot.clone(), proptest::collection::vec(any::<bool>(), pieces as usize))
            .prop_map(|(s, bits)| Op::Bitfield(s, bits)),
        1 => slot.clone().prop_map(Op::HaveAll),
        4 => (slot.clone(), piece.clone()).prop_map(|(s, p)| Op::Have(s, p)),
        1 => slot.prop_map(Op::Remove),
        1 => piece.clone().prop_map(Op::Start),
        1 => piece.clone().prop_map(Op::Abandon),
        1 => piece.prop_map(Op::Complete),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// After any sequence of peer and piece events, every pick is one of
    /// the naive model's rarest choices, and `None` exactly when it has none.
    #[test]
    fn pick_is_always_a_valid_rarest_choice(
        pieces in 1u32..300,
        seed in any::<u64>(),
        ops in (1u32..300).prop_flat_map(|n| proptest::collection::vec(op(n), 0..120)),
    ) {
        let mut fast = picker(pieces, seed);
        let mut naive = NaivePicker::new(pieces, PEERS);
        for op in ops {
            match op {
                Op::AddPeer(s) => {
                    if fast.add_peer(PeerSlot(s)).is_ok() {
                        naive.add_peer(PeerSlot(s));
                    }
                }
                Op::Bitfield(s, bits) => {
                    let bits: Vec<bool> = bits.into_iter().take(pieces as usize).collect();
                    if bits.len() == pieces as usize
                        && fast.peer_bitfield(PeerSlot(s), &packed(pieces, |p| bits[p as usize])).is_ok()
                    {
                        for (p, &has) in bits.iter().enumerate() {
                            if has {
                                naive.peer_have(PeerSlot(s), PieceIndex(p as u32));
                            }
                        }
                    }
                }
                Op::HaveAll(s) => {
                    if fast.peer_has_all(PeerSlot(s)).is_ok() {
                        naive.peer_has_all(PeerSlot(s));
                    }
                }
                Op::Have(s, p) => {
                    if fast.peer_have(PeerSlot(s), PieceIndex(p % pieces)).is_ok() {
                        naive.peer_have(PeerSlot(s), PieceIndex(p % pieces));
                    }
                }
                Op::Remove(s) => {
                    if fast.remove_peer(PeerSlot(s)).is_ok() {
                        naive.remove_peer(PeerSlot(s));
                    }
                }
                Op::Start(p) => {
                    let p = PieceIndex(p % pieces);
                    if fast.state(p) == Some(PieceState::Free) {
                        fast.start(p);
                        naive.set_state(p, PieceState::Partial);
                    }
                }
                Op::Abandon(p) => {
                    let p = PieceIndex(p % pieces);
                    if fast.state(p) == Some(PieceState::Partial) {
                        fast.abandon(p);
                        naive.set_state(p, PieceState::Free);
                    }
                }
                Op::Complete(p) => {
                    let p = PieceIndex(p % pieces);
                    fast.complete(p).unwrap();
                    naive.set_state(p, PieceState::Have);
                }
            }
            fast.assert_invariants();
            for s in 0..PEERS {
                let slot = PeerSlot(s);
                let valid = naive.rarest_choices(slot);
                match fast.pick(slot) {
                    None => prop_assert!(valid.is_empty(), "picker found nothing, reference has {:?}", valid),
                    Some(p) => prop_assert!(valid.contains(&p), "pick {:?} not in {:?}", p, valid),
                }
            }
        }
        for p in 0..pieces {
            let p = PieceIndex(p);
            prop_assert_eq!(fast.availability(p), naive.availability(p));
            for s in 0..PEERS {
                prop_assert_eq!(fast.peer_has(PeerSlot(s), p), naive.peer_has(PeerSlot(s), p));
            }
        }
    }
}
