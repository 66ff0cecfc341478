//! A 64-ary hierarchical bitset: the leaf layer holds one bit per position,
//! and each upper layer one bit per non-zero word of the layer below, up to
//! a single top word. Insert and remove touch one word per layer (three
//! layers cover 262,144 positions); finding the lowest position common to
//! two sets descends only where both summaries overlap, so it never scans
//! the empty parts of either set.

/// Layers a set of `u32` positions can need: 64^6 > 2^32.
const LAYERS_MAX: usize = 6;

/// Set of positions `0..capacity` with O(layers) insert/remove and
/// summary-guided search.
///
/// All layers live in one allocation, leaves first: a membership test is
/// one load behind the set's pointer. (A `Vec` per layer cost a second,
/// dependent cache miss; a piece's holders are tested for every session
/// whenever a piece completes.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HierBitset {
    /// Layer `l` is `words[starts[l]..starts[l + 1]]`; layer 0 holds the
    /// leaves and the last layer exactly one word.
    words: Box<[u64]>,
    starts: [u32; LAYERS_MAX + 1],
    layers: u8,
    capacity: u32,
    count: u32,
}

impl HierBitset {
    /// An empty set for positions `0..capacity`.
    pub(crate) fn new(capacity: u32) -> Self {
        let mut starts = [0u32; LAYERS_MAX + 1];
        let mut layers = 0;
        let mut width = capacity.div_ceil(64).max(1);
        loop {
            starts[layers + 1] = starts[layers] + width;
            layers += 1;
            if width == 1 {
                break;
            }
            width = width.div_ceil(64);
        }
        let words = vec![0u64; starts[layers] as usize].into_boxed_slice();
        Self { words, starts, layers: layers as u8, capacity, count: 0 }
    }

    /// Number of positions present.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Layer `l`'s words.
    fn layer(&self, l: usize) -> &[u64] {
        &self.words[self.starts[l] as usize..self.starts[l + 1] as usize]
    }

    pub(crate) fn contains(&self, pos: u32) -> bool {
        // Leaves start at word 0.
        pos < self.capacity && self.words[(pos / 64) as usize] & (1 << (pos % 64)) != 0
    }

    /// Add `pos`; returns whether it was absent.
    pub(crate) fn insert(&mut self, pos: u32) -> bool {
        assert!(pos < self.capacity, "position {pos} out of range {}", self.capacity);
        if self.contains(pos) {
            return false;
        }
        let mut index = pos as usize;
        for l in 0..usize::from(self.layers) {
            let word = &mut self.words[self.starts[l] as usize + index / 64];
            let was_empty = *word == 0;
            *word |= 1u64 << (index % 64);
            if !was_empty {
                break; // invariant: a non-empty word's parent bit is set
            }
            index /= 64;
        }
        self.count += 1;
        true
    }

    /// Remove `pos`; returns whether it was present.
    pub(crate) fn remove(&mut self, pos: u32) -> bool {
        if !self.contains(pos) {
            return false;
        }
        let mut index = pos as usize;
        for l in 0..usize::from(self.layers) {
            let word = &mut self.words[self.starts[l] as usize + index / 64];
            *word &= !(1u64 << (index % 64));
            if *word != 0 {
                break; // siblings remain: the parent bit stays
            }
            index /= 64;
        }
        self.count -= 1;
        true
    }

    /// Whether at least `n` valid positions are in neither set (same
    /// capacity). Reads the leaf words only until it has counted `n`.
    pub(crate) fn absent_from_both_at_least(&self, other: &HierBitset, n: u32) -> bool {
        assert_eq!(self.capacity, other.capacity, "sets of different capacity");
        let leaves = self.starts[1] as usize;
        let mut found = 0;
        for (index, (&a, &b)) in self.words[..leaves].iter().zip(&other.words[..leaves]).enumerate() {
            let valid = self.capacity.saturating_sub(index as u32 * 64).min(64);
            let mask = if valid == 64 { u64::MAX } else { (1u64 << valid) - 1 };
            found += (!(a | b) & mask).count_ones();
            if found >= n {
                return true;
            }
        }
        found >= n
    }

    /// Lowest position present in both sets (same capacity).
    pub(crate) fn first_common(&self, other: &HierBitset) -> Option<u32> {
        assert_eq!(self.capacity, other.capacity, "sets of different capacity");
        self.descend(usize::from(self.layers) - 1, 0, Some(other))
    }

