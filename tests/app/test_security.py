"""The security review as tests: people never reach each other's chats, CSRF on every state-changing route, cookie
flags, the login rate limit, security headers on every kind of response, and text that cannot become markup.

(The role matrix is in test_role_matrix.py; stored XSS in a real browser in tests/browser/test_xss_in_browser.py.)
"""

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import migrate
from app.auth import CSRF_COOKIE, SESSION_COOKIE, LoginRateLimiter
from app.models import Role
from app.services import chat, tokens
from app.settings import Settings
from app.web.main import create_app
from tests.app.test_role_matrix import MATRIX, Caller, callers  # noqa: F401 (callers: a fixture used below)
from tests.factories import (
    PASSWORD,
    app_with_active_model,
    csrf_from,
    db_snapshot,
    login,
    make_user,
    wait_for_model,
)

UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


# ---------------------------------------------------------------------------------------------------------------------
# Nobody sees or touches anyone else's conversations


@pytest.fixture
def served_app(settings: Settings, model_dir: Path) -> Iterator[FastAPI]:
    """The app with a model served, so that message routes get as far as the ownership check (not a 503)."""
    app = app_with_active_model(settings, model_dir)
    with TestClient(app):  # runs the lifespan: the watcher loads the model
        wait_for_model(app)
        yield app


def test_people_never_see_or_touch_each_others_conversations(served_app: FastAPI, settings: Settings) -> None:
    with served_app.state.session_factory() as db:
        owner = make_user(db, "owner")
        conversation = chat.create_conversation(db, user=owner, title="Owner's secret title")
        _, answer = chat.add_user_message(db, user=owner, conversation_id=conversation.id, content="my secret question")
        chat.finish_answer(
            db,
            message_id=answer.id,
            content="the secret answer",
            finish_reason="stop",
            model_version_id=None,
            sampling={},
        )
        _, pending = chat.add_user_message(db, user=owner, conversation_id=conversation.id, content="and the other?")
        token, _ = tokens.create_token(db, user=owner, name="owner's token")
        db.commit()
        make_user(db, "snoop")
    ids = {"c": conversation.id, "m": answer.id, "p": pending.id, "t": token.id}
    snoop = TestClient(served_app)
    csrf = login(snoop, "snoop")
    form = {"csrf_token": csrf}
    header = {"X-CSRF-Token": csrf}
    htmx = {"HX-Request": "true", **header}
    before = db_snapshot(settings.resolved_database_url)

    attempts = [
        # pages and the htmx fragments they are built from
        ("GET", "/chat/{c}", {}),
        ("GET", "/chat/{c}", {"headers": htmx}),
        ("GET", "/chat/messages/{m}", {"headers": htmx}),
        ("GET", "/chat/messages/{p}/stream", {}),
        ("POST", "/chat/{c}/messages", {"data": {"content": "injected", **form}, "headers": htmx}),
        ("POST", "/chat/{c}/settings", {"data": {"title": "mine now", "allow_training": "false", **form}}),
        ("POST", "/chat/{c}/delete", {"data": form}),
        ("POST", "/chat/messages/{m}/feedback", {"data": {"value": "-1", "comment": "bad", **form}, "headers": htmx}),
        ("POST", "/chat/messages/{m}/regenerate", {"data": form, "headers": htmx}),
        ("POST", "/chat/messages/{p}/stop", {"data": form}),
        ("POST", "/account/tokens/{t}/revoke", {"data": form}),
        # REST
        ("GET", "/api/v1/conversations/{c}", {}),
        ("PATCH", "/api/v1/conversations/{c}", {"json": {"title": "mine now"}, "headers": header}),
        ("DELETE", "/api/v1/conversations/{c}", {"headers": header}),
        ("POST", "/api/v1/conversations/{c}/messages", {"json": {"content": "injected"}, "headers": header}),
        ("PUT", "/api/v1/messages/{m}/feedback", {"json": {"value": 1}, "headers": header}),
        ("DELETE", "/api/v1/messages/{m}/feedback", {"headers": header}),
        ("DELETE", "/api/v1/tokens/{t}", {"headers": header}),
    ]
    failures = []
    for method, path, kwargs in attempts:
        response = snoop.request(method, path.format(**ids), follow_redirects=False, **kwargs)
        leaked = [s for s in ("secret", "Owner's") if s in response.text]
        if response.status_code != 404 or leaked:
            failures.append(f"{method} {path}: {response.status_code} {leaked or ''}")
    assert not failures, "\n".join(failures)

    # An answer being generated right now is no different: 404, not a 409 that tells it exists.
    served_app.state.process.answers.claim(pending.id)
    try:
        assert snoop.get(f"/chat/messages/{pending.id}/stream").status_code == 404
    finally:
        served_app.state.process.answers.release(pending.id)

    # The snoop's own lists show only their own things.
    for path in ("/chat", "/api/v1/conversations", "/account/tokens", "/api/v1/tokens"):
        response = snoop.get(path)
        assert response.status_code == 200 and "secret" not in response.text and "owner" not in response.text, path
    assert db_snapshot(settings.resolved_database_url) == before


