"""Who may call what: every registered route × anonymous / user / annotator / admin gets exactly the intended status,
and a disabled person's cookie or token, or a revoked token, gets no further than an anonymous visitor.

Adding a route without adding it here fails `test_every_route_is_in_the_matrix`.
"""

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ModelKind, ModelVersion, Prompt, PromptSource, Role, User
from app.services import annotation, chat, jobs, prompts, role_requests, tokens, users
from tests.factories import PASSWORD, csrf_from, db_snapshot, login, make_user

ROLES = ("anonymous", "user", "annotator", "admin")
_names = itertools.count()


@dataclass
class Caller:
    client: TestClient
    csrf: str
    ids: dict[
        str, int | str
    ]  # what the path parameters name: this caller's own token, conversation, messages; shared ones


def form(**data: Any) -> Callable[[Caller], dict]:
    return lambda c: {"data": {**data, "csrf_token": c.csrf}}


def body(**data: Any) -> Callable[[Caller], dict]:
    return lambda c: {"json": data, "headers": {"X-CSRF-Token": c.csrf}}


def new_user_form(c: Caller) -> dict:
    return {"data": {"username": f"new{next(_names)}", "password": PASSWORD, "role": "user", "csrf_token": c.csrf}}


def new_user_body(c: Caller) -> dict:
    return {"json": {"username": f"api{next(_names)}", "password": PASSWORD}, "headers": {"X-CSRF-Token": c.csrf}}


def upload(c: Caller) -> dict:
    return {"data": {"kind": "prompts", "csrf_token": c.csrf}, "files": {"file": ("p.jsonl", b'{"prompt": "New?"}')}}


def nothing(c: Caller) -> dict:
    return {}


