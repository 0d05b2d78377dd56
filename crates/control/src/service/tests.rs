use super::*;
use crate::store::file::FileStore;

struct Fixture {
    dir: std::path::PathBuf,
    svc: Service,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture() -> Fixture {
    let dir = std::env::temp_dir().join(format!("keygate-svc-{}", random_suffix().unwrap()));
    std::fs::create_dir_all(&dir).unwrap();
    let svc = Service::new(Box::new(FileStore::new(dir.join("store.json"))));
    svc.init_store().unwrap();
    Fixture { dir, svc }
}

fn new_key(tenant: &str, kind: Kind) -> NewKey {
    NewKey {
        key_id: None,
        name: String::new(),
        tenant: tenant.into(),
        environment: "live".into(),
        kind,
        scopes: if kind == Kind::Scoped {
            vec!["read".into()]
        } else {
            vec![]
        },
        allowed_ips: vec![],
        rate_limit: None,
        expires_at: None,
        with_secret: false,
        key_value: None,
        secret_value: None,
        owner: None,
        metadata: None,
        key_format: None,
    }
}

#[test]
fn created_key_is_random_hex_and_only_its_hash_is_stored() {
    let f = fixture();
    let hex = |k| NewKey {
        key_format: Some(crate::service::KeyFormat::Hex64),
        ..k
    };
    let a = f
        .svc
        .create_key(hex(new_key("acme", Kind::Scoped)), 10)
        .unwrap();
    let b = f
        .svc
        .create_key(hex(new_key("acme", Kind::Scoped)), 10)
        .unwrap();
    assert_ne!(a.api_key, b.api_key);
    assert!(keygate_core::hash::is_hex64(a.api_key.as_bytes()));
    let stored = serde_json::to_string(&f.svc.snapshot().unwrap()).unwrap();
    assert!(!stored.contains(&a.api_key));
    assert!(stored.contains(&to_hex(&sha256(a.api_key.as_bytes()))));
    assert!(a.key_id.starts_with("acme-"));
}

#[test]
fn with_secret_gives_a_basic_header_and_stores_the_secret_hash() {
    let f = fixture();
    let c = f
        .svc
        .create_key(
            NewKey {
                with_secret: true,
                ..new_key("acme", Kind::Scoped)
            },
            10,
        )
        .unwrap();
    let secret = c.secret.clone().unwrap();
    assert_eq!(
        c.authorization_basic.unwrap(),
        basic_header(&c.api_key, &secret)
    );
    assert!(!serde_json::to_string(&f.svc.snapshot().unwrap())
        .unwrap()
        .contains(&secret));
}

#[test]
fn bad_arguments_name_the_option_and_change_nothing() {
    let f = fixture();
    let bad = [
        (
            NewKey {
                scopes: vec!["Bad Scope".into()],
                ..new_key("t", Kind::Scoped)
            },
            "--scope",
        ),
        (
            NewKey {
                allowed_ips: vec!["10.0.0/8".into()],
                ..new_key("t", Kind::Scoped)
            },
            "--allow-ip",
        ),
        (
            NewKey {
                scopes: vec![],
                ..new_key("t", Kind::Scoped)
            },
            "--scope",
        ),
        (
            NewKey {
                scopes: vec!["read".into()],
                ..new_key("t", Kind::Default)
            },
            "--scope",
        ),
        (
            NewKey {
                expires_at: Some(5),
                ..new_key("t", Kind::Scoped)
            },
            "--expires",
        ),
        (
            NewKey {
                tenant: "bad tenant".into(),
                ..new_key("t", Kind::Scoped)
            },
            "--tenant",
        ),
        (
            NewKey {
                environment: "no way".into(),
                ..new_key("t", Kind::Scoped)
            },
            "--env",
        ),
        (
            NewKey {
                key_value: Some("short".into()),
                ..new_key("t", Kind::Scoped)
            },
            "--key-value",
        ),
    ];
    for (k, field) in bad {
        let err = f.svc.create_key(k, 10).unwrap_err().to_string();
        assert!(err.starts_with(field), "{err} should name {field}");
        assert!(!err.contains("key_id"), "{err}");
    }
    assert!(f.svc.snapshot().unwrap().keys.is_empty());
}

#[test]
fn a_given_key_value_is_used_and_must_be_unique() {
    let f = fixture();
    let given = NewKey {
        key_id: Some("acme-read".into()),
        key_value: Some("demo-acme-read-key".into()),
        ..new_key("acme", Kind::Scoped)
    };
    let c = f.svc.create_key(given, 10).unwrap();
    assert_eq!(c.api_key, "demo-acme-read-key");
    let again = NewKey {
        key_value: Some("demo-acme-read-key".into()),
        ..new_key("acme", Kind::Scoped)
    };
    let err = f.svc.create_key(again, 10).unwrap_err().to_string();
    assert!(err.starts_with("--key-value"), "{err}");
}

#[test]
fn tenant_limits_refuse_with_what_to_do() {
    let f = fixture();
    f.svc
        .create_key(new_key("acme", Kind::Default), 10)
        .unwrap();
    let err = f
        .svc
        .create_key(new_key("acme", Kind::Default), 10)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("refused: tenant 'acme' already has 1 default"),
        "{err}"
    );
    assert!(err.contains("keygate key revoke"), "{err}");
    for _ in 0..5 {
        f.svc.create_key(new_key("acme", Kind::Scoped), 10).unwrap();
    }
    let err = f
        .svc
        .create_key(new_key("acme", Kind::Scoped), 10)
        .unwrap_err();
    assert!(matches!(err, Error::TenantLimit { limit: 5, .. }), "{err}");
    assert_eq!(f.svc.snapshot().unwrap().keys.len(), 6);
}

