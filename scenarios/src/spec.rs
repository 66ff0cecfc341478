//! Loading scenario files: TOML into the simulator's typed model, with
//! `--set key=value` overrides.
//!
//! Every table rejects unknown keys, so a misspelt key fails with the
//! line and the key named (the `toml` crate's spans). Overrides address
//! values by dotted path; a segment is a table key, an array index, or the
//! `name` of an element of an array of tables (`hosts.leechers.count=50`).

use std::path::Path;

use serde::Deserialize;
use shoal_sim::model::Scenario;
use toml::{Table, Value};

use crate::catalog;

/// Largest scenario file read.
pub const SPEC_BYTES_MAX: u64 = 1024 * 1024;

/// Where a scenario came from.
#[derive(Clone, Debug)]
pub struct Source {
    /// Catalog name or file stem.
    pub name: String,
    /// Where to say errors are (`catalog:flash-crowd` or a path).
    pub origin: String,
    /// The TOML text.
    pub text: String,
}

impl Source {
    /// A catalog name, or else a path to a TOML file.
    pub fn resolve(name_or_path: &str) -> Result<Self, String> {
        if let Some(entry) = catalog::find(name_or_path) {
            return Ok(Self {
                name: entry.name.to_owned(),
                origin: format!("catalog:{}", entry.name),
                text: entry.text.to_owned(),
            });
        }
        let path = Path::new(name_or_path);
        if !path.exists() {
            return Err(format!(
                "`{name_or_path}` is neither a catalog scenario nor a file (`shoal-sim list` shows the catalog)"
            ));
        }
        let size = std::fs::metadata(path).map_err(|e| format!("{name_or_path}: {e}"))?.len();
        if size > SPEC_BYTES_MAX {
            return Err(format!("{name_or_path}: {size} bytes is over the {SPEC_BYTES_MAX}-byte limit for a scenario"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{name_or_path}: {e}"))?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("scenario").to_owned();
        Ok(Self { name, origin: name_or_path.to_owned(), text })
    }
}

/// Parse a scenario, apply overrides, and fill in its name.
pub fn load(source: &Source, overrides: &[String]) -> Result<Scenario, String> {
    // Parse once as the typed model so errors carry the file's lines.
    let mut scenario: Scenario =
        toml::from_str(&source.text).map_err(|e| format!("{}: {}", source.origin, e.to_string().trim_end()))?;
    if !overrides.is_empty() {
        let mut table: Table = toml::from_str(&source.text).map_err(|e| format!("{}: {e}", source.origin))?;
        for item in overrides {
            set(&mut table, item)?;
        }
        scenario = Scenario::deserialize(Value::Table(table))
            .map_err(|e| format!("{} with {}: {}", source.origin, overrides.join(" "), e.to_string().trim_end()))?;
    }
    if scenario.name.is_empty() {
        scenario.name.clone_from(&source.name);
    }
    Ok(scenario)
}

/// Apply one `key.path=value` override.
pub fn set(table: &mut Table, item: &str) -> Result<(), String> {
    let (path, raw) = item.split_once('=').ok_or_else(|| format!("--set `{item}`: expected key=value"))?;
    let path = path.trim();
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.trim().is_empty()) {
        return Err(format!("--set `{item}`: `{path}` is not a key path"));
    }
    let mut cursor = std::mem::take(table);
    let result = set_in(&mut cursor, &segments, parse_value(raw.trim()));
    *table = cursor;
    result.map_err(|at| format!("--set `{item}`: {at}"))
}

fn set_in(table: &mut Table, segments: &[&str], value: Value) -> Result<(), String> {
    let (first, rest) = segments.split_first().ok_or("empty key")?;
    if rest.is_empty() {
        table.insert((*first).to_owned(), value);
        return Ok(());
    }
    // Protocol overrides and expectations may be absent from a file; a
    // made-up key is still rejected when the model is read.
    let child = table.entry((*first).to_owned()).or_insert_with(|| Value::Table(Table::new()));
    match child {
        Value::Table(inner) => set_in(inner, rest, value),
        Value::Array(items) => {
            let (pick, rest) = rest.split_first().ok_or("empty key")?;
            let element = match pick.parse::<usize>() {
                Ok(index) => items.get_mut(index),
                Err(_) => items.iter_mut().find(|v| v.get("name").and_then(Value::as_str) == Some(pick)),
            }
            .ok_or_else(|| format!("`{first}` has no element `{pick}`"))?;
            match (element, rest.is_empty()) {
                (slot, true) => {
                    *slot = value;
                    Ok(())
                }
                (Value::Table(inner), false) => set_in(inner, rest, value),
                (_, false) => Err(format!("`{first}.{pick}` is not a table")),
            }
        }
        _ => Err(format!("`{first}` is not a table")),
    }
}

fn parse_value(raw: &str) -> Value {
    // A TOML value if it is one (numbers, booleans, quoted strings,
    // arrays, inline tables); else the raw text as a string.
    toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| Value::String(raw.to_owned()))
}
