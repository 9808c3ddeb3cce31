"""Chat through REST and through the official `openai` client, against a real tiny served model."""

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.models import Feedback
from app.services import tokens
from app.settings import Settings
from tests.conftest import serving
from tests.factories import app_with_active_model, make_user, wait_for_model


@pytest.fixture
def api(settings: Settings, model_dir: Path) -> Iterator[tuple[TestClient, Session, str]]:
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db:
        user = make_user(db, "rita")
        _, secret = tokens.create_token(db, user=user, name="api")
        db.commit()
        with TestClient(app, headers={"Authorization": f"Bearer {secret}"}) as client:
            wait_for_model(app)
            yield client, db, secret


def test_conversation_and_answer_as_json(api) -> None:
    client, db, _ = api
    conversation = client.post("/api/v1/conversations", json={"title": "numbers"}).json()
    response = client.post(
        f"/api/v1/conversations/{conversation['id']}/messages",
        json={"content": "What is 3 plus 4?", "temperature": 0, "max_tokens": 8},
    )
    assert response.status_code == 201, response.text
    exchange = response.json()
    assert exchange["user_message"]["content"] == "What is 3 plus 4?"
    assert exchange["answer"]["finish_reason"] in {"stop", "length"} and exchange["answer"]["model_version_id"]
    detail = client.get(f"/api/v1/conversations/{conversation['id']}").json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant"]
    assert detail["messages"][1]["content"] == exchange["answer"]["content"]

    answer_id = exchange["answer"]["id"]
    for _ in range(2):
        vote = client.put(f"/api/v1/messages/{answer_id}/feedback", json={"value": 1, "reason": "correct"})
        assert vote.status_code == 200 and vote.json()["value"] == 1
    assert db.query(Feedback).count() == 1
    bad = client.put(f"/api/v1/messages/{answer_id}/feedback", json={"value": 0})
    assert bad.status_code == 422 and isinstance(bad.json()["detail"], str)
    assert client.delete(f"/api/v1/messages/{answer_id}/feedback").status_code == 204
    assert db.query(Feedback).count() == 0


def test_streamed_answer_over_sse(api) -> None:
    client, _, _ = api
    conversation = client.post("/api/v1/conversations", json={}).json()
    events = []
    with client.stream(
        "POST",
        f"/api/v1/conversations/{conversation['id']}/messages",
        json={"content": "Hello", "stream": True, "max_tokens": 10},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    assert events[0][0] == "start" and events[-1][0] == "done"
    text = "".join(data["text"] for name, data in events if name == "delta")
    saved = client.get(f"/api/v1/conversations/{conversation['id']}").json()["messages"][1]
    assert saved["content"] == text


def test_openai_client_against_the_running_server(api) -> None:
    client, _, secret = api
    with serving(client.app) as url:
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        assert [m.id for m in oa.models.list().data] == ["tiny"]
        completion = oa.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Where does Mira live?"}], n=2, max_tokens=6, seed=3
        )
        assert len(completion.choices) == 2 and completion.usage.completion_tokens > 0
        assert all(c.finish_reason in {"stop", "length"} for c in completion.choices)
        again = oa.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Where does Mira live?"}], n=2, max_tokens=6, seed=3
        )
        assert [c.message.content for c in again.choices] == [c.message.content for c in completion.choices]

        pieces, finishes = {0: "", 1: ""}, {}
        stream = oa.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], n=2, max_tokens=8, stream=True, temperature=0
        )
        for chunk in stream:
            for choice in chunk.choices:
                pieces[choice.index] += choice.delta.content or ""
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
        assert set(finishes) == {0, 1} and pieces[0] == pieces[1]  # greedy: both the same

        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="fw_wrong", max_retries=0).models.list()
        with pytest.raises(openai.UnprocessableEntityError):
            oa.chat.completions.create(model="tiny", messages=[], max_tokens=4)
