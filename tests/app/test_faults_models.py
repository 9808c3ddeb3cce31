"""Faults around model files: a write error while a job saves its model (a real one: the training process may write
no file beyond 1 KiB, as on a full disk), and a corrupt checkpoint promoted while the server serves a good one."""

import multiprocessing
import resource
import secrets
import threading
import time
from pathlib import Path

from fastapi.testclient import TestClient

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.worker import Worker, WorkerConfig
from app.models import Job, JobStatus, ModelKind, ModelVersion, Role
from app.services import jobs, tokens
from app.settings import Settings
from app.web.main import create_app
from tests.app.faults import bearer, wait_for
from tests.factories import make_tiny_model_dir, make_user, register_active_model

TINY = {
    "n_layer": 1,
    "n_embd": 32,
    "n_head": 2,
    "demo_docs": 200,
    "vocab_size": 300,
    "block_size": 32,
    "batch_size": 4,
    "eval_every": 50,
    "eval_batches": 1,
    "save_every": 0,
    "warmup": 1,
    "steps": 3,
}


def settings_for(tmp_path: Path, database_url: str, **extra) -> Settings:
    return Settings(
        data_dir=tmp_path / "data", database_url=database_url, secret_key=secrets.token_urlsafe(40), **extra
    )


def test_a_write_error_while_a_model_is_saved_fails_the_job_and_registers_nothing(
    any_db_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, any_db_url)
    migrate.upgrade(any_db_url)
    factory = make_session_factory(make_engine(any_db_url))
    with transaction(factory) as session:
        job_id = jobs.enqueue(session, type="pretrain", params=TINY).id
    worker = Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.2))
    thread = threading.Thread(target=worker.run, kwargs={"once": True})
    thread.start()
    try:
        # The training child starts in a fresh interpreter and writes nothing until it saves its model: limit the
        # size of any file it writes from now on, so that saving fails with EFBIG as it would with ENOSPC.
        wait_for(lambda: bool(multiprocessing.active_children()), 30, "the training process", every=0.005)
        (child,) = multiprocessing.active_children()
        _, hard = resource.prlimit(child.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (1024, hard))
    finally:
        thread.join(180)
    assert not thread.is_alive()

    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.failed, (job.status, job.error)
        assert job.error.startswith("CheckpointWriteError: cannot save the model to "), job.error
        assert "File too large" in job.error and f"base-job{job_id}" in job.error
        assert session.query(ModelVersion).count() == 0
    models = settings.data_dir / "models"
    assert not models.exists() or list(models.iterdir()) == [], "a partial model directory was left behind"


def test_a_corrupt_checkpoint_is_refused_with_its_reason_and_the_served_model_stays(
    any_db_url: str, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, any_db_url, model_poll_s=0.1)
    migrate.upgrade(any_db_url)
    app = create_app(settings)
    good_dir = make_tiny_model_dir(tmp_path / "good")
    truncated = make_tiny_model_dir(tmp_path / "truncated", seed=1)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    garbled = make_tiny_model_dir(tmp_path / "garbled", seed=2)
    (garbled / "config.json").write_text('{"n_layer": 2, "n_embd":')  # half a file
    with app.state.session_factory() as db:
        good = register_active_model(db, good_dir, name="good")
        broken = []
        for path in (truncated, garbled):
            version = ModelVersion(name=path.name, kind=ModelKind.sft, path=str(path))
            db.add(version)
            db.commit()
            broken.append(version.id)
        admin = bearer(tokens.create_token(db, user=make_user(db, "boss", Role.admin), name="t")[1])
        db.commit()

    def load_error(client: TestClient, version_id: int) -> str | None:
        versions = client.get("/api/v1/models", headers=admin).json()
        return next(v for v in versions if v["id"] == version_id)["metrics"].get("load_error")

    with TestClient(app) as client:
        wait_for(lambda: app.state.inference.current is not None, 30, "the good model to load")
        for version_id, reason in zip(
            broken, ("model.safetensors: unreadable weights", "config.json: unreadable JSON"), strict=True
        ):
            assert client.post(f"/api/v1/models/{version_id}/promote", headers=admin).status_code == 200
            wait_for(lambda v=version_id: load_error(client, v) is not None, 30, "the load error to be recorded")
            error = load_error(client, version_id)
            assert error.startswith("cannot be loaded: ") and reason in error and error.endswith("still serving good")
            assert app.state.inference.current.version_id == good.id
            assert client.get("/v1/models", headers=admin).json()["data"][0]["id"] == "good"
            answer = client.post(
                "/v1/chat/completions",
                headers=admin,
                json={"model": "good", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
            )
            assert answer.status_code == 200, answer.text
        page = client.get("/admin/models", headers=admin)
        assert "unreadable weights" in page.text and 'id="served-model">good<' in page.text

        # Promoting the good one again makes the database agree with what every server still serves: no reload.
        assert client.post(f"/api/v1/models/{good.id}/promote", headers=admin).json()["status"] == "active"
        time.sleep(0.3)
        assert app.state.inference.current.version_id == good.id
