"""Helpers of the fault tests: a real `flywheel serve` process, a throwaway PostgreSQL cluster, a mixed load of chats,
thumbs and rankings that writes down every write the server acknowledged, and the audit of the database against it.

What "acknowledged" means per write (what a client may rely on once it has seen it):
- a conversation, a ranking: the 201 body with its id;
- a user message: the `start` event of a streamed answer (or the 201 body of a whole one), which carries its id and
  that of its answer. The message and the empty answer it is answered into are stored in one transaction;
- an answer: the `done` event (sent only after the answer is saved) or the 201 body. An answer is saved once, whole,
  at the end; until then it is an empty row marked `streaming`, which the chat page answers when it is opened;
- a thumb: the 200 body of the PUT.
"""

import itertools
import json
import os
import pwd
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from app import migrate
from app.cli.demo_flywheel import free_port
from app.db import make_engine, make_session_factory, transaction
from app.models import (
    Candidate,
    Conversation,
    Feedback,
    Message,
    MessageRole,
    ModelKind,
    ModelVersion,
    Prompt,
    PromptSource,
    Ranking,
    Role,
    User,
)
from app.services import annotation, model_versions, prompts, tokens, users
from app.services.chat import STREAMING

PASSWORD = "correct horse battery"
Status = int | str  # an HTTP status, or the name of the exception the request ended with


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def answer_from_events(body: str) -> tuple[str, str | None]:
    """(text, finish_reason) of a whole server-sent event stream of an answer; finish_reason None without `done`."""
    text, finish = "", None
    for block in body.split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if lines.get("event") == "delta":
            text += json.loads(lines["data"])["text"]
        elif lines.get("event") == "done":
            finish = json.loads(lines["data"])["finish_reason"]
    return text, finish


# ---------------------------------------------------------------------------------------------------- the people


@dataclass
class Cast:
    """Who takes part and what they work on: tokens by name, candidate sets by id with their candidates' ids."""

    user: str
    user_id: int
    annotators: dict[str, str]
    admin: str
    sets: dict[int, list[int]]


def populate(database_url: str, model_dir: Path, n_sets: int = 150, n_annotators: int = 3) -> Cast:
    """Migrate, register `model_dir` as the active SFT model, make the people and the candidate sets to rank."""
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            version = ModelVersion(name="tiny", kind=ModelKind.sft, path=str(model_dir))
            session.add(version)
            session.flush()
            model_versions.promote(session, version_id=version.id)
            secret = {}
            people = [("chatter", Role.user), ("boss", Role.admin)]
            people += [(f"annotator{i}", Role.annotator) for i in range(n_annotators)]
            for name, role in people:
                person = users.create_user(session, username=name, password=PASSWORD, role=role)
                secret[name] = (person.id, tokens.create_token(session, user=person, name="faults")[1])
            items = [([{"role": "user", "content": f"What is {i} plus {i % 7}?"}], None) for i in range(n_sets)]
            prompts.add_prompts(session, items=items, source=PromptSource.demo)
            sets = {}
            for prompt_id in sorted(session.scalars(select(Prompt.id))):
                answers = [(f"answer {k} to prompt {prompt_id}", 4) for k in range(4)]
                cset = annotation.create_set(
                    session, prompt_id=prompt_id, answers=answers, model_version_id=None, params={}, seed=prompt_id
                )
                sets[cset.id] = [c.id for c in cset.candidates]
    finally:
        engine.dispose()
    annotators = {name: token for name, (_, token) in secret.items() if name.startswith("annotator")}
    return Cast(secret["chatter"][1], secret["chatter"][0], annotators, secret["boss"][1], sets)


# ------------------------------------------------------------------------------------------------ the processes