#[test]
fn rotation_keeps_the_old_secret_only_with_grace() {
    let f = fixture();
    let c = f
        .svc
        .create_key(
            NewKey {
                with_secret: true,
                ..new_key("t", Kind::Scoped)
            },
            10,
        )
        .unwrap();
    let old_hash = f.svc.show_key(&c.key_id).unwrap().record.secret_hash;
    f.svc.rotate_secret(&c.key_id, 600, 100).unwrap();
    let r = f.svc.show_key(&c.key_id).unwrap().record;
    assert_eq!(
        (r.previous_secret_hash, r.previous_secret_expires_at),
        (old_hash, Some(700))
    );
    f.svc.rotate_secret(&c.key_id, 0, 200).unwrap();
    assert!(f
        .svc
        .show_key(&c.key_id)
        .unwrap()
        .record
        .previous_secret_hash
        .is_none());
    let plain = f.svc.create_key(new_key("u", Kind::Scoped), 10).unwrap();
    assert!(f
        .svc
        .rotate_secret(&plain.key_id, 0, 1)
        .unwrap_err()
        .to_string()
        .contains("no secret"));
}

#[test]
fn allowlist_add_and_remove_normalise_addresses() {
    let f = fixture();
    let c = f.svc.create_key(new_key("t", Kind::Scoped), 10).unwrap();
    f.svc.allow_ip(&c.key_id, "10.0.0.0/8", true, 11).unwrap();
    f.svc.allow_ip(&c.key_id, "192.0.2.7", true, 11).unwrap();
    assert!(f.svc.allow_ip(&c.key_id, "10.0.0.0/8", true, 11).is_err());
    let k = f
        .svc
        .allow_ip(&c.key_id, "192.0.2.7/32", false, 12)
        .unwrap();
    assert_eq!(k.record.allowed_ips, vec!["10.0.0.0/8"]);
    assert!(f.svc.allow_ip(&c.key_id, "10.1.0.0/16", false, 12).is_err());
    assert!(matches!(
        f.svc.allow_ip("nope", "10.0.0.0/8", true, 12),
        Err(Error::NoSuchKey(_))
    ));
}