# (method, path) -> (status for anonymous, user, annotator, admin), request arguments
MATRIX: dict[tuple[str, str], tuple[tuple[int, int, int, int], Callable[[Caller], dict]]] = {
    ("GET", "/openapi.json"): ((200, 200, 200, 200), nothing),
    ("GET", "/docs"): ((200, 200, 200, 200), nothing),
    ("GET", "/docs/oauth2-redirect"): ((200, 200, 200, 200), nothing),
    ("GET", "/redoc"): ((200, 200, 200, 200), nothing),
    ("GET", "/"): ((200, 200, 200, 200), nothing),
    ("GET", "/setup"): ((200, 200, 200, 200), nothing),
    ("GET", "/healthz"): ((200, 200, 200, 200), nothing),
    ("GET", "/readyz"): ((200, 200, 200, 200), nothing),
    ("GET", "/login"): ((200, 303, 303, 303), nothing),
    ("POST", "/login"): ((401, 401, 401, 401), form(username="ghost", password="not the password")),
    ("GET", "/signup"): ((200, 200, 200, 200), nothing),
    ("POST", "/signup"): ((409, 409, 409, 409), form(username="admin", password=PASSWORD, password_confirm=PASSWORD)),
    ("POST", "/logout"): ((303, 303, 303, 303), form()),
    ("GET", "/account/tokens"): ((303, 200, 200, 200), nothing),
    ("POST", "/account/tokens"): ((401, 201, 201, 201), form(name="matrix")),
    ("POST", "/account/tokens/{token_id}/revoke"): ((401, 303, 303, 303), form()),
    ("GET", "/admin/users"): ((303, 403, 403, 200), nothing),
    ("POST", "/admin/users"): ((401, 403, 403, 303), new_user_form),
    ("POST", "/admin/users/{user_id}"): ((401, 403, 403, 303), form(role="user")),
    ("POST", "/admin/users/{user_id}/revoke-tokens"): ((401, 403, 403, 303), form()),
    ("POST", "/admin/users/{delete_user_id}/delete"): ((401, 403, 403, 303), form(confirm="doomed-page")),
    ("POST", "/account/delete"): ((401, 422, 422, 422), form(confirm="not-my-name")),  # success: test_withdrawal.py
    ("DELETE", "/api/v1/me"): (
        (401, 422, 422, 422),
        lambda c: {"params": {"confirm": "not-my-name"}, "headers": {"X-CSRF-Token": c.csrf}},
    ),
    ("DELETE", "/api/v1/users/{api_delete_user_id}"): (
        (401, 403, 403, 204),
        lambda c: {"params": {"confirm": "doomed-api"}, "headers": {"X-CSRF-Token": c.csrf}},
    ),
    ("POST", "/chat/messages/{delete_message_id}/delete"): ((401, 303, 303, 303), form()),
    ("DELETE", "/api/v1/messages/{api_delete_message_id}"): ((401, 204, 204, 204), body()),
    ("GET", "/api/v1/me"): ((401, 200, 200, 200), nothing),
    ("GET", "/api/v1/users"): ((401, 403, 403, 200), nothing),
    ("POST", "/api/v1/users"): ((401, 403, 403, 201), new_user_body),
    ("PATCH", "/api/v1/users/{user_id}"): ((401, 403, 403, 200), body(role="user")),
    ("POST", "/api/v1/users/{user_id}/tokens"): ((401, 403, 403, 201), body(name="bot")),
    ("GET", "/api/v1/tokens"): ((401, 200, 200, 200), nothing),
    ("POST", "/api/v1/tokens"): ((401, 201, 201, 201), body(name="matrix")),
    ("DELETE", "/api/v1/tokens/{token_id}"): ((401, 200, 200, 200), lambda c: {"headers": {"X-CSRF-Token": c.csrf}}),
    ("GET", "/chat"): ((303, 200, 200, 200), nothing),
    ("POST", "/chat"): ((401, 503, 503, 503), form(content="hello")),  # a new chat's first message; no model served
    ("GET", "/chat/{conversation_id}"): ((303, 200, 200, 200), nothing),
    ("POST", "/chat/{conversation_id}/messages"): ((401, 503, 503, 503), form(content="hello")),  # no model served
    ("POST", "/chat/{conversation_id}/settings"): ((401, 303, 303, 303), form(title="renamed", allow_training="true")),
    ("POST", "/chat/{delete_conversation_id}/delete"): ((401, 303, 303, 303), form()),
    ("GET", "/chat/messages/{message_id}"): ((303, 200, 200, 200), nothing),
    ("GET", "/chat/messages/{streaming_message_id}/stream"): ((303, 503, 503, 503), nothing),  # no model served
    ("POST", "/chat/messages/{message_id}/stop"): ((401, 200, 200, 200), form()),
    ("POST", "/chat/messages/{message_id}/feedback"): ((401, 303, 303, 303), form(value="1", reason="helpful")),
    ("POST", "/chat/messages/{message_id}/feedback/reason"): (
        (401, 303, 303, 303),
        form(reason="wrong"),
    ),  # voted above
    ("POST", "/chat/messages/{last_answer_id}/regenerate"): ((401, 303, 303, 303), form()),
    ("GET", "/api/v1/conversations"): ((401, 200, 200, 200), nothing),
    ("POST", "/api/v1/conversations"): ((401, 201, 201, 201), body(title="api")),
    ("GET", "/api/v1/conversations/{conversation_id}"): ((401, 200, 200, 200), nothing),
    ("PATCH", "/api/v1/conversations/{conversation_id}"): ((401, 200, 200, 200), body(allow_training=False)),
    ("DELETE", "/api/v1/conversations/{api_delete_conversation_id}"): ((401, 204, 204, 204), body()),
    ("POST", "/api/v1/conversations/{conversation_id}/messages"): ((401, 503, 503, 503), body(content="hi")),
    ("POST", "/api/v1/messages/{message_id}/stop"): ((401, 200, 200, 200), body()),
    ("PUT", "/api/v1/messages/{message_id}/feedback"): ((401, 200, 200, 200), body(value=-1, reason="wrong")),
    ("DELETE", "/api/v1/messages/{message_id}/feedback"): ((401, 204, 204, 204), body()),
    ("GET", "/api/v1/models"): ((401, 403, 403, 200), nothing),
    ("POST", "/api/v1/models/{version_id}/promote"): ((401, 403, 403, 200), body()),
    ("POST", "/api/v1/models/rollback"): ((401, 403, 403, 409), body(kind="policy")),  # nothing to roll back to
    ("GET", "/v1/models"): ((401, 200, 200, 200), nothing),
    ("POST", "/v1/chat/completions"): ((401, 503, 503, 503), body(messages=[{"role": "user", "content": "hi"}])),
    ("GET", "/annotate"): ((303, 200, 200, 200), nothing),  # a user gets the page that asks for the role
    ("POST", "/annotate/sets/{set_id}"): ((401, 403, 303, 303), form(action="skip")),
    ("GET", "/annotate/guidelines"): ((303, 403, 200, 200), nothing),
    ("POST", "/annotate/guidelines"): ((401, 403, 403, 303), form(text="Rank carefully.")),
    ("GET", "/api/v1/annotation/next"): ((401, 403, 200, 200), nothing),
    ("POST", "/api/v1/annotation/sets/{api_set_id}/ranking"): ((401, 403, 201, 201), body(status="skipped")),
    ("POST", "/api/v1/prompts/import"): ((401, 403, 403, 201), body(jsonl='{"prompt": "Where does Mira live?"}')),
    ("GET", "/admin"): ((303, 403, 403, 200), nothing),
    ("GET", "/admin/jobs"): ((303, 403, 403, 200), nothing),
    ("POST", "/admin/jobs"): ((401, 403, 403, 303), form(type="reward", params='{"steps": 5}')),
    ("GET", "/admin/jobs/{job_id}"): ((303, 403, 403, 200), nothing),
    ("POST", "/admin/jobs/{admin_cancel_job_id}/cancel"): ((401, 403, 403, 303), form()),
    ("POST", "/admin/models/{version_id}/promote"): ((401, 403, 403, 303), form()),
    ("POST", "/admin/models/rollback"): ((401, 403, 403, 409), form(kind="reward")),  # nothing to roll back to
    ("GET", "/admin/export/{kind}"): ((303, 403, 403, 200), nothing),
    ("POST", "/admin/import"): ((401, 403, 403, 303), upload),
    ("GET", "/api/v1/export/{kind}"): ((401, 403, 403, 200), nothing),
    ("GET", "/api/v1/jobs"): ((401, 403, 403, 200), nothing),
    ("POST", "/api/v1/jobs"): ((401, 403, 403, 201), body(type="reward")),
    ("GET", "/api/v1/jobs/{job_id}"): ((401, 403, 403, 200), nothing),
    ("POST", "/api/v1/jobs/{job_id}/cancel"): ((401, 403, 403, 200), lambda c: {"headers": {"X-CSRF-Token": c.csrf}}),
    ("GET", "/admin/models/{version_id}"): ((303, 403, 403, 200), nothing),
    ("POST", "/admin/settings"): ((401, 403, 403, 303), form(auto_retrain_after="0")),
    ("GET", "/admin/settings"): ((303, 403, 403, 200), nothing),
    ("GET", "/admin/data"): ((303, 403, 403, 200), nothing),
    ("GET", "/admin/models"): ((303, 403, 403, 200), nothing),
    ("POST", "/admin/role-requests/{request_id}"): ((401, 403, 403, 303), form(decision="approve")),
    ("POST", "/annotate/request-role"): ((401, 303, 409, 409), form(message="I would like to help")),
    ("GET", "/api/v1/settings"): ((401, 403, 403, 200), nothing),
    ("PATCH", "/api/v1/settings"): ((401, 403, 403, 200), body(auto_retrain_after=0)),
}


