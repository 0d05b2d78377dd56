//! What the filter writes back: header edits on the request going upstream
//! and rate-limit headers on the reply. (Refusal bodies: [`crate::denial`].)

use super::decide::{Decision, Headers, Outcome};
use crate::config::{Policy, RateLimitHeaders, LOGGED_IDENTITY};
use crate::credential::Kind;
use crate::rate_limit::{policy_name, Policies, RateStatus};
use smallvec::{smallvec, SmallVec};

/// Header edits on the request before it goes upstream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UpstreamHeaders<'a> {
    /// Inline for the usual edits of an allowed request (no allocation).
    pub remove: SmallVec<[&'a str; 8]>,
    pub set: SmallVec<[(&'a str, &'a str); 8]>,
}

impl Decision {
    /// Request header edits: identity headers a client sent are always
    /// dropped; on success the credential is stripped and the identity set.
    /// A denied request never goes upstream, but Envoy's access log reads
    /// the identity of a request from these headers (envoy/envoy.yaml): a
    /// client's copies must not stand in a denial's record either.
    pub fn upstream_headers<'a>(
        &'a self,
        policy: &'a Policy,
        headers: &dyn Headers,
    ) -> UpstreamHeaders<'a> {
        let present = |name: &str| headers.has(name);
        let mut edits = UpstreamHeaders::default();
        match &self.outcome {
            // The filter removes only those the client sent.
            Outcome::Public | Outcome::Denied { .. } => edits.remove = policy.headers.all().into(),
            Outcome::Allowed { credential: c, .. } => {
                edits.remove = ["authorization", policy.api_key_header.as_str()]
                    .into_iter()
                    .filter(|h| present(h))
                    .collect();
                let h = &policy.headers;
                // A default key holds every scope: the upstream is told which.
                let scopes = match c.kind {
                    Kind::Default => policy.full_access_scopes.as_str(),
                    Kind::Scoped => c.scopes_header.as_str(),
                };
                edits.set = smallvec![
                    (h.tenant.as_str(), c.tenant.as_str()),
                    (h.environment.as_str(), c.environment.as_str()),
                    (h.key_id.as_str(), c.key_id.as_str()),
                    (h.scopes.as_str(), scopes),
                ];
                // Owner and metadata headers the key does not set must not
                // pass as the client sent them.
                match &c.owner {
                    Some(owner) => edits.set.push((h.owner.as_str(), owner.as_str())),
                    None => edits.remove.push(h.owner.as_str()),
                }
                for (field, header) in &h.metadata {
                    match c.metadata.iter().find(|(k, _)| k == field) {
                        Some((_, value)) => edits.set.push((header.as_str(), value.as_str())),
                        None => edits.remove.push(header.as_str()),
                    }
                }
                // Renamed identity headers: the default names the access log
                // reads must not pass as the client sent them either.
                for (_, name) in LOGGED_IDENTITY {
                    if present(name)
                        && !edits.set.iter().any(|(n, _)| *n == name)
                        && !edits.remove.contains(&name)
                    {
                        edits.remove.push(name);
                    }
                }
            }
        }
        edits
    }
}

/// Request header names that are an identity header spelled another way:
/// `_` for `-` (which CGI, WSGI, Rack and others fold into the same
/// variable) or another case. The exact names are removed or overwritten
/// by [`Decision::upstream_headers`]; these must go as well.
pub fn identity_spellings<'n>(
    policy: &Policy,
    names: impl IntoIterator<Item = &'n str>,
) -> Vec<&'n str> {
    let identity = policy.headers.all();
    names
        .into_iter()
        .filter(|name| {
            !identity.contains(name)
                && identity.iter().any(|id| {
                    id.len() == name.len()
                        && id
                            .bytes()
                            .zip(name.bytes())
                            .all(|(a, b)| a == b.to_ascii_lowercase() || (a == b'-' && b == b'_'))
                })
        })
        .collect()
}

/// Rate-limit response headers, in the enabled styles.
/// The IETF `RateLimit-Policy` value: every limit the request met, named
/// as `crate::rate_limit::policy_name` says (`"minute";q=100;w=60, …`).
pub fn policy_header(status: &RateStatus) -> String {
    let one = Policies::one(status.tag, status.limit);
    let policies = if status.policies.is_empty() {
        &one
    } else {
        &status.policies
    };
    let mut out = String::with_capacity(32 * policies.len());
    for (i, (tag, limit)) in policies.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&format!(
            "\"{}\";q={};w={}",
            policy_name(tag),
            limit.requests,
            limit.window_secs
        ));
    }
    out
}

pub fn rate_limit_headers(
    status: &RateStatus,
    styles: RateLimitHeaders,
    now_ns: u64,
) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(5);
    if styles.x_ratelimit {
        h.push(("x-ratelimit-limit", status.limit.requests.to_string()));
        h.push(("x-ratelimit-remaining", status.remaining.to_string()));
        h.push(("x-ratelimit-reset", status.reset_epoch_secs().to_string()));
    }
    if styles.ietf {
        h.push(("ratelimit-policy", policy_header(status)));
        h.push((
            "ratelimit",
            format!(
                "\"{}\";r={};t={}",
                policy_name(status.tag),
                status.remaining,
                status.reset_in_secs(now_ns)
            ),
        ));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::NOW;

    #[test]
    fn identity_headers_spelled_with_underscores_or_case_are_found() {
        let p = crate::testing::policy(vec![], "");
        let names = [
            "x_keygate_tenant",
            "x-keygate_key-id",
            "X-Keygate-Scopes",
            "x-keygate-tenant",
            "x_api_key",
            "x-keygate-tenants",
        ];
        assert_eq!(
            identity_spellings(&p, names),
            vec!["x_keygate_tenant", "x-keygate_key-id", "X-Keygate-Scopes"]
        );
    }

    #[test]
    fn rate_headers_report_both_styles_truthfully() {
        let (s, _) = crate::rate_limit::check(
            crate::rate_limit::RateLimit {
                requests: 100,
                window_secs: 60,
            },
            None,
            NOW,
        );
        let h = rate_limit_headers(&s, RateLimitHeaders::default(), NOW);
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        assert_eq!(get("x-ratelimit-limit"), "100");
        assert_eq!(get("x-ratelimit-remaining"), "99");
        assert_eq!(
            get("x-ratelimit-reset"),
            (NOW / 1_000_000_000 + 1).to_string()
        );
        assert_eq!(get("ratelimit-policy"), "\"default\";q=100;w=60");
        assert_eq!(get("ratelimit"), "\"default\";r=99;t=1");
        let only_x = RateLimitHeaders {
            x_ratelimit: true,
            ietf: false,
        };
        assert_eq!(rate_limit_headers(&s, only_x, NOW).len(), 3);
    }
}
