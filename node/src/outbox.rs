//! A connection's send queue: frames the loop handed to the connection's
//! writer and the writer has not taken yet.
//!
//! Two lanes. Handshake, control (goodbye), DHT and gossip frames wait in
//! the control lane; exchange frames (blocks, and the requests, haves and
//! chokes whose order relative to the blocks matters) wait in the data
//! lane. The writer takes from the control lane first, so a DHT answer
//! waits behind at most the frame being written, not behind every block
//! queued on a slow uplink (in a flash crowd on 1 MB/s uplinks that queue
//! held over a second of blocks and lookups timed out behind it). Within a
//! lane the order is kept. Both lanes together hold at most `frames_max`
//! frames: a peer whose queue is full is too slow and is disconnected.
//!
//! The lanes are shared by the loop ([`OutboxSender`]) and the writer task
//! ([`OutboxReceiver`]) under a mutex held only to push or pop; a peer's
//! `Cancel` takes back a block still queued (BEP 3).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use shoal_core::ids::{FileId, PieceIndex};
use shoal_core::wire::{ExchangeMessage, Message};
use tokio::sync::Notify;

use crate::driver::FrameKind;

/// Which lane of a writer's queue a frame waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Handshake, control, DHT and gossip: written first.
    Control,
    /// Exchange frames, blocks among them: written when the control lane
    /// is empty.
    Data,
}

impl Lane {
    /// The lane of a message. Every exchange frame shares the blocks' lane:
    /// a `Choke` that overtook the blocks queued before it would make them
    /// arrive unrequested (wasted), and a `Have` could overtake nothing
    /// that matters, so the exchange's order is kept whole.
    #[must_use]
    pub fn of(message: &Message) -> Self {
        match FrameKind::of(message) {
            FrameKind::Block | FrameKind::Exchange => Self::Data,
            FrameKind::Handshake | FrameKind::Control | FrameKind::Dht | FrameKind::Gossip => Self::Control,
        }
    }
}

/// The queue was full: the frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

/// What [`OutboxReceiver::try_recv`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum TryRecv {
    /// The next frame to write.
    Frame(Message),
    /// Nothing queued; the loop may queue more.
    Empty,
    /// Nothing queued and the loop dropped its sender: the writer ends.
    Closed,
}

#[derive(Debug)]
struct Lanes {
    control: VecDeque<Message>,
    data: VecDeque<Message>,
    frames_max: usize,
    /// The loop dropped its sender.
    sender_gone: bool,
    /// The writer dropped its receiver: frames queued now go nowhere.
    receiver_gone: bool,
}

impl Lanes {
    fn len(&self) -> usize {
        self.control.len() + self.data.len()
    }
}

#[derive(Debug)]
struct Shared {
    lanes: Mutex<Lanes>,
    /// Wakes the writer after a push or when the sender goes.
    wake: Notify,
}

