//! Key identity: the format of new key values (identifiable `kg_live_…` or
//! 64 hex digits), whole-key rolls, owners and metadata. Part of the
//! service layer; the doors (CLI, API, portal) call these.

use super::{random_hex32, Service};
use crate::error::{Error, Result};
use crate::store::StoredKey;
use keygate_core::credential::check_owner;
use keygate_core::hash::{sha256, to_hex};
use keygate_core::key_format;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Largest metadata object, serialised.
pub const MAX_METADATA_BYTES: usize = 4096;

/// The format of key values keygate generates.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyFormat {
    /// `<prefix>_<env>_<22 random base62><6 checksum>`: found by secret
    /// scanners, refused by checksum at the gate before any lookup.
    #[default]
    Identifiable,
    /// 64 lowercase hex digits (256 random bits), for platforms that need it.
    Hex64,
}

impl std::str::FromStr for KeyFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<KeyFormat, String> {
        match s {
            "identifiable" => Ok(KeyFormat::Identifiable),
            "hex64" => Ok(KeyFormat::Hex64),
            other => Err(format!(
                "'{other}' is no key format: use identifiable or hex64"
            )),
        }
    }
}

/// How a deployment makes new keys (`--key-format`, `--key-prefix`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyStyle {
    pub format: KeyFormat,
    pub prefix: String,
}

impl Default for KeyStyle {
    fn default() -> Self {
        KeyStyle {
            format: KeyFormat::Identifiable,
            prefix: key_format::DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl KeyStyle {
    /// Checks the prefix (naming `field`).
    pub fn new(format: KeyFormat, prefix: &str, field: &str) -> Result<KeyStyle> {
        key_format::check_prefix(field, prefix).map_err(|e| Error::bad(&e.field, e.message))?;
        Ok(KeyStyle {
            format,
            prefix: prefix.to_owned(),
        })
    }

    /// A new key value for a key of `environment`, from the OS CSPRNG.
    pub fn generate(&self, format: Option<KeyFormat>, environment: &str) -> Result<String> {
        match format.unwrap_or(self.format) {
            KeyFormat::Hex64 => random_hex32(),
            KeyFormat::Identifiable => {
                let random = key_format::random_chars(getrandom::fill)
                    .map_err(|e| Error::Random(e.to_string()))?;
                Ok(key_format::compose(&self.prefix, environment, &random))
            }
        }
    }
}

/// What a roll shows, exactly once.
#[derive(Serialize, Debug)]
pub struct Rolled {
    pub key_id: String,
    pub tenant: String,
    pub api_key: String,
    /// Until when the replaced value still works (absent: refused at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_key_expires_at: Option<u64>,
}

/// Checks an owner (`field` names the option or API field).
pub fn check_key_owner(field: &str, owner: &str) -> Result<()> {
    check_owner(field, owner).map_err(|e| Error::bad(field, e.message))
}

/// Checks a metadata value: a JSON object of at most [`MAX_METADATA_BYTES`]
/// serialised, with field names a header allowlist can name.
pub fn check_metadata(field: &str, value: &Value) -> Result<Map<String, Value>> {
    let Value::Object(map) = value else {
        return Err(Error::bad(field, "must be a JSON object"));
    };
    let size = serde_json::to_vec(value)
        .map_err(|e| Error::bad(field, e.to_string()))?
        .len();
    if size > MAX_METADATA_BYTES {
        return Err(Error::bad(
            field,
            format!("is {size} bytes serialised; at most {MAX_METADATA_BYTES}"),
        ));
    }
    for k in map.keys() {
        keygate_core::credential::check_metadata_field(&format!("{field}.{k}"), k)
            .map_err(|e| Error::bad(&e.field, e.message))?;
    }
    Ok(map.clone())
}

/// Parses `--metadata` JSON text.
pub fn parse_metadata(field: &str, text: &str) -> Result<Map<String, Value>> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| Error::bad(field, format!("is not JSON: {e}")))?;
    check_metadata(field, &value)
}

/// The metadata fields of `metadata` named in `fields` whose value is a
/// scalar that fits a header, as header values: what a push carries (the
/// rest never reaches Envoy). Strings as they are, numbers and booleans as
/// JSON text; objects, arrays, null and unfit strings are left out.
pub fn forwarded_metadata(
    metadata: Option<&Map<String, Value>>,
    fields: &[String],
) -> BTreeMap<String, String> {
    let Some(m) = metadata else {
        return BTreeMap::new();
    };
    fields
        .iter()
        .filter_map(|f| {
            let v = match m.get(f)? {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            keygate_core::credential::is_header_value(&v).then(|| (f.clone(), v))
        })
        .take(keygate_core::credential::MAX_FORWARDED_METADATA)
        .collect()
}

impl Service {
    pub fn key_style(&self) -> &KeyStyle {
        &self.key_style
    }

    pub fn set_key_style(&mut self, style: KeyStyle) {
        self.key_style = style;
    }

    /// Issues a new value for `key_id` (of `tenant`, if given): id, name,
    /// scopes, limits, owner, metadata, counters and logs stay; the old
    /// value works until `now + grace_secs` (0: refused at once), then 401.
    /// A second roll within the grace ends the first one's old value.
    pub fn roll_key(
        &self,
        tenant: Option<&str>,
        key_id: &str,
        grace_secs: u64,
        format: Option<KeyFormat>,
        now: u64,
    ) -> Result<Rolled> {
        if grace_secs > MAX_ROLL_GRACE_SECS {
            return Err(Error::bad(
                "--grace",
                format!("at most {MAX_ROLL_GRACE_SECS} seconds (30 days)"),
            ));
        }
        let environment = self.show_key(key_id).and_then(|k| match tenant {
            Some(t) if t != k.record.tenant => Err(Error::NoSuchKey(key_id.to_owned())),
            _ => Ok(k.record.environment),
        })?;
        // Generated outside the transaction: the randomness cannot fail inside it.
        let api_key = self.key_style.generate(format, &environment)?;
        let hash = to_hex(&sha256(api_key.as_bytes()));
        let rolled: StoredKey = self.update(|snap| {
            if snap.keys.iter().any(|k| {
                k.record.key_hash == hash || k.record.previous_key_hash.as_ref() == Some(&hash)
            }) {
                return Err(Error::Other(
                    "generated a key value already in use; try again".into(),
                ));
            }
            let k = snap.find_mut(key_id)?;
            if tenant.is_some_and(|t| t != k.record.tenant) {
                return Err(Error::NoSuchKey(key_id.to_owned()));
            }
            let old = std::mem::replace(&mut k.record.key_hash, hash.clone());
            if grace_secs > 0 {
                k.record.previous_key_hash = Some(old);
                k.record.previous_key_expires_at = Some(now + grace_secs);
            } else {
                k.record.previous_key_hash = None;
                k.record.previous_key_expires_at = None;
            }
            k.updated_at = now;
            Ok(k.clone())
        })?;
        Ok(Rolled {
            key_id: rolled.record.key_id,
            tenant: rolled.record.tenant,
            api_key,
            previous_key_expires_at: rolled.record.previous_key_expires_at,
        })
    }

    /// Sets or clears (None) the owner of `key_id`.
    pub fn set_owner(&self, key_id: &str, owner: Option<&str>, now: u64) -> Result<StoredKey> {
        if let Some(o) = owner {
            check_key_owner("--owner", o)?;
        }
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            k.record.owner = owner.map(str::to_owned);
            k.updated_at = now;
            Ok(k.clone())
        })
    }

