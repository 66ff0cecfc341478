//! The routing table: 256 k-buckets of contacts ordered least-recently seen
//! first, with ping-before-evict and a replacement cache (Kademlia §2.2,
//! §4.1).

use std::time::Duration;

use rand::Rng;

use crate::ids::{AsKey, Distance, KEY_BYTES, NodeId};
use crate::time::Instant;
use crate::wire::Contact;

/// Number of buckets: one per bit of the key space.
pub const BUCKETS: usize = KEY_BYTES * 8;

/// One known contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Who and where.
    pub contact: Contact,
    /// When a message from it last arrived.
    pub last_seen: Instant,
    /// Requests to it that failed since it was last seen.
    pub failures: u32,
}

/// What [`RoutingTable::observe`] did with a contact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// It is our own id: never stored.
    Local,
    /// Already known: moved to the most-recently-seen end.
    Refreshed,
    /// New, and its bucket had room.
    Inserted,
    /// New; it took the place of `evicted`, a contact whose requests had
    /// failed (stale contacts go first, Kademlia §4.1).
    Replaced {
        /// The stale contact dropped.
        evicted: Contact,
    },
    /// New, bucket full: cached as a replacement, and `ping` (the least
    /// recently seen entry, not heard from lately) must be pinged; if it fails to answer, the
    /// newest replacement takes its place (Kademlia §2.2).
    PingNeeded {
        /// The entry to ping.
        ping: Contact,
    },
    /// New, bucket full, and its head recently seen or already being
    /// pinged: cached only.
    Cached,
}

#[derive(Clone, Debug, Default)]
struct Bucket {
    /// Least recently seen first (Kademlia §2.2).
    entries: Vec<Entry>,
    /// Most recently seen last.
    replacements: Vec<Contact>,
    /// The entry being pinged because a newcomer wants its place.
    pinging: Option<NodeId>,
    /// Last lookup of an id in this bucket's range, for refresh.
    last_lookup: Instant,
}

/// The k-bucket routing table of one node.
#[derive(Clone, Debug)]
pub struct RoutingTable {
    local: NodeId,
    bucket_size: usize,
    replacements_max: usize,
    failures_max: u32,
    fresh: Duration,
    /// Farthest bucket first: `buckets[j]` is bucket `BUCKETS - 1 - j`,
    /// and the vector reaches only as deep as a contact or a lookup has
    /// gone. A network of n nodes fills about log2(n / k) buckets; the
    /// other two hundred and more would cost 96 bytes each per node.
    buckets: Vec<Bucket>,
    /// `last_lookup` of a bucket not yet stored (see `touch_all`).
    untouched_since: Instant,
    /// Bit i set when bucket i holds an entry: lets `closest` skip empty
    /// buckets without touching their (cold) memory.
    occupied: [u64; BUCKETS / 64],
    len: usize,
}

/// Push `item` onto `list`, which holds at most `max`: the buffer doubles
/// as a `Vec`'s does, but never past `max` (a full bucket of k = 20
/// would otherwise keep room for 32 entries, in every bucket of every
/// node).
fn push_within<T>(list: &mut Vec<T>, item: T, max: usize) {
    if list.len() == list.capacity() {
        let room = (list.len() * 2).max(4).min(max.max(list.len() + 1));
        list.reserve_exact(room - list.len());
    }
    list.push(item);
}

fn bit(distance: &Distance, index: usize) -> bool {
    distance.0[KEY_BYTES - 1 - index / 8] >> (index % 8) & 1 == 1
}

impl RoutingTable {
    /// An empty table around `local`.
    #[must_use]
    pub fn new(local: NodeId, bucket_size: usize, replacements_max: usize, failures_max: u32, fresh: Duration) -> Self {
        assert!(bucket_size > 0, "k must be positive");
        Self {
            local,
            bucket_size,
            replacements_max,
            failures_max,
            fresh,
            buckets: Vec::new(),
            untouched_since: Instant::ZERO,
            occupied: [0; BUCKETS / 64],
            len: 0,
        }
    }

