//! The named scenarios shipped with the binary (`scenarios/catalog/`).

/// One catalog entry.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Its name.
    pub name: &'static str,
    /// Its TOML.
    pub text: &'static str,
}

macro_rules! entries {
    ($($name:literal),* $(,)?) => {
        &[$(Entry { name: $name, text: include_str!(concat!("../catalog/", $name, ".toml")) }),*]
    };
}

/// Every catalog scenario, in the order `shoal-sim list` prints them.
pub const CATALOG: &[Entry] = entries![
    "flash-crowd",
    "slow-seed",
    "churn",
    "partition-heal",
    "dht-lookups",
    "gossip-spread",
    "bad-peer",
    "name-search",
];

/// A catalog entry by name.
#[must_use]
pub fn find(name: &str) -> Option<Entry> {
    CATALOG.iter().copied().find(|e| e.name == name)
}

/// An entry's one-line description (its `description` key).
#[must_use]
pub fn description(entry: &Entry) -> String {
    toml::from_str::<toml::Table>(entry.text)
        .ok()
        .and_then(|t| t.get("description").and_then(toml::Value::as_str).map(str::to_owned))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_parses_plans_and_has_a_description() {
        for entry in CATALOG {
            let source = crate::spec::Source {
                name: entry.name.into(),
                origin: format!("catalog:{}", entry.name),
                text: entry.text.into(),
            };
            let scenario = crate::spec::load(&source, &[]).unwrap_or_else(|e| panic!("{e}"));
            scenario.plan().unwrap_or_else(|e| panic!("{}: {e}", entry.name));
            assert!(!description(entry).is_empty(), "{} has a description", entry.name);
            assert_eq!(scenario.name, entry.name);
        }
    }
}
