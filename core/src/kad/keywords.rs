//! Name search: a file name becomes keyword tokens, each token a DHT key
//! holding `{FileId, name, size}` entries. A query looks every token up and
//! intersects the results (the keyword index of eMule's Kad network, after
//! Mysore/Kad "keyword publishing").

use sha2::{Digest, Sha256};

use crate::wire::{KeywordEntry, RecordKey};

/// Domain tag hashed before each token, so keyword keys never collide with
/// file or node ids by construction.
pub const KEYWORD_DOMAIN: &[u8] = b"shoal/kad/keyword/v1\0";

/// Shortest token kept, in characters: single letters match everything.
pub const TOKEN_CHARS_MIN: usize = 2;

/// Longest token kept, in bytes: a longer one is junk and would make keys
/// out of arbitrary blobs.
pub const TOKEN_BYTES_MAX: usize = 64;

/// Tokens too common to narrow a search. File extensions are *not* stop
/// words ("iso" is a useful filter).
pub const STOP_TOKENS: &[&str] = &["the", "and", "of", "to", "in", "for", "on", "with", "a", "an", "by", "at", "or"];

/// Lower-case `name`, split it on non-alphanumerics, drop short and stop
/// tokens and duplicates. Order of first appearance is kept.
#[must_use]
pub fn tokens(name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for raw in name.split(|c: char| !c.is_alphanumeric()) {
        let token = raw.to_lowercase();
        if token.chars().count() < TOKEN_CHARS_MIN || token.len() > TOKEN_BYTES_MAX {
            continue;
        }
        if STOP_TOKENS.contains(&token.as_str()) || out.contains(&token) {
            continue;
        }
        out.push(token);
    }
    out
}

/// The DHT key of a token: SHA-256(domain tag ‖ token).
#[must_use]
pub fn keyword_key(token: &str) -> RecordKey {
    let mut hash = Sha256::new();
    hash.update(KEYWORD_DOMAIN);
    hash.update(token.as_bytes());
    hash.finalize().into()
}

/// Whether `entry` legitimately lives under `key`: one of its name's tokens
/// hashes to `key`. Entries failing this are spam and are refused, so a
/// peer cannot file arbitrary names under a popular keyword.
#[must_use]
pub fn entry_belongs_to(entry: &KeywordEntry, key: &RecordKey) -> bool {
    tokens(&entry.name).iter().any(|t| keyword_key(t) == *key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::FileId;

    #[test]
    fn names_normalise_to_useful_tokens() {
        assert_eq!(tokens("Ubuntu 24.04 desktop amd64.iso"), vec!["ubuntu", "24", "04", "desktop", "amd64", "iso"]);
        assert_eq!(tokens("ubuntu-server.iso"), vec!["ubuntu", "server", "iso"]);
        assert_eq!(tokens("The Lord of the Rings (a)"), vec!["lord", "rings"]);
        assert_eq!(tokens("ISO iso Iso"), vec!["iso"]);
        assert_eq!(tokens("Ärger_Über.TXT"), vec!["ärger", "über", "txt"]);
        assert!(tokens("a b c - _ .").is_empty());
    }

    #[test]
    fn keys_are_domain_separated_and_case_free() {
        assert_eq!(keyword_key("iso"), keyword_key(&tokens("ISO")[0]));
        assert_ne!(keyword_key("iso"), keyword_key("isos"));
        let plain: [u8; 32] = Sha256::digest(b"iso").into();
        assert_ne!(keyword_key("iso"), plain);
        let entry = KeywordEntry { file: FileId([1; 32]), name: "debian.iso".into(), size: 1 };
        assert!(entry_belongs_to(&entry, &keyword_key("debian")));
        assert!(!entry_belongs_to(&entry, &keyword_key("ubuntu")));
    }
}
