"""Stop reaches the answer whatever web process receives it (`serve --workers N`): through the database.

The served model here has room for long answers and no end-of-turn token, so an answer surely runs until it is
stopped; an answer that was not stopped would end with `length`, not `stopped`.
"""

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.orm import Session

from app import migrate
from app.db import make_engine, make_session_factory
from app.models import Message
from app.services import tokens
from app.settings import Settings
from app.web.main import create_app
from ml.tokenizer import Tokenizer
from tests.app.faults import free_port, wait_for
from tests.conftest import serving
from tests.factories import make_tiny_model_dir, make_user, register_active_model, wait_for_model

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 2000  # several seconds of answer: far longer than a Stop takes to be heard


@pytest.fixture(scope="module")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("long") / "long", max_seq_len=MAX_TOKENS + 40)


def arrange(url: str, model_dir: Path) -> str:
    """A migrated database with the long model active and a person's API token; the token."""
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as db:
            register_active_model(db, model_dir, name="long")
            _, secret = tokens.create_token(db, user=make_user(db, "ulla"), name="t")
            db.commit()
        return secret
    finally:
        engine.dispose()


def finish_reason_of(url: str, message_id: int, timeout: float = 20) -> str:
    """The stored answer's finish reason once it is no longer `streaming`."""
    engine = make_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            with Session(engine) as db:
                reason = db.get(Message, message_id).finish_reason
            if reason != "streaming":
                return reason
            assert time.monotonic() < deadline, "the answer was never closed"
            time.sleep(0.1)
    finally:
        engine.dispose()


