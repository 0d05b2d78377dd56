//! `keygate logs`: the requests made with credentials, from Envoy's JSON
//! access log (the format in envoy/envoy.yaml), filtered and tabulated.

use serde::Deserialize;
use std::io::BufRead;
use std::time::{Duration, SystemTime};

/// One access-log record; fields keygate does not need are ignored.
#[derive(Deserialize, Debug, Clone, serde::Serialize)]
pub struct Record {
    #[serde(default)]
    pub time: Option<String>,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// The key's owner (absent in lines from before owners were logged).
    #[serde(default)]
    pub owner: Option<String>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub client_ip: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default)]
    pub decision: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    /// A number here even though Envoy's access log can only print the
    /// filter's field as a string ("4"): filter state has no numeric type
    /// that Envoy's JSON formatter writes as a bare number.
    #[serde(
        default,
        deserialize_with = "keygate_control::ingest::number_or_numeric_text"
    )]
    pub rate_remaining: Option<u64>,
}

pub struct Filter {
    pub key: Option<String>,
    pub tenant: Option<String>,
    pub since: Option<SystemTime>,
    /// `4xx`, `429`, `2xx`…
    pub status: Option<String>,
}

pub fn parse_status_filter(s: &str) -> Result<String, String> {
    let ok = s.len() == 3
        && s.as_bytes()[0].is_ascii_digit()
        && s[1..].bytes().all(|b| b.is_ascii_digit() || b == b'x');
    let ok = ok && (s.ends_with("xx") || s.bytes().all(|b| b.is_ascii_digit()));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("status filter '{s}' should look like 4xx or 403"))
    }
}

impl Filter {
    fn matches(&self, r: &Record) -> bool {
        // Only requests made with a credential.
        let Some(key_id) = &r.key_id else {
            return false;
        };
        if self.key.as_ref().is_some_and(|k| k != key_id)
            || self
                .tenant
                .as_ref()
                .is_some_and(|t| Some(t) != r.tenant.as_ref())
        {
            return false;
        }
        if let Some(want) = &self.status {
            let got = r.status.map(|s| s.to_string()).unwrap_or_default();
            let hit = got.len() == 3
                && want
                    .bytes()
                    .zip(got.bytes())
                    .all(|(w, g)| w == b'x' || w == g);
            if !hit {
                return false;
            }
        }
        if let Some(since) = self.since {
            let at = r
                .time
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).ok());
            if at.is_none_or(|at| at < since) {
                return false;
            }
        }
        true
    }
}

impl Record {
    /// As envoy/envoy.yaml logs them: a field joining two sources is ""
    /// when neither has it, and the identity fields (read from request
    /// headers keygate sets) count only in a record keygate decided: Envoy
    /// logs a request it refuses before any filter runs with whatever
    /// identity headers the client sent.
    fn normalized(mut self) -> Record {
        let decided = self.decision.as_deref().is_some_and(|d| !d.is_empty());
        for field in [&mut self.key_id, &mut self.tenant, &mut self.owner] {
            if !decided || field.as_deref() == Some("") {
                *field = None;
            }
        }
        self
    }
}

/// Reads records from `input`, skipping lines that are not JSON records.
pub fn read(input: impl BufRead, filter: &Filter) -> Vec<Record> {
    input
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| serde_json::from_str::<Record>(&l).ok())
        .map(Record::normalized)
        .filter(|r| filter.matches(r))
        .collect()
}