PARAMETER_NAMES = {
    "delete_conversation_id": "conversation_id",
    "streaming_message_id": "message_id",
    "last_answer_id": "message_id",
    "api_delete_conversation_id": "conversation_id",
    "api_set_id": "set_id",
    "admin_cancel_job_id": "job_id",
    "delete_user_id": "user_id",
    "api_delete_user_id": "user_id",
    "delete_message_id": "message_id",
    "api_delete_message_id": "message_id",
}


def route_key(method: str, path: str) -> tuple[str, str]:
    """The matrix may name a path parameter more precisely than the route (which object of the caller's to use)."""
    for specific, generic in PARAMETER_NAMES.items():
        path = path.replace("{" + specific + "}", "{" + generic + "}")
    return method, path


def registered_routes(app: FastAPI) -> Iterator[tuple[str, str]]:
    """(method, path) of every endpoint, also inside included routers (FastAPI may keep those as nested objects)."""
    for route in app.routes:
        contexts = route.effective_route_contexts() if hasattr(route, "effective_route_contexts") else [route]
        for ctx in contexts:
            for method in getattr(ctx, "methods", None) or ():
                if method != "HEAD":
                    yield method, ctx.path


def test_every_route_is_in_the_matrix(app: FastAPI) -> None:
    routes = set(registered_routes(app))
    assert routes, "found no routes: the walker is broken"
    keys = {route_key(*key) for key in MATRIX}
    missing = routes - keys
    assert not missing, f"routes without an entry in the role matrix: {sorted(missing)}"
    stale = keys - routes
    assert not stale, f"matrix entries for routes that no longer exist: {sorted(stale)}"