#[test]
fn session_revocation_needs_a_known_key_and_replaces_older_entries() {
    let f = fixture();
    let c = f.svc.create_key(new_key("t", Kind::Scoped), 10).unwrap();
    assert!(f.svc.revoke_session("nope", "s1", 5).is_err());
    assert!(f.svc.revoke_session(&c.key_id, "bad id", 5).is_err());
    f.svc.revoke_session(&c.key_id, "s1", 5).unwrap();
    f.svc.revoke_session(&c.key_id, "s1", 9).unwrap();
    let snap = f.svc.snapshot().unwrap();
    assert_eq!(snap.revoked_sessions.len(), 1);
    assert_eq!(snap.revoked_sessions[0].revoked_at_ms, 9);
    // Past the longest token lifetime an entry is useless and dropped.
    let week_later = 9 + keygate_core::token::MAX_LIFETIME_SECS * 1000 + 1;
    f.svc.revoke_session(&c.key_id, "s2", week_later).unwrap();
    assert_eq!(f.svc.snapshot().unwrap().revoked_sessions.len(), 1);
}

#[test]
fn several_sessions_are_revoked_in_one_change_each_once() {
    let f = fixture();
    let c = f.svc.create_key(new_key("t", Kind::Scoped), 10).unwrap();
    let before = f.svc.snapshot().unwrap().version;
    f.svc
        .revoke_sessions(&c.key_id, &["a", "b", "", "a"], 7)
        .unwrap();
    let snap = f.svc.snapshot().unwrap();
    assert_eq!(snap.version, before + 1);
    let mut ids: Vec<_> = snap
        .revoked_sessions
        .iter()
        .map(|r| r.session_id.as_str())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["", "a", "b"]);
    assert!(f
        .svc
        .revoke_sessions(&c.key_id, &["ok", "bad id"], 8)
        .is_err());
    assert_eq!(f.svc.snapshot().unwrap(), snap, "a bad id changes nothing");
}

#[test]
fn rates_parse_in_several_spellings_and_errors_list_the_forms() {
    let r = |requests, window_secs| RateLimit {
        requests,
        window_secs,
    };
    assert_eq!(parse_rate("100/60s").unwrap(), r(100, 60));
    assert_eq!(parse_rate("100/min").unwrap(), r(100, 60));
    assert_eq!(parse_rate("5000/1h").unwrap(), r(5000, 3600));
    assert!(parse_rate("0/min").is_err());
    assert!(parse_rate("1/2d").is_err());
    for bad in ["100", "x/min", "5/fortnight"] {
        let e = parse_rate(bad).unwrap_err();
        assert!(
            e.contains("100/min") && !e.contains("expected number"),
            "{e}"
        );
    }
}

#[test]
fn scopes_cannot_be_set_on_a_default_key_or_emptied_on_a_scoped_one() {
    let f = fixture();
    let d = f.svc.create_key(new_key("a", Kind::Default), 10).unwrap();
    let err = f
        .svc
        .set_scopes(&d.key_id, &["read".into()], 11)
        .unwrap_err();
    assert!(err.to_string().contains("every scope"), "{err}");
    let s = f.svc.create_key(new_key("b", Kind::Scoped), 10).unwrap();
    assert!(f.svc.set_scopes(&s.key_id, &[], 11).is_err());
    let k = f.svc.set_scopes(&s.key_id, &["write".into()], 11).unwrap();
    assert_eq!(k.record.scopes, vec!["write"]);
}

#[test]
fn new_keys_are_identifiable_by_default_with_the_environment_in_them() {
    let f = fixture();
    let c = f
        .svc
        .create_key(
            NewKey {
                environment: "test".into(),
                ..new_key("acme", Kind::Scoped)
            },
            10,
        )
        .unwrap();
    assert!(c.api_key.starts_with("kg_test_"), "{}", c.api_key);
    assert_eq!(
        keygate_core::key_format::classify(&c.api_key, &["kg".to_string()]),
        keygate_core::key_format::Shape::Valid
    );
}

