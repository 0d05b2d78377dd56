//! The credential model: the record as written in plugin config, the sync
//! protocol and the sidecar store ([`CredentialRecord`]), and its validated,
//! ready-to-use form ([`Credential`]).

use crate::error::ConfigError;
// Re-exported: the sidecar validates names with it.
use crate::hash::{ct_eq, parse_hex_digest, Digest};
use crate::ip_rules::parse_allowed;
use crate::limits::{
    check_limits, rules, seed_counters_with, Counters, Credits, Limit, QuotaUsed, Rule,
};
pub use crate::names::check_name;
use crate::names::check_scope_name;
use crate::rate_limit::RateLimit;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Most scoped credentials one tenant may hold.
pub const MAX_SCOPED_PER_TENANT: usize = 5;
/// Most default (full-access) credentials one tenant may hold.
pub const MAX_DEFAULT_PER_TENANT: usize = 1;
const MAX_SCOPES: usize = 32;
pub(crate) const MAX_ALLOWED_IPS: usize = 256;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Full access: passes every scope rule. At most one per tenant.
    Default,
    /// Limited to its scopes. At most five per tenant.
    #[default]
    Scoped,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    #[default]
    Active,
    Inactive,
}

/// A credential as it travels: plugin config, sync pushes, the sidecar store.
/// Only hashes; never a key or a secret.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CredentialRecord {
    pub key_id: String,
    /// Hex SHA-256 of the key as the client presents it. (Left out of
    /// shared-data entries, whose name already is the hash.)
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub key_hash: String,
    /// Hex SHA-256 of the secret, for key:secret (Basic) credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    /// A secret replaced by rotation, still accepted until `previous_secret_expires_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub kind: Kind,
    pub tenant: String,
    #[serde(
        default = "default_environment",
        skip_serializing_if = "is_default_environment"
    )]
    pub environment: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// CIDRs or plain addresses, IPv4 or IPv6; empty means any address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<String>,
    /// Overrides the plugin's default rate limit for this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub status: Status,
    /// Unix seconds after which the key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// The user of the tenant the key belongs to (sent upstream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// A key value replaced by a roll, still accepted until
    /// `previous_key_expires_at` (same key id, same counter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_expires_at: Option<u64>,
    /// Metadata fields forwarded upstream, as header values (the store keeps
    /// the whole object; only fields a gate forwards travel).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// The key's own limits besides `rate_limit` (`crate::limits`): any mix
    /// of windows and calendar quotas, at most one per period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// The plan whose limits apply when the key has none of its own. In a
    /// push, the key's plan or else its tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The tenant has shared limits (`tl:<tenant>`, pushed by sync) this key
    /// counts against too. Set by the sidecar when it builds a push.
    #[serde(default, skip_serializing_if = "core::ops::Not::not")]
    pub tenant_limits: bool,
    /// Day and month quota usage counted from the request log, pushed by a
    /// full sync so quotas survive an Envoy restart (`crate::limits::QuotaUsed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota_used: Vec<QuotaUsed>,
    /// Usage credits, counted on top of the key's limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<Credits>,
}

fn default_environment() -> String {
    "live".to_owned()
}

fn is_default_environment(e: &str) -> bool {
    e == "live"
}

// Defaults are left out when serialising: shared data holds one record per
// credential, so every byte counts a million times.
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// A validated credential, as the decision uses it.
#[derive(Clone, Debug, PartialEq)]
pub struct Credential {
    pub key_id: String,
    pub key_hash: Digest,
    pub secret_hash: Option<Digest>,
    pub previous_secret: Option<(Digest, u64)>,
    pub kind: Kind,
    pub tenant: String,
    pub environment: String,
    pub scopes: Vec<String>,
    /// `scopes` joined with spaces, as sent upstream.
    pub scopes_header: String,
    pub allowed_ips: Vec<IpNet>,
    pub rate_limit: Option<RateLimit>,
    pub active: bool,
    pub expires_at: Option<u64>,
    pub owner: Option<String>,
    /// The key value a roll replaced, and until when it still works.
    pub previous_key: Option<(Digest, u64)>,
    /// Forwarded metadata fields and their header values.
    pub metadata: Vec<(String, String)>,
    pub limits: Vec<Limit>,
    /// `rate_limit` and `limits` as the decision applies them.
    pub own_rules: Vec<Rule>,
    pub plan: Option<String>,
    pub tenant_limits: bool,
    /// Counters to start from when Envoy holds none (`quota_used`); not part
    /// of the record a shared-data entry reads back.
    pub seed: Counters,
    pub credits: Option<Credits>,
}

