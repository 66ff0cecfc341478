//! One iterative lookup's candidate set (Kademlia §2.3): the closest known
//! contacts to a target, each not yet asked, waiting, answered or failed.
//! Networking, values and timers live in the machine; this file decides
//! whom to ask next and when the lookup is over.

use std::collections::BTreeMap;

use crate::ids::{Distance, NodeId};
use crate::wire::{Contact, RecordKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Fresh,
    Waiting,
    /// Asked, no answer within the stall time: out of consideration (and
    /// of the α count) until it answers (Kademlia §2.3).
    Stalled,
    Answered,
    Failed,
}

impl State {
    /// Whether the candidate counts for termination and for whom to ask.
    fn considered(self) -> bool {
        !matches!(self, State::Failed | State::Stalled)
    }
}

#[derive(Clone, Debug)]
struct Candidate {
    contact: Contact,
    state: State,
    /// Hop count: 1 for contacts from our own table, n + 1 for contacts
    /// learned from an answer at hop n.
    depth: u32,
}

/// The state of one iterative lookup.
#[derive(Clone, Debug)]
pub(crate) struct Lookup {
    target: RecordKey,
    local: NodeId,
    k: usize,
    alpha: usize,
    candidates_max: usize,
    candidates: BTreeMap<Distance, Candidate>,
    in_flight: usize,
    /// Deepest hop a request was sent at.
    pub(crate) rounds: u32,
    /// Requests sent.
    pub(crate) messages: u32,
    /// Contacts dropped because the candidate set was full.
    pub(crate) dropped: u64,
}

impl Lookup {
    pub(crate) fn new(target: RecordKey, local: NodeId, k: usize, alpha: usize, candidates_max: usize) -> Self {
        assert!(k > 0 && alpha > 0, "k and alpha are positive");
        assert!(candidates_max >= k, "the candidate set holds at least k");
        Self {
            target,
            local,
            k,
            alpha,
            candidates_max,
            candidates: BTreeMap::new(),
            in_flight: 0,
            rounds: 0,
            messages: 0,
            dropped: 0,
        }
    }

    pub(crate) fn target(&self) -> &RecordKey {
        &self.target
    }

    /// Add contacts learned at hop `depth` (our own table is hop 0).
    pub(crate) fn add(&mut self, depth: u32, contacts: impl IntoIterator<Item = Contact>) {
        for contact in contacts {
            if contact.id == self.local {
                continue;
            }
            let distance = contact.id.distance(&self.target);
            if self.candidates.contains_key(&distance) {
                continue;
            }
            // Full: make room by dropping the farthest candidate that is
            // farther than this one and not awaiting an answer.
            if self.candidates.len() >= self.candidates_max {
                let victim = self
                    .candidates
                    .iter()
                    .rev()
                    .take_while(|(d, _)| **d > distance)
                    .find(|(_, c)| c.state != State::Waiting)
                    .map(|(d, _)| *d);
                self.dropped += 1;
                match victim {
                    Some(far) => self.candidates.remove(&far),
                    None => continue,
                };
            }
            self.candidates.insert(distance, Candidate { contact, state: State::Fresh, depth: depth + 1 });
        }
    }

    /// Record a contact that already answered (a bootstrap seed).
    pub(crate) fn add_answered(&mut self, contact: Contact) {
        if contact.id == self.local {
            return;
        }
        let distance = contact.id.distance(&self.target);
        self.candidates.insert(distance, Candidate { contact, state: State::Answered, depth: 1 });
        self.rounds = self.rounds.max(1);
    }

    /// The k closest candidates that have not failed: the set the
    /// Kademlia termination rule looks at.
    fn live_front(&self) -> impl Iterator<Item = &Candidate> {
        self.candidates.values().filter(|c| c.state.considered()).take(self.k)
    }

    /// Next contact to ask, if fewer than α requests are in flight and a
    /// fresh contact is among the k closest live candidates. Marks it
    /// waiting; returns it with its hop number.
    pub(crate) fn next(&mut self) -> Option<(Contact, u32)> {
        if self.in_flight >= self.alpha {
            return None;
        }
        let distance = self
            .candidates
            .iter()
            .filter(|(_, c)| c.state.considered())
            .take(self.k)
            .find(|(_, c)| c.state == State::Fresh)
            .map(|(d, _)| *d)?;
        let candidate = self.candidates.get_mut(&distance)?;
        candidate.state = State::Waiting;
        self.in_flight += 1;
        self.messages += 1;
        self.rounds = self.rounds.max(candidate.depth);
        Some((candidate.contact, candidate.depth))
    }

    fn settle(&mut self, id: &NodeId, state: State) -> Option<u32> {
        let candidate = self.candidates.get_mut(&id.distance(&self.target))?;
        match candidate.state {
            State::Waiting => self.in_flight -= 1,
            State::Stalled => {}
            State::Fresh | State::Answered | State::Failed => return None,
        }
        candidate.state = state;
        Some(candidate.depth)
    }

    /// The request to `id` is slow: stop waiting for it, but accept its
    /// answer if it still comes.
    pub(crate) fn stalled(&mut self, id: &NodeId) {
        let Some(candidate) = self.candidates.get_mut(&id.distance(&self.target)) else { return };
        if candidate.state == State::Waiting {
            candidate.state = State::Stalled;
            self.in_flight -= 1;
        }
    }

