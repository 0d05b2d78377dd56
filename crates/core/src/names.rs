//! Name checks shared by the credential model, scopes, tokens, sync and
//! plugin configuration: what may go into headers, logs and shared-data keys.

use crate::error::ConfigError;

const MAX_NAME_LEN: usize = 128;

/// Names that go into headers, logs and shared-data keys: a safe alphabet.
pub fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(ConfigError::new(
            field,
            format!("must be 1 to {MAX_NAME_LEN} characters"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return Err(ConfigError::new(
            field,
            "may only contain letters, digits, '-', '_', '.', ':'",
        ));
    }
    Ok(())
}

/// Scope names: lowercase, so matching never depends on case.
pub fn check_scope_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 64 {
        return Err("a scope is 1 to 64 characters".into());
    }
    if !s.bytes().all(|b| {
        b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b':')
    }) {
        return Err(format!(
            "scope '{s}' may only contain a-z, 0-9, '-', '_', '.', ':'"
        ));
    }
    Ok(())
}

/// Header names the filter reads or writes: lowercase, and none Envoy or
/// the client relies on for something else.
pub fn check_header_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok {
        return Err(ConfigError::new(
            field,
            "must be a lowercase header name (a-z, 0-9, '-')",
        ));
    }
    if matches!(
        name,
        "authorization" | "host" | "content-length" | "transfer-encoding" | "cookie"
    ) {
        return Err(ConfigError::new(field, format!("'{name}' cannot be used")));
    }
    Ok(())
}