/// A record's digests, each already decoded but any error not yet raised:
/// validation reports them where it always has, among the other checks. A
/// binary sync push carries them as bytes ([`RecordHashes::of_bytes`]);
/// its record's hex fields are then left empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHashes {
    key_hash: Result<Digest, &'static str>,
    secret_hash: Option<Result<Digest, &'static str>>,
    previous_secret_hash: Option<Result<Digest, &'static str>>,
    previous_key_hash: Option<Result<Digest, &'static str>>,
}

impl RecordHashes {
    /// Those of a record's hex fields.
    pub fn parse(r: &CredentialRecord) -> RecordHashes {
        let opt = |h: &Option<String>| h.as_deref().map(parse_hex_digest);
        RecordHashes {
            key_hash: parse_hex_digest(&r.key_hash),
            secret_hash: opt(&r.secret_hash),
            previous_secret_hash: opt(&r.previous_secret_hash),
            previous_key_hash: opt(&r.previous_key_hash),
        }
    }

    /// Digests carried as bytes.
    pub fn of_bytes(
        key_hash: Digest,
        secret_hash: Option<Digest>,
        previous_secret_hash: Option<Digest>,
        previous_key_hash: Option<Digest>,
    ) -> RecordHashes {
        RecordHashes {
            key_hash: Ok(key_hash),
            secret_hash: secret_hash.map(Ok),
            previous_secret_hash: previous_secret_hash.map(Ok),
            previous_key_hash: previous_key_hash.map(Ok),
        }
    }
}

impl TryFrom<&CredentialRecord> for Credential {
    type Error = ConfigError;

    fn try_from(r: &CredentialRecord) -> Result<Self, ConfigError> {
        Credential::build(Cow::Borrowed(r), RecordHashes::parse(r))
    }
}

impl Credential {
    /// [`Credential::try_from`] of a record the caller no longer needs: its
    /// strings move into the credential instead of being copied.
    pub fn from_record(r: CredentialRecord) -> Result<Credential, ConfigError> {
        let hashes = RecordHashes::parse(&r);
        Credential::build(Cow::Owned(r), hashes)
    }

    /// A record whose digests came as bytes (`hashes`; its hex fields are
    /// not read), validated like any other.
    pub fn from_parts(
        r: CredentialRecord,
        hashes: RecordHashes,
    ) -> Result<Credential, ConfigError> {
        Credential::build(Cow::Owned(r), hashes)
    }

