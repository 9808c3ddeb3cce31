"""Chat through HTTP with a real tiny model: streamed answers, stop, regenerate, thumbs, isolation, bad input."""

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Feedback, Message, MessageRole, User
from app.services import chat, tokens
from app.settings import Settings
from ml.tokenizer import Tokenizer
from tests.conftest import serving
from tests.factories import (
    app_with_active_model,
    csrf_from,
    db_snapshot,
    login,
    make_tiny_model_dir,
    make_user,
    register_active_model,
    wait_for_model,
)


@pytest.fixture
def served(settings: Settings, model_dir: Path) -> Iterator[tuple[TestClient, Session]]:
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db, TestClient(app) as client:
        wait_for_model(app)
        yield client, db


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_chat(client: TestClient, db: Session, name: str = "ulla") -> tuple[str, int]:
    """A signed-in user with an empty conversation (as the REST API makes them; the page makes one with its first
    message)."""
    user = make_user(db, name)
    csrf = login(client, name)
    conversation = chat.create_conversation(db, user=user)
    db.commit()
    return csrf, conversation.id


def send(client: TestClient, csrf: str, conversation_id: int, content: str) -> int:
    response = client.post(
        f"/chat/{conversation_id}/messages",
        data={"content": content, "csrf_token": csrf},
        headers={"HX-Request": "true"},
    )
    assert response.status_code == 200, response.text
    return int(response.text.split('data-stream-url="')[1].split("/stream")[0].rsplit("/", 1)[1])


def read_sse(client: TestClient, message_id: int) -> tuple[str, str]:
    text, finish = "", None
    with client.stream("GET", f"/chat/messages/{message_id}/stream") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
                if event == "delta":
                    text += data["text"]
                elif event == "done":
                    finish = data["finish_reason"]
    return text, finish


def test_an_answer_streams_and_is_saved(served) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    answer_id = send(client, csrf, conversation_id, "Where does Mira live?")
    text, finish = read_sse(client, answer_id)
    assert finish in {"stop", "length"}
    db.expire_all()
    answer = db.get(Message, answer_id)
    assert answer.content == text and answer.finish_reason == finish and answer.model_version_id is not None
    assert answer.sampling_params["temperature"] > 0
    again = client.get(f"/chat/messages/{answer_id}/stream")
    assert again.status_code == 409  # an answer is generated once
    page = client.get(f"/chat/{conversation_id}").text
    assert "Where does Mira live?" in page


def test_stop_and_disconnect_end_the_generation_on_the_server(served, monkeypatch, tmp_path: Path) -> None:
    """Against a real server (the test client buffers streams): Stop, and a client that just goes away. The served
    model here is given room for long answers and no stop token, so that the answer is surely still running."""
    client, db = served
    monkeypatch.setattr(Tokenizer, "stop_token_ids", property(lambda self: []))
    register_active_model(db, make_tiny_model_dir(tmp_path / "long", max_seq_len=640), name="long")
    wait_until(lambda: client.app.state.inference.current.name == "long", "the long model to be served")
    csrf, conversation_id = start_chat(client, db)
    user = db.query(User).filter_by(username="ulla").one()
    _, secret = tokens.create_token(db, user=user, name="t")
    db.commit()
    app = client.app
    app.state.inference.limits.max_new_tokens = 600
    with serving(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}) as http:
        for how in ("stop", "disconnect"):
            answer_id = send(client, csrf, conversation_id, f"Tell me everything ({how}).")
            asked = False
            with http.stream("GET", f"/chat/messages/{answer_id}/stream") as response:
                for line in response.iter_lines():
                    if line.startswith("event: delta") and not asked:
                        asked = True
                        if how == "stop":
                            assert http.post(f"/chat/messages/{answer_id}/stop").status_code == 204
                        else:
                            break  # leaves the with-block: the connection closes mid-stream
            deadline = time.monotonic() + 20
            while True:
                db.expire_all()
                answer = db.get(Message, answer_id)
                if answer.finish_reason != "streaming":
                    break
                assert time.monotonic() < deadline, "the answer was never closed"
                time.sleep(0.1)
            assert answer.finish_reason == ("stopped" if how == "stop" else "cancelled")
            decoder = app.state.inference.current.decoder
            wait_until(lambda d=decoder: len(d) == 0, "the generation to stop")  # nothing left generating
    assert len(app.state.process.answers) == 0


