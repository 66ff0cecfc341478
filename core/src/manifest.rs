//! File manifests: what a downloader needs besides the `FileId`.
//!
//! A manifest is self-certifying. Its layout and Merkle root hash to the
//! `FileId` ([`crate::content::file_id`]), and when it carries the piece
//! hashes they must fold to that root, so a node that holds the id rejects
//! any forged or inconsistent manifest. The name is *not* part of the
//! identity (identical content has one id whatever it is called); it is
//! only checked to be a safe file name.

use serde::{Deserialize, Serialize};

use crate::content::{self, Content, ContentError, Layout, MerkleRoot, PieceHash};
use crate::ids::FileId;

/// Longest accepted file name, in UTF-8 bytes (common filesystem limit).
pub const NAME_BYTES_MAX: usize = 255;
/// Most piece hashes carried inline: 1024 × 32 B = 32 KiB keeps a manifest
/// within one DHT record. Longer lists are fetched from peers with proofs.
pub const INLINE_PIECE_HASHES_MAX: u32 = 1024;

/// Everything needed to fetch and verify a file, stored in the DHT under its
/// `FileId`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileManifest {
    /// Suggested file name (not authenticated by the id).
    pub name: String,
    /// File length in bytes.
    pub size: u64,
    /// Nominal piece size in bytes.
    pub piece_size: u32,
    /// Merkle root over the piece hashes.
    pub root: MerkleRoot,
    /// All piece hashes, when they fit [`INLINE_PIECE_HASHES_MAX`].
    pub piece_hashes: Option<Vec<PieceHash>>,
}

