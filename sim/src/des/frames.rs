//! Frames in flight, between the writer and the receiving node: a slab,
//! so an event refers to its frame by a small index and a frame is written
//! once and read once, never allocated or copied on its way.

use shoal_node::core::wire::Message;

/// A frame's place in [`Frames`]; each is held by exactly one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FrameId(u32);

/// The frames in flight.
#[derive(Default)]
pub(crate) struct Frames {
    slots: Vec<Option<Message>>,
    /// Free slots, the latest freed last (reused first, while warm).
    free: Vec<u32>,
}

impl Frames {
    pub(crate) fn hold(&mut self, message: Message) -> FrameId {
        match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(message);
                FrameId(slot)
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 frames in flight");
                self.slots.push(Some(message));
                FrameId(slot)
            }
        }
    }

    /// The frame, which leaves the slab.
    pub(crate) fn take(&mut self, id: FrameId) -> Message {
        let message = self.slots[id.0 as usize].take().expect("a frame is taken once");
        self.free.push(id.0);
        message
    }

    /// Drop a frame that will not be delivered.
    pub(crate) fn drop_frame(&mut self, id: FrameId) {
        drop(self.take(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_slot_is_reused() {
        let mut frames = Frames::default();
        let a = frames.hold(Message::Keepalive);
        let b = frames.hold(Message::Keepalive);
        frames.drop_frame(a);
        let c = frames.hold(Message::Keepalive);
        assert_eq!(c, a);
        assert!(matches!(frames.take(b), Message::Keepalive));
    }
}