def own_objects(db: Session, user: User) -> dict[str, int]:
    token, _ = tokens.create_token(db, user=user, name="to revoke")
    conversation = chat.create_conversation(db, user=user)
    _, answer = chat.add_user_message(db, user=user, conversation_id=conversation.id, content="hi")
    chat.finish_answer(
        db, message_id=answer.id, content="hello", finish_reason="stop", model_version_id=None, sampling={}
    )
    _, streaming = chat.add_user_message(db, user=user, conversation_id=conversation.id, content="and?")
    doomed = chat.create_conversation(db, user=user)
    api_doomed = chat.create_conversation(db, user=user)
    other = chat.create_conversation(db, user=user)
    _, last_answer = chat.add_user_message(db, user=user, conversation_id=other.id, content="hey")
    chat.finish_answer(
        db, message_id=last_answer.id, content="hey", finish_reason="stop", model_version_id=None, sampling={}
    )
    doomed_messages = []
    for _ in range(2):
        message, _ = chat.add_user_message(
            db, user=user, conversation_id=chat.create_conversation(db, user=user).id, content="x"
        )
        doomed_messages.append(message.id)
    db.commit()
    return {
        "delete_message_id": doomed_messages[0],
        "api_delete_message_id": doomed_messages[1],
        "token_id": token.id,
        "conversation_id": conversation.id,
        "message_id": answer.id,
        "streaming_message_id": streaming.id,
        "delete_conversation_id": doomed.id,
        "last_answer_id": last_answer.id,
        "api_delete_conversation_id": api_doomed.id,
    }


@pytest.fixture
def callers(app: FastAPI, db: Session) -> dict[str, Caller]:
    make_user(db, "admin", Role.admin)  # also the name that POST /signup collides with
    version = ModelVersion(name="unloadable", kind=ModelKind.policy, path="/nonexistent")
    db.add(version)
    db.flush()
    prompts.add_prompts(db, items=[([{"role": "user", "content": "Hi?"}], None)], source=PromptSource.demo)
    prompt_id = db.scalar(select(Prompt.id))
    sets = [
        annotation.create_set(db, prompt_id=prompt_id, answers=[("a", 1), ("b", 1)], model_version_id=None, params={})
        for _ in range(2)
    ]
    shared = {
        "user_id": make_user(db, "target").id,
        "job_id": jobs.enqueue(db, type="reward").id,
        "version_id": version.id,
        "set_id": sets[0].id,
        "api_set_id": sets[1].id,
        "admin_cancel_job_id": jobs.enqueue(db, type="sft").id,
        "delete_user_id": make_user(db, "doomed-page").id,
        "api_delete_user_id": make_user(db, "doomed-api").id,
        "kind": "rankings",
        "request_id": role_requests.ask(db, user=make_user(db, "asker")).id,
    }
    db.commit()
    result = {}
    for role in ROLES:
        client = TestClient(app)
        if role == "anonymous":
            someone = own_objects(db, make_user(db, "someone"))
            result[role] = Caller(client, csrf_from(client.get("/login").text), {**someone, **shared})
            continue
        user = make_user(db, f"as-{role}", Role(role))
        result[role] = Caller(client, login(client, user.username), {**own_objects(db, user), **shared})
    return result


def test_role_matrix(callers: dict[str, Caller]) -> None:
    failures = []
    # Logout last: it ends the caller's session.
    for (method, path), (expected, make_args) in sorted(MATRIX.items(), key=lambda kv: kv[0][1] == "/logout"):
        for role, want in zip(ROLES, expected, strict=True):
            caller = callers[role]
            url = path.format(**caller.ids)
            response = caller.client.request(method, url, follow_redirects=False, **make_args(caller))
            if response.status_code != want:
                failures.append(f"{role:9} {method:6} {url}: got {response.status_code}, want {want}")
    assert not failures, "\n".join(failures)