/// Why a manifest is rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The name is empty.
    #[error("file name is empty")]
    EmptyName,
    /// The name is longer than [`NAME_BYTES_MAX`].
    #[error("file name is {len} bytes, the limit is {NAME_BYTES_MAX}")]
    NameTooLong {
        /// Actual length in bytes.
        len: usize,
    },
    /// The name has a path separator, a control character, or is `.`/`..`.
    #[error("file name {name:?} is not a plain file name")]
    UnsafeName {
        /// The rejected name.
        name: String,
    },
    /// Piece size or length unusable.
    #[error("bad layout: {0}")]
    Layout(#[from] ContentError),
    /// More inline hashes than a record may carry.
    #[error("{count} inline piece hashes, the limit is {INLINE_PIECE_HASHES_MAX}")]
    TooManyInlineHashes {
        /// Hashes carried.
        count: usize,
    },
    /// The hash list does not have one entry per piece.
    #[error("manifest lists {got} piece hashes, the layout has {expected} pieces")]
    WrongHashCount {
        /// Pieces in the layout.
        expected: u32,
        /// Hashes listed.
        got: usize,
    },
    /// The piece hashes do not fold to the stated root.
    #[error("piece hashes do not match the manifest's Merkle root")]
    RootMismatch,
    /// The manifest describes another file than the one asked for.
    #[error("manifest is for file {got}, expected {expected}")]
    WrongFileId {
        /// The id asked for.
        expected: FileId,
        /// The id the manifest hashes to.
        got: FileId,
    },
    /// The bytes are not a manifest at all.
    #[error("undecodable manifest: {0}")]
    Decode(#[from] postcard::Error),
}

/// Check that a name is usable as a plain file name on any platform.
pub fn validate_name(name: &str) -> Result<(), ManifestError> {
    if name.is_empty() {
        return Err(ManifestError::EmptyName);
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(ManifestError::NameTooLong { len: name.len() });
    }
    let unsafe_char = |c: char| c.is_control() || matches!(c, '/' | '\\');
    if name == "." || name == ".." || name.chars().any(unsafe_char) {
        return Err(ManifestError::UnsafeName { name: name.to_owned() });
    }
    Ok(())
}

impl FileManifest {
    /// The manifest for hashed content, carrying the hashes when they fit.
    pub fn new(name: &str, content: &Content) -> Result<Self, ManifestError> {
        validate_name(name)?;
        let inline = content.layout.piece_count() <= INLINE_PIECE_HASHES_MAX;
        Ok(Self {
            name: name.to_owned(),
            size: content.layout.file_bytes(),
            piece_size: content.layout.piece_bytes(),
            root: content.root,
            piece_hashes: inline.then(|| content.piece_hashes.clone()),
        })
    }

    /// The layout this manifest describes.
    pub fn layout(&self) -> Result<Layout, ManifestError> {
        Ok(Layout::new(self.size, self.piece_size)?)
    }

    /// Check every internal consistency rule and return the `FileId` the
    /// manifest certifies: safe name, valid layout, inline hashes within
    /// bounds, one per piece, and folding to `root`.
    pub fn validate(&self) -> Result<FileId, ManifestError> {
        validate_name(&self.name)?;
        let layout = self.layout()?;
        if let Some(hashes) = &self.piece_hashes {
            if hashes.len() > INLINE_PIECE_HASHES_MAX as usize {
                return Err(ManifestError::TooManyInlineHashes { count: hashes.len() });
            }
            if hashes.len() as u64 != u64::from(layout.piece_count()) {
                return Err(ManifestError::WrongHashCount { expected: layout.piece_count(), got: hashes.len() });
            }
            if content::merkle_root(hashes) != self.root {
                return Err(ManifestError::RootMismatch);
            }
        }
        Ok(content::file_id(layout, &self.root))
    }

    /// [`validate`](Self::validate), and check it certifies `expected`.
    pub fn validate_for(&self, expected: &FileId) -> Result<(), ManifestError> {
        let got = self.validate()?;
        if got != *expected {
            return Err(ManifestError::WrongFileId { expected: *expected, got });
        }
        Ok(())
    }

    /// Canonical bytes (postcard), as stored in DHT records.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain owned data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decode untrusted bytes and validate them; the whole input must be
    /// consumed. Never panics.
    pub fn from_bytes(bytes: &[u8]) -> Result<(Self, FileId), ManifestError> {
        let (manifest, rest): (Self, _) = postcard::take_from_bytes(bytes)?;
        if !rest.is_empty() {
            return Err(ManifestError::Decode(postcard::Error::DeserializeBadEncoding));
        }
        let id = manifest.validate()?;
        Ok((manifest, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::content::{Layout, PIECE_BYTES_MIN, hash_buf_read};
    use proptest::prelude::*;

    fn sample(len: usize, piece_bytes: u32) -> (FileManifest, FileId) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let content = hash_buf_read(&data[..], Layout::new(len as u64, piece_bytes).unwrap()).unwrap();
        (FileManifest::new("movie.mkv", &content).unwrap(), content.file_id)
    }

    #[test]
    fn honest_manifest_validates_to_its_id() {
        let (m, id) = sample(100_000, PIECE_BYTES_MIN);
        assert_eq!(m.validate().unwrap(), id);
        m.validate_for(&id).unwrap();
        let (decoded, decoded_id) = FileManifest::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!((decoded, decoded_id), (m, id));
    }

    #[test]
    fn forgeries_never_validate_for_the_real_id() {
        let (m, id) = sample(100_000, PIECE_BYTES_MIN);
        let mut forged = Vec::new();

        let mut f = m.clone();
        f.size += 1; // same piece count, different length
        forged.push(("size", f));
        let mut f = m.clone();
        f.piece_size *= 2;
        forged.push(("piece size", f));
        let mut f = m.clone();
        f.root.0[0] ^= 1;
        forged.push(("root", f));
        let mut f = m.clone();
        f.piece_hashes.as_mut().unwrap()[3].0[7] ^= 1;
        forged.push(("piece hash", f));
        let mut f = m.clone();
        f.piece_hashes.as_mut().unwrap().pop();
        forged.push(("hash count", f));
        let mut f = m.clone();
        f.piece_hashes.as_mut().unwrap().swap(0, 1);
        forged.push(("hash order", f));

        for (what, f) in forged {
            assert!(f.validate_for(&id).is_err(), "forged {what} validated");
        }
        // Stripping the inline hashes is allowed (they can be fetched) and
        // still certifies the same id.
        let mut stripped = m;
        stripped.piece_hashes = None;
        stripped.validate_for(&id).unwrap();
    }

    #[test]
    fn unsafe_names_are_rejected() {
        for name in ["", ".", "..", "a/b", "a\\b", "nul\0", "line\nbreak"] {
            assert!(validate_name(name).is_err(), "{name:?} accepted");
        }
        assert!(matches!(validate_name(&"x".repeat(NAME_BYTES_MAX + 1)), Err(ManifestError::NameTooLong { .. })));
        validate_name(&"é".repeat(NAME_BYTES_MAX / 2)).unwrap();
        validate_name("Ubuntu 24.04 desktop amd64.iso").unwrap();
    }

    #[test]
    fn big_files_carry_no_inline_hashes() {
        let content = Content::from_piece_hashes(
            Layout::new(2048 * u64::from(PIECE_BYTES_MIN), PIECE_BYTES_MIN).unwrap(),
            vec![PieceHash::default(); 2048],
        );
        let m = FileManifest::new("big", &content).unwrap();
        assert!(m.piece_hashes.is_none());
        assert_eq!(m.validate().unwrap(), content.file_id);
        let mut stuffed = m;
        stuffed.piece_hashes = Some(content.piece_hashes.clone());
        assert!(matches!(stuffed.validate(), Err(ManifestError::TooManyInlineHashes { count: 2048 })));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = FileManifest::from_bytes(&bytes);
        }

        #[test]
        fn arbitrary_manifests_never_panic(
            name in ".{0,300}", size in any::<u64>(), piece_size in any::<u32>(),
            root in any::<[u8; 32]>(),
            hashes in proptest::option::of(proptest::collection::vec(any::<[u8; 32]>(), 0..40)),
        ) {
            let m = FileManifest {
                name, size, piece_size, root: MerkleRoot(root),
                piece_hashes: hashes.map(|h| h.into_iter().map(PieceHash).collect()),
            };
            let _ = m.validate();
            let _ = FileManifest::from_bytes(&m.to_bytes());
        }

        #[test]
        fn manifests_round_trip(len in 0usize..300_000, piece_shift in 0u32..3) {
            let (mut m, id) = sample(len, PIECE_BYTES_MIN << piece_shift);
            m.name = format!("file-{len}.bin");
            let (decoded, decoded_id) = FileManifest::from_bytes(&m.to_bytes()).unwrap();
            prop_assert_eq!(decoded_id, id);
            prop_assert_eq!(decoded, m);
        }
    }
}
