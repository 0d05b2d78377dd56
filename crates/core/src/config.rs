//! Plugin configuration: the raw JSON users write ([`PluginConfig`]) and the
//! validated, indexed [`Policy`] every request is decided against. All
//! validation happens here, once, at load; errors name the offending field.

use crate::credential::{check_tenant_limits, Credential, CredentialRecord};
pub use crate::error::ConfigError;
use crate::hash::Digest;
use crate::names::{check_header_name, check_name, check_scope_name};
use crate::rate_limit::RateLimit;
use crate::scope::{RouteRuleConfig, Routes};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Guards requests (the normal listener).
    #[default]
    Gate,
    /// Accepts credential pushes from the sidecar (a loopback-only listener
    /// with the same `vm_id` as the gate).
    Sync,
}

/// The shared sync secret. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct SyncSecret(pub Vec<u8>);

impl fmt::Debug for SyncSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncSecret(..)")
    }
}

/// Environment variable the sync role reads its secret from (pass it to the
/// VM with `vm_config.environment_variables.host_env_keys`).
pub const SYNC_SECRET_ENV: &str = "KEYGATE_SYNC_SECRET";

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KeyFormat {
    /// Any printable key.
    #[default]
    Any,
    /// Keys must be 64 hex digits; anything else is refused before hashing.
    Hex64,
}

#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderNames {
    pub tenant: String,
    pub environment: String,
    pub key_id: String,
    pub scopes: String,
    /// The key's owner (a user of its tenant); absent for a key without one.
    pub owner: String,
    /// Metadata fields forwarded upstream: field name → header name. Only
    /// these fields (scalars) are pushed into Envoy at all.
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl Default for HeaderNames {
    fn default() -> Self {
        HeaderNames {
            tenant: "x-keygate-tenant".into(),
            environment: "x-keygate-environment".into(),
            key_id: "x-keygate-key-id".into(),
            scopes: "x-keygate-scopes".into(),
            owner: "x-keygate-owner".into(),
            metadata: Default::default(),
        }
    }
}

/// The default identity header names, field by field. `envoy/envoy.yaml`'s
/// access-log format reads these, so a client-sent copy is removed even when
/// the configuration renames the header: otherwise a format left at the
/// defaults would log the client's value next to a real decision.
pub const LOGGED_IDENTITY: [(&str, &str); 5] = [
    ("headers.tenant", "x-keygate-tenant"),
    ("headers.environment", "x-keygate-environment"),
    ("headers.key_id", "x-keygate-key-id"),
    ("headers.scopes", "x-keygate-scopes"),
    ("headers.owner", "x-keygate-owner"),
];