impl Shared {
    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        // The lanes are plain queues, valid whatever a panicking holder
        // did; the writer or the loop carries on.
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection's send queue holding at most `frames_max` frames: the
/// loop's end and the writer's.
#[must_use]
pub fn outbox(frames_max: usize) -> (OutboxSender, OutboxReceiver) {
    let shared = Arc::new(Shared {
        lanes: Mutex::new(Lanes {
            control: VecDeque::new(),
            data: VecDeque::new(),
            frames_max,
            sender_gone: false,
            receiver_gone: false,
        }),
        wake: Notify::new(),
    });
    (OutboxSender { shared: shared.clone() }, OutboxReceiver { shared })
}

/// The loop's end of a connection's send queue. Dropping it lets the
/// writer write what is queued and end.
#[derive(Debug)]
pub struct OutboxSender {
    shared: Arc<Shared>,
}

impl OutboxSender {
    /// Queue a frame in its lane, unless the queue is full. A frame for a
    /// writer that has ended is dropped.
    pub fn try_send(&self, message: Message) -> Result<(), Full> {
        {
            let mut lanes = self.shared.lanes();
            if lanes.receiver_gone {
                return Ok(());
            }
            if lanes.len() >= lanes.frames_max {
                return Err(Full);
            }
            match Lane::of(&message) {
                Lane::Control => lanes.control.push_back(message),
                Lane::Data => lanes.data.push_back(message),
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    /// The peer cancelled a block: take it back if it is still queued.
    /// Returns whether it was.
    pub fn cancel(&self, file: FileId, piece: PieceIndex, offset: u32) -> bool {
        let mut lanes = self.shared.lanes();
        let queued = lanes.data.iter().position(|message| {
            matches!(message, Message::Exchange(ExchangeMessage::Block { file: f, piece: p, offset: o, .. })
                if (*f, *p, *o) == (file, piece, offset))
        });
        queued.and_then(|index| lanes.data.remove(index)).is_some()
    }

    /// Frames queued in both lanes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shared.lanes().len()
    }

    /// Whether nothing is queued.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for OutboxSender {
    fn drop(&mut self) {
        self.shared.lanes().sender_gone = true;
        self.shared.wake.notify_one();
    }
}

/// The writer's end of a connection's send queue.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

impl OutboxReceiver {
    /// The next frame: the control lane's first, else the data lane's.
    pub fn try_recv(&self) -> TryRecv {
        let mut lanes = self.shared.lanes();
        if let Some(message) = lanes.control.pop_front().or_else(|| lanes.data.pop_front()) {
            TryRecv::Frame(message)
        } else if lanes.sender_gone {
            TryRecv::Closed
        } else {
            TryRecv::Empty
        }
    }

    /// The next frame, waiting for one; `None` once the sender is gone
    /// and everything queued was taken.
    pub async fn recv(&self) -> Option<Message> {
        loop {
            match self.try_recv() {
                TryRecv::Frame(message) => return Some(message),
                TryRecv::Closed => return None,
                // A push between the check and the wait left a permit:
                // `notified` returns at once and the check runs again.
                TryRecv::Empty => self.shared.wake.notified().await,
            }
        }
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut lanes = self.shared.lanes();
        lanes.receiver_gone = true;
        lanes.control.clear();
        lanes.data.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use shoal_core::wire::{GoodbyeReason, Request, RequestId};

    fn block(offset: u32) -> Message {
        Message::Exchange(ExchangeMessage::Block {
            file: FileId([1; 32]),
            piece: PieceIndex(0),
            offset,
            data: Bytes::from_static(&[7; 4]),
        })
    }

    fn ping(id: u64) -> Message {
        Message::Request { id: RequestId(id), body: Request::Ping }
    }

    fn frames(receiver: &OutboxReceiver) -> Vec<Message> {
        std::iter::from_fn(|| match receiver.try_recv() {
            TryRecv::Frame(message) => Some(message),
            _ => None,
        })
        .collect()
    }

    #[test]
    fn control_frames_go_before_queued_blocks_and_each_lane_keeps_its_order() {
        let (sender, receiver) = outbox(16);
        let have = Message::Exchange(ExchangeMessage::Have { file: FileId([1; 32]), pieces: vec![PieceIndex(3)] });
        for message in [block(0), ping(1), have.clone(), block(16384), ping(2)] {
            sender.try_send(message).unwrap();
        }
        assert_eq!(frames(&receiver), [ping(1), ping(2), block(0), have, block(16384)]);
        assert_eq!(receiver.try_recv(), TryRecv::Empty);
    }

    #[test]
    fn both_lanes_share_one_bound() {
        let (sender, receiver) = outbox(3);
        sender.try_send(block(0)).unwrap();
        sender.try_send(ping(1)).unwrap();
        sender.try_send(block(16384)).unwrap();
        assert_eq!(sender.try_send(ping(2)), Err(Full));
        assert_eq!(sender.try_send(block(32768)), Err(Full));
        assert_eq!(sender.len(), 3);
        assert_eq!(receiver.try_recv(), TryRecv::Frame(ping(1)));
        sender.try_send(ping(2)).unwrap();
    }

    #[test]
    fn a_cancel_takes_back_only_a_queued_block() {
        let (sender, receiver) = outbox(16);
        sender.try_send(block(0)).unwrap();
        sender.try_send(block(16384)).unwrap();
        assert!(sender.cancel(FileId([1; 32]), PieceIndex(0), 16384));
        assert_eq!(receiver.try_recv(), TryRecv::Frame(block(0)));
        assert!(!sender.cancel(FileId([1; 32]), PieceIndex(0), 0), "already taken: nothing to take back");
        assert_eq!(receiver.try_recv(), TryRecv::Empty);
    }

    #[test]
    fn the_writer_takes_what_is_queued_then_sees_the_sender_gone() {
        let (sender, receiver) = outbox(16);
        sender.try_send(block(0)).unwrap();
        sender.try_send(Message::Goodbye { reason: GoodbyeReason::Shutdown }).unwrap();
        drop(sender);
        assert_eq!(frames(&receiver), [Message::Goodbye { reason: GoodbyeReason::Shutdown }, block(0)]);
        assert_eq!(receiver.try_recv(), TryRecv::Closed);
    }

    #[test]
    fn frames_for_a_writer_that_ended_are_dropped() {
        let (sender, receiver) = outbox(1);
        drop(receiver);
        for offset in [0, 16384] {
            assert_eq!(sender.try_send(block(offset)), Ok(()));
        }
        assert!(sender.is_empty());
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_for_a_frame_and_for_the_end() {
        let (sender, receiver) = outbox(4);
        let writer = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(message) = receiver.recv().await {
                got.push(message);
            }
            got
        });
        tokio::task::yield_now().await;
        sender.try_send(ping(1)).unwrap();
        tokio::task::yield_now().await;
        sender.try_send(block(0)).unwrap();
        drop(sender);
        assert_eq!(writer.await.unwrap(), [ping(1), block(0)]);
    }
}
