//! SHA-256 digests of presented keys and secrets, and constant-time comparison.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

/// A SHA-256 digest. Keys and secrets are only ever stored as these.
pub type Digest = [u8; 32];

pub fn sha256(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// Parses a 64-character hex digest (either case).
pub fn parse_hex_digest(s: &str) -> Result<Digest, &'static str> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| "must be 64 hex characters (a SHA-256 digest)")?;
    Ok(out)
}

pub fn to_hex(d: &Digest) -> String {
    hex::encode(d)
}

/// Compares two digests in time independent of where they differ.
pub fn ct_eq(a: &Digest, b: &Digest) -> bool {
    a.ct_eq(b).into()
}

/// True when `s` is exactly 64 hex digits.
pub fn is_hex64(s: &[u8]) -> bool {
    s.len() == 64 && s.iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_known_vector() {
        assert_eq!(
            to_hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn parse_hex_digest_round_trips_and_rejects_bad_input() {
        let d = sha256(b"k");
        assert_eq!(parse_hex_digest(&to_hex(&d)), Ok(d));
        assert_eq!(parse_hex_digest(&to_hex(&d).to_uppercase()), Ok(d));
        assert!(parse_hex_digest("abc").is_err());
        assert!(parse_hex_digest(&"g".repeat(64)).is_err());
    }

    #[test]
    fn ct_eq_distinguishes_digests() {
        assert!(ct_eq(&sha256(b"a"), &sha256(b"a")));
        assert!(!ct_eq(&sha256(b"a"), &sha256(b"b")));
    }

    #[test]
    fn is_hex64_checks_length_and_alphabet() {
        assert!(is_hex64(&b"0123456789abcdefABCDEF".repeat(3)[..64]));
        assert!(!is_hex64(&[b'a'; 63]));
        assert!(!is_hex64(&[b'z'; 64]));
    }
}
