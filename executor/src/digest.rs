//! One hasher over the digest algorithms a task checksum may name, so the
//! download path hashes while it writes without caring which one it is.

use md5::Digest as _;
use policy_sdk::ChecksumAlgorithm;

/// A running digest of one of the supported algorithms.
#[derive(Clone)]
pub enum Hasher {
    Md5(md5::Md5),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: ChecksumAlgorithm) -> Self {
        match algorithm {
            ChecksumAlgorithm::Md5 => Hasher::Md5(md5::Md5::new()),
            ChecksumAlgorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            ChecksumAlgorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> ChecksumAlgorithm {
        match self {
            Hasher::Md5(_) => ChecksumAlgorithm::Md5,
            Hasher::Sha256(_) => ChecksumAlgorithm::Sha256,
            Hasher::Sha512(_) => ChecksumAlgorithm::Sha512,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(h) => h.update(data),
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    /// The digest in lower-case hexadecimal, as `Checksum::digest` holds it.
    pub fn finalize_hex(self) -> String {
        match self {
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha512(h) => hex::encode(h.finalize()),
        }
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Hasher({})", self.algorithm())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex_of(algorithm: ChecksumAlgorithm, parts: &[&[u8]]) -> String {
        let mut h = Hasher::new(algorithm);
        for p in parts {
            h.update(p);
        }
        h.finalize_hex()
    }

    #[test]
    fn known_vectors() {
        assert_eq!(
            hex_of(ChecksumAlgorithm::Md5, &[b"abc"]),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            hex_of(ChecksumAlgorithm::Sha256, &[b"abc"]),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(hex_of(ChecksumAlgorithm::Sha512, &[b"abc"]).starts_with("ddaf35a193617aba"));
    }

    #[test]
    fn split_updates_equal_one_update() {
        // Resuming a download feeds the hasher in pieces; the digest must
        // not depend on where the pieces were cut.
        assert_eq!(
            hex_of(ChecksumAlgorithm::Md5, &[b"a", b"", b"bc"]),
            hex_of(ChecksumAlgorithm::Md5, &[b"abc"])
        );
    }
}
