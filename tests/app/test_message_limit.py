"""One message limit (issue #16): a conversation the served model cannot take (its context less room for an answer)
is a 413 that says the limit and how far over, from the page, the REST API, regenerate and the OpenAI route, and
nothing is stored. The tiny served model has a 96-token context and the answer budget 256 tokens, so the limit is
96 - 96 // 4 = 72 tokens."""

import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Message, User
from app.services import chat, tokens
from app.settings import Settings
from tests.factories import app_with_active_model, login, make_user, wait_for_model

LIMIT = 72
LONG = "Mira lives in Oslo and has a red cat. " * 20  # about 200 tokens, under the 8000-character cap


@pytest.fixture
def served(any_db_url: str, tmp_path: Path, model_dir: Path) -> Iterator[tuple[TestClient, Session, str]]:
    settings = Settings(data_dir=tmp_path / "data", database_url=any_db_url, secret_key=secrets.token_urlsafe(40))
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db, TestClient(app) as client:
        wait_for_model(app)
        make_user(db, "ulla")
        yield client, db, login(client, "ulla")


def count(db: Session) -> int:
    db.expire_all()
    n = db.scalar(select(func.count()).select_from(Message))
    db.rollback()
    return n


def assert_over(message: str) -> None:
    found = re.search(r"the conversation is (\d+) tokens; the limit is (\d+) \(.*\): (\d+) tokens over", message)
    assert found, message
    size, limit, over = map(int, found.groups())
    assert limit == LIMIT and over == size - limit > 0


def new_chat(db: Session) -> int:
    """An empty conversation of ulla's (as the REST API makes them)."""
    conversation = chat.create_conversation(db, user=db.scalar(select(User).where(User.username == "ulla")))
    db.commit()
    return conversation.id


def test_the_page_refuses_a_message_over_the_limit_and_stores_nothing(served) -> None:
    client, db, csrf = served
    conversation_id = new_chat(db)
    page = client.get(f"/chat/{conversation_id}").text
    assert f'maxlength="{chat.MAX_MESSAGE_CHARS}"' in page and f"up to {LIMIT} tokens" in page
    before = count(db)
    form = {"content": LONG, "csrf_token": csrf}
    htmx = client.post(f"/chat/{conversation_id}/messages", data=form, headers={"HX-Request": "true"})
    assert htmx.status_code == 413 and htmx.headers["HX-Reswap"] == "none" and 'id="toast"' in htmx.text
    assert_over(htmx.text.replace("&#39;", "'"))
    plain = client.post(f"/chat/{conversation_id}/messages", data=form, follow_redirects=False)
    assert plain.status_code == 413 and "tokens over" in plain.text
    assert count(db) == before
    fits = client.post(f"/chat/{conversation_id}/messages", data={**form, "content": "Hi"}, follow_redirects=False)
    assert fits.status_code == 303 and count(db) == before + 2  # a message that fits is stored with its answer


def test_the_rest_api_refuses_a_message_over_the_limit_and_stores_nothing(served) -> None:
    client, db, _ = served
    user = make_user(db, "rita")
    _, secret = tokens.create_token(db, user=user, name="api")
    db.commit()
    api = TestClient(client.app, headers={"Authorization": f"Bearer {secret}"})
    conversation_id = api.post("/api/v1/conversations", json={}).json()["id"]
    before = count(db)
    for stream in (False, True):
        response = api.post(
            f"/api/v1/conversations/{conversation_id}/messages", json={"content": LONG, "stream": stream}
        )
        assert response.status_code == 413
        assert_over(response.json()["detail"])
    assert count(db) == before


def test_regenerate_over_the_limit_is_refused_and_stores_nothing(served) -> None:
    client, db, csrf = served
    conversation_id = new_chat(db)
    user = db.scalar(select(User).where(User.username == "ulla"))
    _, answer = chat.add_user_message(db, user=user, conversation_id=conversation_id, content=LONG)  # as if stored
    chat.finish_answer(  # before a smaller model was served
        db, message_id=answer.id, content="Oslo.", finish_reason="stop", model_version_id=None, sampling={}
    )
    db.commit()
    before = count(db)
    response = client.post(f"/chat/messages/{answer.id}/regenerate", data={"csrf_token": csrf}, follow_redirects=False)
    assert response.status_code == 413 and "tokens over" in response.text
    assert count(db) == before


def test_the_openai_route_refuses_a_prompt_over_the_limit(served) -> None:
    client, db, _ = served
    user = make_user(db, "otto")
    _, secret = tokens.create_token(db, user=user, name="oa")
    db.commit()
    headers = {"Authorization": f"Bearer {secret}"}
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": LONG}], "stream": stream}
        response = client.post("/v1/chat/completions", json=body, headers=headers)
        assert response.status_code == 413 and response.headers["content-type"].startswith("application/json")
        assert_over(response.json()["detail"])
    fits = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=headers)
    assert fits.status_code == 200 and fits.json()["choices"]


def test_the_limit_is_the_context_less_room_for_an_answer_and_never_over_max_prompt_tokens() -> None:
    from app.serving.inference import Limits, PromptLimit

    assert PromptLimit.of(1024, Limits(max_prompt_tokens=4096, max_new_tokens=256)).tokens == 768
    assert PromptLimit.of(96, Limits(max_prompt_tokens=4096, max_new_tokens=256)).tokens == 72  # a quarter at most
    capped = PromptLimit.of(1024, Limits(max_prompt_tokens=500, max_new_tokens=256))
    assert capped.tokens == 500 and capped.why == "the server's max_prompt_tokens"