# ---------------------------------------------------------------------------------------------------------------------
# CSRF


def without_csrf(kwargs: dict, replacement: str | None) -> dict:
    """The request a cross-site page could make: no CSRF token (None), or one it made up or stole elsewhere."""
    kwargs = {**kwargs}
    for key, field in (("data", "csrf_token"), ("headers", "X-CSRF-Token")):
        if key in kwargs:
            values = {k: v for k, v in kwargs[key].items() if k != field}
            if replacement is not None and field in kwargs[key]:
                values[field] = replacement
            kwargs[key] = values
    return kwargs


def test_every_state_changing_route_refuses_a_cookie_request_without_its_csrf_token(
    app: FastAPI,
    db: Session,
    settings: Settings,
    callers: dict[str, Caller],  # noqa: F811
) -> None:
    """Every POST/PUT/PATCH/DELETE in the role matrix, as an admin (who may call them all) with a valid session
    cookie: no token, a made-up one, or another person's valid token → 403 and nothing changes."""
    admin, other = callers["admin"], callers["user"]
    unsafe = [(key, make_args) for key, (_, make_args) in MATRIX.items() if key[0] in UNSAFE]
    assert len(unsafe) > 30, "the matrix should list every state-changing route"
    before = db_snapshot(settings.resolved_database_url)
    failures = []
    for replacement in (None, "forged-token", other.csrf):
        for (method, path), make_args in unsafe:
            url = path.format(**admin.ids)
            kwargs = without_csrf(make_args(admin), replacement)
            response = admin.client.request(method, url, follow_redirects=False, **kwargs)
            if response.status_code != 403:
                failures.append(f"{method} {url} with {replacement!r}: {response.status_code}")
    assert not failures, "\n".join(failures)
    assert db_snapshot(settings.resolved_database_url) == before
    assert admin.client.get("/api/v1/me").status_code == 200  # the session survived (logout was refused too)


def test_anonymous_forms_need_this_browsers_own_csrf_token(client: TestClient, db: Session) -> None:
    """Login CSRF: an attacker's own valid nonce does not work in the victim's browser (it is bound to a cookie)."""
    make_user(db, "victim")
    attacker = TestClient(client.app)
    stolen = csrf_from(attacker.get("/login").text)
    client.get("/login")  # the victim's browser has its own nonce cookie
    data = {"username": "victim", "password": PASSWORD, "csrf_token": stolen}
    assert client.post("/login", data=data).status_code == 403
    signup = {"username": "newbie", "password": PASSWORD, "password_confirm": PASSWORD, "csrf_token": stolen}
    assert client.post("/signup", data=signup).status_code == 403
    assert client.get("/api/v1/me").status_code == 401


def test_an_authorization_header_that_is_not_a_valid_token_does_not_skip_csrf(client: TestClient, db: Session) -> None:
    """Browsers attach HTTP Basic credentials (of a proxy in front) by themselves, also to cross-site form posts."""
    make_user(db, "basil")
    login(client, "basil")
    for header in ("Basic YWxpY2U6c2VjcmV0", "Bearer fw_not-a-real-token"):
        response = client.post("/logout", headers={"Authorization": header}, follow_redirects=False)
        assert response.status_code == 401, header
        response = client.post("/chat", headers={"Authorization": header}, follow_redirects=False)
        assert response.status_code == 401, header
    assert client.get("/api/v1/me").json()["username"] == "basil"


# ---------------------------------------------------------------------------------------------------------------------
# Cookies


def set_cookies(response) -> dict[str, str]:
    """name → the whole Set-Cookie line, for each cookie the response sets."""
    return {v.split("=", 1)[0]: v for k, v in response.headers.multi_items() if k == "set-cookie"}


def flags(line: str) -> dict[str, str]:
    parts = [p.strip() for p in line.split(";")[1:]]
    return {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else "") for p in parts}


CASES = [
    ("http://testserver", None, False),
    ("https://testserver", None, True),
    ("http://testserver", True, True),
    ("https://testserver", False, False),
]