def test_regenerate_keeps_the_earlier_answer(served) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    first = send(client, csrf, conversation_id, "Hello")
    read_sse(client, first)
    response = client.post(
        f"/chat/messages/{first}/regenerate", data={"csrf_token": csrf}, headers={"HX-Request": "true"}
    )
    assert response.status_code == 200 and "1 earlier answer" in response.text
    db.expire_all()
    answers = db.query(Message).filter_by(conversation_id=conversation_id, role=MessageRole.assistant).all()
    assert len(answers) == 2 and answers[0].parent_id == answers[1].parent_id


def test_thumbs_are_idempotent_and_changeable(served, settings: Settings) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    answer_id = send(client, csrf, conversation_id, "Hi")
    read_sse(client, answer_id)
    url = f"/chat/messages/{answer_id}/feedback"
    for _ in range(2):  # a double click is one vote
        assert (
            client.post(url, data={"value": "1", "csrf_token": csrf}, headers={"HX-Request": "true"}).status_code == 200
        )
    assert db.query(Feedback).count() == 1
    client.post(url, data={"value": "-1", "reason": "rude", "comment": "<b>meh</b>", "csrf_token": csrf})
    db.expire_all()
    vote = db.query(Feedback).one()
    assert (vote.value, vote.reason, vote.comment) == (-1, "rude", "<b>meh</b>")
    before = db_snapshot(settings.resolved_database_url)
    assert client.post(url, data={"value": "5", "csrf_token": csrf}).status_code == 422
    assert client.post(url, data={"value": "1", "reason": "because", "csrf_token": csrf}).status_code == 422
    assert db_snapshot(settings.resolved_database_url) == before


def test_people_never_see_each_others_chats(served) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db, "owner")
    answer_id = send(client, csrf, conversation_id, "my secret")
    other = TestClient(client.app)
    other_csrf, _ = start_chat(other, db, "snoop")
    assert other.get(f"/chat/{conversation_id}").status_code == 404
    assert other.get(f"/chat/messages/{answer_id}").status_code == 404
    assert other.get(f"/chat/messages/{answer_id}/stream").status_code == 404
    assert (
        other.post(f"/chat/messages/{answer_id}/feedback", data={"value": "1", "csrf_token": other_csrf}).status_code
        == 404
    )
    assert other.post(f"/chat/{conversation_id}/delete", data={"csrf_token": other_csrf}).status_code == 404
    assert "my secret" not in other.get("/chat").text


def test_oversized_and_empty_messages_change_nothing(served, settings: Settings) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    before = db_snapshot(settings.resolved_database_url)
    too_long = client.post(f"/chat/{conversation_id}/messages", data={"content": "x" * 9000, "csrf_token": csrf})
    assert too_long.status_code == 413
    assert (
        client.post(f"/chat/{conversation_id}/messages", data={"content": "   ", "csrf_token": csrf}).status_code == 422
    )
    assert db_snapshot(settings.resolved_database_url) == before


def test_user_text_and_model_output_are_escaped(served) -> None:
    client, db = served
    csrf, conversation_id = start_chat(client, db)
    send(client, csrf, conversation_id, "<script>alert('x')</script>")
    page = client.get(f"/chat/{conversation_id}").text
    assert "<script>alert('x')</script>" not in page and "&lt;script&gt;alert(" in page


def csrf_page(client: TestClient) -> str:
    return csrf_from(client.get("/account/tokens").text)
