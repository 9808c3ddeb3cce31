"""Bad input gets a 4xx with the one error shape `{"detail": "<message>"}`, never a 5xx.

Schemathesis walks the whole OpenAPI description against a real server (valid and deliberately invalid cases, as an
admin, so the authenticated routes are reached); hand-written cases pin malformed JSON, wrong types, unknown and
out-of-range ids and NUL characters on SQLite and PostgreSQL.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, settings
from sqlalchemy import select, update

from app.models import Prompt, PromptSource, Role, User
from app.services import annotation, chat, prompts, tokens
from app.settings import Settings
from app.web.main import create_app
from tests.conftest import serving
from tests.factories import app_with_active_model, make_user, wait_for_model

HUGE = 2**63  # past every integer column: PostgreSQL says "out of range" unless the app refuses it first


@dataclass
class World:
    """A served app with something behind each kind of id: a conversation with an answer and a candidate set."""

    app: FastAPI
    url: str
    admin_id: int
    token: str
    answer_id: int
    conversation_id: int
    set_id: int


def build_world(settings: Settings, model_dir: Path) -> Iterator[World]:
    settings.max_new_tokens = 8  # answers stay cheap: the point is the input, not the model
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db:
        admin = make_user(db, "root", Role.admin)
        _, secret = tokens.create_token(db, user=admin, name="fuzz")
        prompts.add_prompts(
            db, items=[([{"role": "user", "content": "What is 1 plus 1?"}], None)], source=PromptSource.demo
        )
        cset = annotation.create_set(
            db,
            prompt_id=db.scalar(select(Prompt.id)),
            answers=[("a", 1), ("b", 1), ("c", 1)],
            model_version_id=None,
            params={},
        )
        conversation = chat.create_conversation(db, user=admin, title="kept")
        _, answer = chat.add_user_message(db, user=admin, conversation_id=conversation.id, content="Hello")
        chat.finish_answer(
            db, message_id=answer.id, content="Hi!", finish_reason="stop", model_version_id=None, sampling={}
        )
        db.commit()
        ids = (admin.id, answer.id, conversation.id, cset.id)
    with serving(app) as url:
        wait_for_model(app)
        yield World(app, url, ids[0], secret, ids[1], ids[2], ids[3])


@pytest.fixture
def world(settings: Settings, model_dir: Path) -> Iterator[World]:
    yield from build_world(settings, model_dir)


def assert_error_shape(response: httpx.Response | object, status: int | None = None) -> None:
    """A 4xx (the given one, if any) whose JSON body is exactly {"detail": "<one message>"}."""
    code = response.status_code
    assert 400 <= code < 500 if status is None else code == status, (code, response.text)
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and body["detail"], body


# ---- schemathesis over the OpenAPI description ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_world(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[World]:
    """One server for every operation of the schemathesis run (a fresh one per operation would cost more than the
    run itself); admin_token() repairs what the fuzzer may break between calls."""
    data = tmp_path_factory.mktemp("fuzzed")
    settings = Settings(data_dir=data, database_url=f"sqlite:///{data / 'flywheel.db'}", secret_key="k" * 40)
    yield from build_world(settings, model_dir)


def admin_token(world: World) -> str:
    """A live admin token for the next call: the fuzzer may have revoked ours, disabled or demoted the admin (after
    creating another admin), and that must not turn the rest of the run into 401s."""
    with world.app.state.session_factory() as db:
        db.execute(update(User).where(User.id == world.admin_id).values(role=Role.admin, disabled=False))
        token = tokens.resolve_token(db, secret=world.token)
        if token is None:
            _, world.token = tokens.create_token(db, user=db.get(User, world.admin_id), name="fuzz")
        db.commit()
    return world.token


# The description depends only on the routes: built from an app that never touches a database (nothing connects).
schema = schemathesis.openapi.from_dict(create_app(Settings(database_url="sqlite://", secret_key="k" * 40)).openapi())


@schema.parametrize()
@settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
)
def test_no_request_makes_a_server_error(case, shared_world: World) -> None:
    """Every operation, valid and invalid inputs: never a 5xx, and API errors keep the one shape."""
    world = shared_world
    # Redirects are not followed: each response is judged on its own (a 303 to the login form is a fine answer).
    response = case.call(
        base_url=world.url, headers={"Authorization": f"Bearer {admin_token(world)}"}, timeout=60, allow_redirects=False
    )
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.status_code} {response.text}"
    is_api = case.formatted_path.startswith(("/api/", "/v1/"))
    if is_api and response.status_code >= 400:
        body = response.json()
        assert set(body) == {"detail"} and isinstance(body["detail"], str), (case.formatted_path, body)


# ---- hand-written bad input, on both databases -------------------------------------------------------------------


@pytest.fixture
def any_world(any_db_url: str, settings: Settings, model_dir: Path) -> Iterator[World]:
    settings.database_url = any_db_url
    yield from build_world(settings, model_dir)


def client(world: World) -> httpx.Client:
    return httpx.Client(base_url=world.url, headers={"Authorization": f"Bearer {world.token}"}, timeout=60)


def bodies_of(world: World) -> dict[tuple[str, str], dict]:
    """A valid body for each JSON route worth breaking."""
    return {
        ("POST", f"/api/v1/annotation/sets/{world.set_id}/ranking"): {"status": "skipped"},
        ("PUT", f"/api/v1/messages/{world.answer_id}/feedback"): {"value": 1},
        ("POST", "/api/v1/conversations"): {"title": "t"},
        ("PATCH", f"/api/v1/conversations/{world.conversation_id}"): {"title": "t"},
        ("POST", f"/api/v1/conversations/{world.conversation_id}/messages"): {"content": "hi", "max_tokens": 2},
        ("POST", "/api/v1/tokens"): {"name": "t"},
        ("POST", "/api/v1/jobs"): {"type": "sft"},
        ("POST", "/api/v1/prompts/import"): {"jsonl": '{"prompt": "p"}'},
        ("POST", "/v1/chat/completions"): {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    }


def test_malformed_json_is_a_422_with_the_one_shape(any_world: World) -> None:
    with client(any_world) as api:
        for (method, path), body in bodies_of(any_world).items():
            good = json.dumps(body)
            for raw in (good[:-1], good + "}", "{'value': 1}", "", "null", "[]", "\x00", '{"a": NaN'):
                response = api.request(method, path, content=raw, headers={"Content-Type": "application/json"})
                assert_error_shape(response, 422)
            response = api.request(method, path, content=good, headers={"Content-Type": "text/plain"})
            assert_error_shape(response, 422)


def test_wrong_types_are_a_422_with_the_one_shape(any_world: World) -> None:
    w = any_world
    cases = {
        ("POST", f"/api/v1/annotation/sets/{w.set_id}/ranking"): [
            {"ranking": "first"},
            {"ranking": [{"candidate_id": "x", "rank": 1}]},
            {"status": 3},
            {"ranking": [{"candidate_id": 1, "rank": 1.5}]},
            {"time_spent_ms": "long"},
            {"status": "maybe"},
            {"ranking": [{"candidate_id": HUGE, "rank": 1}]},
            {"time_spent_ms": HUGE},
            {"unknown": 1},
        ],
        ("PUT", f"/api/v1/messages/{w.answer_id}/feedback"): [
            {"value": "up"},
            {"value": 2},
            {"value": None},
            {"value": 1, "reason": 5},
            {"value": 1, "comment": []},
            {"value": 1, "reason": "because"},
            {},
        ],
        ("POST", f"/api/v1/conversations/{w.conversation_id}/messages"): [
            {"content": 5},
            {"content": "hi", "max_tokens": "ten"},
            {"content": "hi", "temperature": -1},
            {"content": "hi", "seed": "s"},
            {"content": ""},
            {"content": "hi", "top_k": 0},
        ],
        ("POST", "/api/v1/jobs"): [{"type": "sft", "params": []}, {"type": "go"}, {"type": "sft", "priority": 1e9}],
        ("POST", "/v1/chat/completions"): [
            {"messages": "hi"},
            {"messages": [{"role": "robot", "content": "hi"}]},
            {"messages": []},
            {"messages": [{"role": "user", "content": "hi"}], "n": 0},
        ],
    }
    with client(w) as api:
        for (method, path), bodies in cases.items():
            for body in bodies:
                assert_error_shape(api.request(method, path, json=body))


def test_unknown_and_out_of_range_ids_are_4xx_with_the_one_shape(any_world: World) -> None:
    """Ids that name nothing: small, negative, and past every integer column (PostgreSQL would fail on those)."""
    routes = [
        ("GET", "/api/v1/conversations/{}", None),
        ("PATCH", "/api/v1/conversations/{}", {"title": "t"}),
        ("DELETE", "/api/v1/conversations/{}", None),
        ("POST", "/api/v1/conversations/{}/messages", {"content": "hi"}),
        ("PUT", "/api/v1/messages/{}/feedback", {"value": 1}),
        ("DELETE", "/api/v1/messages/{}/feedback", None),
        ("POST", "/api/v1/annotation/sets/{}/ranking", {"status": "skipped"}),
        ("GET", "/api/v1/jobs/{}", None),
        ("POST", "/api/v1/jobs/{}/cancel", None),
        ("PATCH", "/api/v1/users/{}", {"disabled": True}),
        ("POST", "/api/v1/users/{}/tokens", {"name": "t"}),
        ("DELETE", "/api/v1/tokens/{}", None),
        ("POST", "/api/v1/models/{}/promote", None),
    ]
    with client(any_world) as api:
        for method, path, body in routes:
            for ident in (987_654, 0, -1, HUGE, -HUGE, 10**30):
                response = api.request(method, path.format(ident), json=body)
                assert_error_shape(response)
                assert response.status_code in (404, 422), (method, path, ident, response.status_code)
            assert_error_shape(api.request(method, path.format("abc"), json=body), 422)


def test_nul_characters_never_reach_the_database_as_an_error(any_world: World) -> None:
    """PostgreSQL refuses NUL in text: every text field must drop it (or refuse the request), never fail."""
    w = any_world
    nul = "a\x00b"
    with client(w) as api:
        answers = [
            api.post("/api/v1/conversations", json={"title": nul}),
            api.patch(f"/api/v1/conversations/{w.conversation_id}", json={"title": nul}),
            api.put(f"/api/v1/messages/{w.answer_id}/feedback", json={"value": -1, "reason": "other", "comment": nul}),
            api.post(f"/api/v1/annotation/sets/{w.set_id}/ranking", json={"status": "flagged", "flag_reason": nul}),
            api.post("/api/v1/tokens", json={"name": nul}),
            api.post("/api/v1/users", json={"username": nul, "password": nul * 4}),
            api.post("/api/v1/jobs", json={"type": "sft", "params": {nul: nul}}),
            api.post("/api/v1/prompts/import", json={"jsonl": json.dumps({"prompt": nul})}),
            api.put(f"/api/v1/messages/{w.answer_id}/feedback", json={"value": 1, "reason": nul}),
        ]
        for response in answers:
            assert response.status_code < 500, response.text
            if response.status_code >= 400:
                assert_error_shape(response)


def test_a_body_over_the_limit_is_a_413_with_the_one_shape(world: World) -> None:
    limit = world.app.state.settings.max_body_bytes
    with client(world) as api:
        big = json.dumps({"title": "x" * (limit + 10)})
        assert_error_shape(
            api.post("/api/v1/conversations", content=big, headers={"Content-Type": "application/json"}), 413
        )
