//! Identifiable API keys: `<prefix>_<env>_<random><checksum>`, e.g.
//! `kg_live_4Vb0T9qLmZ2cXr8NyA1fKe0jDI6m` (GitHub-token style).
//!
//! Why: a secret scanner can find a leaked key by its shape, and the filter
//! can refuse a mistyped, truncated or made-up key of that shape by its
//! checksum alone, before any credential lookup (a typo costs no shared-data
//! read). The checksum is no secret and no signature: anyone can compute it;
//! it only tells a well-formed key from noise. Keys are still looked up by
//! their SHA-256 only.
//!
//! | part | form |
//! |---|---|
//! | prefix | `[a-z][a-z0-9]{0,9}`, per deployment (default `kg`) |
//! | env | `[a-z0-9]{1,16}`: the key's environment, lowercased, other characters dropped |
//! | random | 22 base62 characters from the OS CSPRNG (130.9 bits) |
//! | checksum | CRC-32 (IEEE) of `<prefix>_<env>_<random>`, 6 base62 characters, zero-padded |
//!
//! Base62 digits are `0-9A-Za-z`. Regular expression of every such key:
//! [`KEY_REGEX`].

use crate::error::ConfigError;

/// Random characters in a key: 62^22 ≈ 2^130.9.
pub const RANDOM_CHARS: usize = 22;
/// Base62 characters of the CRC-32 (62^6 > 2^32).
pub const CHECKSUM_CHARS: usize = 6;
/// Longest prefix.
pub const MAX_PREFIX_LEN: usize = 10;
/// Longest environment segment.
pub const MAX_ENV_SEGMENT: usize = 16;
/// The prefix keygate uses unless a deployment sets another.
pub const DEFAULT_PREFIX: &str = "kg";
/// Matches every identifiable key, whatever its prefix (for secret scanners).
pub const KEY_REGEX: &str = r"\b[a-z][a-z0-9]{0,9}_[a-z0-9]{1,16}_[0-9A-Za-z]{28}\b";

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A deployment's key prefix: lowercase letter first, then lowercase
/// letters and digits, at most [`MAX_PREFIX_LEN`].
pub fn check_prefix(field: &str, prefix: &str) -> Result<(), ConfigError> {
    let ok = (1..=MAX_PREFIX_LEN).contains(&prefix.len())
        && prefix
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!(
                "a key prefix is 1 to {MAX_PREFIX_LEN} characters a-z, 0-9, starting with a letter"
            ),
        ))
    }
}

/// The environment as a key shows it: lowercase letters and digits only,
/// at most [`MAX_ENV_SEGMENT`] (`staging-eu` → `stagingeu`); `x` if nothing
/// is left. Only a label for people and scanners: the checksum covers it,
/// the credential's own environment is what the gate uses.
pub fn env_segment(environment: &str) -> String {
    let s: String = environment
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(MAX_ENV_SEGMENT)
        .collect();
    if s.is_empty() {
        "x".into()
    } else {
        s
    }
}

fn checksum(body: &str) -> [u8; CHECKSUM_CHARS] {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62.get((n % 62) as usize).copied().unwrap_or(b'0');
        n /= 62;
    }
    out
}

/// `RANDOM_CHARS` base62 characters, uniform, from `fill` (the caller's
/// CSPRNG): bytes ≥ 248 are drawn again so that every digit is equally
/// likely (248 = 4 × 62).
pub fn random_chars<E>(mut fill: impl FnMut(&mut [u8]) -> Result<(), E>) -> Result<String, E> {
    let mut out = String::with_capacity(RANDOM_CHARS);
    let mut buf = [0u8; 32];
    while out.len() < RANDOM_CHARS {
        fill(&mut buf)?;
        for b in buf {
            if b < 248 && out.len() < RANDOM_CHARS {
                out.push(char::from(
                    BASE62.get(usize::from(b % 62)).copied().unwrap_or(b'0'),
                ));
            }
        }
    }
    Ok(out)
}

/// The key `<prefix>_<env segment>_<random><checksum>`.
pub fn compose(prefix: &str, environment: &str, random: &str) -> String {
    let body = format!("{prefix}_{}_{random}", env_segment(environment));
    let sum = checksum(&body);
    let mut key = body;
    key.extend(sum.iter().map(|&b| char::from(b)));
    key
}

/// What a presented key is, to the prefixes a gate validates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Does not start with `<prefix>_` for any of them: some other format.
    Other,
    /// A well-formed identifiable key whose checksum matches.
    Valid,
    /// Claims a prefix but is not `<prefix>_<env>_<28 base62>`.
    Malformed,
    /// Well-formed, but the checksum does not match: mistyped or made up.
    BadChecksum,
}