@pytest.mark.parametrize(("base_url", "forced", "secure"), CASES)
def test_session_and_csrf_cookie_flags(settings: Settings, base_url: str, forced: bool | None, secure: bool) -> None:
    settings.cookie_secure = forced  # FLYWHEEL_COOKIE_SECURE, e.g. behind a TLS-terminating proxy
    settings.session_max_age_s = 3600
    migrate.upgrade(settings.resolved_database_url)
    client = TestClient(create_app(settings), base_url=base_url)
    with client.app.state.session_factory() as db:
        make_user(db, "cora")

    def send(method: str, path: str, cookies: dict[str, str], **kwargs):
        """Cookies by hand: a client does not send Secure cookies back over plain http, a forwarding proxy does."""
        client.cookies.clear()
        jar = "; ".join(f"{k}={v}" for k, v in cookies.items())
        return client.request(method, path, headers={"cookie": jar}, follow_redirects=False, **kwargs)

    first = send("GET", "/login", {})
    csrf_line = set_cookies(first)[CSRF_COOKIE]
    jar = {CSRF_COOKIE: csrf_line.split(";")[0].split("=", 1)[1]}
    data = {"username": "cora", "password": PASSWORD, "csrf_token": csrf_from(first.text)}
    session_line = set_cookies(send("POST", "/login", jar, data=data))[SESSION_COOKIE]
    for cookie in (flags(csrf_line), flags(session_line)):
        assert "httponly" in cookie and cookie["samesite"].lower() == "lax" and cookie["path"] == "/"
        assert ("secure" in cookie) is secure
        assert "domain" not in cookie  # host-only: never sent to sibling subdomains
    assert flags(session_line)["max-age"] == "3600"

    jar[SESSION_COOKIE] = session_line.split(";")[0].split("=", 1)[1]
    csrf = csrf_from(send("GET", "/account/tokens", jar).text)
    cleared = flags(set_cookies(send("POST", "/logout", jar, data={"csrf_token": csrf}))[SESSION_COOKIE])
    assert cleared["max-age"] == "0" and cleared["path"] == "/"


# ---------------------------------------------------------------------------------------------------------------------
# Login rate limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limit_window_slides_and_is_case_insensitive() -> None:
    clock = FakeClock()
    limiter = LoginRateLimiter(max_failures=2, window_s=60, clock=clock)
    limiter.record_failure("Lena", "10.0.0.1")
    clock.now += 30
    limiter.record_failure("LENA", "10.0.0.2")
    assert 0 < limiter.retry_after("lena", "10.0.0.3") <= 31  # one account, whatever the spelling or address
    clock.now += 31  # the first failure has left the window
    assert limiter.retry_after("lena", "10.0.0.3") == 0
    limiter.reset("lena")  # a successful login clears the account's count, not the address's
    for name in ("a", "b", "c", "d", "e", "f", "g", "h"):
        limiter.record_failure(name, "10.0.0.9")
    assert limiter.retry_after("fresh", "10.0.0.9") > 0 and limiter.retry_after("fresh", "10.0.0.8") == 0


def test_a_locked_account_waits_out_the_window_over_http(settings: Settings) -> None:
    clock = FakeClock()
    settings.login_max_failures, settings.login_window_s = 2, 60
    migrate.upgrade(settings.resolved_database_url)
    client = TestClient(create_app(settings))
    client.app.state.process.login_limiter.clock = clock
    with client.app.state.session_factory() as db:
        make_user(db, "mila")
    token = csrf_from(client.get("/login").text)
    wrong = {"username": "Mila", "password": "not it at all", "csrf_token": token}
    assert [client.post("/login", data=wrong).status_code for _ in range(2)] == [401, 401]
    right = {"username": "mila", "password": PASSWORD, "csrf_token": token}
    refused = client.post("/login", data=right, follow_redirects=False)
    assert refused.status_code == 429 and 0 < int(refused.headers["retry-after"]) <= 61
    assert SESSION_COOKIE not in set_cookies(refused)
    clock.now += 61
    assert client.post("/login", data=right, follow_redirects=False).status_code == 303


# ---------------------------------------------------------------------------------------------------------------------
# Security headers on every kind of response


def check_headers(response, what: str) -> None:
    headers = response.headers
    csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split(";") if d.strip()}
    assert csp["script-src"] == ["'self'"], what  # only the app's own files: no inline, no eval, no other hosts
    assert csp["default-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"], what
    assert csp["base-uri"] == ["'self'"] and csp["form-action"] == ["'self'"], what
    assert headers["x-content-type-options"] == "nosniff", what
    assert headers["x-frame-options"] == "DENY", what
    assert headers["referrer-policy"] == "same-origin", what
    assert headers["cross-origin-opener-policy"] == "same-origin", what  # no handle on our window from a popup's opener