    fn build(r: Cow<'_, CredentialRecord>, h: RecordHashes) -> Result<Self, ConfigError> {
        check_name("key_id", &r.key_id)?;
        check_name("tenant", &r.tenant)?;
        check_name("environment", &r.environment)?;
        let key_hash = h.key_hash.map_err(|e| ConfigError::new("key_hash", e))?;
        let secret_hash = h
            .secret_hash
            .transpose()
            .map_err(|e| ConfigError::new("secret_hash", e))?;
        let previous_secret = match (h.previous_secret_hash, r.previous_secret_expires_at) {
            (None, None) => None,
            (Some(h), Some(until)) => Some((
                h.map_err(|e| ConfigError::new("previous_secret_hash", e))?,
                until,
            )),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "previous_secret_expires_at",
                    "is required with previous_secret_hash",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "previous_secret_hash",
                    "is required with previous_secret_expires_at",
                ))
            }
        };
        if previous_secret.is_some() && secret_hash.is_none() {
            return Err(ConfigError::new(
                "secret_hash",
                "is required with previous_secret_hash",
            ));
        }
        if r.scopes.len() > MAX_SCOPES {
            return Err(ConfigError::new(
                "scopes",
                format!("at most {MAX_SCOPES} scopes"),
            ));
        }
        for (i, s) in r.scopes.iter().enumerate() {
            check_scope_name(s).map_err(|e| ConfigError::new(&format!("scopes[{i}]"), e))?;
        }
        if r.allowed_ips.len() > MAX_ALLOWED_IPS {
            return Err(ConfigError::new(
                "allowed_ips",
                format!("at most {MAX_ALLOWED_IPS} entries"),
            ));
        }
        let allowed_ips = r
            .allowed_ips
            .iter()
            .enumerate()
            .map(|(i, s)| {
                parse_allowed(s).map_err(|e| ConfigError::new(&format!("allowed_ips[{i}]"), e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(rl) = &r.rate_limit {
            rl.validate().map_err(|e| e.under("rate_limit"))?;
        }
        if let Some(owner) = &r.owner {
            check_owner("owner", owner)?;
        }
        let previous_key = match (h.previous_key_hash, r.previous_key_expires_at) {
            (None, None) => None,
            (Some(h), Some(until)) => Some((
                h.map_err(|e| ConfigError::new("previous_key_hash", e))?,
                until,
            )),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    "previous_key_expires_at",
                    "is required with previous_key_hash",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::new(
                    "previous_key_hash",
                    "is required with previous_key_expires_at",
                ))
            }
        };
        if previous_key.is_some_and(|(h, _)| h == key_hash) {
            return Err(ConfigError::new(
                "previous_key_hash",
                "must differ from key_hash",
            ));
        }
        check_forwarded_metadata(&r.metadata)?;
        check_limits("limits", &r.limits)?;
        // The counter keeps 32 bits of uses (`crate::limits::RuleKind::Credits`).
        if r.credits.is_some_and(|c| c.balance > u64::from(u32::MAX)) {
            return Err(ConfigError::new(
                "credits.balance",
                format!("at most {}", u32::MAX),
            ));
        }
        if let Some(plan) = &r.plan {
            check_name("plan", plan)?;
        }
        let own_rules = r
            .rate_limit
            .map(Rule::of_rate_limit)
            .into_iter()
            .chain(rules(&r.limits, false))
            .collect();
        let seed = seed_counters_with(&r.quota_used, false, r.credits);
        let (kind, rate_limit, active) = (r.kind, r.rate_limit, r.status == Status::Active);
        let (expires_at, tenant_limits, credits) = (r.expires_at, r.tenant_limits, r.credits);
        // Moved out of an owned record; copied (only what is kept) from a borrowed one.
        let (key_id, tenant, environment, scopes, owner, metadata, limits, plan) = match r {
            Cow::Owned(r) => (
                r.key_id,
                r.tenant,
                r.environment,
                r.scopes,
                r.owner,
                r.metadata,
                r.limits,
                r.plan,
            ),
            Cow::Borrowed(r) => (
                r.key_id.clone(),
                r.tenant.clone(),
                r.environment.clone(),
                r.scopes.clone(),
                r.owner.clone(),
                r.metadata.clone(),
                r.limits.clone(),
                r.plan.clone(),
            ),
        };
        Ok(Credential {
            key_id,
            key_hash,
            secret_hash,
            previous_secret,
            kind,
            tenant,
            environment,
            scopes_header: scopes.join(" "),
            scopes,
            allowed_ips,
            rate_limit,
            active,
            expires_at,
            owner,
            previous_key,
            metadata: metadata.into_iter().collect(),
            limits,
            own_rules,
            plan,
            tenant_limits,
            seed,
            credits,
        })
    }
}

impl Credential {
    /// Parses and validates a JSON [`CredentialRecord`] (a shared-data entry).
    pub fn from_json(bytes: &[u8]) -> Result<Credential, ConfigError> {
        let record: CredentialRecord =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::new("", e.to_string()))?;
        Credential::try_from(&record)
    }

    pub fn is_expired(&self, now_secs: u64) -> bool {
        self.expires_at.is_some_and(|t| now_secs >= t)
    }

    /// Whether `presented` (a key hash) is this credential's key, or the key
    /// a roll replaced while its grace lasts. Constant time in the digests.
    pub fn key_matches(&self, presented: &Digest, now_secs: u64) -> bool {
        let current = ct_eq(&self.key_hash, presented);
        let previous = self
            .previous_key
            .is_some_and(|(h, until)| now_secs < until && ct_eq(&h, presented));
        current | previous
    }

    /// Checks a presented secret against the current secret and, until its
    /// grace deadline, the one it replaced. Constant time in the digests.
    pub fn secret_matches(&self, presented: &Digest, now_secs: u64) -> bool {
        let current = self.secret_hash.is_some_and(|h| ct_eq(&h, presented));
        let previous = self
            .previous_secret
            .is_some_and(|(h, until)| now_secs < until && ct_eq(&h, presented));
        current | previous
    }
}