/// Classifies `key` against `prefixes`. No allocation, no lookup.
pub fn classify(key: &str, prefixes: &[String]) -> Shape {
    let Some(rest) = prefixes.iter().find_map(|p| {
        key.strip_prefix(p.as_str())
            .and_then(|r| r.strip_prefix('_'))
    }) else {
        return Shape::Other;
    };
    let Some((env, tail)) = rest.split_once('_') else {
        return Shape::Malformed;
    };
    let env_ok = (1..=MAX_ENV_SEGMENT).contains(&env.len())
        && env
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !env_ok
        || tail.len() != RANDOM_CHARS + CHECKSUM_CHARS
        || !tail.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Shape::Malformed;
    }
    let (Some(body), Some(sum)) = (
        key.get(..key.len() - CHECKSUM_CHARS),
        key.get(key.len() - CHECKSUM_CHARS..),
    ) else {
        return Shape::Malformed;
    };
    if checksum(body).as_slice() == sum.as_bytes() {
        Shape::Valid
    } else {
        Shape::BadChecksum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefixes() -> Vec<String> {
        vec!["kg".into(), "acme".into()]
    }

    fn counter_fill() -> impl FnMut(&mut [u8]) -> Result<(), ()> {
        let mut n = 0u8;
        move |buf: &mut [u8]| {
            for b in buf.iter_mut() {
                *b = n;
                n = n.wrapping_add(37);
            }
            Ok(())
        }
    }

    #[test]
    fn a_composed_key_has_the_documented_shape_and_a_valid_checksum() {
        let random = random_chars(counter_fill()).unwrap();
        assert_eq!(random.len(), RANDOM_CHARS);
        let key = compose("kg", "live", &random);
        assert!(key.starts_with("kg_live_"), "{key}");
        assert_eq!(key.len(), "kg_live_".len() + 28);
        assert_eq!(classify(&key, &prefixes()), Shape::Valid);
        let test_key = compose("acme", "Staging-EU", &random);
        assert!(test_key.starts_with("acme_stagingeu_"), "{test_key}");
        assert_eq!(classify(&test_key, &prefixes()), Shape::Valid);
    }

    #[test]
    fn any_single_character_change_fails_the_checksum() {
        let key = compose("kg", "live", &random_chars(counter_fill()).unwrap());
        let start = "kg_live_".len();
        for i in start..key.len() {
            let mut bytes = key.clone().into_bytes();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let typo = String::from_utf8(bytes).unwrap();
            assert_eq!(classify(&typo, &prefixes()), Shape::BadChecksum, "{typo}");
        }
        // The environment is covered too.
        let moved = key.replacen("kg_live_", "kg_test_", 1);
        assert_eq!(classify(&moved, &prefixes()), Shape::BadChecksum);
    }

    #[test]
    fn keys_of_other_formats_or_prefixes_are_left_alone() {
        let p = prefixes();
        assert_eq!(classify(&"a".repeat(64), &p), Shape::Other);
        assert_eq!(classify("demo-acme-read-key", &p), Shape::Other);
        assert_eq!(classify("kgx_live_abc", &p), Shape::Other);
        assert_eq!(classify("kg_live_x", &[]), Shape::Other);
    }

    #[test]
    fn a_claimed_prefix_with_the_wrong_shape_is_malformed() {
        let p = prefixes();
        for bad in [
            "kg_live",
            "kg_live_",
            "kg__AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kg_Live_AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kg_live_AAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kg_live_AAAAAAAAAAAAAAAAAAAAAAAAAAA-",
            "kg_live_AAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "kg_live_x_AAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ] {
            assert_eq!(classify(bad, &p), Shape::Malformed, "{bad}");
        }
    }

    #[test]
    fn random_chars_are_uniform_over_base62_and_skip_biased_bytes() {
        // Only bytes >= 248 would be skipped: a source of nothing else never
        // yields a character, one of 0..62 yields exactly those digits.
        let mut calls = 0;
        let r = random_chars(|buf: &mut [u8]| {
            calls += 1;
            let v = if calls == 1 { 250 } else { 61 };
            buf.iter_mut().for_each(|b| *b = v);
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(r, "z".repeat(RANDOM_CHARS));
        assert_eq!(calls, 2);
    }

    #[test]
    fn the_published_regex_matches_generated_keys() {
        // The regex is documented; check its parts against the constants.
        assert!(KEY_REGEX.contains(&format!("{{{}}}", RANDOM_CHARS + CHECKSUM_CHARS)));
        assert!(KEY_REGEX.contains(&format!("{{0,{}}}", MAX_PREFIX_LEN - 1)));
        assert!(KEY_REGEX.contains(&format!("{{1,{MAX_ENV_SEGMENT}}}")));
    }

    #[test]
    fn the_documented_example_key_is_valid() {
        let p = prefixes();
        assert_eq!(
            classify("kg_live_4Vb0T9qLmZ2cXr8NyA1fKe0jDI6m", &p),
            Shape::Valid
        );
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(check_prefix("p", "kg").is_ok());
        assert!(check_prefix("p", "a1").is_ok());
        for bad in ["", "1a", "KG", "k_g", "abcdefghijk"] {
            assert_eq!(
                check_prefix("key_prefixes[0]", bad).unwrap_err().field,
                "key_prefixes[0]"
            );
        }
    }
}