def test_security_headers_on_every_kind_of_response(app: FastAPI, db: Session, settings: Settings) -> None:
    @app.get("/test-boom")
    def boom() -> None:
        raise RuntimeError("an unexpected failure")

    make_user(db, "hedy", Role.admin)
    client = TestClient(app, raise_server_exceptions=False)
    csrf = login(client, "hedy")
    anonymous = TestClient(app, raise_server_exceptions=False)
    too_big = b"x" * (settings.max_body_bytes + 1)
    responses = {
        "HTML page": (client.get("/chat"), 200),
        "htmx fragment": (client.get("/admin/jobs", headers={"HX-Request": "true"}), 200),
        "JSON": (client.get("/api/v1/me"), 200),
        "JSONL download": (client.get("/api/v1/export/prompts"), 200),
        "health": (anonymous.get("/healthz"), 200),
        "static script": (anonymous.get("/static/chat.js"), 200),
        "static style": (anonymous.get("/static/app.css"), 200),
        "login redirect": (anonymous.get("/chat", follow_redirects=False), 303),
        "401 JSON": (anonymous.get("/api/v1/me"), 401),
        "403 CSRF": (client.post("/chat"), 403),
        "404 page": (client.get("/chat/999999"), 404),
        "404 JSON": (client.get("/api/v1/nowhere"), 404),
        "404 static": (anonymous.get("/static/nothing.js"), 404),
        "413 body limit": (client.post("/api/v1/tokens", content=too_big, headers={"X-CSRF-Token": csrf}), 413),
        "422 validation": (client.post("/api/v1/tokens", json={}, headers={"X-CSRF-Token": csrf}), 422),
        "500 unhandled": (anonymous.get("/test-boom"), 500),
    }
    for what, (response, status) in responses.items():
        assert response.status_code == status, what
        check_headers(response, what)
        cache = response.headers.get("cache-control", "")
        assert ("no-store" in cache) is not response.url.path.startswith("/static/"), what


def test_static_files_are_served_with_their_real_types(client: TestClient) -> None:
    """With nosniff, a script must come as JavaScript and a stylesheet as CSS, or the browser refuses them."""
    assert (
        client.get("/static/chat.js").headers["content-type"].startswith(("text/javascript", "application/javascript"))
    )
    assert client.get("/static/app.css").headers["content-type"].startswith("text/css")


# ---------------------------------------------------------------------------------------------------------------------
# Text that must never become markup or a redirect


def test_usernames_cannot_carry_markup(client: TestClient, db: Session, settings: Settings) -> None:
    """Usernames are shown on many pages (menus, people, agreement): only letters, digits, '.', '_' and '-'."""
    make_user(db, "root", Role.admin)
    csrf = login(client, "root")
    before = db_snapshot(settings.resolved_database_url)
    for name in ("<img src=x onerror=alert(1)>", '"><script>', "javascript:alert(1)", "a b", "ünïcode"):
        body = {"username": name, "password": PASSWORD}
        assert client.post("/api/v1/users", json=body, headers={"X-CSRF-Token": csrf}).status_code == 422, name
        fresh = TestClient(client.app)
        form = {**body, "password_confirm": PASSWORD, "csrf_token": csrf_from(fresh.get("/signup").text)}
        assert fresh.post("/signup", data=form).status_code == 422, name
    assert db_snapshot(settings.resolved_database_url) == before


def test_the_admin_notice_cannot_be_written_by_a_link(client: TestClient, db: Session) -> None:
    """/admin?message=… shows only what this server signed (an import's result), not what a link says."""
    make_user(db, "ada", Role.admin)
    csrf = login(client, "ada")
    forged = client.get("/admin", params={"message": "Your session expired: log in again at evil.example"})
    assert forged.status_code == 200 and "evil.example" not in forged.text
    upload = {"file": ("p.jsonl", b'{"prompt": "Where does Mira live?"}\n')}
    response = client.post(
        "/admin/import", data={"kind": "prompts", "csrf_token": csrf}, files=upload, follow_redirects=False
    )
    assert response.status_code == 303
    notice = parse_qs(urlsplit(response.headers["location"]).query)["message"][0]
    assert "Imported prompts" in client.get("/admin", params={"message": notice}).text
    assert "Imported prompts" not in client.get("/admin", params={"message": notice + "x"}).text


def test_login_never_redirects_off_site(client: TestClient, db: Session) -> None:
    """Browsers drop tabs and newlines inside URLs: `/\\t/evil.example` would become `//evil.example`."""
    make_user(db, "olga")
    for target in ("/\t/evil.example", "/\n/evil.example", "/%2F/evil.example", "https:/evil.example", "//evil"):
        client.cookies.clear()
        data = {"username": "olga", "password": PASSWORD, "csrf_token": csrf_from(client.get("/login").text)}
        response = client.post("/login", data={**data, "next": target}, follow_redirects=False)
        location = "".join(ch for ch in response.headers["location"] if ch not in "\t\n\r")
        assert location.startswith("/") and not location.startswith(("//", "/\\")), (target, location)
        assert not urlsplit(location).netloc, (target, location)