# A bad token is refused before anything else looks at the request, even where anonymous visitors are welcome.
# A bad token is never redirected to the login page either (which would refuse it again: a redirect loop).
BAD_TOKEN_OVERRIDES = {
    ("GET", "/"): 401,
    ("GET", "/setup"): 401,
    ("GET", "/login"): 401,
    ("POST", "/signup"): 401,
    ("POST", "/logout"): 401,
}


def test_disabled_users_and_revoked_tokens_get_no_further_than_anonymous(
    app: FastAPI, db: Session, settings, callers: dict[str, Caller]
) -> None:
    """Every route, called with the session cookie of a person since disabled, their API token, or a revoked token
    of an active person: exactly what an anonymous visitor gets (a bad token: a 401 even on public pages), and the
    database is left exactly as it was."""
    shared = {
        k: v
        for k, v in callers["admin"].ids.items()
        if k
        in (
            "user_id",
            "job_id",
            "version_id",
            "set_id",
            "api_set_id",
            "admin_cancel_job_id",
            "kind",
            "delete_user_id",
            "api_delete_user_id",
            "request_id",
        )
    }
    gone = make_user(db, "gone", Role.annotator)
    browser = TestClient(app)
    login(browser, gone.username)
    ids = {**shared, **own_objects(db, gone)}
    _, gone_secret = tokens.create_token(db, user=gone, name="before")
    users.update_user(db, user_id=gone.id, disabled=True)
    live = make_user(db, "live", Role.admin)
    row, revoked_secret = tokens.create_token(db, user=live, name="leaked")
    tokens.revoke_token(db, token_id=row.id)
    db.commit()
    as_disabled = Caller(browser, csrf_from(browser.get("/login").text), ids)  # the page now offers anonymous CSRF
    bearers = {
        "disabled token": Caller(TestClient(app, headers={"Authorization": f"Bearer {gone_secret}"}), "", ids),
        "revoked token": Caller(TestClient(app, headers={"Authorization": f"Bearer {revoked_secret}"}), "", ids),
    }
    before = db_snapshot(settings.resolved_database_url)
    failures = []
    for (method, path), (expected, make_args) in sorted(MATRIX.items(), key=lambda kv: kv[0][1] == "/logout"):
        bad_token = BAD_TOKEN_OVERRIDES.get((method, path), 401 if expected[0] == 303 else expected[0])
        wants = {"disabled": expected[0]} | dict.fromkeys(bearers, bad_token)
        for name, caller in {"disabled": as_disabled, **bearers}.items():
            url = path.format(**caller.ids)
            response = caller.client.request(method, url, follow_redirects=False, **make_args(caller))
            if response.status_code != wants[name]:
                failures.append(f"{name:14} {method:6} {url}: got {response.status_code}, want {wants[name]}")
    assert not failures, "\n".join(failures)
    assert db_snapshot(settings.resolved_database_url) == before
    # Nor can the disabled person log in again; and enabling the account again revives no old login or token.
    token = csrf_from(browser.get("/login").text)
    attempt = {"username": gone.username, "password": PASSWORD, "csrf_token": token}
    assert browser.post("/login", data=attempt, follow_redirects=False).status_code == 401
    users.update_user(db, user_id=gone.id, disabled=False)
    db.commit()
    assert bearers["disabled token"].client.get("/api/v1/me").status_code == 401
    assert browser.get("/api/v1/me").status_code == 401


def test_a_bad_token_on_a_page_is_refused_without_a_redirect_loop(app: FastAPI) -> None:
    """A client sending a bad token gets a 401 where a browser without a login is sent to the login page: following
    that redirect would only be refused again, for ever."""
    client = TestClient(app, headers={"Authorization": "Bearer fw_not-a-token"})
    response = client.get("/chat", follow_redirects=True)
    assert response.status_code == 401 and not response.history
    assert TestClient(app).get("/chat", follow_redirects=False).status_code == 303