/// Longest owner name.
pub const MAX_OWNER_LEN: usize = 128;
/// Most forwarded metadata fields per key, and the longest value.
pub const MAX_FORWARDED_METADATA: usize = 16;
pub const MAX_METADATA_VALUE_LEN: usize = 256;

/// An owner goes into a header and the access log: a user name, e-mail
/// address or service-account id (letters, digits, `-_.:@+`).
pub fn check_owner(field: &str, owner: &str) -> Result<(), ConfigError> {
    let ok = (1..=MAX_OWNER_LEN).contains(&owner.len())
        && owner
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            field,
            format!("must be 1 to {MAX_OWNER_LEN} characters: letters, digits, '-', '_', '.', ':', '@', '+'"),
        ))
    }
}

/// A metadata field name: a name (`check_name`) of at most 64 characters.
pub fn check_metadata_field(field: &str, name: &str) -> Result<(), ConfigError> {
    check_name(field, name)?;
    if name.len() > 64 {
        return Err(ConfigError::new(
            field,
            "a metadata field name is at most 64 characters",
        ));
    }
    Ok(())
}

/// Whether `value` can go into a header as it is: printable ASCII (spaces
/// inside), not empty, no surrounding space, at most
/// [`MAX_METADATA_VALUE_LEN`].
pub fn is_header_value(value: &str) -> bool {
    (1..=MAX_METADATA_VALUE_LEN).contains(&value.len())
        && value.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
        && !value.starts_with(' ')
        && !value.ends_with(' ')
}

fn check_forwarded_metadata(m: &BTreeMap<String, String>) -> Result<(), ConfigError> {
    if m.len() > MAX_FORWARDED_METADATA {
        return Err(ConfigError::new(
            "metadata",
            format!("at most {MAX_FORWARDED_METADATA} forwarded fields"),
        ));
    }
    for (k, v) in m {
        check_metadata_field(&format!("metadata.{k}"), k)?;
        if !is_header_value(v) {
            return Err(ConfigError::new(
                &format!("metadata.{k}"),
                format!("must be 1 to {MAX_METADATA_VALUE_LEN} printable ASCII characters"),
            ));
        }
    }
    Ok(())
}

