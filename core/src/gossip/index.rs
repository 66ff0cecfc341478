//! The bounded local index of file announcements heard on
//! [`Topic::Files`](crate::wire::Topic::Files). Search consults it alongside
//! the DHT's keyword records: gossip makes a new file findable at once,
//! before any keyword record has been stored or refreshed.
//!
//! One entry per `FileId` (a re-announcement replaces the name and moves the
//! file to the newest position); at most `entries_max`, oldest evicted
//! first. A search is a linear scan of at most `entries_max` names, which
//! at the default 10,000 is cheaper than maintaining an inverted index on
//! every announcement.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::FileId;
use crate::wire::KeywordEntry;

/// Split text into search tokens: maximal runs of alphanumeric characters,
/// lower-cased. `"Ubuntu-24.04_desktop.iso"` gives `24`, `04`, `desktop`,
/// `iso`, `ubuntu`.
#[must_use]
pub fn tokens(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|t| !t.is_empty()).map(str::to_lowercase).collect()
}

/// Recently announced files, newest last, bounded.
#[derive(Debug, Clone)]
pub struct FileIndex {
    /// File -> (insertion stamp, entry).
    entries: BTreeMap<FileId, (u64, KeywordEntry)>,
    /// Insertion stamp -> file: iteration order is age order.
    by_age: BTreeMap<u64, FileId>,
    next_stamp: u64,
    entries_max: usize,
    results_max: usize,
}

impl FileIndex {
    /// An empty index holding at most `entries_max` files and returning at
    /// most `results_max` per search.
    #[must_use]
    pub fn new(entries_max: usize, results_max: usize) -> Self {
        Self { entries: BTreeMap::new(), by_age: BTreeMap::new(), next_stamp: 0, entries_max, results_max }
    }

    /// Add or refresh an announcement. Returns how many older entries were
    /// evicted to make room.
    pub fn insert(&mut self, entry: KeywordEntry) -> usize {
        if self.entries_max == 0 {
            return 1;
        }
        if let Some((stamp, _)) = self.entries.remove(&entry.file) {
            self.by_age.remove(&stamp);
        }
        let mut evicted = 0;
        while self.entries.len() >= self.entries_max {
            let Some((_, oldest)) = self.by_age.pop_first() else { break };
            self.entries.remove(&oldest);
            evicted += 1;
        }
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        self.by_age.insert(stamp, entry.file);
        self.entries.insert(entry.file, (stamp, entry));
        assert_eq!(self.entries.len(), self.by_age.len(), "every entry has one age stamp");
        evicted
    }

    /// Files whose name contains every token of `words` (see [`tokens`]),
    /// newest first, at most `results_max`. An empty query matches nothing.
    #[must_use]
    pub fn search(&self, words: &str) -> Vec<KeywordEntry> {
        let wanted = tokens(words);
        if wanted.is_empty() {
            return Vec::new();
        }
        self.by_age
            .values()
            .rev()
            .filter_map(|file| self.entries.get(file))
            .filter(|(_, entry)| {
                let have = tokens(&entry.name);
                wanted.iter().all(|w| have.contains(w))
            })
            .map(|(_, entry)| entry.clone())
            .take(self.results_max)
            .collect()
    }

    /// The entry for `file`, if announced.
    #[must_use]
    pub fn get(&self, file: &FileId) -> Option<&KeywordEntry> {
        self.entries.get(file).map(|(_, entry)| entry)
    }

    /// Number of files held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no file is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
