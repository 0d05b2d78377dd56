//! Path normalisation before route matching.
//!
//! Rules match the path an upstream would act on, so tricks such as
//! `/read/../admin`, `//admin`, `/%61dmin` or `/admin?x` cannot dodge a rule:
//! the query and fragment are dropped, percent-escapes decoded (once),
//! repeated slashes merged and dot segments resolved. What servers read in
//! different ways is refused instead: an encoded slash or backslash, a
//! control byte, an escape that decodes to `%` (a second decoding upstream
//! would see another path), and path parameters (`;`, raw or `%3B`), which
//! many servers strip (`/admin;x/users` is `/admin/users` to Tomcat or
//! Spring) while the rules would see another segment.

use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    BadEscape,
    AmbiguousByte,
}

const MAX_PATH: usize = 8192;

/// The normalized path; an already-normal one (the usual request) is
/// borrowed from `raw`, with no copy.
pub fn normalize(raw: &[u8]) -> Result<Cow<'_, str>, PathError> {
    normalize_with(raw, is_normal)
}

/// [`normalize`], with the test for paths that need no work passed in (the
/// tests check the shortcut against the full work).
fn normalize_with(
    raw: &[u8],
    already_normal: fn(&[u8]) -> bool,
) -> Result<Cow<'_, str>, PathError> {
    let raw = raw
        .split(|&b| b == b'?' || b == b'#')
        .next()
        .unwrap_or_default();
    if raw.first() != Some(&b'/') || raw.len() > MAX_PATH {
        return Err(PathError::NotAbsolute);
    }
    if already_normal(raw) {
        // The usual request path: nothing to decode or resolve, so the
        // result is the path itself, borrowed (no buffer at all).
        if let Ok(path) = std::str::from_utf8(raw) {
            return Ok(Cow::Borrowed(path));
        }
    }
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        if b == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let v = std::str::from_utf8(hex)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::BadEscape)?;
            if matches!(v, b'/' | b'\\' | b'%' | b';') || v < 0x20 || v == 0x7f {
                return Err(PathError::AmbiguousByte);
            }
            decoded.push(v);
            i += 3;
        } else {
            if b == b'\\' || b == b';' || b < 0x20 || b == 0x7f {
                return Err(PathError::AmbiguousByte);
            }
            decoded.push(b);
            i += 1;
        }
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    for seg in decoded.split(|&b| b == b'/') {
        match seg {
            b"" | b"." => {}
            b".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with(b"/") || decoded.ends_with(b"/.") || decoded.ends_with(b"/..");
    let mut out = Vec::with_capacity(decoded.len());
    for s in &segments {
        out.push(b'/');
        out.extend_from_slice(s);
    }
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push(b'/');
    }
    // Non-UTF-8 bytes are kept visible but harmless for matching; a UTF-8
    // path (the usual one) keeps its buffer instead of being copied.
    Ok(Cow::Owned(String::from_utf8(out).unwrap_or_else(|e| {
        String::from_utf8_lossy(e.as_bytes()).into_owned()
    })))
}

/// Whether `raw` (absolute, query cut) is already what [`normalize`]
/// returns: no escape, no refused byte, no empty, `.` or `..` segment
/// other than the one a trailing `/` leaves.
fn is_normal(raw: &[u8]) -> bool {
    let refused = |b: u8| b == b'%' || b == b'\\' || b == b';' || b < 0x20 || b == 0x7f;
    if raw.iter().any(|&b| refused(b)) {
        return false;
    }
    let Some(rest) = raw.strip_prefix(b"/") else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    let rest = rest.strip_suffix(b"/").unwrap_or(rest);
    !rest.is_empty()
        && rest
            .split(|&b| b == b'/')
            .all(|seg| !matches!(seg, b"" | b"." | b".."))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`normalize`] without its shortcut for paths already normal.
    fn slow(raw: &str) -> Result<Cow<'_, str>, PathError> {
        normalize_with(raw.as_bytes(), |_| false)
    }

    #[test]
    fn the_shortcut_for_normal_paths_changes_no_result() {
        let parts = [
            "", "/", "a", ".", "..", "%61", "b;", "é", "\\", "//", "x/", "?q", "#f",
        ];
        let mut checked = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    let p = format!("/{a}{b}/{c}");
                    assert_eq!(normalize(p.as_bytes()), slow(&p), "{p:?}");
                    checked += 1;
                }
            }
        }
        let invalid = b"/a/\xff/b";
        assert_eq!(
            normalize(invalid),
            normalize_with(invalid, |_| false),
            "non-UTF-8"
        );
        assert!(checked > 1000);
    }

    fn n(p: &str) -> Result<String, PathError> {
        normalize(p.as_bytes()).map(Cow::into_owned)
    }

    #[test]
    fn plain_paths_are_unchanged() {
        assert_eq!(n("/v1/items").unwrap(), "/v1/items");
        assert_eq!(n("/v1/items/").unwrap(), "/v1/items/");
        assert_eq!(n("/").unwrap(), "/");
    }

    #[test]
    fn query_and_fragment_are_dropped() {
        assert_eq!(n("/admin?x=/read").unwrap(), "/admin");
        assert_eq!(n("/admin#frag").unwrap(), "/admin");
    }

    #[test]
    fn dot_segments_and_double_slashes_resolve() {
        assert_eq!(n("/read/../admin").unwrap(), "/admin");
        assert_eq!(n("//admin").unwrap(), "/admin");
        assert_eq!(n("/./admin/./x").unwrap(), "/admin/x");
        assert_eq!(n("/../../admin").unwrap(), "/admin");
        assert_eq!(n("/admin/..").unwrap(), "/");
    }

    #[test]
    fn percent_escapes_decode_before_matching() {
        assert_eq!(n("/%61dmin").unwrap(), "/admin");
        assert_eq!(n("/read/%2e%2e/admin").unwrap(), "/admin");
    }

    #[test]
    fn ambiguous_or_broken_escapes_are_refused() {
        assert_eq!(n("/read%2fadmin"), Err(PathError::AmbiguousByte));
        assert_eq!(n("/read%5Cadmin"), Err(PathError::AmbiguousByte));
        assert_eq!(n("/a%00"), Err(PathError::AmbiguousByte));
        assert_eq!(n("/a\\b"), Err(PathError::AmbiguousByte));
        assert_eq!(n("/a%4"), Err(PathError::BadEscape));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("admin"), Err(PathError::NotAbsolute));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn path_parameters_and_double_escapes_are_refused() {
        for p in [
            "/admin;x=1/users",
            "/v1;/../admin",
            "/admin%3bx",
            "/admin%3B",
            "/v1/items;jsessionid=1",
            "/v1/%252e%252e/admin",
            "/%2561dmin",
        ] {
            assert_eq!(n(p), Err(PathError::AmbiguousByte), "{p}");
        }
        // In the query a ';' is the upstream's business, not a path's.
        assert_eq!(n("/v1/items?a=1;b=2").unwrap(), "/v1/items");
    }
}