pub fn since(d: Duration) -> SystemTime {
    SystemTime::now()
        .checked_sub(d)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

pub fn print_table(w: &mut impl std::io::Write, records: &[Record]) -> std::io::Result<()> {
    // Envoy prints an unset filter-state field as "" or "-".
    let s = |v: &Option<String>| {
        v.clone()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "-".into())
    };
    writeln!(
        w,
        "{:<24} {:<22} {:<20} {:<7} {:<32} {:<16} {:<6} REASON",
        "TIME", "KEY ID", "OWNER", "METHOD", "PATH", "CLIENT IP", "STATUS"
    )?;
    for r in records {
        writeln!(
            w,
            "{:<24} {:<22} {:<20} {:<7} {:<32} {:<16} {:<6} {}",
            s(&r.time),
            s(&r.key_id),
            s(&r.owner),
            s(&r.method),
            s(&r.path),
            s(&r.client_ip),
            r.status.map_or("-".into(), |v| v.to_string()),
            r.reason.clone().unwrap_or_default()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = r#"{"time":"2026-11-24T02:12:24.582Z","key_id":"k1","tenant":"acme","method":"GET","path":"/v1","client_ip":"127.0.0.1","status":200,"decision":"allowed","reason":null}
not json at all
{"time":"2026-11-24T02:12:25.000Z","key_id":null,"method":"GET","path":"/health","status":200,"decision":"public"}
{"time":"2026-11-24T02:13:00.000Z","key_id":"k2","tenant":"beta","method":"POST","path":"/v1","status":403,"decision":"denied","reason":"insufficient_scope"}
{"time":"2026-11-24T02:14:00.000Z","key_id":"k1","tenant":"acme","method":"GET","path":"/v1","status":429,"decision":"denied","reason":"rate_limited"}"#;

    fn run(f: Filter) -> Vec<Option<u16>> {
        read(LOG.as_bytes(), &f).iter().map(|r| r.status).collect()
    }

    fn none() -> Filter {
        Filter {
            key: None,
            tenant: None,
            since: None,
            status: None,
        }
    }

    #[test]
    fn the_table_shows_the_owner_and_a_dash_without_one() {
        let log = concat!(
            r#"{"time":"t1","key_id":"k1","owner":"alice@example.com","status":200,"decision":"allowed"}"#,
            "\n",
            r#"{"time":"t2","key_id":"k2","owner":"-","status":200,"decision":"allowed"}"#,
            "\n",
            r#"{"time":"t3","key_id":"k3","status":200,"decision":"allowed"}"#
        );
        let mut out = Vec::new();
        print_table(&mut out, &read(log.as_bytes(), &none())).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.lines().next().is_some_and(|h| h.contains(" OWNER ")),
            "{out}"
        );
        let owners: Vec<_> = out
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(2).unwrap_or_default())
            .collect();
        assert_eq!(owners, ["alice@example.com", "-", "-"], "{out}");
    }

    #[test]
    fn only_requests_with_a_credential_are_listed() {
        assert_eq!(run(none()), vec![Some(200), Some(403), Some(429)]);
    }

    #[test]
    fn a_record_keygate_did_not_decide_names_no_key() {
        // Envoy answered these itself; the identity is what a client sent.
        // And a public request's two-source fields are "".
        let log = concat!(
            r#"{"time":"t1","key_id":"victim-key","tenant":"victim","status":400}"#,
            "\n",
            r#"{"time":"t2","key_id":"","tenant":"","status":200,"decision":"public"}"#,
        );
        assert!(read(log.as_bytes(), &none()).is_empty());
        let by_tenant = Filter {
            tenant: Some("victim".into()),
            ..none()
        };
        assert!(read(log.as_bytes(), &by_tenant).is_empty());
    }

    #[test]
    fn filters_by_key_tenant_status_and_time() {
        assert_eq!(
            run(Filter {
                key: Some("k1".into()),
                ..none()
            }),
            vec![Some(200), Some(429)]
        );
        assert_eq!(
            run(Filter {
                tenant: Some("beta".into()),
                ..none()
            }),
            vec![Some(403)]
        );
        assert_eq!(
            run(Filter {
                status: Some("4xx".into()),
                ..none()
            }),
            vec![Some(403), Some(429)]
        );
        assert_eq!(
            run(Filter {
                status: Some("429".into()),
                ..none()
            }),
            vec![Some(429)]
        );
        let t = humantime::parse_rfc3339("2026-11-24T02:13:30Z").unwrap();
        assert_eq!(
            run(Filter {
                since: Some(t),
                ..none()
            }),
            vec![Some(429)]
        );
    }

    #[test]
    fn rate_remaining_is_a_number_whether_logged_as_string_or_number() {
        let log = concat!(
            r#"{"key_id":"k1","decision":"allowed","status":200,"rate_remaining":"4"}"#,
            "\n",
            r#"{"key_id":"k1","decision":"allowed","status":200,"rate_remaining":3}"#,
            "\n",
            r#"{"key_id":"k1","decision":"allowed","status":401,"rate_remaining":null}"#,
            "\n",
            r#"{"key_id":"k1","decision":"allowed","status":401,"rate_remaining":"-"}"#
        );
        let got: Vec<_> = read(log.as_bytes(), &none())
            .iter()
            .map(|r| r.rate_remaining)
            .collect();
        assert_eq!(got, vec![Some(4), Some(3), None, None]);
        let json = serde_json::to_value(&read(log.as_bytes(), &none())[0]).unwrap();
        assert_eq!(json["rate_remaining"], serde_json::json!(4));
    }

    #[test]
    fn status_filters_are_checked() {
        assert!(parse_status_filter("4xx").is_ok() && parse_status_filter("403").is_ok());
        for bad in ["4", "x4x", "40", "abc", "4xxx"] {
            assert!(parse_status_filter(bad).is_err(), "{bad}");
        }
    }
}
