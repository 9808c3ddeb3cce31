"""Sign-up, login, logout, sessions, API tokens, CSRF and the login rate limit — and that bad input changes nothing."""

from datetime import timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.auth import SESSION_COOKIE
from app.models import ApiToken, Role, UserSession, utcnow
from app.settings import Settings, SignupMode
from app.web.main import create_app
from tests.factories import PASSWORD, csrf_from, db_snapshot, login, make_user, user_named


def signup(client: TestClient, username: str, password: str = PASSWORD, confirm: str | None = None):
    token = csrf_from(client.get("/signup").text)
    data = {"username": username, "password": password, "password_confirm": confirm or password, "csrf_token": token}
    return client.post("/signup", data=data, follow_redirects=False)


def test_first_account_is_admin_and_later_ones_are_users(client: TestClient, db: Session) -> None:
    assert signup(client, "alice").status_code == 303
    assert client.get("/api/v1/me").json()["role"] == "admin"
    other = TestClient(client.app)
    assert signup(other, "bob").status_code == 303
    assert other.get("/api/v1/me").json()["role"] == "user"


def test_login_sets_a_safe_cookie_and_logout_ends_the_session(client: TestClient, db: Session) -> None:
    make_user(db, "carol")
    token = csrf_from(client.get("/login").text)
    response = client.post(
        "/login", data={"username": "carol", "password": PASSWORD, "csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303
    cookie = next(v for k, v in response.headers.multi_items() if k == "set-cookie" and SESSION_COOKIE in v)
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Secure" not in cookie
    assert client.get("/api/v1/me").json()["username"] == "carol"

    signed = client.cookies.get(SESSION_COOKIE)
    csrf = csrf_from(client.get("/account/tokens").text)
    assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert client.get("/api/v1/me").status_code == 401
    # The old cookie is dead on the server too, not only forgotten by the browser.
    replay = TestClient(client.app, cookies={SESSION_COOKIE: signed})
    assert replay.get("/api/v1/me").status_code == 401


def test_cookie_is_secure_over_https(app, db: Session) -> None:
    make_user(db, "dora")
    client = TestClient(app, base_url="https://testserver")
    token = csrf_from(client.get("/login").text)
    response = client.post(
        "/login", data={"username": "dora", "password": PASSWORD, "csrf_token": token}, follow_redirects=False
    )
    cookie = next(v for k, v in response.headers.multi_items() if k == "set-cookie" and SESSION_COOKIE in v)
    assert "Secure" in cookie


def test_forged_session_cookie_is_rejected(client: TestClient) -> None:
    client.cookies.set(SESSION_COOKIE, "not-a-signed-value")
    assert client.get("/api/v1/me").status_code == 401


def test_duplicate_username_is_409_and_changes_nothing(client: TestClient, db: Session, settings: Settings) -> None:
    make_user(db, "erin")
    before = db_snapshot(settings.resolved_database_url)
    response = signup(client, "ERIN")
    assert response.status_code == 409 and "taken" in response.text
    assert db_snapshot(settings.resolved_database_url) == before


def test_signup_validation_errors_are_422(client: TestClient, settings: Settings) -> None:
    before = db_snapshot(settings.resolved_database_url)
    assert signup(client, "x").status_code == 422
    assert signup(client, "frank", password="short").status_code == 422
    response = signup(client, "frank", confirm="something else entirely")
    assert response.status_code == 400 and "differ" in response.text
    assert db_snapshot(settings.resolved_database_url) == before


def test_wrong_password_is_401_and_changes_nothing(client: TestClient, db: Session, settings: Settings) -> None:
    make_user(db, "gina")
    before = db_snapshot(settings.resolved_database_url)
    token = csrf_from(client.get("/login").text)
    for name in ("gina", "nobody"):
        response = client.post("/login", data={"username": name, "password": "wrong password", "csrf_token": token})
        assert response.status_code == 401 and "wrong username or password" in response.text
    assert db_snapshot(settings.resolved_database_url) == before
    assert client.get("/api/v1/me").status_code == 401


def test_missing_or_wrong_csrf_token_is_403_and_changes_nothing(
    client: TestClient, db: Session, settings: Settings
) -> None:
    make_user(db, "hank")
    login(client, "hank")
    before = db_snapshot(settings.resolved_database_url)
    assert client.post("/account/tokens", data={"name": "cli"}).status_code == 403
    assert client.post("/account/tokens", data={"name": "cli", "csrf_token": "forged"}).status_code == 403
    assert client.post("/api/v1/tokens", json={"name": "cli"}).status_code == 403
    assert client.post("/logout", follow_redirects=False).status_code == 403
    assert db_snapshot(settings.resolved_database_url) == before
    # Anonymous forms are protected too (login CSRF).
    fresh = TestClient(client.app)
    assert fresh.post("/login", data={"username": "hank", "password": PASSWORD}).status_code == 403


def test_csrf_header_works_for_htmx_and_json(client: TestClient, db: Session) -> None:
    make_user(db, "ivy")
    csrf = login(client, "ivy")
    response = client.post("/api/v1/tokens", json={"name": "cli"}, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 201


def test_api_token_lifecycle(client: TestClient, db: Session, settings: Settings) -> None:
    make_user(db, "jack")
    csrf = login(client, "jack")
    page = client.post("/account/tokens", data={"name": "laptop", "csrf_token": csrf})
    assert page.status_code == 201
    secret = page.text.split('id="new-token" class="secret">')[1].split("<")[0]
    assert secret.startswith("fw_")
    row = db.query(ApiToken).one()
    assert row.token_hash != secret and secret not in row.token_hash  # stored hashed
    assert secret not in client.get("/account/tokens").text  # shown once

    bearer = TestClient(client.app, headers={"Authorization": f"Bearer {secret}"})
    assert bearer.get("/api/v1/me").json()["username"] == "jack"
    # A Bearer request needs no CSRF token: a browser cannot attach the header by itself.
    assert bearer.post("/api/v1/tokens", json={"name": "second"}).status_code == 201

    assert client.post(f"/account/tokens/{row.id}/revoke", data={"csrf_token": csrf}).status_code == 200
    before = db_snapshot(settings.resolved_database_url)
    response = bearer.get("/api/v1/me")
    assert response.status_code == 401 and "revoked" in response.json()["detail"]
    assert bearer.post("/api/v1/tokens", json={"name": "third"}).status_code == 401
    assert db_snapshot(settings.resolved_database_url) == before


def test_expired_token_is_401_and_changes_nothing(client: TestClient, db: Session, settings: Settings) -> None:
    make_user(db, "kim")
    login(client, "kim")
    secret = client.post(
        "/api/v1/tokens", json={"name": "short", "expires_in_days": 1}, headers={"X-CSRF-Token": login(client, "kim")}
    ).json()["token"]
    row = db.query(ApiToken).one()
    row.expires_at = utcnow() - timedelta(seconds=1)
    db.commit()
    before = db_snapshot(settings.resolved_database_url)
    response = TestClient(client.app).get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 401 and "expired" in response.json()["detail"]
    assert db_snapshot(settings.resolved_database_url) == before


def test_malformed_authorization_header_is_401(client: TestClient) -> None:
    for header in ("Basic abc", "Bearer", "Bearer    "):
        response = client.get("/api/v1/me", headers={"Authorization": header})
        assert response.status_code == 401 and response.json()["detail"]


def test_login_is_rate_limited_per_user_and_per_address(settings: Settings) -> None:
    settings.login_max_failures = 3
    from app import migrate

    migrate.upgrade(settings.resolved_database_url)
    app = create_app(settings)
    client = TestClient(app)
    with app.state.session_factory() as db:
        make_user(db, "lena")
    token = csrf_from(client.get("/login").text)
    attempt = {"username": "lena", "password": "nope nope", "csrf_token": token}
    assert [client.post("/login", data=attempt).status_code for _ in range(3)] == [401, 401, 401]
    blocked = client.post("/login", data={**attempt, "password": PASSWORD})
    assert blocked.status_code == 429 and int(blocked.headers["Retry-After"]) > 0
    # The address limit covers spraying many usernames from one place.
    for i in range(3 * 4):
        client.post("/login", data={**attempt, "username": f"u{i}"})
    assert client.post("/login", data={**attempt, "username": "fresh-name"}).status_code == 429


def test_disabling_a_user_ends_their_sessions_and_tokens(client: TestClient, db: Session) -> None:
    admin = make_user(db, "root", Role.admin)
    mona = make_user(db, "mona")
    user_client = TestClient(client.app)
    csrf = login(user_client, "mona")
    secret = user_client.post("/api/v1/tokens", json={"name": "t"}, headers={"X-CSRF-Token": csrf}).json()["token"]
    admin_csrf = login(client, "root")
    response = client.patch(f"/api/v1/users/{mona.id}", json={"disabled": True}, headers={"X-CSRF-Token": admin_csrf})
    assert response.status_code == 200 and response.json()["disabled"] is True
    assert user_client.get("/api/v1/me").status_code == 401
    assert TestClient(client.app).get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    assert db.query(UserSession).filter_by(user_id=mona.id).count() == 0
    assert admin.id != mona.id


def test_last_admin_cannot_be_demoted_or_disabled(client: TestClient, db: Session) -> None:
    admin = make_user(db, "solo", Role.admin)
    csrf = login(client, "solo")
    for body in ({"role": "user"}, {"disabled": True}):
        response = client.patch(f"/api/v1/users/{admin.id}", json=body, headers={"X-CSRF-Token": csrf})
        assert response.status_code == 409 and "last" in response.json()["detail"]
    assert user_named(db, "solo").role == Role.admin


def test_admin_changes_roles_in_the_ui(client: TestClient, db: Session) -> None:
    make_user(db, "boss", Role.admin)
    nina = make_user(db, "nina")
    csrf = login(client, "boss")
    response = client.post(
        f"/admin/users/{nina.id}", data={"role": "annotator", "csrf_token": csrf}, headers={"HX-Request": "true"}
    )
    assert response.status_code == 200 and f'id="user-{nina.id}"' in response.text and "<html" not in response.text
    assert user_named(db, "nina").role == Role.annotator


def test_invite_only_closes_signup_after_the_first_account(settings: Settings) -> None:
    from app import migrate

    settings.signup_mode = SignupMode.invite_only
    migrate.upgrade(settings.resolved_database_url)
    client = TestClient(create_app(settings))
    assert signup(client, "first").status_code == 303
    other = TestClient(client.app)
    assert other.get("/signup").status_code == 403
    token = other.cookies.get("flywheel_csrf") and csrf_from(other.get("/login").text)
    data = {"username": "second", "password": PASSWORD, "password_confirm": PASSWORD, "csrf_token": token}
    assert other.post("/signup", data=data).status_code == 403


def test_open_redirect_is_refused(client: TestClient, db: Session) -> None:
    make_user(db, "olga")
    token = csrf_from(client.get("/login").text)
    for target in ("//evil.example/x", "https://evil.example", "/\\evil.example"):
        data = {"username": "olga", "password": PASSWORD, "csrf_token": token, "next": target}
        response = client.post("/login", data=data, follow_redirects=False)
        assert response.headers["location"] == "/"
        client.cookies.clear()
        token = csrf_from(client.get("/login").text)


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ok"


def test_readiness_reports_pending_migrations(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # never migrated
    response = client.get("/readyz")
    assert response.status_code == 503 and "migrations pending" in response.json()["database"]


def test_security_headers(client: TestClient) -> None:
    headers = client.get("/").headers
    assert headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]


def test_oversized_bodies_are_413(client: TestClient, db: Session, settings: Settings) -> None:
    make_user(db, "pia")
    csrf = login(client, "pia")
    before = db_snapshot(settings.resolved_database_url)
    big = {"name": "x" * (settings.max_body_bytes + 10)}
    response = client.post("/api/v1/tokens", json=big, headers={"X-CSRF-Token": csrf})
    assert response.status_code == 413 and "larger than" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(settings.max_body_bytes // 65536 + 2):
            yield b"a" * 65536

    streamed = client.post(
        "/account/tokens",
        content=chunks(),
        headers={"X-CSRF-Token": csrf, "content-type": "application/x-www-form-urlencoded"},
    )
    assert streamed.status_code == 413
    assert db_snapshot(settings.resolved_database_url) == before


def test_admin_revokes_all_tokens_of_a_person(client: TestClient, db: Session) -> None:
    from app.services import tokens

    make_user(db, "root2", Role.admin)
    leaky = make_user(db, "leaky")
    secrets_ = [tokens.create_token(db, user=leaky, name=f"t{i}")[1] for i in range(2)]
    db.commit()
    csrf = login(client, "root2")
    assert "2 live tokens" in client.get("/admin/users").text
    assert client.post(f"/admin/users/{leaky.id}/revoke-tokens", data={"csrf_token": csrf}).status_code == 200
    for secret in secrets_:
        assert (
            TestClient(client.app).get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"}).status_code == 401
        )