    /// `id` answered with `closer` contacts.
    pub(crate) fn answered(&mut self, id: &NodeId, closer: impl IntoIterator<Item = Contact>) {
        if let Some(depth) = self.settle(id, State::Answered) {
            self.add(depth, closer);
        }
    }

    /// A request to `id` failed or timed out.
    pub(crate) fn failed(&mut self, id: &NodeId) {
        self.settle(id, State::Failed);
    }

    /// Kademlia's rule: done when the k closest live candidates have all
    /// answered (and trivially when none is left).
    pub(crate) fn is_finished(&self) -> bool {
        self.live_front().all(|c| c.state == State::Answered)
    }

    /// Requests of this lookup in flight.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Up to k contacts that answered, closest first.
    pub(crate) fn closest_answered(&self) -> Vec<Contact> {
        self.candidates.values().filter(|c| c.state == State::Answered).take(self.k).map(|c| c.contact).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use super::*;

    fn contact(byte: u8) -> Contact {
        let mut id = [0u8; 32];
        id[0] = byte;
        Contact { id: NodeId(id), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, u16::from(byte))) }
    }

    fn local() -> NodeId {
        NodeId([0xff; 32])
    }

    #[test]
    fn asks_alpha_at_a_time_closest_first() {
        let mut lookup = Lookup::new([0; 32], local(), 3, 2, 10);
        lookup.add(0, [5, 1, 3, 9].map(contact));
        assert_eq!(lookup.next().map(|(c, d)| (c.id.0[0], d)), Some((1, 1)));
        assert_eq!(lookup.next().map(|(c, _)| c.id.0[0]), Some(3));
        assert!(lookup.next().is_none(), "alpha = 2 in flight");
        lookup.answered(&contact(1).id, [contact(2)]);
        assert_eq!(lookup.next().map(|(c, d)| (c.id.0[0], d)), Some((2, 2)), "learned at hop 2 and closer");
        assert_eq!(lookup.rounds, 2);
        assert_eq!(lookup.messages, 3);
    }

    #[test]
    fn finishes_when_the_k_closest_live_have_answered() {
        let mut lookup = Lookup::new([0; 32], local(), 2, 3, 10);
        lookup.add(0, [1, 2, 3].map(contact));
        let asked: Vec<u8> = std::iter::from_fn(|| lookup.next()).map(|(c, _)| c.id.0[0]).collect();
        assert_eq!(asked, vec![1, 2], "only the k closest are asked");
        lookup.answered(&contact(1).id, []);
        assert!(!lookup.is_finished(), "2 still waiting");
        lookup.failed(&contact(2).id);
        assert!(!lookup.is_finished(), "3 moved into the k closest and is fresh");
        assert_eq!(lookup.next().map(|(c, _)| c.id.0[0]), Some(3));
        lookup.answered(&contact(3).id, [local_contact()]);
        assert!(lookup.is_finished());
        assert_eq!(lookup.closest_answered(), vec![contact(1), contact(3)]);
        assert_eq!(lookup.in_flight(), 0);
    }

    fn local_contact() -> Contact {
        Contact { id: local(), addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 1)) }
    }

    #[test]
    fn empty_or_all_failed_lookups_end() {
        let mut lookup = Lookup::new([0; 32], local(), 2, 3, 10);
        assert!(lookup.is_finished());
        lookup.add(0, [contact(4)]);
        assert!(!lookup.is_finished());
        lookup.next();
        lookup.failed(&contact(4).id);
        assert!(lookup.is_finished());
        assert!(lookup.closest_answered().is_empty());
        // A late duplicate answer does not underflow the in-flight count.
        lookup.answered(&contact(4).id, []);
        assert_eq!(lookup.in_flight(), 0);
    }

    #[test]
    fn stalled_requests_free_their_slot_but_may_still_answer() {
        let mut lookup = Lookup::new([0; 32], local(), 2, 1, 10);
        lookup.add(0, [1, 2, 3].map(contact));
        assert_eq!(lookup.next().map(|(c, _)| c.id.0[0]), Some(1));
        assert!(lookup.next().is_none(), "alpha = 1");
        lookup.stalled(&contact(1).id);
        assert_eq!(lookup.next().map(|(c, _)| c.id.0[0]), Some(2), "a stalled request frees its slot");
        lookup.answered(&contact(2).id, []);
        assert_eq!(lookup.next().map(|(c, _)| c.id.0[0]), Some(3), "1 is out of consideration");
        lookup.answered(&contact(3).id, []);
        assert!(lookup.is_finished());
        // 1 answers late after all: it is back, the closest again.
        lookup.answered(&contact(1).id, [contact(0)]);
        assert!(!lookup.is_finished(), "its answer named a closer contact");
        assert_eq!(lookup.in_flight(), 0);
        assert_eq!(lookup.closest_answered(), vec![contact(1), contact(2)]);
    }

    #[test]
    fn candidate_set_is_bounded_keeping_the_closest() {
        let mut lookup = Lookup::new([0; 32], local(), 2, 1, 3);
        lookup.add(0, [9, 8, 7, 6, 1].map(contact));
        assert_eq!(lookup.candidates.len(), 3);
        assert_eq!(lookup.dropped, 2);
        let ids: Vec<u8> = lookup.candidates.values().map(|c| c.contact.id.0[0]).collect();
        assert_eq!(ids, vec![1, 6, 7]);
    }
}
