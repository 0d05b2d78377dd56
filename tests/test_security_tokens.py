"""End-to-end, over HTTP/1.1 and HTTP/2: a token is bound to exactly one
credential (issue 14, item 3). Key ids are unique across plugin config and
the store; a token names its key by id and carries an opaque credential
reference, never the key's hash; it ends with the secret it was issued
under, and with the key."""

import base64
import json
import time

import pytest

from tests.harness import ROUTES, cred, request, sha256_hex
from tests.test_sync_protocol import full, incr, push, state

CONFIG = {
    "routes": ROUTES,
    "tokens": {"lifetime_secs": 600},
    "credentials": [cred("cfg-admin", "cfg-admin-key", kind="default")],
}


@pytest.fixture
def envoy(envoy_factory):
    with envoy_factory(CONFIG) as e:
        yield e


def login(envoy, body, proto="http1"):
    return request(envoy.port, "POST", "/auth/login", [("content-type", "application/json")],
                   json.dumps(body).encode(), proto=proto)


def use(envoy, token, method="GET", proto="http1"):
    return request(envoy.port, method, "/v1/items", [("authorization", f"Bearer {token}")], proto=proto)


def payload(token):
    part = token.split(".")[2]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def test_sync_push_reusing_a_config_key_id_is_refused_naming_both(envoy, proto):
    r = push(envoy, full(1, 1, [cred("cfg-admin", "impostor-key", scopes=["read"])]))
    assert r.status == 400, r
    assert r.json()["error"] == "invalid_request"
    message = r.json()["message"]
    assert "upserts[0].key_id" in message and "'cfg-admin'" in message and "credentials[0]" in message
    assert state(envoy) == {"generation": 0, "version": 0, "stamp": 0}, "nothing applied"
    assert login(envoy, {"api_key": "impostor-key"}, proto).status == 401


def test_token_names_no_key_hash_and_lists_exactly_its_claims(envoy, proto):
    token = login(envoy, {"api_key": "cfg-admin-key", "session_id": "s"}, proto).json()["access_token"]
    claims = payload(token)
    assert set(claims) == {"kid", "cref", "tenant", "env", "scopes", "sid", "iat_ms", "exp_ms"}
    assert claims["kid"] == "cfg-admin"
    assert sha256_hex("cfg-admin-key") not in token
    assert use(envoy, token, "DELETE", proto).status == 200


def test_recreated_store_key_with_the_same_id_does_not_inherit_old_tokens(envoy, proto):
    assert push(envoy, full(1, 1, [cred("st-1", "first-key", scopes=["write"])])).status == 200
    old = login(envoy, {"api_key": "first-key"}, proto).json()["access_token"]
    assert use(envoy, old, "POST", proto).status == 200
    # The key is deleted and another one created under the same id.
    r = push(envoy, incr(1, 1, 2, upserts=[cred("st-1", "second-key", scopes=["write"])],
                         deletes=[sha256_hex("first-key")]))
    assert r.status == 200, r
    assert use(envoy, old, "POST", proto).status == 401
    new = login(envoy, {"api_key": "second-key"}, proto).json()["access_token"]
    assert use(envoy, new, "POST", proto).status == 200


def test_token_ends_with_its_secret_at_the_end_of_the_grace_window(envoy, proto):
    key = cred("st-sec", "sec-key", scopes=["read"], secret="old-secret")
    assert push(envoy, full(1, 1, [key])).status == 200
    old = login(envoy, {"api_key": "sec-key", "api_secret": "old-secret", "session_id": "s"}, proto).json()
    old = old["access_token"]
    assert use(envoy, old, proto=proto).status == 200
    grace_end = int(time.time()) + 3
    rotated = {**key, "secret_hash": sha256_hex("new-secret"), "previous_secret_hash": sha256_hex("old-secret"),
               "previous_secret_expires_at": grace_end}
    assert push(envoy, incr(1, 1, 2, upserts=[rotated])).status == 200
    assert use(envoy, old, proto=proto).status == 200, "still inside the grace window"
    new = login(envoy, {"api_key": "sec-key", "api_secret": "new-secret", "session_id": "s"}, proto).json()
    new = new["access_token"]
    assert new != old
    time.sleep(max(0.0, grace_end - time.time()) + 0.2)
    assert use(envoy, old, proto=proto).status == 401
    assert use(envoy, new, proto=proto).status == 200


