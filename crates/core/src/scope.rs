//! Route rules (method + path → required scope, or public) and scope
//! implication (admin ⊇ write ⊇ read when configured).

use crate::error::ConfigError;
// Re-exported: the sidecar validates scopes with it.
use crate::credential::{Credential, Kind};
pub use crate::names::check_scope_name;
use serde::Deserialize;
use std::rc::Rc;

/// A route rule as written in plugin configuration.
#[derive(Deserialize, Clone, Debug, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteRuleConfig {
    /// HTTP methods the rule applies to; absent or empty means all.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Exact path match.
    #[serde(default)]
    pub path: Option<String>,
    /// Segment-aware prefix: `/admin` matches `/admin` and `/admin/x`, not `/administrator`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Scope the credential must hold.
    #[serde(default)]
    pub scope: Option<String>,
    /// No credential needed.
    #[serde(default)]
    pub public: bool,
}

/// What a request no rule matches needs, when `default_scope` is not set.
#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// The strongest scope of `scope_hierarchy`: an unusual method or path
    /// gets no weaker treatment than the strictest rule. With an empty
    /// hierarchy it is any valid key if no rule requires a scope, and a
    /// configuration error if one does.
    #[default]
    Strictest,
    /// Any valid key, whatever its scopes.
    AnyKey,
}

/// What a request needs, after route matching.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Public,
    Authenticated,
    Scope(RequiredScope),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequiredScope {
    /// Shared with each decision that names it (no copy per request).
    pub name: Rc<str>,
    /// The scope itself and every scope that implies it.
    pub satisfied_by: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathMatch {
    Exact(String),
    Prefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) if p.ends_with('/') => path.starts_with(p.as_str()),
            PathMatch::Prefix(p) => {
                path.starts_with(p.as_str())
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/'))
            }
        }
    }
}

#[derive(Clone, Debug)]
struct RouteRule {
    methods: Vec<String>,
    path: PathMatch,
    access: Access,
}

/// Compiled route table: first matching rule wins, else `default`.
#[derive(Clone, Debug)]
pub struct Routes {
    rules: Vec<RouteRule>,
    default: Access,
}

/// `hierarchy` lists scopes strongest first: each implies all after it.
fn required(name: &str, hierarchy: &[String]) -> RequiredScope {
    let satisfied_by = match hierarchy.iter().position(|s| s == name) {
        Some(i) => hierarchy.iter().take(i + 1).cloned().collect(),
        None => vec![name.to_owned()],
    };
    RequiredScope {
        name: Rc::from(name),
        satisfied_by,
    }
}

fn check_path(field: &str, p: &str) -> Result<(), ConfigError> {
    if !p.starts_with('/') {
        return Err(ConfigError::new(field, "must start with '/'"));
    }
    if p.contains(['?', '#', '%', '\\'])
        || p.contains("//")
        || p.split('/').any(|s| s == "." || s == "..")
    {
        return Err(ConfigError::new(
            field,
            "must be a normalised path (no query, escapes, '//' or dot segments)",
        ));
    }
    Ok(())
}

impl Routes {
    pub fn compile(
        rules: &[RouteRuleConfig],
        default_scope: Option<&str>,
        hierarchy: &[String],
    ) -> Result<Routes, ConfigError> {
        Routes::compile_with(rules, default_scope, None, hierarchy)
    }

