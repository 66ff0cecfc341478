//! [`VecMap`]: an ordered map kept as one sorted `Vec` of pairs, for the
//! per-connection tables every machine holds (the node's connections,
//! gossip's peers, the exchange's sessions).
//!
//! Why not a `BTreeMap`: a node holds up to `connections_target` (192)
//! connections in each of those tables, and a simulator holds 10^5 nodes.
//! Connection handles are handed out in increasing order, and a B-tree fed
//! ascending keys splits its leaves half full, each with its own header
//! and allocation; sorted `Vec`s hold the same entries in two buffers,
//! a binary search away, and append at the end. The two sequences are
//! ring buffers (`VecDeque`): an insert or removal moves the entries on
//! its shorter side, so closing the oldest connections, the common case,
//! moves almost nothing. With `Vec`s, `memmove` was a tenth of perf's
//! samples in a 10,000-node `dht-lookups` run; with ring buffers the run
//! took 50.8 s instead of 59.1 s, with the same events.
//!
//! Iteration is in key order, as a `BTreeMap`'s, so swapping one for the
//! other changes no outcome.

use std::borrow::Borrow;
use std::collections::VecDeque;

/// A map ordered by key, kept as a sorted ring buffer of keys beside one
/// of their values (module docs). Meant for tens to hundreds of entries.
///
/// Keys apart from values: a search reads only the keys, so on a table
/// nobody touched lately (a simulated node's, most of the time) it misses
/// the cache on a few lines of keys, not on a line per probed entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VecMap<K, V> {
    /// Sorted, no repeats.
    keys: VecDeque<K>,
    /// `values[i]` belongs to `keys[i]`.
    values: VecDeque<V>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        Self { keys: VecDeque::new(), values: VecDeque::new() }
    }
}

/// Room for one more item in `list`. The buffer grows by an eighth (at
/// least four items), not twice over: these tables stay near their largest
/// size for a node's whole life, so the room a doubling leaves (a quarter
/// of the buffer on average) would be kept too. Growth stays amortised
/// O(1) per item.
fn reserve_one<T>(list: &mut VecDeque<T>) {
    if list.len() == list.capacity() {
        list.reserve_exact((list.len() / 8).max(4));
    }
}

/// Give memory back once `list` has shrunk to a quarter of its buffer (a
/// node's tables shrink after a burst of connections).
fn release_unused<T>(list: &mut VecDeque<T>) {
    if list.len() < list.capacity() / 4 {
        list.shrink_to(list.len() * 2);
    }
}

