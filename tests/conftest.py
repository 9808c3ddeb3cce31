"""Shared fixtures: a fresh database per test (a SQLite file or a private PostgreSQL schema), apps and clients."""

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from app import migrate
from app.db import normalise_url
from app.settings import Settings
from app.web.main import create_app

POSTGRES_URL = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_or_skip() -> str:
    """The PostgreSQL server URL. Absent server: a skip on a laptop, a failure in CI (CI must test both)."""
    try:
        with create_engine(normalise_url(POSTGRES_URL)).connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {POSTGRES_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL}")
    return POSTGRES_URL


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A private, empty schema on the PostgreSQL server; dropped afterwards."""
    base = normalise_url(postgres_or_skip())
    schema = f"t_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    yield f"{base}{sep}options={quote(f'-csearch_path={schema}')}"
    with admin.connect() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'flywheel.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def any_db_url(request: pytest.FixtureRequest) -> str:
    """Run a test once on SQLite and once on PostgreSQL."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture
def settings(tmp_path: Path, sqlite_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=sqlite_url, secret_key=secrets.token_urlsafe(40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random model directory to serve, built once per test module."""
    from tests.factories import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("served") / "tiny")


@pytest.fixture
def app(settings: Settings):
    migrate.upgrade(settings.resolved_database_url)
    return create_app(settings)


@pytest.fixture
def db(app) -> Iterator[Session]:
    """A session on the app's database, for arranging and inspecting."""
    with app.state.session_factory() as session:
        yield session


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app) -> Iterator[str]:
    """Run the app under a real uvicorn server on a free port (a thread of this process); yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[str]:
    migrate.upgrade(settings.resolved_database_url)
    with serving(create_app(settings)) as url:
        yield url