    /// Replaces (or clears, None) the metadata of `key_id`.
    pub fn set_metadata(
        &self,
        key_id: &str,
        metadata: Option<Map<String, Value>>,
        now: u64,
    ) -> Result<StoredKey> {
        if let Some(m) = &metadata {
            check_metadata("--metadata", &Value::Object(m.clone()))?;
        }
        self.update(|snap| {
            let k = snap.find_mut(key_id)?;
            k.metadata = metadata.clone();
            k.updated_at = now;
            Ok(k.clone())
        })
    }
}

/// Longest grace a roll may give the old value.
pub const MAX_ROLL_GRACE_SECS: u64 = 30 * 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_must_be_a_small_object_with_name_like_fields() {
        assert!(check_metadata(
            "metadata",
            &serde_json::json!({"plan_tier": "gold", "n": 1})
        )
        .is_ok());
        for (bad, why) in [
            (serde_json::json!([1]), "object"),
            (serde_json::json!("x"), "object"),
            (serde_json::json!({"a": "x".repeat(5000)}), "at most 4096"),
            (serde_json::json!({"bad field": 1}), "may only contain"),
        ] {
            let e = check_metadata("metadata", &bad).unwrap_err().to_string();
            assert!(e.starts_with("metadata") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn only_named_scalar_fields_that_fit_a_header_are_forwarded() {
        let m = serde_json::json!({"tier": "gold", "n": 3, "ok": true, "obj": {"a": 1},
                                   "nl": "a\nb", "other": "x"});
        let Value::Object(m) = m else { unreachable!() };
        let fields: Vec<String> = ["tier", "n", "ok", "obj", "nl", "missing"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let f = forwarded_metadata(Some(&m), &fields);
        assert_eq!(
            f.into_iter().collect::<Vec<_>>(),
            vec![
                ("n".to_string(), "3".to_string()),
                ("ok".into(), "true".into()),
                ("tier".into(), "gold".into())
            ]
        );
    }

    #[test]
    fn generated_keys_follow_the_style() {
        let style = KeyStyle::new(KeyFormat::Identifiable, "acme", "--key-prefix").unwrap();
        let k = style.generate(None, "test").unwrap();
        assert!(k.starts_with("acme_test_"), "{k}");
        assert_eq!(
            key_format::classify(&k, &["acme".to_string()]),
            key_format::Shape::Valid
        );
        let h = style.generate(Some(KeyFormat::Hex64), "test").unwrap();
        assert!(keygate_core::hash::is_hex64(h.as_bytes()));
        assert_ne!(style.generate(None, "test").unwrap(), k);
        assert!(
            KeyStyle::new(KeyFormat::Identifiable, "Bad_", "--key-prefix")
                .unwrap_err()
                .to_string()
                .starts_with("--key-prefix")
        );
    }
}
