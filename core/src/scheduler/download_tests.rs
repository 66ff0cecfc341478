use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use super::*;
use crate::content::{BLOCK_BYTES, Layout};
use crate::ids::PieceIndex;
use crate::time::Instant;

const A: PeerSlot = PeerSlot(0);
const B: PeerSlot = PeerSlot(1);

fn t(ms: u64) -> Instant {
    Instant::from_micros(ms * 1000)
}

/// 8 pieces of 4 blocks (64 KiB each).
fn download(config: DownloadConfig) -> Download {
    let layout = Layout::new(8 * 64 * 1024, 64 * 1024).unwrap();
    Download::new(layout, 4, config, [], &mut ChaCha8Rng::seed_from_u64(1))
}

fn seed(d: &mut Download, slot: PeerSlot) {
    d.add_peer(slot).unwrap();
    d.peer_has_all(slot).unwrap();
    d.set_choked(slot, false);
}

fn receive_all(d: &mut Download, slot: PeerSlot, blocks: &[BlockRef], now: Instant) -> Vec<PieceIndex> {
    let mut complete = Vec::new();
    for &block in blocks {
        if d.on_block(slot, block, now).unwrap().piece_complete {
            complete.push(block.piece);
        }
    }
    complete
}

#[test]
fn a_choked_peer_gets_no_requests() {
    let mut d = download(DownloadConfig::default());
    d.add_peer(A).unwrap();
    d.peer_has_all(A).unwrap();
    assert!(d.next_requests(A, t(0)).is_empty());
}

