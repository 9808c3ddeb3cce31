"""Factories and helpers for tests: users, browser-like login, CSRF tokens, database snapshots."""

import re
import time

from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text
from sqlalchemy.orm import Session

from app.db import make_engine
from app.models import Role, User
from app.services import users

PASSWORD = "correct horse battery"


def make_user(session: Session, username: str, role: Role = Role.user, password: str = PASSWORD) -> User:
    user = users.create_user(session, username=username, password=password, role=role)
    session.commit()
    return user


CSRF_INPUT = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_from(html: str) -> str:
    match = CSRF_INPUT.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client: TestClient, username: str, password: str = PASSWORD) -> str:
    """Log in through the form like a browser; returns the session's CSRF token."""
    token = csrf_from(client.get("/login").text)
    response = client.post(
        "/login", data={"username": username, "password": password, "csrf_token": token}, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    return csrf_from(client.get("/account/tokens").text)


def db_snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table: compare two snapshots to prove that a request changed nothing."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            tables = [t for t in inspect(conn).get_table_names() if t != "alembic_version"]
            return {t: sorted(map(tuple, conn.execute(text(f'SELECT * FROM "{t}"'))), key=repr) for t in tables}
    finally:
        engine.dispose()


def user_named(session: Session, name: str) -> User:
    session.expire_all()
    return session.scalar(select(User).where(User.username == name))


TINY_TEXTS = ["Mira lives in Oslo.", "What is 3 plus 4? It is 7.", "Hello there, how are you?", "颜色 是 红色 🙂"] * 20


def make_tiny_model_dir(path, seed: int = 0, max_seq_len: int = 96):
    """A real (random, tiny) model directory with a trained tokenizer: what the server loads and serves."""
    import torch

    from ml.checkpoint import save_checkpoint
    from ml.model import ModelConfig, Transformer
    from ml.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(TINY_TEXTS, vocab_size=300)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.tiny(vocab_size=tokenizer.vocab_size, max_seq_len=max_seq_len))
    save_checkpoint(path, model, tokenizer)
    return path


def register_active_model(session: Session, path, kind: str = "sft", name: str = "tiny"):
    from app.models import ModelKind, ModelVersion
    from app.services.model_versions import promote

    version = ModelVersion(name=name, kind=ModelKind(kind), path=str(path))
    session.add(version)
    session.flush()
    promote(session, version_id=version.id)
    session.commit()
    return version


def app_with_active_model(settings, model_dir):
    """A migrated app whose active model is `model_dir`; its watcher loads it once the lifespan runs (a
    TestClient), polling fast so tests do not wait (see wait_for_model)."""
    from app import migrate
    from app.web.main import create_app

    settings.model_poll_s = 0.1
    migrate.upgrade(settings.resolved_database_url)
    app = create_app(settings)
    with app.state.session_factory() as db:
        register_active_model(db, model_dir)
    return app


def wait_for_model(app, timeout_s: float = 30) -> None:
    """Block until the app's model watcher has loaded the active model (it loads in the background)."""
    deadline = time.monotonic() + timeout_s
    while app.state.inference.current is None:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)
