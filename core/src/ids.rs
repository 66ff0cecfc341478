//! Identifiers: 256-bit node and file ids in one XOR key space (Kademlia §2),
//! and the small integer newtypes used across the protocols.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length in bytes of every key in the Kademlia key space.
pub const KEY_BYTES: usize = 32;

/// Why a hex id failed to parse. Names the position so a user can find a typo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// The text was not exactly 64 hex digits long.
    #[error("expected {expected} hex digits, got {got}")]
    WrongLength {
        /// Digits required.
        expected: usize,
        /// Digits given.
        got: usize,
    },
    /// A character that is not a hex digit.
    #[error("invalid hex digit {found:?} at position {position}")]
    InvalidDigit {
        /// Zero-based character position.
        position: usize,
        /// The offending character.
        found: char,
    },
}

/// Parse exactly `2 * N` hex digits (either case) into `N` bytes.
fn parse_hex<const N: usize>(text: &str) -> Result<[u8; N], ParseIdError> {
    let expected = 2 * N;
    let got = text.chars().count();
    if got != expected {
        return Err(ParseIdError::WrongLength { expected, got });
    }
    let mut out = [0u8; N];
    for (position, ch) in text.chars().enumerate() {
        let nibble = ch.to_digit(16).ok_or(ParseIdError::InvalidDigit { position, found: ch })?;
        // to_digit(16) is < 16, so the cast is lossless.
        out[position / 2] |= (nibble as u8) << if position % 2 == 0 { 4 } else { 0 };
    }
    Ok(out)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

/// The order of two keys as big-endian 256-bit integers (the bytes'
/// lexicographic order, as a derived `Ord` gives), compared a 64-bit word
/// at a time. The derived order calls `memcmp` for each comparison, and
/// routing-table sorts, lookups and id-keyed maps make millions of them
/// (a tenth of a 10,000-node simulation's time).
fn key_order(a: &[u8; KEY_BYTES], b: &[u8; KEY_BYTES]) -> Ordering {
    fn words(key: &[u8; KEY_BYTES]) -> [u64; KEY_BYTES / 8] {
        std::array::from_fn(|i| u64::from_be_bytes(std::array::from_fn(|j| key[8 * i + j])))
    }
    words(a).cmp(&words(b))
}

/// `PartialOrd` and `Ord` by [`key_order`].
macro_rules! key_ord {
    ($name:ident) => {
        impl Ord for $name {
            fn cmp(&self, other: &Self) -> Ordering {
                key_order(&self.0, &other.0)
            }
        }

        impl PartialOrd for $name {
            fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
                Some(self.cmp(other))
            }
        }
    };
}

/// XOR distance between two keys (Kademlia §2.1), compared as a big-endian
/// 256-bit integer: a smaller distance means closer.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Distance(pub [u8; KEY_BYTES]);

key_ord!(Distance);

impl Distance {
    /// Number of leading zero bits: 256 for a zero distance.
    #[must_use]
    pub fn leading_zeros(&self) -> u32 {
        let mut zeros = 0;
        for byte in self.0 {
            if byte != 0 {
                return zeros + byte.leading_zeros();
            }
            zeros += 8;
        }
        zeros
    }

    /// The k-bucket this distance falls in: 255 for the farthest half of the
    /// key space (top bit differs) down to 0 for a distance of exactly 1;
    /// `None` for a zero distance (the key itself, which has no bucket).
    #[must_use]
    pub fn bucket_index(&self) -> Option<u8> {
        let zeros = self.leading_zeros();
        // zeros < 256 means the value 255 - zeros fits a u8.
        (zeros < 256).then(|| (255 - zeros) as u8)
    }
}

impl fmt::Debug for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Distance(lz={})", self.leading_zeros())
    }
}

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
        pub struct $name(pub [u8; KEY_BYTES]);

        key_ord!($name);

        impl $name {
            /// The raw 32 bytes.
            #[must_use]
            pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
                &self.0
            }

            /// XOR distance to any key of the shared key space.
            #[must_use]
            pub fn distance(&self, other: &impl AsKey) -> Distance {
                xor(&self.0, other.as_key())
            }

            /// The first 8 hex digits: enough to tell ids apart in logs.
            #[must_use]
            pub fn short(&self) -> String {
                format!("{:02x}{:02x}{:02x}{:02x}", self.0[0], self.0[1], self.0[2], self.0[3])
            }
        }

        impl AsKey for $name {
            fn as_key(&self) -> &[u8; KEY_BYTES] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(text: &str) -> Result<Self, Self::Err> {
                parse_hex(text).map(Self)
            }
        }
    };
}

/// Anything that is a point in the 256-bit Kademlia key space.
pub trait AsKey {
    /// The 32 key bytes.
    fn as_key(&self) -> &[u8; KEY_BYTES];
}

