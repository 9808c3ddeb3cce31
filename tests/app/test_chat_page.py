"""The chat page's own behaviour (issue #18): New chat stores nothing until the first message, which titles the chat
(shown at once, out of band); a reason picked after the thumb is saved; each answer names the model that wrote it;
an answer the model refuses before its first token says why instead of looking stopped."""

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import Conversation, Feedback, Message, User
from app.services import chat
from app.settings import Settings
from tests.app.test_chat import read_sse, send, start_chat
from tests.factories import app_with_active_model, db_snapshot, login, make_user, wait_for_model

LONG = "Mira lives in Oslo and has a red cat. " * 20  # over the tiny model's limit (tests/app/test_message_limit.py)


@pytest.fixture
def served(settings: Settings, model_dir: Path) -> Iterator[tuple[TestClient, Session]]:
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db, TestClient(app) as client:
        wait_for_model(app)
        yield client, db


def conversations(db: Session) -> int:
    db.expire_all()
    return db.scalar(select(func.count()).select_from(Conversation))


def test_new_chat_stores_nothing_until_the_first_message(served, settings: Settings) -> None:
    client, db = served
    make_user(db, "nina")
    csrf = login(client, "nina")
    before = db_snapshot(settings.resolved_database_url)
    page = client.get("/chat")
    assert page.status_code == 200 and re.search(r'<form id="composer" method="post" action="[^"]*/chat"', page.text)
    assert client.post("/chat", data={"csrf_token": csrf}).status_code == 422  # no message: no conversation
    assert client.post("/chat", data={"content": "  ", "csrf_token": csrf}).status_code == 422
    assert client.post("/chat", data={"content": LONG, "csrf_token": csrf}).status_code == 413  # too long for it
    assert db_snapshot(settings.resolved_database_url) == before

    first = "Where does Mira live?\nAnd what colour is her cat?"
    response = client.post("/chat", data={"content": first, "csrf_token": csrf}, headers={"HX-Request": "true"})
    assert response.status_code == 200
    conversation = db.scalars(select(Conversation)).one()
    assert response.headers["HX-Push-Url"] == f"/chat/{conversation.id}"
    assert conversation.title == "Where does Mira live?"  # the first line of the first message
    assert 'id="chat"' in response.text and "data-stream-url" in response.text and "<html" not in response.text
    assert len(db.scalars(select(Message).where(Message.conversation_id == conversation.id)).all()) == 2

    plain = client.post("/chat", data={"content": "Hi", "csrf_token": csrf}, follow_redirects=False)
    assert plain.status_code == 303 and conversations(db) == 2


def test_the_first_message_titles_a_chat_and_the_sidebar_changes_at_once(served) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)  # an empty one, as the REST API makes them: "New chat"
    response = client.post(
        f"/chat/{conversation_id}/messages",
        data={"content": "Tell me about Mira's red cat", "csrf_token": csrf},
        headers={"HX-Request": "true"},
    )
    assert '<ul id="conversation-list" hx-swap-oob="true">' in response.text
    assert f'id="conversation-{conversation_id}"' in response.text
    assert '<h1 id="chat-title" hx-swap-oob="true">Tell me about Mira&#39;s red cat</h1>' in response.text


def test_titles_are_the_first_line_cut_at_a_word() -> None:
    assert chat.title_from("\n\n  Hello   there \nsecond line") == "Hello there"
    long = "word " * 30
    title = chat.title_from(long)
    assert title.endswith("…") and len(title) <= chat.TITLE_FROM_MESSAGE_CHARS + 1 and " …" not in title
    assert title[:-1].split() == ["word"] * len(title[:-1].split())  # no word cut in half
    assert chat.title_from("x" * 100) == "x" * chat.TITLE_FROM_MESSAGE_CHARS + "…"


