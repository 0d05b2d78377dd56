"""Browser tests of the developer portal (`/portal` of `keygate serve`):
headless Chromium (Debian's chromium + chromium-driver) driven by Selenium,
against a real `keygate serve` syncing a real Envoy. The flows a tenant
needs: open a one-time link, create a scoped key, use it through Envoy, see
the request in Logs, regenerate the secret (old one refused), delete it
(refused); plus the refusals: a used link, a form without its CSRF token,
another tenant's key id, HTML in a key name shown as text. Screenshots of
each page are taken on every run; KEYGATE_SCREENSHOTS=1 writes them to
docs/screenshots/ (the README's pictures), otherwise to a temp directory."""

import base64
import json
import os
import re
import tempfile
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.harness import keygate, request, wait_until
from tests.test_api import (
    CONFIG, Server, as_stored, call, create_key, live, portal_http as http, portal_session as session, synced, token,
)

CHROMEDRIVER = "/usr/bin/chromedriver"
# A test run leaves the committed pictures alone unless asked to refresh them.
SHOTS = (Path(__file__).resolve().parent.parent / "docs" / "screenshots" if os.environ.get("KEYGATE_SCREENSHOTS")
         else Path(tempfile.gettempdir()) / "keygate-portal-screenshots")

if not Path(CHROMEDRIVER).exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"{CHROMEDRIVER} is missing under CI: install chromium and chromium-driver")
    pytest.skip(f"{CHROMEDRIVER} not found: apt-get install chromium chromium-driver to run the portal tests",
                allow_module_level=True)

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium==4.51.0")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

HTML_NAME = '<img src=x id=pwned><script>document.title="pwned"</script>'


@pytest.fixture(scope="module")
def rig(envoy_factory, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("portal")
    store = str(tmp / "keygate.db")
    keygate(store, "store", "init")
    log = tmp / "access.log"
    with envoy_factory(CONFIG, access_log=log) as envoy:
        with Server(store, tmp, "--endpoint", f"http://127.0.0.1:{envoy.sync_port}", "--access-log", str(log),
                    "--auth-failures", "1000/min") as server:
            yield {"envoy": envoy, "server": server, "store": store, "op": token(store, "--operator")}
            assert "kgt_" not in server.log(), "a token reached the server's log"


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_window_size(1280, 900)
    drv.set_page_load_timeout(20)
    # A form post's next page may still be loading when the test looks for
    # an element on it (a busy machine): wait for it rather than fail.
    drv.implicitly_wait(10)
    yield drv
    drv.quit()


def link(rig, tenant):
    s, v = call(rig["server"], "POST", f"/api/v1/tenants/{tenant}/portal-sessions", rig["op"], {})
    assert s == 201, v
    assert v["url"].startswith(f"http://127.0.0.1:{rig['server'].port}/portal/open?link=")
    return v["url"]


def shot(drv, name):
    SHOTS.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(SHOTS / f"{name}.png"))


def text(drv):
    return drv.find_element(By.TAG_NAME, "body").text


def fill(drv, field, value):
    # Looked up again if the page was still being replaced when first found
    # (Chrome then reports the node as stale or "not in the document").
    for attempt in range(5):
        try:
            el = drv.find_element(By.ID, field)
            el.clear()
            el.send_keys(value)
            return
        except WebDriverException as e:
            if attempt == 4 or not replaced_meanwhile(e):
                raise
            time.sleep(0.2)


def replaced_meanwhile(e):
    """The element came from a document that has since been replaced."""
    return isinstance(e, StaleElementReferenceException) or "does not belong to the document" in str(e)