    fn descend(&self, layer: usize, word_index: usize, other: Option<&HierBitset>) -> Option<u32> {
        let at = self.starts[layer] as usize + word_index;
        let mut mask = self.words[at];
        if let Some(other) = other {
            // Same capacity, so the same layout.
            mask &= other.words[at];
        }
        while mask != 0 {
            let child = word_index * 64 + mask.trailing_zeros() as usize;
            if layer == 0 {
                // child < capacity because only valid positions are set.
                return Some(child as u32);
            }
            if let Some(found) = self.descend(layer - 1, child, other) {
                return Some(found);
            }
            mask &= mask - 1;
        }
        None
    }

    /// Positions present, ascending. Skips empty leaf words through the
    /// first summary layer: O(capacity / 4096 + count).
    pub(crate) fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        let leaves = self.layer(0);
        let summary: &[u64] = if self.layers > 1 { self.layer(1) } else { &[u64::MAX][..] };
        set_bits(summary)
            .filter(|&w| (w as usize) < leaves.len())
            .flat_map(move |w| set_bits(std::slice::from_ref(&leaves[w as usize])).map(move |bit| w * 64 + bit))
    }

    /// Bytes of heap memory held.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.words.len() * 8
    }
}

/// Set bit indices of a word slice, ascending.
pub(crate) fn set_bits(words: &[u64]) -> impl Iterator<Item = u32> + '_ {
    words.iter().enumerate().flat_map(|(w, &word)| {
        let mut bits = word;
        std::iter::from_fn(move || {
            (bits != 0).then(|| {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                w as u32 * 64 + bit
            })
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn layers_shrink_to_one_top_word() {
        assert_eq!(HierBitset::new(0).layers, 1);
        assert_eq!(HierBitset::new(64).layers, 1);
        assert_eq!(HierBitset::new(65).layers, 2);
        assert_eq!(HierBitset::new(4096).layers, 2);
        assert_eq!(HierBitset::new(100_000).layers, 3);
        assert_eq!(HierBitset::new(100_000).layer(1).len(), 25);
        assert_eq!(HierBitset::new(100_000).layer(0).len(), 1563);
        assert_eq!(HierBitset::new(64 * 64 * 64 + 1).layers, 4);
    }

    #[test]
    fn first_common_skips_disjoint_regions() {
        let mut a = HierBitset::new(100_000);
        let mut b = HierBitset::new(100_000);
        a.insert(5);
        a.insert(70_000);
        b.insert(6);
        b.insert(70_000);
        b.insert(99_999);
        assert_eq!(a.first_common(&b), Some(70_000));
        a.remove(70_000);
        assert_eq!(a.first_common(&b), None);
        assert!(!a.remove(70_000));
        assert_eq!(a.count(), 1);
    }

    proptest! {
        /// Against a BTreeSet model: any sequence of inserts and removes
        /// leaves the same members, first and first-common, and the same
        /// count of positions in neither set.
        #[test]
        fn matches_a_set_model(
            capacity in 1u32..20_000,
            ops in proptest::collection::vec((any::<bool>(), any::<u32>(), any::<bool>()), 0..400),
        ) {
            let mut a = HierBitset::new(capacity);
            let mut b = HierBitset::new(capacity);
            let (mut ma, mut mb) = (BTreeSet::new(), BTreeSet::new());
            for (insert, pos, into_a) in ops {
                let pos = pos % capacity;
                let (set, model) = if into_a { (&mut a, &mut ma) } else { (&mut b, &mut mb) };
                if insert {
                    prop_assert_eq!(set.insert(pos), model.insert(pos));
                } else {
                    prop_assert_eq!(set.remove(pos), model.remove(&pos));
                }
            }
            prop_assert_eq!(a.count() as usize, ma.len());
            prop_assert_eq!(a.first_common(&b), ma.intersection(&mb).next().copied());
            prop_assert_eq!(a.iter().collect::<Vec<_>>(), ma.iter().copied().collect::<Vec<_>>());
            let absent = (0..capacity).filter(|p| !ma.contains(p) && !mb.contains(p)).count() as u32;
            for n in [0, 1, absent.saturating_sub(1), absent, absent + 1] {
                prop_assert_eq!(a.absent_from_both_at_least(&b, n), absent >= n, "n = {}", n);
            }
        }
    }
}