/// Enforces the per-tenant seed rules over a whole set of records.
pub fn check_tenant_limits<'a>(
    records: impl IntoIterator<Item = &'a CredentialRecord>,
) -> Result<(), String> {
    let mut counts: std::collections::HashMap<&str, (usize, usize)> = Default::default();
    for r in records {
        let c = counts.entry(r.tenant.as_str()).or_default();
        match r.kind {
            Kind::Default => c.0 += 1,
            Kind::Scoped => c.1 += 1,
        }
        if c.0 > MAX_DEFAULT_PER_TENANT {
            return Err(format!(
                "tenant '{}' has more than {MAX_DEFAULT_PER_TENANT} default credential",
                r.tenant
            ));
        }
        if c.1 > MAX_SCOPED_PER_TENANT {
            return Err(format!(
                "tenant '{}' has more than {MAX_SCOPED_PER_TENANT} scoped credentials",
                r.tenant
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::hash::{sha256, to_hex};

    pub use crate::testing::record;

    #[test]
    fn a_record_with_its_digests_as_bytes_validates_to_the_same_credential() {
        let mut r = record("k", "t");
        r.secret_hash = Some(to_hex(&sha256(b"s")));
        r.previous_key_hash = Some(to_hex(&sha256(b"k-old")));
        r.previous_key_expires_at = Some(9);
        let by_hex = Credential::try_from(&r).unwrap();
        assert_eq!(Credential::from_record(r.clone()).unwrap(), by_hex);
        let bytes = RecordHashes::of_bytes(
            sha256(b"k"),
            Some(sha256(b"s")),
            None,
            Some(sha256(b"k-old")),
        );
        let hexless = CredentialRecord {
            key_hash: String::new(),
            secret_hash: None,
            previous_key_hash: None,
            ..r.clone()
        };
        assert_eq!(Credential::from_parts(hexless, bytes).unwrap(), by_hex);
        // Errors come in the order they always did: the key id before the hash.
        let bad = CredentialRecord {
            key_id: "bad id".into(),
            key_hash: "nope".into(),
            ..r.clone()
        };
        let err = Credential::from_record(bad).unwrap_err().to_string();
        assert!(err.starts_with("key_id"), "{err}");
        // A deadline without its hash is refused whichever way digests come.
        let orphan = CredentialRecord {
            previous_key_hash: None,
            ..r
        };
        let bytes = RecordHashes::of_bytes(sha256(b"k"), None, None, None);
        let err = Credential::from_parts(orphan, bytes)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("previous_key_hash"), "{err}");
    }

    #[test]
    fn record_json_defaults_to_scoped_active_live() {
        let r: CredentialRecord = serde_json::from_str(&format!(
            r#"{{"key_id":"k","key_hash":"{}","tenant":"t"}}"#,
            "a".repeat(64)
        ))
        .unwrap();
        assert_eq!(
            (r.kind, r.status, r.environment.as_str()),
            (Kind::Scoped, Status::Active, "live")
        );
    }

    #[test]
    fn unknown_record_field_is_rejected() {
        let err = serde_json::from_str::<CredentialRecord>(
            r#"{"key_id":"k","key_hash":"00","tenant":"t","secret":"oops"}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("unknown field `secret`"));
    }

    #[test]
    fn validation_names_the_bad_field() {
        let mut r = record("k", "t");
        r.allowed_ips = vec!["10.0.0.0/8".into(), "10.0.0/8".into()];
        assert_eq!(
            Credential::try_from(&r).unwrap_err().field,
            "allowed_ips[1]"
        );
        let mut r = record("k", "t");
        r.key_hash = "xyz".into();
        assert_eq!(Credential::try_from(&r).unwrap_err().field, "key_hash");
        let mut r = record("k", "t");
        r.tenant = "bad tenant".into();
        assert_eq!(Credential::try_from(&r).unwrap_err().field, "tenant");
        let mut r = record("k", "t");
        r.previous_secret_hash = Some("a".repeat(64));
        assert_eq!(
            Credential::try_from(&r).unwrap_err().field,
            "previous_secret_expires_at"
        );
    }

    #[test]
    fn credits_beyond_what_the_counter_holds_are_refused() {
        let mut r = record("k", "t");
        r.credits = Some(crate::limits::Credits {
            balance: u64::from(u32::MAX) + 1,
            serial: 1,
            monthly: false,
            granted_at: 0,
        });
        assert_eq!(
            Credential::try_from(&r).unwrap_err().field,
            "credits.balance"
        );
        r.credits = r.credits.map(|c| crate::limits::Credits {
            balance: u64::from(u32::MAX),
            ..c
        });
        assert!(Credential::try_from(&r).is_ok());
    }

    #[test]
    fn previous_secret_works_only_until_its_deadline() {
        let mut r = record("k", "t");
        r.secret_hash = Some(to_hex(&sha256(b"new")));
        r.previous_secret_hash = Some(to_hex(&sha256(b"old")));
        r.previous_secret_expires_at = Some(100);
        let c = Credential::try_from(&r).unwrap();
        assert!(c.secret_matches(&sha256(b"new"), 500));
        assert!(c.secret_matches(&sha256(b"old"), 99));
        assert!(!c.secret_matches(&sha256(b"old"), 100));
        assert!(!c.secret_matches(&sha256(b"other"), 0));
    }

    #[test]
    fn tenant_limits_allow_one_default_and_five_scoped() {
        let mut rs: Vec<_> = (0..5).map(|i| record(&i.to_string(), "t")).collect();
        let mut d = record("d", "t");
        d.kind = Kind::Default;
        rs.push(d.clone());
        assert!(check_tenant_limits(&rs).is_ok());
        rs.push(record("6", "t"));
        assert!(check_tenant_limits(&rs).unwrap_err().contains("5 scoped"));
        rs.pop();
        rs.push(d);
        assert!(check_tenant_limits(&rs).unwrap_err().contains("1 default"));
        // Another tenant has its own budget.
        assert!(check_tenant_limits(&[record("x", "u"), record("y", "u")]).is_ok());
    }
}
