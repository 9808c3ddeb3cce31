"""Shared by the serving benchmarks: a real `flywheel serve` in a throwaway data directory, and timed streamed chats.

bench/serve_speed.py and bench/real_serve.py both need the same four steps: register a model as the served one and
make an API token (`prepare`), start `flywheel serve` without worker or bootstrap, wait until it serves a model, and
stream chats through `/v1/chat/completions` recording when each chunk arrived (`stream_chat`). They live here once.
This module is imported, not run: `.venv/bin/python bench/serve_speed.py` and `bench/real_serve.py` use it.
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECRET = "b" * 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(data_dir: Path, model: str | None) -> str:
    """Register a model as the served one (training a short demo model unless one is given); returns a token."""
    from app import migrate
    from app.db import make_engine, make_session_factory, transaction
    from app.jobs.bootstrap import bootstrap_demo_model
    from app.models import ModelKind, ModelStatus, ModelVersion, Role
    from app.services import tokens, users
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, secret_key=SECRET)
    migrate.upgrade(settings.resolved_database_url)
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    if model:
        with transaction(factory) as session:
            session.add(ModelVersion(name="bench", kind=ModelKind.sft, path=model, status=ModelStatus.active))
    else:
        bootstrap_demo_model(settings, pretrain_steps=40, sft_steps=20, demo_docs=2000)
    with transaction(factory) as session:
        user = users.create_user(session, username="bench", password="bench password", role=Role.user)
        return tokens.create_token(session, user=user, name="bench")[1]


def wait_for_model(client: httpx.Client, server: subprocess.Popen, timeout_s: float) -> None:
    """Block until the server lists a model; fail early if the server process dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.get("/v1/models").json()["data"]:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before serving a model")
        if time.monotonic() > deadline:
            raise SystemExit("the server did not come up with a model")
        time.sleep(0.5)


@dataclass
class Served:
    client: httpx.Client  # authenticated, pointed at the server
    process: subprocess.Popen  # `flywheel serve` itself (one web process: uvicorn runs inside it)
    log: Path | None  # the server's stdout and stderr, when asked for


@contextmanager
def served(
    model: str | None, env: dict[str, str] | None = None, log: Path | None = None, timeout_s: float = 60
) -> Iterator[Served]:
    """`flywheel serve --no-worker --no-bootstrap` on a free port over a fresh data directory serving `model`
    (a model directory; None trains a short demo model), with extra FLYWHEEL_* variables in `env`."""
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as files:
        data_dir = Path(tmp) / "data"
        token = prepare(data_dir, model)
        port = free_port()
        full_env = {
            **os.environ,
            "FLYWHEEL_DATA_DIR": str(data_dir),
            "FLYWHEEL_SECRET_KEY": SECRET,
            "FLYWHEEL_MAX_STREAMS_PER_USER": "16",
            **(env or {}),
        }
        out = files.enter_context(open(log, "wb")) if log else subprocess.DEVNULL
        command = [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--no-bootstrap", "--port", str(port)]
        server = subprocess.Popen(command, env=full_env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {token}"}
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=600) as client:
                wait_for_model(client, server, timeout_s)
                yield Served(client, server, log)
        finally:
            server.terminate()
            server.wait(30)


@dataclass
class ChatTiming:
    """One streamed chat: seconds since the request was sent at which each content chunk arrived."""

    chunks: list[float] = field(default_factory=list)
    total: float = 0.0  # seconds until the stream ended
    tokens: int = 0  # completion tokens, from the usage chunk

    @property
    def ttft(self) -> float:
        return self.chunks[0] if self.chunks else self.total

    @property
    def gaps(self) -> list[float]:
        """Seconds between consecutive content chunks (a chunk holds one token, rarely more)."""
        return [b - a for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def stream_chat(client: httpx.Client, body: dict) -> ChatTiming:
    """POST a chat with `stream` and usage turned on, and time its content chunks."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    timing = ChatTiming()
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                timing.tokens = chunk["usage"]["completion_tokens"]
            elif any(c["delta"].get("content") for c in chunk["choices"]):
                timing.chunks.append(time.perf_counter() - start)
    timing.total = time.perf_counter() - start
    return timing