#[test]
fn a_peer_finishes_the_pieces_it_started() {
    let mut d = download(DownloadConfig::default());
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    assert_eq!(requests.len(), 8, "initial depth");
    // Whole pieces, block by block: 2 pieces of 4 blocks.
    assert_eq!(requests[0].piece, requests[3].piece);
    assert_eq!((0..4).map(|i| requests[i].block).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(requests[4].piece, requests[7].piece);
    assert_ne!(requests[0].piece, requests[4].piece);
    let complete = receive_all(&mut d, A, &requests, t(10));
    assert_eq!(complete, vec![requests[0].piece, requests[4].piece]);
    d.piece_passed(requests[0].piece);
    d.piece_passed(requests[4].piece);
    assert_eq!(d.picker().missing(), 6);
    assert_eq!(d.unverified_bytes(), 0);
}

#[test]
fn blocks_nobody_asked_for_are_rejected_and_late_ones_are_taken() {
    let mut d = download(DownloadConfig::default());
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    // Initial depth 8 covers two whole pieces of 4 blocks; take a block of
    // a third piece, which was certainly not requested.
    let untouched = (0..8).map(PieceIndex).find(|p| requests.iter().all(|r| r.piece != *p)).unwrap();
    let never = BlockRef { piece: untouched, block: 3 };
    assert_eq!(d.on_block(A, never, t(1)), Err(BlockError::Unsolicited));
    assert_eq!(d.on_block(B, requests[0], t(1)), Err(BlockError::Unsolicited), "unknown peer");
    // A choke drops the requests; a block crossing it on the wire is taken
    // while still missing, once.
    d.set_choked(A, true);
    assert_eq!(d.inflight(A), 0);
    assert!(d.on_block(A, requests[0], t(2)).is_ok());
    assert_eq!(d.on_block(A, requests[0], t(3)), Err(BlockError::Unsolicited));
}

#[test]
fn depth_follows_the_measured_rate() {
    let mut d = download(DownloadConfig { requests_inflight_initial: 2, ..DownloadConfig::default() });
    seed(&mut d, A);
    let mut now = t(0);
    // Deliver 2 blocks every 100 ms: 20 blocks/s = 320 KiB/s.
    for _ in 0..30 {
        let requests = d.next_requests(A, now);
        now += Duration::from_millis(100);
        for block in requests.into_iter().take(2) {
            if d.on_block(A, block, now).unwrap().piece_complete {
                d.piece_passed(block.piece);
            }
        }
        if d.is_complete() {
            break;
        }
    }
    let rate = d.rate(A).expect("rate measured");
    assert!((250_000..400_000).contains(&rate), "rate {rate}");
    // rate × queue time / 16 KiB: ≈ 10 blocks at the default 0.5 s.
    let queue_ms = DownloadConfig::default().request_queue_time.as_millis() as u64;
    let expected = rate * queue_ms / 1000 / u64::from(BLOCK_BYTES);
    let depth = u64::from(d.depth(A));
    assert!(depth.abs_diff(expected) <= 1, "depth {depth}, expected {expected} for {rate} B/s");
}

#[test]
fn timeouts_free_blocks_for_others_and_snub_the_peer() {
    let mut d = download(DownloadConfig::default());
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    let deadline = d.poll_timeout().expect("requests have deadlines");
    assert!(deadline >= t(5000));
    assert!(d.handle_timeout(deadline - Duration::from_millis(1)).is_empty(), "early call is harmless");
    let expired = d.handle_timeout(deadline);
    assert_eq!(expired.len(), requests.len());
    assert_eq!(d.depth(A), 1, "snubbed");
    seed(&mut d, B);
    let taken = d.next_requests(B, deadline);
    assert!(taken.contains(&requests[0]), "B takes over the orphaned blocks: {taken:?}");
    // A's late block is no violation: still missing, it is taken, and B's
    // request for it is cancelled; B's copy is then waste.
    let accepted = d.on_block(A, requests[0], deadline).unwrap();
    assert_eq!(accepted.cancels, vec![(B, requests[0])]);
    assert_eq!(d.on_block(B, requests[0], deadline), Err(BlockError::Duplicate));
}

#[test]
fn endgame_duplicates_the_last_blocks_and_cancels_the_losers() {
    let mut d = download(DownloadConfig { requests_inflight_initial: 64, ..DownloadConfig::default() });
    seed(&mut d, A);
    let all = d.next_requests(A, t(0));
    assert_eq!(all.len(), 32, "every block requested from A");
    seed(&mut d, B);
    let dups = d.next_requests(B, t(1));
    // One busy block at a time, and only from a peer with nothing else in
    // flight: a whole pipeline of duplicates is mostly waste.
    assert_eq!(dups.len(), 1, "endgame duplicates one block from B: {dups:?}");
    assert!(all.contains(&dups[0]));
    assert!(d.next_requests(B, t(1)).is_empty(), "no second duplicate while one is in flight");
    let accepted = d.on_block(B, dups[0], t(2)).unwrap();
    assert_eq!(accepted.cancels, vec![(A, dups[0])]);
    assert_eq!(d.on_block(A, dups[0], t(3)), Err(BlockError::Duplicate), "the loser's copy is waste");
    assert_eq!(d.next_requests(B, t(3)).len(), 1, "B's pipeline empty again: the next duplicate");
}

#[test]
fn a_failed_piece_is_fetched_from_someone_else() {
    let mut d = download(DownloadConfig::default());
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    let piece = requests[0].piece;
    receive_all(&mut d, A, &requests[..4], t(1));
    assert_eq!(d.piece_failed(piece), vec![A]);
    // A is excluded from that piece; B gets it.
    let again = d.next_requests(A, t(2));
    assert!(again.iter().all(|b| b.piece != piece), "A must not refetch {piece:?}");
    seed(&mut d, B);
    let from_b = d.next_requests(B, t(3));
    assert!(from_b.iter().any(|b| b.piece == piece), "B refetches {piece:?}: {from_b:?}");
}

#[test]
fn unverified_bytes_are_bounded() {
    let mut d = download(DownloadConfig {
        unverified_bytes_max: 2 * 64 * 1024,
        requests_inflight_initial: 64,
        ..DownloadConfig::default()
    });
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    assert_eq!(requests.len(), 8, "two pieces of budget, no more");
    assert_eq!(d.unverified_bytes(), 2 * 64 * 1024);
}

#[test]
fn streaming_fetches_the_window_in_order() {
    let mut d = download(DownloadConfig { streaming_window_pieces: 3, ..DownloadConfig::default() });
    d.set_streaming(Some(PieceIndex(2)));
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    let pieces: Vec<u32> = requests.iter().map(|b| b.piece.0).collect();
    assert_eq!(pieces, vec![2, 2, 2, 2, 3, 3, 3, 3]);
}

#[test]
fn a_departed_owner_leaves_its_piece_to_others() {
    let mut d = download(DownloadConfig { requests_inflight_initial: 2, ..DownloadConfig::default() });
    seed(&mut d, A);
    let requests = d.next_requests(A, t(0));
    let piece = requests[0].piece;
    receive_all(&mut d, A, &requests[..1], t(1));
    d.remove_peer(A).unwrap();
    seed(&mut d, B);
    // Partial pieces are finished before new ones are started.
    let first = d.next_requests(B, t(2));
    assert_eq!(first[0].piece, piece, "B finishes A's orphan first: {first:?}");
    for round in 0..100 {
        let requests = if round == 0 { first.clone() } else { d.next_requests(B, t(3)) };
        for piece in receive_all(&mut d, B, &requests, t(3)) {
            d.piece_passed(piece);
        }
        if d.is_complete() {
            break;
        }
    }
    assert!(d.is_complete());
}

#[test]
fn priority_pauses_and_scales_the_depth() {
    let mut d = download(DownloadConfig::default());
    seed(&mut d, A);
    d.set_priority(0);
    assert!(d.next_requests(A, t(0)).is_empty(), "paused");
    d.set_priority(7);
    assert_eq!(d.next_requests(A, t(0)).len(), 8 * 7 / 4, "high priority asks for more");
    d.set_priority(1);
    assert_eq!(d.depth(A), 2);
}

/// A piece owned by a peer far slower than average loses its free blocks
/// to a fast peer, once both rates are measured.
#[test]
fn a_slow_owner_loses_its_piece_to_a_fast_peer() {
    // 4 pieces of 16 blocks: a slow owner with depth 2 leaves 14 free.
    let layout = Layout::new(4 * 256 * 1024, 256 * 1024).unwrap();
    let config = DownloadConfig { requests_inflight_initial: 2, ..DownloadConfig::default() };
    let mut d = Download::new(layout, 4, config, [], &mut ChaCha8Rng::seed_from_u64(2));
    seed(&mut d, B);
    let mut b_queue = d.next_requests(B, t(0));
    let slow_piece = b_queue[0].piece;
    seed(&mut d, A);
    let mut a_queue = d.next_requests(A, t(0));
    let mut taken_at = None;
    for tick in 1..=100u64 {
        let now = t(tick * 100);
        // A answers two blocks every 100 ms, B one block every 1.5 s.
        let answered: Vec<BlockRef> = a_queue.drain(..2.min(a_queue.len())).collect();
        for block in answered {
            if d.on_block(A, block, now).is_ok_and(|a| a.piece_complete) {
                d.piece_passed(block.piece);
            }
        }
        if tick % 15 == 0 {
            b_queue.extend(d.next_requests(B, now));
            if let Some(block) = b_queue.first().copied() {
                b_queue.remove(0);
                // In endgame A may have delivered B's block first.
                if d.on_block(B, block, now).is_ok_and(|a| a.piece_complete) {
                    d.piece_passed(block.piece);
                }
            }
        }
        let requests = d.next_requests(A, now);
        if taken_at.is_none() && requests.iter().any(|b| b.piece == slow_piece) {
            taken_at = Some(now);
            assert!(d.rate(B).is_some(), "taken over only once B's rate is known");
        }
        a_queue.extend(requests);
        if d.is_complete() {
            break;
        }
    }
    let taken_at = taken_at.expect("A took over the slow owner's piece");
    assert!(taken_at < t(10_000), "takeover at {taken_at:?}");
}

/// A peer that chokes us gives up its pieces: another peer finishes them
/// at once instead of waiting for the next unchoke.
#[test]
fn a_choking_owner_gives_up_its_pieces() {
    let mut d = download(DownloadConfig { requests_inflight_initial: 4, ..DownloadConfig::default() });
    seed(&mut d, A);
    let from_a = d.next_requests(A, t(0));
    assert!(!from_a.is_empty());
    let piece = from_a[0].piece;
    d.set_choked(A, true);
    seed(&mut d, B);
    let from_b = d.next_requests(B, t(1));
    assert!(from_b.iter().any(|b| b.piece == piece), "B takes over {piece:?} from choking A: {from_b:?}");
}

/// Requests carry no id: a block asked for, dropped by a choke, and asked
/// for again after the unchoke may come twice (the peer served the first
/// request before it saw its own choke). The second copy is waste, not a
/// protocol violation; after a reject that answered the older request
/// while the newer one is served, the block is still taken.
#[test]
fn a_block_asked_twice_across_a_choke_may_come_twice() {
    let mut d = download(DownloadConfig::default());
    seed(&mut d, A);
    let first = d.next_requests(A, t(0));
    let block = first[0];
    d.set_choked(A, true);
    d.set_choked(A, false);
    let again = d.next_requests(A, t(10));
    assert!(again.contains(&block), "the dropped block is asked for again");
    assert!(d.on_block(A, block, t(20)).is_ok(), "the first copy answers the request");
    assert_eq!(d.on_block(A, block, t(21)).unwrap_err(), BlockError::Duplicate, "the second is waste");
    // A reject for the old request while the new one is in flight.
    let other = again.iter().copied().find(|b| *b != block).unwrap();
    d.set_choked(A, true);
    d.set_choked(A, false);
    let third = d.next_requests(A, t(30));
    assert!(third.contains(&other));
    assert!(d.on_reject(A, other));
    assert!(d.on_block(A, other, t(40)).is_ok(), "a dropped request's block is taken while missing");
    assert_eq!(d.on_block(A, other, t(41)).unwrap_err(), BlockError::Unsolicited, "once only");
}

/// Random sequences of everything a download hears, with its counters
/// checked after each step: the fast paths of `next_requests` lean on
/// `free_blocks`, so it must always be the sum of the started pieces'.
#[test]
fn counters_hold_through_random_histories() {
    use rand::RngExt;
    for seed in 0..64u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // 12 pieces of 2 blocks, then a short last piece of 1.
        let layout = Layout::new(12 * 32 * 1024 + 100, 32 * 1024).unwrap();
        let config = DownloadConfig { unverified_bytes_max: 16 * 1024 * 1024, ..DownloadConfig::default() };
        let mut d = Download::new(layout, 4, config, [], &mut rng);
        let mut present = [false; 4];
        let mut asked: Vec<(PeerSlot, BlockRef)> = Vec::new();
        let mut now = 0;
        for _ in 0..400 {
            now += rng.random_range(1..400u64);
            let slot = PeerSlot(rng.random_range(0..4u16));
            let here = present[usize::from(slot.0)];
            match rng.random_range(0..10u32) {
                0 if !here => {
                    d.add_peer(slot).unwrap();
                    present[usize::from(slot.0)] = true;
                }
                0 | 1 if here => {
                    let piece = PieceIndex(rng.random_range(0..layout.piece_count()));
                    d.peer_have(slot, piece).unwrap();
                }
                2 if here => d.set_choked(slot, rng.random_bool(0.3)),
                3 | 4 if here => {
                    for block in d.next_requests(slot, t(now)) {
                        asked.push((slot, block));
                    }
                }
                5 | 6 if !asked.is_empty() => {
                    let (from, block) = asked.swap_remove(rng.random_range(0..asked.len()));
                    if let Ok(accepted) = d.on_block(from, block, t(now))
                        && accepted.piece_complete
                    {
                        if rng.random_bool(0.8) {
                            d.piece_passed(block.piece);
                        } else {
                            d.piece_failed(block.piece);
                        }
                    }
                }
                7 if !asked.is_empty() => {
                    let (from, block) = asked[rng.random_range(0..asked.len())];
                    d.on_reject(from, block);
                }
                8 => {
                    d.handle_timeout(t(now));
                }
                9 if here && rng.random_bool(0.2) => {
                    d.remove_peer(slot).unwrap();
                    present[usize::from(slot.0)] = false;
                    asked.retain(|(from, _)| *from != slot);
                }
                _ => {}
            }
            d.assert_invariants();
        }
    }
}