#[test]
fn a_roll_keeps_the_key_and_accepts_the_old_value_until_the_grace_ends() {
    let f = fixture();
    let c = f
        .svc
        .create_key(
            NewKey {
                owner: Some("alice@example.com".into()),
                ..new_key("acme", Kind::Scoped)
            },
            10,
        )
        .unwrap();
    let before = f.svc.show_key(&c.key_id).unwrap();
    let r = f.svc.roll_key(None, &c.key_id, 60, None, 20).unwrap();
    assert_ne!(r.api_key, c.api_key);
    assert_eq!(r.previous_key_expires_at, Some(80));
    let after = f.svc.show_key(&c.key_id).unwrap();
    assert_eq!(after.record.key_hash, to_hex(&sha256(r.api_key.as_bytes())));
    assert_eq!(
        after.record.previous_key_hash,
        Some(before.record.key_hash.clone())
    );
    assert_eq!(
        (
            after.name,
            after.record.scopes,
            after.record.owner,
            after.created_at
        ),
        (
            before.name,
            before.record.scopes,
            before.record.owner,
            before.created_at
        )
    );
    // Grace 0: the old value goes at once.
    f.svc.roll_key(None, &c.key_id, 0, None, 30).unwrap();
    let k = f.svc.show_key(&c.key_id).unwrap();
    assert_eq!(
        (k.record.previous_key_hash, k.record.previous_key_expires_at),
        (None, None)
    );
    // Another tenant's key is no key; a too long grace names the field.
    assert!(matches!(
        f.svc.roll_key(Some("other"), &c.key_id, 0, None, 30),
        Err(Error::NoSuchKey(_))
    ));
    let e = f
        .svc
        .roll_key(None, &c.key_id, 31 * 86_400, None, 30)
        .unwrap_err();
    assert!(e.to_string().starts_with("--grace"), "{e}");
}

