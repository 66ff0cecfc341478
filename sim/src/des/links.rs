//! The table of live connections: a slab, so finding a link for an event
//! is an index, not a tree search. A slot is reused once its link is gone;
//! its generation tells a late event for the old link from the new one.
//! Slots are storage only: nothing observable depends on which slot a link
//! got, and [`Links::dial_order`] gives the order links were made.

use super::conns::Link;

/// A link's handle: its slot and the slot's generation when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LinkId {
    slot: u32,
    generation: u32,
}

struct Slot {
    generation: u32,
    /// The link and its dial number (links made earlier have lower ones).
    link: Option<(u64, Link)>,
}

/// Live links by [`LinkId`].
#[derive(Default)]
pub(crate) struct Links {
    slots: Vec<Slot>,
    /// Free slots, the latest freed last (reused first, while warm).
    free: Vec<u32>,
    dials: u64,
}

impl Links {
    /// Store a new link; its dial number is the next.
    pub(crate) fn insert(&mut self, link: Link) -> LinkId {
        let dial = self.dials;
        self.dials += 1;
        match self.free.pop() {
            Some(slot) => {
                let s = &mut self.slots[slot as usize];
                // A slot reused 2^32 times could meet an event 2^32
                // generations old; events live seconds, links far longer.
                s.generation = s.generation.wrapping_add(1);
                s.link = Some((dial, link));
                LinkId { slot, generation: s.generation }
            }
            None => {
                let slot = u32::try_from(self.slots.len()).expect("fewer than 2^32 links at once");
                self.slots.push(Slot { generation: 0, link: Some((dial, link)) });
                LinkId { slot, generation: 0 }
            }
        }
    }

    pub(crate) fn get(&self, id: LinkId) -> Option<&Link> {
        let s = self.slots.get(id.slot as usize)?;
        s.link.as_ref().filter(|_| s.generation == id.generation).map(|(_, link)| link)
    }

    pub(crate) fn get_mut(&mut self, id: LinkId) -> Option<&mut Link> {
        let s = self.slots.get_mut(id.slot as usize)?;
        s.link.as_mut().filter(|_| s.generation == id.generation).map(|(_, link)| link)
    }

    /// Drop a link; later events for it find nothing.
    pub(crate) fn remove(&mut self, id: LinkId) {
        if let Some(s) = self.slots.get_mut(id.slot as usize)
            && s.generation == id.generation
            && s.link.take().is_some()
        {
            self.free.push(id.slot);
        }
    }

    /// The live links' handles in the order they were dialled.
    pub(crate) fn dial_order(&self) -> Vec<LinkId> {
        let mut live: Vec<(u64, LinkId)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| {
                let (dial, _) = s.link.as_ref()?;
                Some((*dial, LinkId { slot: slot as u32, generation: s.generation }))
            })
            .collect();
        live.sort_unstable_by_key(|&(dial, _)| dial);
        live.into_iter().map(|(_, id)| id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reused_slot_does_not_answer_for_its_old_link() {
        let mut links = Links::default();
        let a = links.insert(Link::new((0, 0), (1, 0), 0));
        let b = links.insert(Link::new((2, 0), (3, 0), 0));
        links.remove(a);
        assert!(links.get(a).is_none());
        let c = links.insert(Link::new((4, 0), (5, 0), 0));
        assert!(links.get(a).is_none(), "the old handle is stale");
        assert_eq!(links.get(c).map(|l| l.ends[0].host), Some(4));
        links.remove(a);
        assert!(links.get(c).is_some(), "removing by a stale handle leaves the new link");
        assert_eq!(links.dial_order(), vec![b, c], "dial order, not slot order");
    }
}