def test_a_reason_picked_after_the_thumb_is_saved_on_the_vote(served, settings: Settings) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    answer_id = send(client, csrf, conversation_id, "Hi")
    read_sse(client, answer_id)
    reason_url = f"/chat/messages/{answer_id}/feedback/reason"
    before = db_snapshot(settings.resolved_database_url)
    no_vote = client.post(reason_url, data={"reason": "helpful", "csrf_token": csrf})
    assert no_vote.status_code == 409 and "first" in no_vote.text  # nothing to attach it to yet
    assert db_snapshot(settings.resolved_database_url) == before

    htmx = {"HX-Request": "true"}
    thumb = client.post(f"/chat/messages/{answer_id}/feedback", data={"value": "-1", "csrf_token": csrf}, headers=htmx)
    assert f'{reason_url}" hx-trigger="change"' in thumb.text  # once voted, the reason saves itself when it changes
    saved = client.post(reason_url, data={"reason": "wrong", "comment": "Oslo", "csrf_token": csrf}, headers=htmx)
    assert saved.status_code == 200 and "reason saved" in saved.text
    db.expire_all()
    vote = db.query(Feedback).one()
    assert (vote.value, vote.reason, vote.comment) == (-1, "wrong", "Oslo")  # the thumb kept, the reason added
    assert client.post(reason_url, data={"reason": "because", "csrf_token": csrf}).status_code == 422

    other = TestClient(client.app)
    make_user(db, "snoop")
    other_csrf = login(other, "snoop")
    assert other.post(reason_url, data={"reason": "rude", "csrf_token": other_csrf}).status_code == 404


def test_each_answer_names_the_model_version_that_wrote_it(served) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    answer_id = send(client, csrf, conversation_id, "Hi")
    read_sse(client, answer_id)
    name = client.app.state.inference.current.name
    fragment = client.get(f"/chat/messages/{answer_id}").text
    assert f'<span class="model-name" title="the model version that wrote this answer">{name}</span>' in fragment


def test_an_answer_refused_before_its_first_token_says_why(served) -> None:
    """A conversation can outgrow the served model after it was sent (a smaller model promoted): the page's stream
    gets an `error` event with the reason, and the answer is marked `error`, not an empty "(stopped)"."""
    client, db = served
    _, conversation_id = start_chat(client, db)
    user = db.scalar(select(User).where(User.username == "ulla"))
    _, answer = chat.add_user_message(db, user=user, conversation_id=conversation_id, content=LONG)  # as if stored
    db.commit()
    with client.stream(
        "GET", f"/chat/messages/{answer.id}/stream", headers={"Accept": "text/event-stream"}
    ) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    assert lines[0] == "event: error"
    error = json.loads(lines[1].removeprefix("data: "))
    assert error["status"] == 413 and "tokens over" in error["detail"]
    db.expire_all()
    stored = db.get(Message, answer.id)
    assert (stored.finish_reason, stored.content) == ("error", "")
    fragment = client.get(f"/chat/messages/{answer.id}").text
    assert "No answer" in fragment and "(stopped)" not in fragment


def test_the_answer_settings_sent_with_a_message_sample_its_answer_and_its_regenerations(
    served, settings: Settings
) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    form = {"content": "Hi", "csrf_token": csrf, "temperature": "0", "top_p": "0.5", "max_tokens": "3"}
    before = db_snapshot(settings.resolved_database_url)
    for bad in ({"temperature": "2.5"}, {"top_p": "0"}, {"max_tokens": "0"}, {"temperature": "warm"}):
        refused = client.post(f"/chat/{conversation_id}/messages", data={**form, **bad})
        assert refused.status_code == 422, bad
    assert db_snapshot(settings.resolved_database_url) == before

    response = client.post(f"/chat/{conversation_id}/messages", data=form, headers={"HX-Request": "true"})
    answer_id = int(response.text.split('data-stream-url="')[1].split("/stream")[0].rsplit("/", 1)[1])
    read_sse(client, answer_id)
    db.expire_all()
    answer = db.get(Message, answer_id)
    asked = (
        answer.sampling_params["temperature"],
        answer.sampling_params["top_p"],
        answer.sampling_params["max_tokens"],
    )
    assert asked == (0, 0.5, 3) and answer.finish_reason in {"stop", "length"}
    tokenizer = client.app.state.inference.current.tokenizer
    assert len(tokenizer.encode(answer.content)) <= 3 + 1  # re-encoding may split a token's text in two

    again = client.post(
        f"/chat/messages/{answer_id}/regenerate", data={"csrf_token": csrf}, headers={"HX-Request": "true"}
    )
    new_id = int(again.text.split('data-stream-url="')[1].split("/stream")[0].rsplit("/", 1)[1])
    read_sse(client, new_id)
    db.expire_all()
    assert db.get(Message, new_id).sampling_params["max_tokens"] == 3  # asked again as it was asked

    plain = send(client, csrf, conversation_id, "And without settings?")  # the server's defaults
    read_sse(client, plain)
    db.expire_all()
    assert db.get(Message, plain).sampling_params["max_tokens"] == settings.max_new_tokens
