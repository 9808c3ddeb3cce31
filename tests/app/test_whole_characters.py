"""No stored or streamed text holds a broken character ("�"): a tiny random byte-level model, which emits bytes of
multi-byte characters in any order, answers 20 annotation tasks, chats (REST, streamed and not) and the OpenAI
endpoint (streamed and not), and samples candidate sets in a `candidates` job; every text is whole characters."""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.jobs.worker import Worker, WorkerConfig
from app.models import Candidate, Job, JobStatus, Message, PromptSource, Role
from app.services import jobs, prompts, tokens
from app.settings import Settings
from tests.factories import app_with_active_model, make_user, wait_for_model

BROKEN = "\ufffd"
TASKS = 20


@pytest.fixture
def api(settings: Settings, model_dir: Path) -> Iterator[tuple[TestClient, Session, Settings]]:
    settings.annotations_per_set = 1
    app = app_with_active_model(settings, model_dir)
    with app.state.session_factory() as db:
        items = [([{"role": "user", "content": f"颜色 {i} 是什么? 🙂"}], None) for i in range(TASKS + 4)]
        prompts.add_prompts(db, items=items, source=PromptSource.demo)
        user = make_user(db, "ann", Role.annotator)
        _, secret = tokens.create_token(db, user=user, name="t")
        db.commit()
        with TestClient(app, headers={"Authorization": f"Bearer {secret}"}) as client:
            wait_for_model(app)
            yield client, db, settings


def sse_text(lines: Iterator[str]) -> str:
    """The text deltas of an SSE stream, REST's ({"text": ...}) or OpenAI's (choices[0].delta.content)."""
    out = []
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: ") :])
        if "text" in event:
            out.append(event["text"])
        for choice in event.get("choices", []):
            out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


def test_no_stored_or_streamed_text_holds_a_broken_character(api) -> None:
    client, db, settings = api
    shown = []
    for _ in range(TASKS):  # each task samples a new set of K answers from the served model
        task = client.get("/api/v1/annotation/next").json()
        shown += [c["content"] for c in task["candidates"]]
        ranking = [{"candidate_id": c["id"], "rank": i + 1} for i, c in enumerate(task["candidates"])]
        assert client.post(f"/api/v1/annotation/sets/{task['set_id']}/ranking", json={"ranking": ranking}).is_success

    for seed in range(4):  # a new conversation each time: the tiny model's context is short
        body = {"content": "颜色 🙂?", "max_tokens": 24, "temperature": 1.0, "seed": seed}
        url = f"/api/v1/conversations/{client.post('/api/v1/conversations', json={}).json()['id']}/messages"
        response = client.post(url, json=body)
        assert response.status_code == 201, response.text
        shown.append(response.json()["answer"]["content"])
        url = f"/api/v1/conversations/{client.post('/api/v1/conversations', json={}).json()['id']}/messages"
        with client.stream("POST", url, json={**body, "stream": True}) as response:
            shown.append(sse_text(response.iter_lines()))
        request = {"model": "tiny", "messages": [{"role": "user", "content": "🙂"}], "max_tokens": 24, "seed": seed}
        completion = client.post("/v1/chat/completions", json=request).json()
        shown += [c["message"]["content"] for c in completion["choices"]]
        with client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
            shown.append(sse_text(response.iter_lines()))

    with transaction_of(client) as session:  # the worker's path: a job pre-samples sets for the other prompts
        job_id = jobs.enqueue(session, type="candidates", params={"sets": 4}).id
    Worker(settings, WorkerConfig(poll_s=0.1)).run(once=True)
    db.expire_all()
    assert db.get(Job, job_id).status == JobStatus.succeeded, db.get(Job, job_id).error

    stored = [c.content for c in db.scalars(select(Candidate))] + [m.content for m in db.scalars(select(Message))]
    assert len(stored) >= TASKS * settings.candidates_per_set + 4 * settings.candidates_per_set + 8
    assert not [t for t in stored + shown if BROKEN in t]
    assert any(ord(ch) > 0x7FF for t in stored for ch in t)  # multi-byte characters were generated, and kept whole


def transaction_of(client: TestClient):
    from app.db import transaction

    return transaction(client.app.state.session_factory)
