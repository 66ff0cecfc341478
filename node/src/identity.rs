//! A node's identity: an ed25519 key pair, created once and kept in the
//! data dir. The `NodeId` is SHA-256 of the public key, so an id cannot be
//! claimed without the key (the handshake proves possession).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};
use shoal_core::ids::NodeId;

/// File name of the secret key inside the data dir.
pub const IDENTITY_FILE: &str = "identity.key";

/// Why an identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The key file could not be read or written.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file does not hold a 32-byte secret.
    #[error("identity file {path} is corrupt: expected 32 bytes, found {len}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// The node's key pair and the id derived from it.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
    id: NodeId,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?})", self.id) // never print the secret
    }
}

/// The id of the node holding `public_key`.
#[must_use]
pub fn node_id_of(public_key: &[u8; 32]) -> NodeId {
    NodeId(Sha256::digest(public_key).into())
}

impl Identity {
    /// The identity with this secret key (the simulator derives secrets from
    /// its seed; the daemon from the OS, once).
    #[must_use]
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let signing = SigningKey::from_bytes(&secret);
        let id = node_id_of(&signing.verifying_key().to_bytes());
        Self { signing, id }
    }

    /// Load `dir/identity.key`, or create it from `fresh()` on first start.
    /// The file is written to a temporary name, synced and renamed, so a
    /// crash never leaves a half-written key; it is readable by the owner
    /// only.
    pub fn load_or_create(dir: &Path, fresh: impl FnOnce() -> [u8; 32]) -> Result<Self, IdentityError> {
        let path = dir.join(IDENTITY_FILE);
        let io = |source| IdentityError::Io { path: path.clone(), source };
        match fs::read(&path) {
            Ok(bytes) => {
                let secret: [u8; 32] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| IdentityError::Corrupt { path: path.clone(), len: bytes.len() })?;
                Ok(Self::from_secret(secret))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let secret = fresh();
                let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
                let mut options = fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&tmp).map_err(io)?;
                file.write_all(&secret).map_err(io)?;
                file.sync_all().map_err(io)?;
                fs::rename(&tmp, &path).map_err(io)?;
                if let Ok(dir) = fs::File::open(dir) {
                    dir.sync_all().map_err(io)?;
                }
                Ok(Self::from_secret(secret))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// This node's id.
    #[must_use]
    pub fn node_id(&self) -> NodeId {
        self.id
    }

    /// The public key, as sent in the handshake.
    #[must_use]
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Sign `message`.
    #[must_use]
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// Check `signature` over `message` by the holder of `public_key`.
#[must_use]
pub fn verify(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else { return false };
    key.verify(message, &ed25519_dalek::Signature::from_bytes(signature)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_the_hash_of_the_public_key_and_signatures_verify() {
        let me = Identity::from_secret([7; 32]);
        assert_eq!(me.node_id(), node_id_of(&me.public_key()));
        let sig = me.sign(b"hello");
        assert!(verify(&me.public_key(), b"hello", &sig));
        assert!(!verify(&me.public_key(), b"hellO", &sig));
        let other = Identity::from_secret([8; 32]);
        assert!(!verify(&other.public_key(), b"hello", &sig));
        assert!(!verify(&[0xff; 32], b"hello", &sig), "a bad key is a failed check, not a panic");
    }

    #[test]
    fn identity_persists_across_restarts_and_rejects_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path(), || [1; 32]).unwrap();
        let again = Identity::load_or_create(dir.path(), || panic!("must not create twice")).unwrap();
        assert_eq!(first.node_id(), again.node_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(IDENTITY_FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "secret readable by others: {mode:o}");
        }
        fs::write(dir.path().join(IDENTITY_FILE), b"short").unwrap();
        assert!(matches!(Identity::load_or_create(dir.path(), || [1; 32]), Err(IdentityError::Corrupt { len: 5, .. })));
    }
}