def test_deactivated_or_deleted_store_key_ends_its_tokens(envoy, proto):
    key = cred("st-life", "life-key", scopes=["read"])
    assert push(envoy, full(1, 1, [key])).status == 200
    token = login(envoy, {"api_key": "life-key"}, proto).json()["access_token"]
    assert push(envoy, incr(1, 1, 2, upserts=[{**key, "status": "inactive"}])).status == 200
    assert use(envoy, token, proto=proto).status == 403
    assert push(envoy, incr(1, 2, 3, deletes=[sha256_hex("life-key")])).status == 200
    assert use(envoy, token, proto=proto).status == 401


@pytest.mark.parametrize("skew_s", [-3600, 3600], ids=["sidecar-clock-behind", "sidecar-clock-ahead"])
def test_session_revocation_uses_envoys_clock_whatever_the_sidecars(envoy, proto, skew_s):
    key = cred("st-rev", "rev-key", scopes=["read"])
    assert push(envoy, full(1, 1, [key])).status == 200
    old = login(envoy, {"api_key": "rev-key", "session_id": "phone"}, proto).json()["access_token"]
    sidecar_now_ms = int((time.time() + skew_s) * 1000)
    revoke = {**incr(1, 1, 2), "revoked_sessions": [
        {"key_id": "st-rev", "session_id": "phone", "revoked_at_ms": sidecar_now_ms}]}
    assert push(envoy, revoke).status == 200
    r = use(envoy, old, proto=proto)
    assert r.status == 401 and r.json()["message"] == "Token has been revoked"
    time.sleep(0.01)
    fresh = login(envoy, {"api_key": "rev-key", "session_id": "phone"}, proto).json()["access_token"]
    assert fresh != old
    assert use(envoy, fresh, proto=proto).status == 200
    # The same revocation sent again (a full push re-states it) revokes nothing new.
    again = {**full(2, 3, [key]), "revoked_sessions": revoke["revoked_sessions"]}
    assert push(envoy, again).status == 200
    assert use(envoy, fresh, proto=proto).status == 200


def test_gate_config_reusing_a_key_id_the_store_holds_is_refused_naming_both(envoy_factory, tmp_path):
    """Config vs store at load: a listener added later (LDS) whose plugin
    config defines a key id the store already holds for another key is
    refused, and the log names both; the running gate is unaffected."""
    import copy
    import os

    import yaml

    from tests.harness import free_port, native_config, wait_until

    lds = tmp_path / "lds"
    lds.mkdir()
    (lds / "listeners.yaml").write_text("resources: []\n")

    def with_lds(config):
        config["node"] = {"id": "sec-test", "cluster": "sec-test"}
        config["dynamic_resources"] = {"lds_config": {"resource_api_version": "V3", "path_config_source": {
            "path": str(lds / "listeners.yaml"), "watched_directory": {"path": str(lds)}}}}

    with envoy_factory({"routes": ROUTES}, mutate=with_lds) as envoy:
        assert push(envoy, full(1, 1, [cred("dup-id", "store-key", scopes=["read"])])).status == 200
        gate = next(lst for lst in envoy.config["static_resources"]["listeners"] if lst["name"] == "gate")

        def add_listener(name, credential):
            listener = copy.deepcopy(gate)
            listener["name"] = name
            listener["address"]["socket_address"]["port_value"] = free_port()
            hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
            keygate = next(f for f in hcm["http_filters"] if f["name"] == "keygate")
            keygate["typed_config"]["config"]["configuration"]["value"] = json.dumps(
                {"routes": ROUTES, "credentials": [credential]})
            if envoy.build == "native":
                listener = native_config({"static_resources": {"listeners": [listener]}})["static_resources"][
                    "listeners"][0]
            listener["@type"] = "type.googleapis.com/envoy.config.listener.v3.Listener"
            tmp = lds / "next.yaml"
            tmp.write_text(yaml.safe_dump({"resources": [listener]}))
            os.replace(tmp, lds / "listeners.yaml")

        add_listener("gate-dup", cred("dup-id", "config-key", scopes=["admin"]))
        message = "credentials[0].key_id: 'dup-id' is also a key in the credential store"
        assert wait_until(lambda: message in envoy.log(), timeout=15), envoy.log()[-2000:]
        assert "gate-dup" not in envoy.admin("/listeners")
        # Another id is fine, and the running gate still serves the store key.
        add_listener("gate-ok", cred("fresh-id", "config-key", scopes=["admin"]))
        assert wait_until(lambda: "gate-ok" in envoy.admin("/listeners"), timeout=15)
        assert request(envoy.port, "GET", "/v1/items", [("x-api-key", "store-key")]).status == 200