    /// Our own id.
    #[must_use]
    pub fn local(&self) -> NodeId {
        self.local
    }

    /// Contacts held (replacements excluded).
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no contact is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bucket of `id`, or `None` for our own id.
    #[must_use]
    pub fn bucket_of(&self, id: &impl AsKey) -> Option<usize> {
        self.local.distance(id).bucket_index().map(usize::from)
    }

    /// Bucket `index`, if stored.
    fn at(&self, index: usize) -> Option<&Bucket> {
        BUCKETS.checked_sub(index + 1).and_then(|j| self.buckets.get(j))
    }

    /// Bucket `index`, if stored.
    fn at_mut(&mut self, index: usize) -> Option<&mut Bucket> {
        BUCKETS.checked_sub(index + 1).and_then(|j| self.buckets.get_mut(j))
    }

    /// Bucket `index` (`< BUCKETS`), stored now if it was not.
    fn stored(&mut self, index: usize) -> &mut Bucket {
        let j = BUCKETS - 1 - index;
        if self.buckets.len() <= j {
            let fresh = Bucket { last_lookup: self.untouched_since, ..Bucket::default() };
            self.buckets.resize(j + 1, fresh);
        }
        &mut self.buckets[j]
    }

    /// Every entry, bucket by bucket (nearest bucket first).
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.buckets.iter().rev().flat_map(|b| b.entries.iter())
    }

    /// The entries of bucket `index`, least recently seen first.
    #[must_use]
    pub fn bucket(&self, index: usize) -> &[Entry] {
        self.at(index).map_or(&[], |b| &b.entries[..])
    }

    /// The replacement cache of bucket `index`, most recent last.
    #[must_use]
    pub fn replacements(&self, index: usize) -> &[Contact] {
        self.at(index).map_or(&[], |b| &b.replacements[..])
    }

    /// Whether `id` is held.
    #[must_use]
    pub fn contains(&self, id: &NodeId) -> bool {
        self.bucket_of(id).is_some_and(|b| self.bucket(b).iter().any(|e| e.contact.id == *id))
    }

    /// Whether a new contact with `id` would be inserted at once: its
    /// bucket has room or a stale entry (else it would only be cached).
    #[must_use]
    pub fn has_room_for(&self, id: &NodeId) -> bool {
        self.bucket_of(id).is_some_and(|b| {
            let entries = self.bucket(b);
            entries.len() < self.bucket_size || entries.iter().any(|e| e.failures > 0)
        }) && !self.contains(id)
    }

    /// A message from `contact` arrived (or it answered us): learn or
    /// refresh it (Kademlia §2.2).
    pub fn observe(&mut self, contact: Contact, now: Instant) -> Observed {
        let Some(index) = self.bucket_of(&contact.id) else { return Observed::Local };
        let (k, replacements_max, fresh) = (self.bucket_size, self.replacements_max, self.fresh);
        let bucket = self.stored(index);
        if let Some(at) = bucket.entries.iter().position(|e| e.contact.id == contact.id) {
            let mut entry = bucket.entries.remove(at);
            entry.contact = contact;
            entry.last_seen = now;
            entry.failures = 0;
            bucket.entries.push(entry);
            if bucket.pinging == Some(contact.id) {
                bucket.pinging = None;
            }
            return Observed::Refreshed;
        }
        bucket.replacements.retain(|c| c.id != contact.id);
        let newcomer = Entry { contact, last_seen: now, failures: 0 };
        if bucket.entries.len() < k {
            push_within(&mut bucket.entries, newcomer, k);
            self.len += 1;
            self.occupied[index / 64] |= 1 << (index % 64);
            return Observed::Inserted;
        }
        // Stale entries (failed since last seen) are replaced without a ping.
        let stalest = bucket.entries.iter().enumerate().filter(|(_, e)| e.failures > 0).max_by_key(|(_, e)| e.failures);
        if let Some((at, _)) = stalest {
            let evicted = bucket.entries.remove(at).contact;
            if bucket.pinging == Some(evicted.id) {
                bucket.pinging = None;
            }
            bucket.entries.push(newcomer);
            return Observed::Replaced { evicted };
        }
        // The oldest replacement makes room for the newest.
        if bucket.replacements.len() >= replacements_max && !bucket.replacements.is_empty() {
            bucket.replacements.remove(0);
        }
        if replacements_max > 0 {
            push_within(&mut bucket.replacements, contact, replacements_max);
        }
        // Only a head not heard from for `fresh` is worth a ping (BEP 5:
        // nodes seen in the last 15 minutes are "good"); pinging on every
        // newcomer would cost one ping per unknown sender.
        let head = &bucket.entries[0];
        if bucket.pinging.is_some() || now.saturating_duration_since(head.last_seen) < fresh {
            return Observed::Cached;
        }
        let head = head.contact;
        bucket.pinging = Some(head.id);
        Observed::PingNeeded { ping: head }
    }

    /// A request to `id` failed. With a replacement waiting it is evicted at
    /// once; without one it stays (transient loss, Kademlia §4.1) until
    /// `failures_max`. Returns the evicted contact, if any.
    pub fn failed(&mut self, id: &NodeId) -> Option<Contact> {
        let index = self.bucket_of(id)?;
        let failures_max = self.failures_max;
        let bucket = self.at_mut(index)?;
        let at = bucket.entries.iter().position(|e| e.contact.id == *id)?;
        if bucket.pinging == Some(*id) {
            bucket.pinging = None;
        }
        bucket.entries[at].failures += 1;
        if bucket.replacements.is_empty() && bucket.entries[at].failures < failures_max {
            return None;
        }
        let evicted = bucket.entries.remove(at).contact;
        match bucket.replacements.pop() {
            Some(replacement) => {
                bucket.entries.push(Entry { contact: replacement, last_seen: Instant::ZERO, failures: 0 })
            }
            None => self.len -= 1,
        }
        self.sync_occupied(index);
        Some(evicted)
    }

    /// Forget `id` entirely.
    pub fn remove(&mut self, id: &NodeId) -> bool {
        let Some(index) = self.bucket_of(id) else { return false };
        let Some(bucket) = self.at_mut(index) else { return false };
        bucket.replacements.retain(|c| c.id != *id);
        let Some(at) = bucket.entries.iter().position(|e| e.contact.id == *id) else { return false };
        bucket.entries.remove(at);
        if bucket.pinging == Some(*id) {
            bucket.pinging = None;
        }
        self.len -= 1;
        self.sync_occupied(index);
        true
    }

    fn sync_occupied(&mut self, index: usize) {
        let mask = 1 << (index % 64);
        if self.bucket(index).is_empty() {
            self.occupied[index / 64] &= !mask;
        } else {
            self.occupied[index / 64] |= mask;
        }
    }

    fn is_occupied(&self, index: usize) -> bool {
        self.occupied[index / 64] >> (index % 64) & 1 == 1
    }

    /// Append the live entries of bucket `index` to `out`, sorted by
    /// distance to `target`. Returns whether `out` holds `count` or more.
    fn take_bucket<'a>(
        &'a self,
        index: usize,
        target: &impl AsKey,
        count: usize,
        except: Option<&NodeId>,
        out: &mut Vec<(Distance, &'a Contact)>,
    ) -> bool {
        let start = out.len();
        for e in self.bucket(index) {
            if e.failures == 0 && except != Some(&e.contact.id) {
                out.push((e.contact.id.distance(target), &e.contact));
            }
        }
        // Only the `need` closest of this bucket can make the cut: select
        // them in O(n) before sorting, which matters for large buckets.
        let need = count.saturating_sub(start);
        if out.len() - start > need && need > 0 {
            out[start..].select_nth_unstable_by_key(need - 1, |(d, _)| *d);
            out.truncate(start + need);
        }
        out[start..].sort_unstable_by_key(|(d, _)| *d);
        out.len() >= count
    }

    /// Up to `count` live contacts closest to `target`, closest first.
    /// Entries whose last requests failed are left out: we do not hand out
    /// contacts we believe dead.
    ///
    /// Buckets are visited nearest first, so only as many are read as it
    /// takes to fill `count` (libp2p kad `ClosestBucketsIter`). With
    /// d = local ⊕ target and h its top bit, every contact of an earlier
    /// bucket in this order is closer than any of a later one: bucket h,
    /// then lower buckets where d has a 1 (descending), then lower buckets
    /// where d has a 0 (ascending), then the buckets above h (ascending).
    #[must_use]
    pub fn closest(&self, target: &impl AsKey, count: usize) -> Vec<Contact> {
        self.closest_except(target, count, None)
    }

    /// [`Self::closest`] without `except` (the asker, who needs no news of
    /// itself): the same as asking for one more and dropping it, without
    /// scanning a further bucket for the one more.
    #[must_use]
    pub fn closest_except(&self, target: &impl AsKey, count: usize, except: Option<&NodeId>) -> Vec<Contact> {
        let mut out: Vec<(Distance, &Contact)> = Vec::with_capacity(count.min(self.len));
        let d = self.local.distance(target);
        let (below, above) = match d.bucket_index().map(usize::from) {
            Some(h) => (h, h + 1),
            None => (0, 0),
        };
        let order = (below..above)
            .chain((0..below).rev().filter(|&i| bit(&d, i)))
            .chain((0..below).filter(|&i| !bit(&d, i)))
            .chain(above..BUCKETS);
        for index in order {
            if self.is_occupied(index) && self.take_bucket(index, target, count, except, &mut out) {
                break;
            }
        }
        out.truncate(count);
        out.into_iter().map(|(_, c)| *c).collect()
    }

    /// Record that a lookup for `target` ran now (it refreshes the bucket
    /// `target` falls in, Kademlia §2.3).
    pub fn touch(&mut self, target: &impl AsKey, now: Instant) {
        if let Some(index) = self.bucket_of(target) {
            self.stored(index).last_lookup = now;
        }
    }

    /// Count every bucket as looked up at `now` (at start: a fresh node has
    /// no idle buckets yet).
    pub fn touch_all(&mut self, now: Instant) {
        self.untouched_since = now;
        for bucket in &mut self.buckets {
            bucket.last_lookup = now;
        }
    }

    /// Non-empty buckets with no lookup for `idle` or longer at `now`.
    #[must_use]
    pub fn buckets_idle(&self, now: Instant, idle: std::time::Duration) -> Vec<usize> {
        (0..BUCKETS)
            .filter(|&i| self.at(i).is_some_and(|b| !b.entries.is_empty() && now - b.last_lookup >= idle))
            .collect()
    }

    /// Index of the nearest non-empty bucket (our closest neighbour's).
    #[must_use]
    pub fn nearest_bucket(&self) -> Option<usize> {
        (0..BUCKETS).find(|&i| self.is_occupied(i))
    }

    /// A uniformly random id in bucket `index`: our id with bit `index`
    /// flipped and every lower bit random.
    pub fn random_id_in(&self, index: usize, rng: &mut impl Rng) -> NodeId {
        assert!(index < BUCKETS, "bucket index in range");
        let mut random = [0u8; KEY_BYTES];
        rng.fill_bytes(&mut random);
        let mut id = self.local.0;
        let byte = KEY_BYTES - 1 - index / 8;
        let bit = index % 8;
        // Keep bits above `index`, flip bit `index`, randomise the rest.
        let low_mask = ((1u16 << bit) - 1) as u8;
        id[byte] = (id[byte] & !low_mask & !(1 << bit)) | (!id[byte] & (1 << bit)) | (random[byte] & low_mask);
        id[byte + 1..].copy_from_slice(&random[byte + 1..]);
        NodeId(id)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    use super::*;

    fn contact(id: NodeId) -> Contact {
        Contact { id, addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 4000)) }
    }

    /// An id in bucket `index` of the zero id, distinguished by `tag`.
    fn in_bucket(index: usize, tag: u8) -> NodeId {
        let mut id = [0u8; KEY_BYTES];
        id[KEY_BYTES - 1 - index / 8] = 1 << (index % 8);
        if index >= 16 {
            id[KEY_BYTES - 1] = tag;
        }
        NodeId(id)
    }

    fn t(s: u64) -> Instant {
        Instant::from_micros(s * 1_000_000)
    }

    /// Buckets are stored only as deep as contacts and lookups go; a
    /// bucket stored late starts with the table's last `touch_all`.
    #[test]
    fn buckets_are_stored_only_as_deep_as_used() {
        let mut table = RoutingTable::new(NodeId([0; KEY_BYTES]), 2, 2, 2, Duration::from_secs(60));
        table.touch_all(t(5));
        assert_eq!(table.observe(contact(in_bucket(250, 1)), t(6)), Observed::Inserted);
        assert_eq!(table.buckets.len(), 6, "buckets 255 down to 250");
        assert_eq!(table.nearest_bucket(), Some(250));
        assert!(table.bucket(3).is_empty() && table.failed(&in_bucket(3, 0)).is_none());
        assert!(!table.remove(&in_bucket(3, 0)));
        assert_eq!(table.buckets.len(), 6, "reads and misses store nothing");
        table.touch(&in_bucket(200, 0), t(7));
        assert_eq!(table.buckets.len(), 56);
        assert_eq!(table.observe(contact(in_bucket(220, 1)), t(8)), Observed::Inserted);
        let hour = Duration::from_secs(3600);
        assert_eq!(table.buckets_idle(t(5) + hour, hour), vec![220, 250], "stored late, idle since touch_all");
        assert_eq!(table.entries().map(|e| e.contact.id).collect::<Vec<_>>(), [in_bucket(220, 1), in_bucket(250, 1)]);
    }

    /// A full bucket's buffers hold k entries and `replacements_max`
    /// replacements, not the next power of two; tiny limits work too.
    #[test]
    fn a_full_bucket_keeps_room_for_its_limits_only() {
        for (k, replacements) in [(20, 10), (2, 1), (1, 0)] {
            let mut table = RoutingTable::new(NodeId::default(), k, replacements, 3, Duration::from_secs(60));
            for tag in 1..=40 {
                table.observe(contact(in_bucket(200, tag)), t(0));
            }
            let bucket = table.at(200).unwrap();
            assert_eq!((bucket.entries.len(), bucket.entries.capacity()), (k, k));
            assert_eq!((bucket.replacements.len(), bucket.replacements.capacity()), (replacements, replacements));
        }
    }

    #[test]
    fn contacts_land_in_the_bucket_of_their_distance() {
        let mut table = RoutingTable::new(NodeId::default(), 4, 2, 3, Duration::ZERO);
        for index in [0, 7, 8, 100, 255] {
            assert_eq!(table.observe(contact(in_bucket(index, 1)), t(0)), Observed::Inserted);
            assert_eq!(table.bucket(index).len(), 1, "bucket {index}");
        }
        assert_eq!(table.len(), 5);
        assert_eq!(table.observe(contact(NodeId::default()), t(0)), Observed::Local);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for index in [0, 5, 8, 9, 130, 255] {
            let id = table.random_id_in(index, &mut rng);
            assert_eq!(table.bucket_of(&id), Some(index));
        }
    }

    #[test]
    fn full_bucket_pings_the_least_recently_seen_and_evicts_only_on_failure() {
        let mut table = RoutingTable::new(NodeId::default(), 2, 2, 3, Duration::ZERO);
        let (a, b, c, d) = (in_bucket(200, 1), in_bucket(200, 2), in_bucket(200, 3), in_bucket(200, 4));
        table.observe(contact(a), t(0));
        table.observe(contact(b), t(1));
        // a is least recently seen: it is pinged, c waits as replacement.
        assert_eq!(table.observe(contact(c), t(2)), Observed::PingNeeded { ping: contact(a) });
        assert_eq!(table.observe(contact(d), t(3)), Observed::Cached, "one ping at a time");
        // a answers: it stays and moves to the back; the newcomers stay cached.
        assert_eq!(table.observe(contact(a), t(4)), Observed::Refreshed);
        let order: Vec<NodeId> = table.bucket(200).iter().map(|e| e.contact.id).collect();
        assert_eq!(order, vec![b, a]);
        assert_eq!(table.replacements(200), &[contact(c), contact(d)]);
        // Now b is the head; a newcomer triggers its ping, b fails: the
        // newest replacement takes its place.
        let e = in_bucket(200, 5);
        assert_eq!(table.observe(contact(e), t(5)), Observed::PingNeeded { ping: contact(b) });
        assert_eq!(table.failed(&b), Some(contact(b)));
        let order: Vec<NodeId> = table.bucket(200).iter().map(|e| e.contact.id).collect();
        assert_eq!(order, vec![a, e]);
        assert_eq!(table.len(), 2);
        assert!(!table.contains(&b));
    }

    #[test]
    fn failures_without_replacement_evict_only_at_the_limit() {
        let mut table = RoutingTable::new(NodeId::default(), 2, 2, 3, Duration::ZERO);
        let a = in_bucket(50, 1);
        table.observe(contact(a), t(0));
        assert_eq!(table.failed(&a), None);
        assert_eq!(table.failed(&a), None);
        assert!(table.closest(&a, 5).is_empty(), "a stale contact is not handed out");
        assert_eq!(table.failed(&a), Some(contact(a)));
        assert!(table.is_empty());
    }

    #[test]
    fn stale_entries_are_replaced_without_a_ping() {
        let mut table = RoutingTable::new(NodeId::default(), 2, 2, 3, Duration::ZERO);
        let (a, b, c) = (in_bucket(90, 1), in_bucket(90, 2), in_bucket(90, 3));
        table.observe(contact(a), t(0));
        table.observe(contact(b), t(0));
        table.failed(&b);
        assert_eq!(table.observe(contact(c), t(1)), Observed::Replaced { evicted: contact(b) });
        assert!(table.contains(&c));
    }

    #[test]
    fn closest_matches_a_full_sort() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut local = [0u8; KEY_BYTES];
        rng.fill_bytes(&mut local);
        let mut table = RoutingTable::new(NodeId(local), 8, 2, 3, Duration::ZERO);
        for _ in 0..2_000 {
            let mut id = [0u8; KEY_BYTES];
            rng.fill_bytes(&mut id);
            table.observe(contact(NodeId(id)), t(0));
        }
        // Also some near ids so that low buckets are populated.
        for index in 0..40 {
            let id = table.random_id_in(index, &mut rng);
            table.observe(contact(id), t(0));
        }
        for round in 0..200 {
            let mut target = [0u8; KEY_BYTES];
            rng.fill_bytes(&mut target);
            if round % 4 == 0 {
                target = table.random_id_in(round % 40, &mut rng).0;
            }
            let mut all: Vec<Contact> = table.entries().map(|e| e.contact).collect();
            all.sort_by_key(|c| c.id.distance(&target));
            all.truncate(20);
            assert_eq!(table.closest(&target, 20), all, "round {round}");
            // Leaving one out is asking for one more and dropping it.
            let except = all[round % all.len()].id;
            let mut one_more = table.closest(&target, 21);
            one_more.retain(|c| c.id != except);
            one_more.truncate(20);
            assert_eq!(table.closest_except(&target, 20, Some(&except)), one_more, "round {round}");
            // Our own id is never in our table.
            assert_eq!(table.closest_except(&target, 20, Some(&NodeId(local))), all, "round {round}");
        }
        let all = table.closest(&local, usize::MAX);
        assert_eq!(all.len(), table.len());
    }
}