    /// As [`Routes::compile`], with what an unmatched request needs when
    /// `default_scope` is absent (None: [`Unmatched::Strictest`]).
    pub fn compile_with(
        rules: &[RouteRuleConfig],
        default_scope: Option<&str>,
        unmatched: Option<Unmatched>,
        hierarchy: &[String],
    ) -> Result<Routes, ConfigError> {
        let mut compiled = Vec::with_capacity(rules.len());
        for (i, r) in rules.iter().enumerate() {
            let at = |f: &str| format!("routes[{i}].{f}");
            let path = match (&r.path, &r.path_prefix) {
                (Some(p), None) => {
                    check_path(&at("path"), p)?;
                    PathMatch::Exact(p.clone())
                }
                (None, Some(p)) => {
                    check_path(&at("path_prefix"), p)?;
                    PathMatch::Prefix(p.clone())
                }
                _ => {
                    return Err(ConfigError::new(
                        &format!("routes[{i}]"),
                        "needs exactly one of path, path_prefix",
                    ))
                }
            };
            let access = match (&r.scope, r.public) {
                (Some(_), true) => {
                    return Err(ConfigError::new(
                        &at("public"),
                        "a public route cannot also require a scope",
                    ))
                }
                (None, true) => Access::Public,
                (Some(s), false) => {
                    check_scope_name(s).map_err(|e| ConfigError::new(&at("scope"), e))?;
                    Access::Scope(required(s, hierarchy))
                }
                (None, false) => Access::Authenticated,
            };
            let mut methods = Vec::with_capacity(r.methods.len());
            for (j, m) in r.methods.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(ConfigError::new(
                        &at(&format!("methods[{j}]")),
                        "must be an HTTP method name",
                    ));
                }
                methods.push(m.to_ascii_uppercase());
            }
            compiled.push(RouteRule {
                methods,
                path,
                access,
            });
        }
        let scoped = compiled
            .iter()
            .any(|r| matches!(r.access, Access::Scope(_)));
        let default = match (default_scope, unmatched, hierarchy.first()) {
            (None, None | Some(Unmatched::Strictest), Some(strongest)) => {
                Access::Scope(required(strongest, hierarchy))
            }
            // Rules require scopes but none is the strictest: "strictest"
            // would quietly become "any valid key", weaker than every rule.
            (None, None | Some(Unmatched::Strictest), None) if scoped => {
                return Err(ConfigError::new(
                    "scope_hierarchy",
                    "is empty, so no scope is the strictest for requests no route matches: \
                     set default_scope, or \"unmatched\": \"any_key\" to accept any valid key there",
                ))
            }
            (None, _, _) => Access::Authenticated,
            (Some(_), Some(Unmatched::AnyKey), _) => {
                return Err(ConfigError::new(
                    "unmatched",
                    "'any_key' contradicts default_scope: give one of them",
                ))
            }
            (Some(s), _, _) => {
                check_scope_name(s).map_err(|e| ConfigError::new("default_scope", e))?;
                Access::Scope(required(s, hierarchy))
            }
        };
        Ok(Routes {
            rules: compiled,
            default,
        })
    }

    /// `path` must already be normalised (see [`crate::path::normalize`]).
    /// Every scope a rule or the unmatched default requires, in rule order.
    pub fn required_scopes(&self) -> impl Iterator<Item = &str> {
        self.rules
            .iter()
            .map(|r| &r.access)
            .chain(std::iter::once(&self.default))
            .filter_map(|a| match a {
                Access::Scope(s) => Some(&*s.name),
                _ => None,
            })
    }

    pub fn access(&self, method: &str, path: &str) -> &Access {
        self.rules
            .iter()
            .find(|r| {
                (r.methods.is_empty() || r.methods.iter().any(|m| m == method))
                    && r.path.matches(path)
            })
            .map_or(&self.default, |r| &r.access)
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// True when some rule is public, so requests may legitimately carry no credential.
    pub fn has_public(&self) -> bool {
        self.rules.iter().any(|r| r.access == Access::Public)
    }
}