class ServerProcess:
    """`flywheel serve --no-worker` in a process of its own, so that a test can kill it as an OOM killer would."""

    def __init__(self, database_url: str, data_dir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {
            **os.environ,
            "FLYWHEEL_DATABASE_URL": database_url,
            "FLYWHEEL_DATA_DIR": str(data_dir),
            "FLYWHEEL_SECRET_KEY": secrets.token_urlsafe(40),
            "FLYWHEEL_MODEL_POLL_S": "0.3",
            "FLYWHEEL_MAX_STREAMS_PER_USER": "16",
        }
        self.process: subprocess.Popen | None = None

    def start(self, token: str, timeout: float = 90) -> None:
        """Start (again, on the same port and database) and wait until it serves the model."""
        command = [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--no-bootstrap", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

        def serving() -> bool:
            assert self.process.poll() is None, f"the server exited:\n{self.log_tail()}"
            try:
                response = httpx.get(f"{self.url}/v1/models", headers=bearer(token), timeout=5)
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and bool(response.json()["data"])

        wait_for(serving, timeout, "the server to serve its model", every=0.1)

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _unavailable(reason: str) -> None:
    """Like the shared PostgreSQL fixture: a skip on a laptop, a failure in CI, which must run every fault test."""
    if os.environ.get("CI"):
        pytest.fail(f"the PostgreSQL restart test must run in CI: {reason}")
    pytest.skip(reason)


class ThrowawayPostgres:
    """A private PostgreSQL cluster in a temporary directory on a free port, that a test may stop and start at will
    (the shared server of the test suite must never be restarted). initdb refuses to run as root: as root the
    cluster belongs to the `postgres` system user (run through `runuser`). fsync is off: the test crashes the
    server process, not the machine, and what a crashed server had committed is in its WAL in the page cache."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
        if not self.initdb or not self.pg_ctl:
            _unavailable("initdb and pg_ctl are not installed")
        self.as_owner: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.root)
                _unavailable("running as root and there is no `postgres` user to own a cluster")
            if not shutil.which("runuser"):
                shutil.rmtree(self.root)
                _unavailable("running as root and `runuser` is missing")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.port = free_port()
        self.data = self.root / "data"
        self._run(
            self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync"
        )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self.as_owner, *command], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"), "-o", options, "-w", "-t", "60", "start"
        )

    def stop(self, mode: str = "immediate") -> None:
        """`immediate`: the server processes quit at once, mid-transaction, as in a crash (recovery on start)."""
        self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def remove(self) -> None:
        subprocess.run(
            [*self.as_owner, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ the load


@dataclass
class Ledger:
    """Everything the server acknowledged, and what was sent without an acknowledgement (it may or may not land)."""

    conversations: set[int] = field(default_factory=set)
    messages: dict[int, str] = field(default_factory=dict)  # user message id -> content
    unacked_messages: set[str] = field(default_factory=set)  # contents sent, no `start` / 201 seen
    answers: dict[int, tuple[str, str]] = field(default_factory=dict)  # answer id -> (finish_reason, content)
    partial: dict[int, str] = field(default_factory=dict)  # answer id -> text streamed so far, no `done` (yet)
    rankings: dict[int, tuple[int, str, dict[int, int]]] = field(default_factory=dict)  # id -> (set, annotator, ranks)
    unacked_rankings: set[tuple[int, str]] = field(default_factory=set)  # (set, annotator) sent, no 201 seen
    feedback: dict[int, int] = field(default_factory=dict)  # answer id -> thumb
    responses: list[tuple[float, float, str, Status, str]] = field(default_factory=list)  # start, end, route, ..body


class Load:
    """Users chatting (streamed and whole answers) and thumbing each answer, annotators ranking set after set, all
    over HTTP from threads of the test process, until stopped. Failed requests are recorded and retried later."""

    def __init__(self, url: str, cast: Cast, streams: int = 3, whole: int = 1, max_tokens: int = 160) -> None:
        self.url, self.cast, self.max_tokens = url, cast, max_tokens
        self.ledger = Ledger()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._chat, args=(i, True), daemon=True) for i in range(streams)]
        self.threads += [
            threading.Thread(target=self._chat, args=(streams + i, False), daemon=True) for i in range(whole)
        ]
        self.threads += [
            threading.Thread(target=self._annotate, args=(name, token), daemon=True)
            for name, token in cast.annotators.items()
        ]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a load thread did not stop"

    # ---- what the test watches
    def count(self, what: str, since: float = 0.0) -> int:
        """Acknowledged answers or rankings (of requests started after `since`)."""
        route = {"answers": ("stream", "whole"), "rankings": ("ranking",)}[what]
        with self.lock:
            return sum(
                1
                for start, _, r, status, _ in self.ledger.responses
                if r in route and start >= since and status in (200, 201)
            )

    def while_mid_stream(self, action: Callable[[], None], streams: int = 2) -> bool:
        """Run `action` if `streams` answers are streaming right now (some of each has arrived, not its end), with no
        event taken in between, so that they are still in flight for the action (two: one may have sent its end)."""
        with self.lock:
            if sum(1 for text in self.ledger.partial.values() if text) < streams:
                return False
            action()
            return True

    # ---- the clients
    def _record(self, start: float, route: str, status: Status, body: str = "") -> None:
        with self.lock:
            self.ledger.responses.append((start, time.monotonic(), route, status, body[:300]))

    def _pause(self) -> None:
        self.stop.wait(0.05)

    def _call(self, client: httpx.Client, method: str, path: str, route: str, **kwargs) -> dict | None:
        start = time.monotonic()
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self._record(start, route, type(exc).__name__)
            return None
        self._record(start, route, response.status_code, response.text)
        return response.json() if response.is_success else None

    def _chat(self, worker: int, stream: bool) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=self.url, headers=bearer(self.cast.user), timeout=30) as client:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                conversation = self._call(
                    client, "POST", "/api/v1/conversations", "conversation", json={"title": f"load {worker}-{n}"}
                )
                if conversation is None:
                    self._pause()
                    continue
                with self.lock:
                    self.ledger.conversations.add(conversation["id"])
                content = f"chat {worker}-{n}: where does Mira live?"
                body = {"content": content, "max_tokens": self.max_tokens, "temperature": 1.0, "stream": stream}
                path = f"/api/v1/conversations/{conversation['id']}/messages"
                with self.lock:
                    self.ledger.unacked_messages.add(content)
                answer_id = self._stream(client, path, body) if stream else self._whole(client, path, body)
                if answer_id is None:
                    self._pause()
                    continue
                value = rng.choice((1, -1))
                if (
                    self._call(
                        client, "PUT", f"/api/v1/messages/{answer_id}/feedback", "feedback", json={"value": value}
                    )
                    is not None
                ):
                    with self.lock:
                        self.ledger.feedback[answer_id] = value

    def _whole(self, client: httpx.Client, path: str, body: dict) -> int | None:
        exchange = self._call(client, "POST", path, "whole", json=body)
        if exchange is None:
            return None
        asked, answer = exchange["user_message"], exchange["answer"]
        with self.lock:
            self.ledger.messages[asked["id"]] = asked["content"]
            self.ledger.unacked_messages.discard(asked["content"])
            self.ledger.answers[answer["id"]] = (answer["finish_reason"], answer["content"])
        return answer["id"]

    def _stream(self, client: httpx.Client, path: str, body: dict) -> int | None:
        """Read the server-sent events: `start` acknowledges the message, `done` the answer."""
        start, status, answer_id, text, event = time.monotonic(), "cut", None, "", ""
        try:
            with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    self._record(start, "stream", response.status_code, response.read().decode(errors="replace"))
                    return None
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                        continue
                    if not line.startswith("data: "):
                        continue
                    data = json.loads(line[6:])
                    with self.lock:
                        if event == "start":
                            answer_id = data["answer_id"]
                            self.ledger.messages[data["user_message_id"]] = body["content"]
                            self.ledger.unacked_messages.discard(body["content"])
                            self.ledger.partial[answer_id] = ""
                        elif event == "delta":
                            text += data["text"]
                            self.ledger.partial[answer_id] = text
                        elif event == "done":
                            self.ledger.answers[answer_id] = (data["finish_reason"], text)
                            del self.ledger.partial[answer_id]
                            status = 200
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        self._record(start, "stream", status)
        return answer_id if status == 200 else None

    def _annotate(self, name: str, token: str) -> None:
        """Rank every set once; after a failure ask again until a 201, or a 409 (an earlier try did land)."""
        rng = random.Random(name)
        with httpx.Client(base_url=self.url, headers=bearer(token), timeout=30) as client:
            for set_id, candidate_ids in self.cast.sets.items():
                ranks = {c: rng.randint(1, 3) for c in candidate_ids}  # ties included
                body = {
                    "status": "ranked",
                    "time_spent_ms": rng.randint(500, 9000),
                    "ranking": [{"candidate_id": c, "rank": r} for c, r in ranks.items()],
                }
                while not self.stop.is_set():
                    with self.lock:
                        self.ledger.unacked_rankings.add((set_id, name))
                    start = time.monotonic()
                    try:
                        response = client.post(f"/api/v1/annotation/sets/{set_id}/ranking", json=body)
                    except httpx.HTTPError as exc:
                        self._record(start, "ranking", type(exc).__name__)
                        self._pause()
                        continue
                    self._record(start, "ranking", response.status_code, response.text)
                    if response.status_code == 201:
                        ranking = response.json()
                        with self.lock:
                            self.ledger.rankings[ranking["id"]] = (set_id, name, annotation.dense_ranks(ranks))
                            self.ledger.unacked_rankings.discard((set_id, name))
                        break
                    if response.status_code in (409, 422):
                        break
                    self._pause()
                if self.stop.is_set():
                    return


# ----------------------------------------------------------------------------------------------------- the audit


def audit(database_url: str, ledger: Ledger, cast: Cast) -> dict[str, int]:
    """Every acknowledged write is in the database exactly once and whole; nothing in it is half-written."""
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            return _audit(session, ledger, cast)
    finally:
        engine.dispose()


def _audit(session: Session, ledger: Ledger, cast: Cast) -> dict[str, int]:
    messages = {m.id: m for m in session.scalars(select(Message))}
    asked = [m for m in messages.values() if m.role == MessageRole.user]
    answers = [m for m in messages.values() if m.role == MessageRole.assistant]

    # messages: each acknowledged one once, with its text; nothing stored that the load did not send
    twice = [content for content, n in Counter(m.content for m in asked).items() if n > 1]
    assert not twice, f"messages stored twice: {twice[:3]}"
    for message_id, content in ledger.messages.items():
        assert message_id in messages and messages[message_id].content == content, f"lost message {message_id}"
    strays = [m.id for m in asked if m.id not in ledger.messages and m.content not in ledger.unacked_messages]
    assert not strays, f"messages nobody sent: {strays}"
    conversation_ids = {m.conversation_id for m in messages.values()}
    stored_conversations = set(session.scalars(select(Conversation.id).where(Conversation.user_id == cast.user_id)))
    assert ledger.conversations <= stored_conversations, "an acknowledged conversation is lost"
    assert conversation_ids <= stored_conversations

    # an exchange is whole: every user message has exactly one answer row (stored in the same transaction), and an
    # answer is either the empty `streaming` placeholder or complete; it is never saved half-way
    answer_count = Counter(m.parent_id for m in answers)
    assert all(answer_count[m.id] == 1 for m in asked), "a message without its answer row"
    half = [m.id for m in answers if m.finish_reason == STREAMING and m.content != ""]
    assert not half, f"half-written answers: {half}"
    for answer_id, (finish, content) in ledger.answers.items():
        row = messages.get(answer_id)
        assert row is not None and (row.finish_reason, row.content) == (finish, content), f"answer {answer_id} differs"
    for answer_id, streamed in ledger.partial.items():  # cut off mid-stream: still waiting, or saved before the cut
        row = messages[answer_id]
        waiting = row.finish_reason == STREAMING and row.content == ""
        saved = row.finish_reason != STREAMING and row.content.startswith(streamed)
        assert waiting or saved, (answer_id, row.finish_reason, row.content[:200], streamed[:200])

    # rankings: each acknowledged one once with the ranks sent; every stored one names every candidate of its set
    names = {u.id: u.username for u in session.scalars(select(User))}
    candidates: dict[int, set[int]] = {}
    for candidate in session.scalars(select(Candidate)):
        candidates.setdefault(candidate.candidate_set_id, set()).add(candidate.id)
    stored = {r.id: r for r in session.scalars(select(Ranking))}
    for ranking in stored.values():
        entries = {e.candidate_id: e.rank for e in ranking.entries}
        assert set(entries) == candidates[ranking.candidate_set_id], f"ranking {ranking.id} is partial"
        key = (ranking.candidate_set_id, names[ranking.annotator_id])
        assert ranking.id in ledger.rankings or key in ledger.unacked_rankings, f"ranking nobody sent: {key}"
    assert len({(r.candidate_set_id, r.annotator_id) for r in stored.values()}) == len(stored), "a ranking twice"
    for ranking_id, (set_id, name, ranks) in ledger.rankings.items():
        ranking = stored.get(ranking_id)
        assert ranking is not None, f"acknowledged ranking {ranking_id} is lost"
        assert (ranking.candidate_set_id, names[ranking.annotator_id]) == (set_id, name)
        assert {e.candidate_id: e.rank for e in ranking.entries} == ranks, f"ranking {ranking_id} differs"

    # thumbs: the acknowledged value
    thumbs = {f.message_id: f.value for f in session.scalars(select(Feedback))}
    for answer_id, value in ledger.feedback.items():
        assert thumbs.get(answer_id) == value, f"thumb on {answer_id} lost"

    waiting = [m.id for m in answers if m.finish_reason == STREAMING]
    return {
        "messages": len(ledger.messages),
        "answers": len(ledger.answers),
        "cut": len(ledger.partial),
        "waiting": len(waiting),
        "rankings": len(ledger.rankings),
        "stored_rankings": len(stored),
        "thumbs": len(ledger.feedback),
        "first_waiting": waiting[0] if waiting else 0,
    }