impl<K: Ord, V> VecMap<K, V> {
    /// An empty map (allocates nothing).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no entry is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn position<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.keys.binary_search_by(|k| k.borrow().cmp(key))
    }

    /// The value of `key`.
    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.position(key).ok().map(|i| &self.values[i])
    }

    /// The value of `key`, to change.
    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.position(key).ok().map(|i| &mut self.values[i])
    }

    /// Whether `key` is held.
    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.position(key).is_ok()
    }

    /// Put a new entry at `i`, its sorted place.
    fn insert_at(&mut self, i: usize, key: K, value: V) {
        reserve_one(&mut self.keys);
        reserve_one(&mut self.values);
        self.keys.insert(i, key);
        self.values.insert(i, value);
    }

    /// Set `key` to `value`; the value it had, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.position(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.values[i], value)),
            Err(i) => {
                self.insert_at(i, key, value);
                None
            }
        }
    }

    /// The value of `key`, inserted from `value` first if absent.
    pub fn get_or_insert_with(&mut self, key: K, value: impl FnOnce() -> V) -> &mut V {
        let i = match self.position(&key) {
            Ok(i) => i,
            Err(i) => {
                self.insert_at(i, key, value());
                i
            }
        };
        &mut self.values[i]
    }

    /// Take `key` out; its value, if it was held.
    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        let i = self.position(key).ok()?;
        self.keys.remove(i);
        let value = self.values.remove(i);
        release_unused(&mut self.keys);
        release_unused(&mut self.values);
        value
    }

    /// The entry with the smallest key at or after `key`.
    pub fn first_from<Q: Ord + ?Sized>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: Borrow<Q>,
    {
        let i = self.position(key).unwrap_or_else(|i| i);
        self.keys.get(i).zip(self.values.get(i))
    }

    /// The entry with the smallest key.
    #[must_use]
    pub fn first_key_value(&self) -> Option<(&K, &V)> {
        self.keys.front().zip(self.values.front())
    }

    /// Entries in key order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&K, &V)> + ExactSizeIterator {
        self.keys.iter().zip(&self.values)
    }

    /// Entries in key order, values to change.
    pub fn iter_mut(&mut self) -> impl DoubleEndedIterator<Item = (&K, &mut V)> + ExactSizeIterator {
        self.keys.iter().zip(&mut self.values)
    }

    /// Keys in order.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &K> + ExactSizeIterator {
        self.keys.iter()
    }

    /// Values in key order.
    pub fn values(&self) -> impl DoubleEndedIterator<Item = &V> + ExactSizeIterator {
        self.values.iter()
    }

    /// Values in key order, to change.
    pub fn values_mut(&mut self) -> impl DoubleEndedIterator<Item = &mut V> + ExactSizeIterator {
        self.values.iter_mut()
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for VecMap<K, V> {
    /// Later pairs win over earlier ones with the same key, as for a
    /// `BTreeMap`.
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        let mut map = Self::new();
        for (k, v) in pairs {
            map.insert(k, v);
        }
        map
    }
}

impl<K, V> IntoIterator for VecMap<K, V> {
    type Item = (K, V);
    type IntoIter = std::iter::Zip<std::collections::vec_deque::IntoIter<K>, std::collections::vec_deque::IntoIter<V>>;

    /// Entries in key order.
    fn into_iter(self) -> Self::IntoIter {
        self.keys.into_iter().zip(self.values)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::ChaCha8Rng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    /// Random inserts, removals and updates give the same contents, in the
    /// same order, as a `BTreeMap`.
    #[test]
    fn behaves_as_a_btree_map() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (mut map, mut reference) = (VecMap::new(), BTreeMap::new());
        for step in 0..5_000u32 {
            let key: u16 = rng.random_range(0..300);
            match rng.random_range(0..4) {
                0 => assert_eq!(map.remove(&key), reference.remove(&key), "step {step}"),
                1 => {
                    *map.get_or_insert_with(key, || 0) += 1;
                    *reference.entry(key).or_insert(0) += 1;
                }
                _ => assert_eq!(map.insert(key, step), reference.insert(key, step), "step {step}"),
            }
            assert_eq!(map.get(&key), reference.get(&key), "step {step}");
        }
        assert!(map.iter().eq(reference.iter()));
        assert_eq!(map.len(), reference.len());
        assert_eq!(map.first_key_value(), reference.first_key_value());
        for key in [0, 150, 299, 300] {
            assert_eq!(map.first_from(&key), reference.range(key..).next(), "from {key}");
        }
        assert!(map.into_iter().eq(reference));
    }

    #[test]
    fn the_buffer_grows_by_an_eighth() {
        let mut map = VecMap::new();
        for k in 0..1_000u32 {
            map.insert(k, k);
            let (len, room) = (map.keys.len(), map.values.capacity().max(map.keys.capacity()));
            assert!(room <= len + (len / 8).max(3), "{len} entries, room for {room}");
        }
    }

    #[test]
    fn a_drained_map_gives_its_buffer_back() {
        let mut map: VecMap<u32, [u8; 64]> = (0..1_000).map(|k| (k, [0; 64])).collect();
        let full = map.values.capacity();
        for k in 0..990 {
            map.remove(&k);
        }
        assert!(map.values.capacity() < full / 4, "{} of {full}", map.values.capacity());
        assert_eq!(map.keys().copied().collect::<Vec<_>>(), (990..1_000).collect::<Vec<_>>());
    }
}