#[test]
fn bad_owner_or_metadata_changes_nothing_and_names_the_field() {
    let f = fixture();
    let c = f.svc.create_key(new_key("acme", Kind::Scoped), 10).unwrap();
    let e = f
        .svc
        .create_key(
            NewKey {
                owner: Some("bad owner".into()),
                ..new_key("acme", Kind::Scoped)
            },
            10,
        )
        .unwrap_err();
    assert!(e.to_string().starts_with("--owner"), "{e}");
    let big =
        crate::service::parse_metadata("metadata", &format!(r#"{{"a":"{}"}}"#, "x".repeat(5000)));
    assert!(big.unwrap_err().to_string().contains("at most 4096"));
    let before = f.svc.snapshot().unwrap();
    let patch = crate::service::KeyPatch {
        name: Some("renamed".into()),
        owner: Some(Some("no spaces allowed".into())),
        ..Default::default()
    };
    let e = f.svc.patch_key("acme", &c.key_id, &patch, 20).unwrap_err();
    assert!(e.to_string().starts_with("owner"), "{e}");
    assert_eq!(f.svc.snapshot().unwrap(), before);
    let meta = crate::service::parse_metadata("metadata", r#"{"plan_tier":"gold"}"#).unwrap();
    let k = f
        .svc
        .set_metadata(&c.key_id, Some(meta.clone()), 30)
        .unwrap();
    assert_eq!(k.metadata, Some(meta));
    let k = f.svc.set_owner(&c.key_id, Some("bob"), 31).unwrap();
    assert_eq!(k.record.owner.as_deref(), Some("bob"));
}

fn limits(items: &[&str]) -> Vec<keygate_core::limits::Limit> {
    items.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn a_plan_change_is_one_record_and_leaves_every_key_on_it_as_it_was() {
    let f = fixture();
    f.svc.create_plan("free", limits(&["10/min"]), 1).unwrap();
    let on_plan = KeyLimits {
        limits: vec![],
        plan: Some("free".into()),
    };
    let a = f
        .svc
        .create_key_limited(new_key("acme", Kind::Scoped), on_plan.clone(), 1)
        .unwrap();
    let b = f
        .svc
        .create_key_limited(new_key("beta", Kind::Scoped), on_plan, 1)
        .unwrap();
    let before = f.svc.snapshot().unwrap();
    f.svc
        .set_plan_limits("free", limits(&["20/min", "1000/day"]), 2)
        .unwrap();
    let after = f.svc.snapshot().unwrap();
    for id in [&a.key_id, &b.key_id] {
        assert_eq!(before.find(id), after.find(id), "keys are not rewritten");
    }
    let changed: Vec<_> = after
        .limit_records()
        .into_iter()
        .filter(|(k, r)| before.limit_records().get(k) != Some(r))
        .collect();
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].1.limits, limits(&["20/min", "1000/day"]));
}

#[test]
fn a_used_plan_cannot_be_deleted_and_an_unknown_one_cannot_be_named() {
    let f = fixture();
    f.svc.create_plan("pro", limits(&["100/min"]), 1).unwrap();
    f.svc
        .set_tenant_limits(
            "acme",
            &TenantLimitsChange {
                plan: Some(Some("pro".into())),
                limits: None,
            },
        )
        .unwrap();
    let e = f.svc.delete_plan("pro").unwrap_err();
    assert!(e.to_string().contains("1 tenant(s)"), "{e}");
    let e = f
        .svc
        .create_key_limited(
            new_key("acme", Kind::Scoped),
            KeyLimits {
                limits: vec![],
                plan: Some("gold".into()),
            },
            1,
        )
        .unwrap_err();
    assert!(
        matches!(&e, Error::BadInput { field, .. } if field == "plan"),
        "{e}"
    );
    assert!(f.svc.list_keys(None).unwrap().is_empty(), "nothing created");
    assert!(matches!(
        f.svc.set_plan_limits("gold", limits(&["1/s"]), 1),
        Err(Error::NoSuchPlan(_))
    ));
    assert!(matches!(
        f.svc.create_plan("empty", vec![], 1),
        Err(Error::BadInput { field, .. }) if field == "limits"
    ));
}

#[test]
fn a_pushed_key_carries_its_tenants_plan_and_tenant_limit_flag() {
    let f = fixture();
    f.svc.create_plan("pro", limits(&["100/min"]), 1).unwrap();
    f.svc.create_plan("own", limits(&["5/s"]), 1).unwrap();
    let plain = f.svc.create_key(new_key("acme", Kind::Scoped), 1).unwrap();
    let own = f
        .svc
        .create_key_limited(
            new_key("acme", Kind::Default),
            KeyLimits {
                limits: vec![],
                plan: Some("own".into()),
            },
            1,
        )
        .unwrap();
    f.svc
        .set_tenant_limits(
            "acme",
            &TenantLimitsChange {
                plan: Some(Some("pro".into())),
                limits: Some(limits(&["1000/min"])),
            },
        )
        .unwrap();
    let snap = f.svc.snapshot().unwrap();
    let wire = |id: &str| snap.wire_record(snap.find(id).unwrap());
    assert_eq!(wire(&plain.key_id).plan.as_deref(), Some("pro"));
    assert_eq!(wire(&own.key_id).plan.as_deref(), Some("own"));
    assert!(wire(&plain.key_id).tenant_limits);
    assert_eq!(
        snap.find(&plain.key_id).unwrap().record.plan,
        None,
        "stored as set"
    );
    // Clearing the tenant's settings removes its row.
    f.svc
        .set_tenant_limits(
            "acme",
            &TenantLimitsChange {
                plan: Some(None),
                limits: Some(vec![]),
            },
        )
        .unwrap();
    let snap = f.svc.snapshot().unwrap();
    assert!(snap.tenant_limits.is_empty());
    assert!(
        !snap
            .wire_record(snap.find(&plain.key_id).unwrap())
            .tenant_limits
    );
}