def stream_and_stop(
    answering: httpx.Client, stopping: httpx.Client, leave: bool = False, api: bool = False
) -> tuple[int, str | None]:
    """Stream an answer from one server and send Stop to the other after its first piece (the page's route, or with
    `api` the REST one); (answer id, the finish reason of the `done` event, None when `leave`: the client goes away
    right after its Stop)."""
    conversation = answering.post("/api/v1/conversations", json={"title": "long"}).json()["id"]
    body = {"content": "Tell me everything.", "stream": True, "max_tokens": MAX_TOKENS}
    answer_id, kept, event, done = None, None, None, None
    with answering.stream("POST", f"/api/v1/conversations/{conversation}/messages", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "start":
                answer_id = json.loads(line.removeprefix("data: "))["answer_id"]
            elif line.startswith("data: ") and event == "delta" and answer_id is not None:
                if api:
                    sent = stopping.post(f"/api/v1/messages/{answer_id}/stop")
                    assert sent.status_code == 200 and sent.json() == {"message_id": answer_id, "stopping": True}
                else:
                    assert stopping.post(f"/chat/messages/{answer_id}/stop").status_code == 204
                answer_id, kept = None, answer_id  # asked once
                if leave:
                    return kept, None
            elif line.startswith("data: ") and event == "done":
                done = json.loads(line.removeprefix("data: "))["finish_reason"]
    return kept, done


@pytest.fixture
def two_apps(
    settings: Settings, long_model_dir: Path, monkeypatch
) -> Iterator[tuple[FastAPI, str, httpx.Client, dict]]:
    """Two apps on one database in this process: A serves the model (a real server), B only takes the Stop."""
    monkeypatch.setattr(Tokenizer, "stop_token_ids", property(lambda self: []))
    settings.max_new_tokens, settings.model_poll_s = MAX_TOKENS, 0.1
    secret = arrange(settings.resolved_database_url, long_model_dir)
    a, b = create_app(settings), create_app(settings)
    headers = {"Authorization": f"Bearer {secret}"}
    with serving(a) as url_a, serving(b) as url_b, httpx.Client(base_url=url_b, headers=headers) as stopping:
        wait_for_model(a)
        yield a, url_a, stopping, headers


@pytest.mark.parametrize("api", [False, True], ids=["page", "rest"])
def test_a_stop_sent_to_another_app_ends_the_answer(two_apps, settings: Settings, api: bool) -> None:
    a, url_a, stopping, headers = two_apps
    with httpx.Client(base_url=url_a, headers=headers, timeout=30) as answering:
        answer_id, done = stream_and_stop(answering, stopping, api=api)
    assert done == "stopped"
    assert finish_reason_of(settings.resolved_database_url, answer_id) == "stopped"
    assert len(a.state.process.answers) == 0


def test_a_client_that_leaves_right_after_its_stop_is_stopped_not_cancelled(two_apps, settings: Settings) -> None:
    """The page closes its stream soon after Stop, maybe before the streaming process has heard it: the answer is
    still saved as stopped, since the Stop is on the message."""
    a, url_a, stopping, headers = two_apps
    a.state.process.answers.read_stops = lambda ids: {}  # A never hears the Stop while it streams
    with httpx.Client(base_url=url_a, headers=headers, timeout=30) as answering:
        answer_id, _ = stream_and_stop(answering, stopping, leave=True)
    assert finish_reason_of(settings.resolved_database_url, answer_id) == "stopped"


def test_a_stop_before_the_stream_opens_or_after_it_ends_changes_nothing(two_apps, settings: Settings) -> None:
    """As in one process: a stream opened after a Stop is not stopped by it, and a finished answer stays as it was."""
    _, url_a, stopping, headers = two_apps
    settings.max_new_tokens = 20  # the page's stream: the default length
    with httpx.Client(base_url=url_a, headers=headers, timeout=30) as answering:
        conversation = answering.post("/api/v1/conversations", json={"title": "early"}).json()["id"]
        assert answering.post(f"/chat/{conversation}/messages", data={"content": "Hello"}).status_code == 303
        answer_id = answering.get(f"/api/v1/conversations/{conversation}").json()["messages"][-1]["id"]
        assert stopping.post(f"/chat/messages/{answer_id}/stop").status_code == 204  # not finished: recorded
        events = answering.get(f"/chat/messages/{answer_id}/stream").text
    assert events.endswith('event: done\ndata: {"finish_reason": "length"}\n\n')
    assert finish_reason_of(settings.resolved_database_url, answer_id) == "length"
    assert stopping.post(f"/chat/messages/{answer_id}/stop").status_code == 200  # finished: nothing to stop
    assert stopping.post(f"/api/v1/messages/{answer_id}/stop").json() == {"message_id": answer_id, "stopping": False}
    assert finish_reason_of(settings.resolved_database_url, answer_id) == "length"


# A web process of the app on its own port, whose model never ends a turn by itself.
SERVE = """
import sys
import uvicorn
from ml.tokenizer import Tokenizer
Tokenizer.stop_token_ids = property(lambda self: [])
uvicorn.run("app.web.main:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def start_process(url: str, tmp_path: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "FLYWHEEL_DATABASE_URL": url,
        "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
        "FLYWHEEL_SECRET_KEY": secrets.token_urlsafe(40),
        "FLYWHEEL_MAX_NEW_TOKENS": str(MAX_TOKENS),
        "FLYWHEEL_MODEL_POLL_S": "0.2",
    }
    command = [sys.executable, "-c", SERVE, str(port)]
    log = (tmp_path / f"server-{port}.log").open("w")  # a file, not a pipe nobody reads while the test runs
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def serves_the_model(url: str, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{url}/v1/models", headers=headers, timeout=2).json()["data"] != []
    except (httpx.HTTPError, ValueError, KeyError):
        return False


def test_a_stop_sent_to_another_process_ends_the_answer(any_db_url: str, long_model_dir: Path, tmp_path: Path) -> None:
    """Two real server processes on one database, as `serve --workers 2` runs them: the answer streams from A, the
    Stop goes to B, and A ends the answer early with `stopped`."""
    secret = arrange(any_db_url, long_model_dir)
    headers = {"Authorization": f"Bearer {secret}"}
    ports = [free_port()]
    while len(ports) < 2:
        ports += [port for port in [free_port()] if port not in ports]
    processes = [start_process(any_db_url, tmp_path, port) for port in ports]
    url_a, url_b = (f"http://127.0.0.1:{port}" for port in ports)
    try:
        for process, url in zip(processes, (url_a, url_b), strict=True):
            wait_for(lambda u=url, p=process: p.poll() is not None or serves_the_model(u, headers), 60, "a server")
            assert process.poll() is None, (tmp_path / f"server-{url.rsplit(':', 1)[1]}.log").read_text()
        with (
            httpx.Client(base_url=url_a, headers=headers, timeout=30) as answering,
            httpx.Client(base_url=url_b, headers=headers, timeout=30) as stopping,
        ):
            answer_id, done = stream_and_stop(answering, stopping)
        assert done == "stopped"
        assert finish_reason_of(any_db_url, answer_id) == "stopped"
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