impl AsKey for [u8; KEY_BYTES] {
    fn as_key(&self) -> &[u8; KEY_BYTES] {
        self
    }
}

fn xor(a: &[u8; KEY_BYTES], b: &[u8; KEY_BYTES]) -> Distance {
    let mut out = [0u8; KEY_BYTES];
    for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
        *o = x ^ y;
    }
    Distance(out)
}

key_type!(
    /// A node's identity: SHA-256 of its ed25519 public key.
    NodeId
);
key_type!(
    /// A file's identity: the length-bound Merkle root of its piece hashes
    /// (see [`crate::content`]). Identical content gives an identical id.
    FileId
);

/// Index of a piece within one file.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct PieceIndex(pub u32);

impl fmt::Debug for PieceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "piece#{}", self.0)
    }
}

impl fmt::Display for PieceIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A driver-assigned handle for one connection. Never reused within a run,
/// so a late event for a closed connection cannot be mistaken for a new one.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct ConnId(pub u64);

impl fmt::Debug for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "conn#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::ChaCha8Rng;
    use rand::{Rng, RngExt, SeedableRng};

    use super::*;

    /// The word-wise order is the bytes' lexicographic order, on random
    /// keys and on keys that differ in one byte only.
    #[test]
    fn keys_order_as_their_bytes() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..10_000 {
            let (mut a, mut b) = ([0u8; KEY_BYTES], [0u8; KEY_BYTES]);
            rng.fill_bytes(&mut a);
            if rng.random_bool(0.5) {
                rng.fill_bytes(&mut b);
            } else {
                b = a;
                b[rng.random_range(0..KEY_BYTES)] = rng.random();
            }
            assert_eq!(NodeId(a).cmp(&NodeId(b)), a.cmp(&b));
            assert_eq!(FileId(a).partial_cmp(&FileId(b)), Some(a.cmp(&b)));
            assert_eq!(Distance(a).cmp(&Distance(b)), a.cmp(&b));
        }
    }

    fn id_with(prefix: &[u8]) -> NodeId {
        let mut bytes = [0u8; KEY_BYTES];
        bytes[..prefix.len()].copy_from_slice(prefix);
        NodeId(bytes)
    }

    #[test]
    fn distance_is_xor_and_symmetric() {
        let a = id_with(&[0b1010_0000, 0xff]);
        let b = id_with(&[0b0110_0000, 0x0f]);
        let d = a.distance(&b);
        assert_eq!(d.0[0], 0b1100_0000);
        assert_eq!(d.0[1], 0xf0);
        assert_eq!(d, b.distance(&a));
        assert_eq!(a.distance(&a), Distance::default());
    }

    #[test]
    fn bucket_index_counts_from_the_far_end() {
        let zero = NodeId::default();
        assert_eq!(zero.distance(&zero).bucket_index(), None);
        assert_eq!(zero.distance(&id_with(&[0x80])).bucket_index(), Some(255));
        assert_eq!(zero.distance(&id_with(&[0x01])).bucket_index(), Some(248));
        assert_eq!(zero.distance(&id_with(&[0x00, 0x40])).bucket_index(), Some(246));
        let mut one = [0u8; KEY_BYTES];
        one[KEY_BYTES - 1] = 1;
        assert_eq!(zero.distance(&NodeId(one)).bucket_index(), Some(0));
        assert_eq!(zero.distance(&NodeId(one)).leading_zeros(), 255);
    }

    #[test]
    fn closer_distance_orders_first() {
        let target = FileId([0x55; KEY_BYTES]);
        let near = NodeId([0x54; KEY_BYTES]);
        let far = NodeId([0xaa; KEY_BYTES]);
        assert!(near.distance(&target) < far.distance(&target));
    }

    #[test]
    fn hex_round_trips_and_accepts_upper_case() {
        let id = FileId([0xab; KEY_BYTES]);
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<FileId>(), Ok(id));
        assert_eq!(text.to_uppercase().parse::<FileId>(), Ok(id));
    }

    #[test]
    fn hex_parse_errors_name_the_problem() {
        assert_eq!("abc".parse::<NodeId>(), Err(ParseIdError::WrongLength { expected: 64, got: 3 }));
        let mut bad = "0".repeat(64);
        bad.replace_range(10..11, "g");
        let err = bad.parse::<NodeId>().unwrap_err();
        assert_eq!(err, ParseIdError::InvalidDigit { position: 10, found: 'g' });
        assert_eq!(err.to_string(), "invalid hex digit 'g' at position 10");
        // Multi-byte characters count as one position, never split a byte.
        let wide = format!("{}é", "0".repeat(63));
        assert_eq!(wide.parse::<NodeId>(), Err(ParseIdError::InvalidDigit { position: 63, found: 'é' }));
    }
}