/// Default credentials pass every scope rule; scoped ones need a satisfying scope.
pub fn grants(cred: &Credential, need: &RequiredScope) -> bool {
    cred.kind == Kind::Default || cred.scopes.iter().any(|s| need.satisfied_by.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h() -> Vec<String> {
        vec!["admin".into(), "write".into(), "read".into()]
    }

    fn rule(methods: &[&str], prefix: &str, scope: Option<&str>, public: bool) -> RouteRuleConfig {
        RouteRuleConfig {
            methods: methods.iter().map(|s| s.to_string()).collect(),
            path_prefix: Some(prefix.into()),
            scope: scope.map(Into::into),
            public,
            ..Default::default()
        }
    }

    fn scope_of(a: &Access) -> Option<&str> {
        match a {
            Access::Scope(s) => Some(&*s.name),
            _ => None,
        }
    }

    #[test]
    fn first_matching_rule_wins_by_method_and_prefix() {
        let routes = Routes::compile(
            &[
                rule(&[], "/health", None, true),
                rule(&["get"], "/v1", Some("read"), false),
                rule(&["POST", "DELETE"], "/v1", Some("write"), false),
                rule(&[], "/admin", Some("admin"), false),
            ],
            None,
            &h(),
        )
        .unwrap();
        assert_eq!(routes.access("GET", "/health"), &Access::Public);
        assert_eq!(scope_of(routes.access("GET", "/v1/items")), Some("read"));
        assert_eq!(scope_of(routes.access("POST", "/v1/items")), Some("write"));
        assert_eq!(
            scope_of(routes.access("GET", "/admin/users")),
            Some("admin")
        );
        // Unmatched: the strictest scope, whatever the method's spelling.
        for (method, path) in [
            ("GET", "/administrator"),
            ("get", "/v1/items"),
            ("PROPFIND", "/v1/items"),
            ("PUT", "/v1/items"),
        ] {
            assert_eq!(scope_of(routes.access(method, path)), Some("admin"));
        }
    }

    #[test]
    fn unmatched_requests_need_what_the_config_says() {
        let rules = [rule(&["GET"], "/v1", Some("read"), false)];
        let any = Routes::compile_with(&rules, None, Some(Unmatched::AnyKey), &h()).unwrap();
        assert_eq!(any.access("POST", "/v1"), &Access::Authenticated);
        // An empty hierarchy has no strictest scope: refused where rules
        // require scopes, any valid key where none does.
        let flat = Routes::compile_with(&rules, None, None, &[]);
        assert_eq!(flat.unwrap_err().field, "scope_hierarchy");
        let flat = Routes::compile_with(&rules, None, Some(Unmatched::Strictest), &[]);
        assert_eq!(flat.unwrap_err().field, "scope_hierarchy");
        let flat = Routes::compile_with(&rules, None, Some(Unmatched::AnyKey), &[]).unwrap();
        assert_eq!(flat.access("POST", "/v1"), &Access::Authenticated);
        let flat = Routes::compile_with(&rules, Some("read"), None, &[]).unwrap();
        assert_eq!(scope_of(flat.access("POST", "/v1")), Some("read"));
        let unscoped = [rule(&[], "/v1", None, false)];
        let flat = Routes::compile_with(&unscoped, None, None, &[]).unwrap();
        assert_eq!(flat.access("POST", "/other"), &Access::Authenticated);
        let write = Routes::compile_with(&rules, Some("write"), None, &h()).unwrap();
        assert_eq!(scope_of(write.access("POST", "/v1")), Some("write"));
        let both = Routes::compile_with(&rules, Some("write"), Some(Unmatched::AnyKey), &h());
        assert_eq!(both.unwrap_err().field, "unmatched");
    }

    #[test]
    fn exact_paths_match_only_themselves() {
        let r = RouteRuleConfig {
            path: Some("/webhooks/stripe".into()),
            public: true,
            ..Default::default()
        };
        let routes = Routes::compile(&[r], Some("read"), &h()).unwrap();
        assert_eq!(routes.access("POST", "/webhooks/stripe"), &Access::Public);
        assert_eq!(
            scope_of(routes.access("POST", "/webhooks/stripe/x")),
            Some("read")
        );
    }

    #[test]
    fn hierarchy_lets_stronger_scopes_satisfy_weaker_ones() {
        let need = required("read", &h());
        assert_eq!(need.satisfied_by, vec!["admin", "write", "read"]);
        assert_eq!(required("admin", &h()).satisfied_by, vec!["admin"]);
        assert_eq!(required("billing", &h()).satisfied_by, vec!["billing"]);
        assert_eq!(required("read", &[]).satisfied_by, vec!["read"]);
    }

    #[test]
    fn bad_rules_name_their_field() {
        let e = Routes::compile(&[rule(&[], "v1", None, false)], None, &h()).unwrap_err();
        assert_eq!(e.field, "routes[0].path_prefix");
        let e = Routes::compile(&[rule(&[], "/a/../b", None, false)], None, &h()).unwrap_err();
        assert_eq!(e.field, "routes[0].path_prefix");
        let e = Routes::compile(&[rule(&[], "/a", Some("w"), true)], None, &h()).unwrap_err();
        assert_eq!(e.field, "routes[0].public");
        let e = Routes::compile(&[rule(&["G T"], "/a", None, false)], None, &h()).unwrap_err();
        assert_eq!(e.field, "routes[0].methods[0]");
        let e = Routes::compile(&[RouteRuleConfig::default()], None, &h()).unwrap_err();
        assert_eq!(e.field, "routes[0]");
        let e = Routes::compile(&[], Some("Bad Scope"), &h()).unwrap_err();
        assert_eq!(e.field, "default_scope");
    }
}