def follow(drv, by, value):
    """Clicks a link or submit button and waits until its page has replaced
    the current one (on a busy machine the next lookup would otherwise find
    the old page's elements)."""
    page = drv.find_element(By.TAG_NAME, "html")
    drv.find_element(by, value).click()

    def page_replaced(_):
        # Selenium's staleness_of, except that Chrome may report the old
        # page's node as "not in the document" rather than stale.
        try:
            page.is_enabled()
            return False
        except WebDriverException as e:
            if replaced_meanwhile(e):
                return True
            raise
    WebDriverWait(drv, 20).until(page_replaced)
    WebDriverWait(drv, 20, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.readyState") == "complete")


def basic(key, secret):
    return [("authorization", "Basic " + base64.b64encode(f"{key}:{secret}".encode()).decode())]


def envoy_status(rig, headers, path="/v1/items"):
    return request(rig["envoy"].port, "GET", path, headers).status


def test_a_tenant_manages_a_key_end_to_end_in_the_browser(rig, browser):
    drv = browser
    drv.get(link(rig, "acme"))
    assert wait_until(lambda: drv.current_url.endswith("/portal/keys"), timeout=10)
    assert "API keys" in text(drv) and "acme" in text(drv)

    fill(drv, "name", HTML_NAME)
    fill(drv, "scopes", "read")
    follow(drv, By.CSS_SELECTOR, "form[action='/portal/keys'] button[type=submit]")
    api_key = drv.find_element(By.ID, "api-key").text
    secret = drv.find_element(By.ID, "secret").text
    assert api_key and re.fullmatch(r"[0-9a-f]{64}", secret), (api_key, secret)
    assert drv.find_element(By.CSS_SELECTOR, "button.copy[data-copy=secret]").is_displayed()
    shot(drv, "portal-new-key")

    # The HTML name is text, never markup.
    drv.get(f"http://127.0.0.1:{rig['server'].port}/portal/keys")
    assert HTML_NAME in text(drv)
    drv.implicitly_wait(0)  # an absence check: nothing to wait for
    assert not drv.find_elements(By.ID, "pwned") and drv.title != "pwned"
    drv.implicitly_wait(10)
    shot(drv, "portal-keys")

    old = basic(api_key, secret)
    assert wait_until(lambda: envoy_status(rig, old) == 200, timeout=10)
    assert envoy_status(rig, old, "/v1/items/portal-was-here") == 200

    def in_logs():
        drv.get(f"http://127.0.0.1:{rig['server'].port}/portal/logs")
        return "/v1/items/portal-was-here" in text(drv)
    assert wait_until(in_logs, timeout=10, interval=0.5)
    shot(drv, "portal-logs")

    follow(drv, By.LINK_TEXT, "API keys")
    follow(drv, By.CSS_SELECTOR, "a.key-name")
    key_url = drv.current_url
    shot(drv, "portal-key")
    follow(drv, By.ID, "rotate")
    new_secret = drv.find_element(By.ID, "secret").text
    assert new_secret and new_secret != secret
    assert wait_until(lambda: envoy_status(rig, old) == 401, timeout=10)
    assert envoy_status(rig, basic(api_key, new_secret)) == 200

    drv.get(f"http://127.0.0.1:{rig['server'].port}/portal/usage")
    assert "allowed" in text(drv) and drv.find_elements(By.CSS_SELECTOR, "svg rect.allowed")
    shot(drv, "portal-usage")
    follow(drv, By.LINK_TEXT, "Limits")  # read-only: the key's limits in effect
    assert "Limits in effect" in text(drv) and HTML_NAME in text(drv)
    shot(drv, "portal-limits")

    drv.get(key_url)
    follow(drv, By.ID, "delete")
    shot(drv, "portal-confirm-delete")
    follow(drv, By.ID, "confirm-delete")
    assert wait_until(lambda: drv.current_url.endswith("/portal/keys"), timeout=10)
    assert HTML_NAME not in text(drv)
    assert wait_until(lambda: envoy_status(rig, basic(api_key, new_secret)) == 401, timeout=10)

    drv.set_window_size(390, 900)
    drv.get(f"http://127.0.0.1:{rig['server'].port}/portal/keys")
    shot(drv, "portal-keys-phone")
    drv.set_window_size(1280, 900)


def test_a_bad_cidr_is_shown_next_to_the_field(rig, browser):
    drv = browser
    drv.get(link(rig, "acme"))
    assert wait_until(lambda: drv.current_url.endswith("/portal/keys"), timeout=10)
    fill(drv, "name", "cidr test")
    fill(drv, "scopes", "read")
    follow(drv, By.CSS_SELECTOR, "form[action='/portal/keys'] button[type=submit]")
    follow(drv, By.LINK_TEXT, "Go to the key")
    fill(drv, "allowed_ips", "10.0.0.0/33")
    follow(drv, By.CSS_SELECTOR, "form[action$='/ips'] button[type=submit]")
    err = drv.find_element(By.ID, "allowed_ips-error")
    assert "10.0.0.0/33" in err.text or "CIDR" in err.text or "prefix" in err.text.lower(), err.text
    fill(drv, "allowed_ips", "10.0.0.0/8")
    follow(drv, By.CSS_SELECTOR, "form[action$='/ips'] button[type=submit]")
    assert "10.0.0.0/8" in drv.find_element(By.ID, "allowed_ips").get_attribute("value")


def test_a_used_link_is_refused(rig, browser):
    url = link(rig, "acme")
    session(url)
    s, _, body = http(url)
    assert s == 410 and "already been used" in body
    browser.get(url)
    assert "already been used" in text(browser)
    shot(browser, "portal-used-link")


def test_the_portal_offers_no_rate_limit_and_refuses_a_posted_one(rig, browser):
    """A key's own rate limit would replace the limits the operator set, so
    the create form has no such field and a crafted post carrying one is
    refused (403) without making a key."""
    base = f"http://127.0.0.1:{rig['server'].port}"
    drv = browser
    drv.get(link(rig, "ratecap-portal"))
    assert wait_until(lambda: drv.current_url.endswith("/portal/keys"), timeout=10)
    drv.implicitly_wait(0)  # absence checks: nothing to wait for
    assert not drv.find_elements(By.ID, "rate_limit")
    assert not drv.find_elements(By.NAME, "rate_limit")
    drv.implicitly_wait(10)
    assert "set by your operator" in drv.find_element(By.ID, "limits-note").text
    fill(drv, "name", "plain")
    fill(drv, "scopes", "read")
    follow(drv, By.CSS_SELECTOR, "form[action='/portal/keys'] button[type=submit]")
    assert drv.find_element(By.ID, "api-key").text
    follow(drv, By.LINK_TEXT, "Go to the key")
    assert "Rate limit\ndefault" in text(drv) or "Rate limit default" in text(drv), text(drv)

    cookie = session(link(rig, "ratecap-portal"))
    _, _, page = http(f"{base}/portal/keys", cookie=cookie)
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    ct = [("Content-Type", "application/x-www-form-urlencoded")]
    form = urllib.parse.urlencode({"csrf": csrf, "name": "fast", "scopes": "read",
                                   "rate_limit": "1000000/1s"}).encode()
    s, _, body = http(f"{base}/portal/keys", cookie=cookie, data=form, headers=ct)
    assert s == 403 and "set by your operator" in body, body
    s, v = call(rig["server"], "GET", "/api/v1/tenants/ratecap-portal/keys", rig["op"])
    assert s == 200 and [(k["name"], k["rate_limit"]) for k in v["keys"]] == [("plain", None)], v


def test_a_form_without_its_csrf_token_or_from_another_origin_is_refused(rig):
    base = f"http://127.0.0.1:{rig['server'].port}"
    cookie = session(link(rig, "acme"))
    form = urllib.parse.urlencode({"name": "csrf-less", "scopes": "read"}).encode()
    s, _, _ = http(f"{base}/portal/keys", cookie=cookie, data=form,
                   headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert s == 403
    _, _, page = http(f"{base}/portal/keys", cookie=cookie)
    assert "csrf-less" not in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    form = urllib.parse.urlencode({"csrf": csrf, "name": "cross-site", "scopes": "read"}).encode()
    s, _, _ = http(f"{base}/portal/keys", cookie=cookie, data=form,
                   headers=[("Content-Type", "application/x-www-form-urlencoded"), ("Origin", "http://evil.example")])
    assert s == 403
    s, _, _ = http(f"{base}/portal/keys", cookie=cookie, data=form,
                   headers=[("Content-Type", "application/x-www-form-urlencoded")])
    assert s == 201


def test_another_tenants_key_id_answers_404(rig):
    base = f"http://127.0.0.1:{rig['server'].port}"
    s, v = call(rig["server"], "POST", "/api/v1/tenants/globex/keys", rig["op"], {"name": "theirs", "scopes": ["read"]})
    assert s == 201, v
    theirs = v["key_id"]
    cookie = session(link(rig, "acme"))
    _, _, page = http(f"{base}/portal/keys", cookie=cookie)
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    assert http(f"{base}/portal/keys/{theirs}", cookie=cookie)[0] == 404
    assert http(f"{base}/portal/keys/{theirs}/delete", cookie=cookie)[0] == 404
    form = urllib.parse.urlencode({"csrf": csrf}).encode()
    ct = [("Content-Type", "application/x-www-form-urlencoded")]
    assert http(f"{base}/portal/keys/{theirs}/delete", cookie=cookie, data=form, headers=ct)[0] == 404
    assert http(f"{base}/portal/keys/{theirs}/rotate", cookie=cookie, data=form, headers=ct)[0] == 404
    s, v = call(rig["server"], "GET", f"/api/v1/tenants/globex/keys/{theirs}", rig["op"])
    assert s == 200 and v["name"] == "theirs"


def test_logout_ends_the_session_and_portal_links_need_an_operator(rig):
    base = f"http://127.0.0.1:{rig['server'].port}"
    cookie = session(link(rig, "acme"))
    _, _, page = http(f"{base}/portal/keys", cookie=cookie)
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)
    ct = [("Content-Type", "application/x-www-form-urlencoded")]
    assert http(f"{base}/portal/logout", cookie=cookie, data=urllib.parse.urlencode({"csrf": csrf}).encode(),
                headers=ct)[0] == 200
    assert http(f"{base}/portal/keys", cookie=cookie)[0] == 401
    tenant_tok = token(rig["store"], "--tenant", "acme")
    assert call(rig["server"], "POST", "/api/v1/tenants/acme/portal-sessions", tenant_tok, {})[0] == 403
    s, v = call(rig["server"], "GET", "/api/v1/tenants/acme/audit", rig["op"])
    actions = {e["action"] for e in v["records"]} if s == 200 and "records" in v else set()
    assert {"portal.link_create", "portal.login", "portal.logout", "key.create"} <= actions, v


def test_the_cli_mints_a_link_that_works_once(rig):
    v = keygate(rig["store"], "portal", "link", "--tenant", "acme",
                "--base-url", f"http://127.0.0.1:{rig['server'].port}")
    session(v["url"])
    assert http(v["url"])[0] == 410


# --- cross-tenant isolation of every portal page (audit p6 item 7) ------------

FORM = [("Content-Type", "application/x-www-form-urlencoded")]
NO_SUCH = "There is no such page or key."


def csrf_of(rig, cookie):
    _, _, page = http(f"http://127.0.0.1:{rig['server'].port}/portal/keys", cookie=cookie)
    return re.search(r'name="csrf" value="([0-9a-f]{64})"', page).group(1)


def post(rig, cookie, path, fields):
    return http(f"http://127.0.0.1:{rig['server'].port}{path}", cookie=cookie,
                data=urllib.parse.urlencode(fields).encode(), headers=FORM)


def test_another_tenants_key_cannot_be_rolled_disabled_restricted_or_have_a_session_revoked_in_the_portal(rig):
    srv, op, envoy = rig["server"], rig["op"], rig["envoy"]
    theirs = create_key(rig, "portal-victim", op, name="victim key")
    kid = theirs["key_id"]
    by_key = [("x-api-key", theirs["api_key"])]
    live(rig, by_key)
    r = request(envoy.port, "POST", "/auth/login", [("content-type", "application/json")],
                json.dumps({"api_key": theirs["api_key"], "session_id": "victims-laptop"}).encode())
    assert r.status == 200, r
    bearer = [("authorization", f"Bearer {r.json()['access_token']}")]

    def sessions():
        s, v = call(srv, "GET", f"/api/v1/tenants/portal-victim/keys/{kid}/sessions", op)
        assert s == 200, v
        return {x["session_id"]: x["revoked"] for x in v["sessions"]}
    assert wait_until(lambda: "victims-laptop" in sessions(), timeout=30, interval=0.2), sessions()
    before = as_stored(call(srv, "GET", f"/api/v1/tenants/portal-victim/keys/{kid}", op)[1])

    mine = create_key(rig, "portal-thief", op, name="thief key")
    cookie = session(link(rig, "portal-thief"))
    csrf = csrf_of(rig, cookie)
    forms = [("roll", {"csrf": csrf, "grace_seconds": "0"}, 200),
             ("status", {"csrf": csrf, "status": "inactive"}, 303),
             ("ips", {"csrf": csrf, "allowed_ips": "10.0.0.0/8"}, 303),
             ("sessions/victims-laptop/revoke", {"csrf": csrf}, 303)]
    for action, fields, _ in forms:
        s, _, page = post(rig, cookie, f"/portal/keys/{kid}/{action}", fields)
        assert s == 404 and NO_SUCH in page, (action, s, page[-600:])
        assert "victim key" not in page and "victims-laptop" not in page, action
    # The same forms on the session's own key do what they say: the 404s were the key's.
    for action, fields, ok in forms:
        s, _, page = post(rig, cookie, f"/portal/keys/{mine['key_id']}/{action}", fields)
        assert s == ok, (action, s, page[-600:])
    # Its owner sees the key unchanged, the session live, no change audited.
    s, v = call(srv, "GET", f"/api/v1/tenants/portal-victim/keys/{kid}", op)
    assert s == 200 and as_stored(v) == before, (before, v)
    assert sessions() == {"victims-laptop": False}
    recs = call(srv, "GET", "/api/v1/tenants/portal-victim/audit", op)[1]["records"]
    assert [r["action"] for r in recs if r["object"] == kid] == ["key.create"], recs
    # And Envoy, holding every change made so far: the same value (no roll),
    # active, from any address, its session's token still accepted.
    synced(rig)
    assert envoy_status(rig, by_key) == 200
    assert envoy_status(rig, bearer) == 200


def test_the_portal_logs_and_usage_never_show_another_tenants_key_or_its_requests(rig):
    srv, op, envoy = rig["server"], rig["op"], rig["envoy"]
    theirs = create_key(rig, "portal-watched", op, name="watched key")
    mine = create_key(rig, "portal-snoop", op, name="snoop key")
    for k, path in ((theirs, "/v1/items/watched-only-path"), (mine, "/v1/items/snoop-own-path")):
        live(rig, [("x-api-key", k["api_key"])])
        assert request(envoy.port, "GET", path, [("x-api-key", k["api_key"])]).status == 200

    def owner_sees():
        s, v = call(srv, "GET", "/api/v1/tenants/portal-watched/logs?path=/v1/items/watched-only-path", op)
        return s == 200 and v["records"]
    # The other tenant's request is in the store: there is something to leak.
    assert wait_until(owner_sees, timeout=30, interval=0.2), "the owner never saw its request"
    base = f"http://127.0.0.1:{srv.port}"
    cookie = session(link(rig, "portal-snoop"))

    def own_request_shown():
        s, _, page = http(f"{base}/portal/logs", cookie=cookie)
        return s == 200 and "/v1/items/snoop-own-path" in page and page
    page = wait_until(own_request_shown, timeout=30, interval=0.2)
    assert page, "the portal never showed the session's own request"
    leaks = (theirs["key_id"], "watched key", "watched-only-path", "portal-watched")
    assert not [x for x in leaks if x in page], page
    s, _, page = http(f"{base}/portal/logs?key={theirs['key_id']}", cookie=cookie)
    assert s == 200 and "No requests match." in page, (s, page[-800:])
    assert not [x for x in leaks if x in page], page
    for url in ("/portal/usage", f"/portal/usage?key={theirs['key_id']}", f"/portal/usage?key_id={theirs['key_id']}"):
        s, _, page = http(base + url, cookie=cookie)
        assert s == 200 and f"snoop key ({mine['key_id']})" in page, (url, s, page[-800:])
        assert not [x for x in leaks if x in page], (url, page)
    assert owner_sees(), "the owner's records are gone"