impl HeaderNames {
    /// Every identity header keygate sets, and the default names the access
    /// log reads ([`LOGGED_IDENTITY`]), so every one a client sends is
    /// removed.
    pub fn all(&self) -> Vec<&str> {
        let mut all = vec![
            self.tenant.as_str(),
            &self.environment,
            &self.key_id,
            &self.scopes,
            &self.owner,
        ];
        all.extend(self.metadata.values().map(String::as_str));
        for (_, name) in LOGGED_IDENTITY {
            if !all.contains(&name) {
                all.push(name);
            }
        }
        all
    }
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitHeaders {
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset` (epoch seconds).
    pub x_ratelimit: bool,
    /// IETF draft `RateLimit-Policy` and `RateLimit` structured fields.
    pub ietf: bool,
}

impl Default for RateLimitHeaders {
    fn default() -> Self {
        RateLimitHeaders {
            x_ratelimit: true,
            ietf: true,
        }
    }
}

fn default_hierarchy() -> Vec<String> {
    vec!["admin".into(), "write".into(), "read".into()]
}

/// The plugin configuration as written in Envoy's `configuration` field.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub key_format: KeyFormat,
    #[serde(default = "default_api_key_header")]
    pub api_key_header: String,
    #[serde(default)]
    pub credentials: Vec<CredentialRecord>,
    #[serde(default)]
    pub routes: Vec<RouteRuleConfig>,
    /// Scope required when no route matches; absent: see `unmatched`.
    #[serde(default)]
    pub default_scope: Option<String>,
    /// Without `default_scope`: "strictest" (default) needs the strongest
    /// scope of `scope_hierarchy` where no rule matches; "any_key" any valid key.
    #[serde(default)]
    pub unmatched: Option<crate::scope::Unmatched>,
    /// Strongest first; each scope implies those after it. Empty disables implication.
    #[serde(default = "default_hierarchy")]
    pub scope_hierarchy: Vec<String>,
    #[serde(default)]
    pub headers: HeaderNames,
    /// 0 (default): the client is the address Envoy computed (`source.address`,
    /// which follows the HCM's `use_remote_address` / `xff_num_trusted_hops`).
    /// N > 0: the Nth X-Forwarded-For entry from the right, as the header
    /// reaches the filter (with `use_remote_address: true` Envoy has already
    /// appended the peer, so count it).
    #[serde(default)]
    pub trusted_xff_hops: u32,
    /// Limit for keys that do not set their own; absent = no limit.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub rate_limit_headers: RateLimitHeaders,
    /// Realm in `WWW-Authenticate`.
    #[serde(default = "default_realm")]
    pub realm: String,
    /// Sync role: the shared secret pushes are signed with. Prefer the
    /// KEYGATE_SYNC_SECRET environment variable: config is visible in Envoy's
    /// config dump.
    #[serde(default)]
    pub sync_secret: Option<String>,
    /// Token exchange (`POST /auth/login` → short-lived bearer tokens); absent: off.
    #[serde(default)]
    pub tokens: Option<crate::token::TokenConfig>,
    /// Also log one JSON line per decision through Envoy's log (info level).
    #[serde(default)]
    pub log_decisions: bool,
    /// Expose each decision to Envoy's access log as filter state: what no
    /// header carries (see `access_log::AccessRecord::fields`; one object for
    /// an allowed request); false turns it off.
    #[serde(default = "default_true")]
    pub access_log_fields: bool,
    /// Prefixes of identifiable keys (`<prefix>_<env>_<random><checksum>`,
    /// see `key_format`) whose checksum the gate checks before any lookup;
    /// other keys are looked up as before. `[]` turns the check off.
    #[serde(default = "default_key_prefixes")]
    pub key_prefixes: Vec<String>,
}

fn default_key_prefixes() -> Vec<String> {
    vec![crate::key_format::DEFAULT_PREFIX.to_owned()]
}

fn default_true() -> bool {
    true
}

fn default_api_key_header() -> String {
    "x-api-key".into()
}

fn default_realm() -> String {
    "keygate".into()
}

/// The compiled configuration. Built once per VM in `on_configure`.
#[derive(Debug)]
pub struct Policy {
    pub role: Role,
    pub key_format: KeyFormat,
    pub api_key_header: String,
    /// Credentials from plugin configuration, by key hash. The sidecar's
    /// credentials live in Envoy shared data, a second source the filter
    /// consults when a hash is not here.
    pub credentials: HashMap<Digest, Rc<Credential>>,
    /// The same credentials by key id (tokens name their key by id).
    pub by_key_id: HashMap<String, Digest>,
    /// Each key id's index in `credentials`, for error messages.
    key_id_index: HashMap<String, usize>,
    pub routes: Routes,
    pub headers: HeaderNames,
    pub trusted_xff_hops: u32,
    pub rate_limit: Option<RateLimit>,
    pub rate_limit_headers: RateLimitHeaders,
    pub realm: String,
    pub sync_secret: Option<SyncSecret>,
    pub tokens: Option<crate::token::Tokens>,
    pub log_decisions: bool,
    pub access_log_fields: bool,
    /// Identifiable-key prefixes checked by checksum before any lookup.
    pub key_prefixes: Vec<String>,
    /// What a default (full-access) key sends as its scopes header: every
    /// scope this gate knows, `scope_hierarchy` first, then those rules
    /// name outside it.
    pub full_access_scopes: String,
}

const MAX_XFF_HOPS: u32 = 16;

impl Policy {
    /// Where plugin config defines `key_id` (`credentials[i]`), for errors.
    pub fn key_id_source(&self, key_id: &str) -> String {
        self.key_id_index
            .get(key_id)
            .map_or_else(|| "credentials".into(), |i| format!("credentials[{i}]"))
    }

    /// Parses and validates plugin configuration JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Policy, ConfigError> {
        Policy::from_json_with_env(bytes, &|_| None)
    }

    /// As [`Policy::from_json`], with secrets the config leaves out read
    /// through `env` ([`SYNC_SECRET_ENV`], [`crate::token::SIGNING_KEYS_ENV`]):
    /// values in config are visible in Envoy's config dump.
    pub fn from_json_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Policy, ConfigError> {
        let mut raw: PluginConfig = parse_json(bytes)?;
        if raw.sync_secret.is_none() {
            raw.sync_secret = env(SYNC_SECRET_ENV).filter(|s| !s.is_empty());
        }
        let tokens = match raw.tokens.take() {
            Some(cfg) => Some(crate::token::Tokens::compile(
                cfg,
                env(crate::token::SIGNING_KEYS_ENV),
            )?),
            None => None,
        };
        let mut policy = Policy::try_from(raw)?;
        policy.tokens = tokens;
        Ok(policy)
    }
}

/// Deserializes `bytes`, naming the field a type, value or unknown-field
/// error is about (`rate_limit.requests: invalid type: string "5", …`):
/// serde's own message names only the offending value or key.
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        json_error(&field, e.into_inner())
    })?;
    // Trailing characters after the object.
    de.end().map_err(|e| json_error("", e))?;
    Ok(value)
}

fn json_error(field: &str, e: serde_json::Error) -> ConfigError {
    let message = if e.is_syntax() || e.is_eof() {
        format!("not valid JSON: {e}")
    } else {
        e.to_string()
    };
    ConfigError::new(field, message)
}

/// The `cfg:ids` entry with `policy`'s key ids merged in (other gate configs
/// sharing the VM keep theirs; an unreadable entry is replaced).
pub fn merge_config_ids(current: Option<&[u8]>, policy: &Policy) -> Vec<u8> {
    let mut all: std::collections::BTreeMap<String, String> = current
        .filter(|b| !b.is_empty())
        .and_then(|b| serde_json::from_slice(b).ok())
        .unwrap_or_default();
    for key_id in policy.by_key_id.keys() {
        all.insert(key_id.clone(), policy.key_id_source(key_id));
    }
    serde_json::to_vec(&all).unwrap_or_default()
}

/// Refuses a plugin config defining a key id that the store holds for
/// another key (`held`: the store's live credential hash for an id), naming
/// both. Checked in a stable order, so the error is the same on every run.
pub fn check_store_ids<E>(
    policy: &Policy,
    mut held: impl FnMut(&str) -> Result<Option<Digest>, E>,
) -> Result<Result<(), ConfigError>, E> {
    let mut ids: Vec<(&String, &Digest)> = policy.by_key_id.iter().collect();
    ids.sort();
    for (key_id, hash) in ids {
        if held(key_id)?.is_some_and(|h| h != *hash) {
            return Ok(Err(ConfigError::new(
                &format!("{}.key_id", policy.key_id_source(key_id)),
                format!("'{key_id}' is also a key in the credential store (pushed by the sidecar); key ids must be unique across plugin config and store"),
            )));
        }
    }
    Ok(Ok(()))
}

impl TryFrom<PluginConfig> for Policy {
    type Error = ConfigError;

    fn try_from(raw: PluginConfig) -> Result<Policy, ConfigError> {
        check_header_name("api_key_header", &raw.api_key_header)?;
        // The access log reads identity from the default names: a key header
        // under one of them would be logged, another field's value under one
        // would be logged as the wrong fact.
        if LOGGED_IDENTITY
            .iter()
            .any(|(_, n)| *n == raw.api_key_header)
        {
            return Err(ConfigError::new(
                "api_key_header",
                "must not be an identity header name the access log reads (x-keygate-tenant, x-keygate-environment, x-keygate-key-id, x-keygate-scopes, x-keygate-owner)",
            ));
        }
        let h = &raw.headers;
        for (field, name) in [
            ("headers.tenant", &h.tenant),
            ("headers.environment", &h.environment),
            ("headers.key_id", &h.key_id),
            ("headers.scopes", &h.scopes),
            ("headers.owner", &h.owner),
        ] {
            check_header_name(field, name)?;
            if *name == raw.api_key_header {
                return Err(ConfigError::new(field, "must differ from api_key_header"));
            }
            if let Some((owner, _)) = LOGGED_IDENTITY
                .iter()
                .find(|(f, n)| n == name && f != &field)
            {
                return Err(ConfigError::new(
                    field,
                    format!("'{name}' is the access log's header for {owner}"),
                ));
            }
        }
        check_metadata_headers(h, &raw.api_key_header)?;
        if raw.key_prefixes.len() > MAX_KEY_PREFIXES {
            return Err(ConfigError::new(
                "key_prefixes",
                format!("at most {MAX_KEY_PREFIXES} prefixes"),
            ));
        }
        for (i, p) in raw.key_prefixes.iter().enumerate() {
            crate::key_format::check_prefix(&format!("key_prefixes[{i}]"), p)?;
        }
        for (i, s) in raw.scope_hierarchy.iter().enumerate() {
            check_scope_name(s)
                .map_err(|e| ConfigError::new(&format!("scope_hierarchy[{i}]"), e))?;
        }
        if raw.trusted_xff_hops > MAX_XFF_HOPS {
            return Err(ConfigError::new(
                "trusted_xff_hops",
                format!("must be 0 to {MAX_XFF_HOPS}"),
            ));
        }
        if let Some(rl) = &raw.rate_limit {
            rl.validate().map_err(|e| e.under("rate_limit"))?;
        }
        check_name("realm", &raw.realm)?;
        let sync_secret = match (raw.role, raw.sync_secret) {
            (Role::Sync, None) => {
                return Err(ConfigError::new(
                    "sync_secret",
                    format!("the sync role needs a secret (sync_secret, or {SYNC_SECRET_ENV} in vm_config.environment_variables)"),
                ))
            }
            (Role::Sync, Some(s)) if s.len() < crate::sync::MIN_SECRET_LEN => {
                return Err(ConfigError::new(
                    "sync_secret",
                    format!("must be at least {} characters", crate::sync::MIN_SECRET_LEN),
                ))
            }
            (Role::Sync, Some(s)) => Some(SyncSecret(s.into_bytes())),
            (Role::Gate, _) => None,
        };
        let routes = Routes::compile_with(
            &raw.routes,
            raw.default_scope.as_deref(),
            raw.unmatched,
            &raw.scope_hierarchy,
        )?;
        let mut credentials = HashMap::with_capacity(raw.credentials.len());
        let mut ids = HashMap::with_capacity(raw.credentials.len());
        for (i, r) in raw.credentials.iter().enumerate() {
            let at = format!("credentials[{i}]");
            let c = Credential::try_from(r).map_err(|e| e.under(&at))?;
            if ids.insert(c.key_id.clone(), c.key_hash).is_some() {
                return Err(ConfigError::new(
                    &format!("{at}.key_id"),
                    format!("'{}' is used twice", c.key_id),
                ));
            }
            if credentials.insert(c.key_hash, Rc::new(c)).is_some() {
                return Err(ConfigError::new(
                    &format!("{at}.key_hash"),
                    "the same key hash is used twice",
                ));
            }
        }
        // A rolled key's old value finds the same credential until its deadline.
        let rolled: Vec<(usize, Digest, Rc<Credential>)> = raw
            .credentials
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let c = credentials.get(&ids.get(&r.key_id).copied()?)?;
                Some((i, c.previous_key?.0, c.clone()))
            })
            .collect();
        for (i, old, c) in rolled {
            if credentials.insert(old, c).is_some() {
                return Err(ConfigError::new(
                    &format!("credentials[{i}].previous_key_hash"),
                    "is another credential's key hash",
                ));
            }
        }
        check_tenant_limits(&raw.credentials).map_err(|e| ConfigError::new("credentials", e))?;
        let mut known: Vec<&str> = raw.scope_hierarchy.iter().map(String::as_str).collect();
        for s in routes.required_scopes() {
            if !known.contains(&s) {
                known.push(s);
            }
        }
        let full_access_scopes = known.join(" ");
        Ok(Policy {
            role: raw.role,
            key_format: raw.key_format,
            api_key_header: raw.api_key_header,
            credentials,
            key_id_index: raw
                .credentials
                .iter()
                .enumerate()
                .map(|(i, r)| (r.key_id.clone(), i))
                .collect(),
            by_key_id: ids,
            routes,
            headers: raw.headers,
            trusted_xff_hops: raw.trusted_xff_hops,
            rate_limit: raw.rate_limit,
            rate_limit_headers: raw.rate_limit_headers,
            realm: raw.realm,
            sync_secret,
            tokens: None,
            log_decisions: raw.log_decisions,
            access_log_fields: raw.access_log_fields,
            key_prefixes: raw.key_prefixes,
            full_access_scopes,
        })
    }
}

const MAX_KEY_PREFIXES: usize = 8;
/// Most metadata fields a gate forwards.
pub const MAX_METADATA_HEADERS: usize = 16;

/// Metadata field names are names (`check_name`); their headers are header
/// names, distinct from each other and from every other identity header.
fn check_metadata_headers(h: &HeaderNames, api_key_header: &str) -> Result<(), ConfigError> {
    if h.metadata.len() > MAX_METADATA_HEADERS {
        return Err(ConfigError::new(
            "headers.metadata",
            format!("at most {MAX_METADATA_HEADERS} fields"),
        ));
    }
    let fixed = [&h.tenant, &h.environment, &h.key_id, &h.scopes, &h.owner];
    let mut seen = std::collections::HashSet::new();
    for (field, header) in &h.metadata {
        let at = format!("headers.metadata.{field}");
        crate::credential::check_metadata_field(&at, field)?;
        check_header_name(&at, header)?;
        let logged = LOGGED_IDENTITY.iter().any(|(_, n)| n == header);
        if header == api_key_header || fixed.contains(&header) || logged || !seen.insert(header) {
            return Err(ConfigError::new(
                &at,
                format!("'{header}' is already used by another header"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(json: &str) -> ConfigError {
        Policy::from_json(json.as_bytes()).unwrap_err()
    }

    #[test]
    fn renamed_identity_headers_still_strip_the_names_the_access_log_reads() {
        let p = Policy::from_json(
            br#"{"headers":{"tenant":"x-tenant","key_id":"x-key-id","environment":"x-env","owner":"x-owner","scopes":"x-scopes"}}"#,
        )
        .unwrap();
        let all = p.headers.all();
        for (_, logged) in LOGGED_IDENTITY {
            assert!(all.contains(&logged), "{logged} not stripped: {all:?}");
        }
        assert!(all.contains(&"x-tenant") && all.contains(&"x-key-id"));
        // Defaults: each name once.
        let d = HeaderNames::default();
        assert_eq!(d.all().len(), 5);
    }

    #[test]
    fn a_header_the_access_log_reads_as_identity_is_refused_for_anything_else() {
        let e = err(r#"{"api_key_header":"x-keygate-key-id"}"#);
        assert_eq!(e.field, "api_key_header");
        let e = err(r#"{"headers":{"tenant":"x-keygate-key-id","key_id":"x-id"}}"#);
        assert_eq!(e.field, "headers.tenant");
        assert!(e.to_string().contains("headers.key_id"), "{e}");
        let e = err(r#"{"headers":{"tenant":"x-tenant","metadata":{"tier":"x-keygate-tenant"}}}"#);
        assert_eq!(e.field, "headers.metadata.tier");
        // A field keeping its own default name is fine.
        assert!(Policy::from_json(br#"{"headers":{"tenant":"x-keygate-tenant"}}"#).is_ok());
    }

    #[test]
    fn config_key_ids_are_recorded_and_checked_against_the_store() {
        let h = "a".repeat(64);
        let p = Policy::from_json(
            format!(r#"{{"credentials":[{{"key_id":"x","key_hash":"{h}","tenant":"t"}},{{"key_id":"cfg","key_hash":"{}","tenant":"t"}}]}}"#, "b".repeat(64)).as_bytes(),
        )
        .unwrap();
        let merged = merge_config_ids(Some(br#"{"other":"credentials[0]"}"#), &p);
        let ids: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&merged).unwrap();
        assert_eq!(ids["cfg"], "credentials[1]");
        assert_eq!(ids["other"], "credentials[0]");
        let none = |_: &str| Ok::<_, ()>(None);
        assert!(check_store_ids(&p, none).unwrap().is_ok());
        let same = |id: &str| Ok::<_, ()>((id == "x").then_some([0xaa; 32]));
        assert!(
            check_store_ids(&p, same).unwrap().is_ok(),
            "the same key is no conflict"
        );
        let other = |id: &str| Ok::<_, ()>((id == "cfg").then_some([1; 32]));
        let e = check_store_ids(&p, other).unwrap().unwrap_err();
        assert_eq!(e.field, "credentials[1].key_id");
        assert!(e.message.contains("'cfg'") && e.message.contains("credential store"));
        assert_eq!(check_store_ids(&p, |_| Err("host")).unwrap_err(), "host");
    }

    #[test]
    fn empty_object_is_a_valid_config_with_defaults() {
        let p = Policy::from_json(b"{}").unwrap();
        assert_eq!(p.role, Role::Gate);
        assert_eq!(p.api_key_header, "x-api-key");
        assert_eq!(p.headers.tenant, "x-keygate-tenant");
        assert!(p.rate_limit.is_none());
    }

    #[test]
    fn mistyped_values_are_refused_naming_their_field_path() {
        let e = err(r#"{"rate_limit": {"requests": "5", "window_secs": 60}}"#);
        assert_eq!(e.field, "rate_limit.requests", "{e}");
        assert!(e.message.contains("invalid type: string"), "{e}");
        let e = err(r#"{"credentials": [{"key_id": "a", "key_hash": 7}]}"#);
        assert_eq!(e.field, "credentials[0].key_hash", "{e}");
        let e = err(r#"{"role": "gateway"}"#);
        assert_eq!(e.field, "role", "{e}");
        assert!(e.message.contains("unknown variant `gateway`"), "{e}");
        let e = err(r#"{"rate_limit": {"requests": 5, "window_secs": 60, "burst": 1}}"#);
        assert_eq!(e.field, "rate_limit.burst", "{e}");
        assert!(e.message.contains("unknown field `burst`"), "{e}");
        // The message carries no prefix of its own: callers add one.
        assert!(
            !e.to_string().contains("invalid plugin configuration"),
            "{e}"
        );
        let e = err(r#"{} x"#);
        assert_eq!(e.field, "");
        assert!(e.message.contains("not valid JSON"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_json_are_refused_with_the_field_named() {
        assert!(err(r#"{"rate_limits": {}}"#)
            .to_string()
            .contains("unknown field `rate_limits`"));
        assert!(err("not json").to_string().contains("not valid JSON"));
        assert!(err(r#"{"trusted_xff_hops": -1}"#)
            .to_string()
            .contains("invalid value"));
    }

    #[test]
    fn nested_errors_carry_their_path() {
        let e = err(r#"{"credentials":[{"key_id":"a","key_hash":"zz","tenant":"t"}]}"#);
        assert_eq!(e.field, "credentials[0].key_hash");
        let e = err(r#"{"rate_limit":{"requests":0,"window_secs":60}}"#);
        assert_eq!(e.to_string(), "rate_limit.requests: must be at least 1");
        let e = err(r#"{"headers":{"tenant":"X Tenant"}}"#);
        assert_eq!(e.field, "headers.tenant");
        let e = err(r#"{"trusted_xff_hops": 99}"#);
        assert_eq!(e.field, "trusted_xff_hops");
        let e = err(r#"{"api_key_header": "authorization"}"#);
        assert_eq!(e.field, "api_key_header");
    }

    #[test]
    fn key_prefixes_and_identity_headers_are_checked_naming_the_field() {
        assert_eq!(Policy::from_json(b"{}").unwrap().key_prefixes, vec!["kg"]);
        assert_eq!(
            err(r#"{"key_prefixes":["kg","Bad"]}"#).field,
            "key_prefixes[1]"
        );
        assert_eq!(
            err(r#"{"headers":{"owner":"X Owner"}}"#).field,
            "headers.owner"
        );
        let e = err(r#"{"headers":{"metadata":{"tier":"x-keygate-tenant"}}}"#);
        assert_eq!(e.field, "headers.metadata.tier");
        let e = err(r#"{"headers":{"metadata":{"a":"x-m","b":"x-m"}}}"#);
        assert_eq!(e.field, "headers.metadata.b");
        let e = err(r#"{"headers":{"metadata":{"bad field":"x-m"}}}"#);
        assert_eq!(e.field, "headers.metadata.bad field");
        let p = Policy::from_json(br#"{"headers":{"metadata":{"tier":"x-m-tier"}}}"#).unwrap();
        assert!(
            p.headers.all().contains(&"x-m-tier") && p.headers.all().contains(&"x-keygate-owner")
        );
    }

    #[test]
    fn sync_role_needs_a_long_enough_secret_from_config_or_env() {
        assert_eq!(err(r#"{"role":"sync"}"#).field, "sync_secret");
        assert_eq!(
            err(r#"{"role":"sync","sync_secret":"short"}"#).field,
            "sync_secret"
        );
        let long = "s".repeat(32);
        let env = |v: &str| (v == SYNC_SECRET_ENV).then(|| "s".repeat(32));
        let p = Policy::from_json_with_env(br#"{"role":"sync"}"#, &env).unwrap();
        assert_eq!(p.sync_secret, Some(SyncSecret(long.into_bytes())));
        assert!(!format!("{p:?}").contains("ssss"));
        // The gate role ignores a secret.
        assert!(Policy::from_json_with_env(b"{}", &env)
            .unwrap()
            .sync_secret
            .is_none());
    }

    #[test]
    fn duplicate_credentials_and_tenant_limits_are_refused() {
        let h = "a".repeat(64);
        let e = err(&format!(
            r#"{{"credentials":[{{"key_id":"a","key_hash":"{h}","tenant":"t"}},{{"key_id":"b","key_hash":"{h}","tenant":"t"}}]}}"#
        ));
        assert_eq!(e.field, "credentials[1].key_hash");
        let creds: Vec<String> = (0..2)
            .map(|i| {
                format!(
                    r#"{{"key_id":"k{i}","key_hash":"{}","tenant":"t","kind":"default"}}"#,
                    format!("{i}").repeat(64)
                )
            })
            .collect();
        let e = err(&format!(r#"{{"credentials":[{}]}}"#, creds.join(",")));
        assert_eq!(e.field, "credentials");
    }
}
