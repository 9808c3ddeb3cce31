"""The worker runs real (tiny) training jobs in a child process: success, cancel, a crash, and kill -9 + retry."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.jobs.worker import Worker, WorkerConfig
from app.models import Job, JobStatus, ModelVersion
from app.services import jobs
from app.settings import Settings
from ml.checkpoint import load_checkpoint

TINY = {
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "demo_docs": 300,
    "vocab_size": 300,
    "block_size": 32,
    "batch_size": 4,
    "eval_every": 50,
    "eval_batches": 2,
    "save_every": 10_000,
    "warmup": 2,
}


@pytest.fixture
def factory(settings: Settings) -> sessionmaker[Session]:
    migrate.upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url))


def enqueue(factory, **params) -> int:
    with transaction(factory) as session:
        return jobs.enqueue(session, type="pretrain", params={**TINY, **params}).id


def job_row(factory, job_id: int) -> Job:
    with factory() as session:
        return session.get(Job, job_id)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def model_versions(factory) -> list[ModelVersion]:
    with factory() as session:
        return list(session.query(ModelVersion))


def test_bad_params_and_missing_models_fail_cleanly(settings: Settings, factory) -> None:
    bad = enqueue(factory, learning_rate_typo=1)
    with transaction(factory) as session:
        unsupported = jobs.enqueue(session, type="kto").id
    Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.2)).run(once=True)
    assert "unknown parameters for this job: learning_rate_typo" in job_row(factory, bad).error
    assert "no active policy or sft model" in job_row(factory, unsupported).error
    assert job_row(factory, bad).status == job_row(factory, unsupported).status == JobStatus.failed
    assert model_versions(factory) == []


def test_cancel_stops_a_running_job_and_registers_nothing(settings: Settings, factory) -> None:
    job_id = enqueue(factory, steps=100_000)
    worker = Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.3))
    thread = threading.Thread(target=worker.run, kwargs={"once": True})
    thread.start()
    wait_for(lambda: job_row(factory, job_id).progress > 0, 120, "training progress")
    with transaction(factory) as session:
        jobs.cancel(session, job_id=job_id)
    thread.join(30)
    assert not thread.is_alive(), "the worker did not stop the cancelled job"
    job = job_row(factory, job_id)
    assert job.status == JobStatus.cancelled and job.metrics  # it had really been training
    assert model_versions(factory) == []
    assert not list((settings.data_dir / "models").glob(f"*job{job_id}*"))


def worker_process(settings: Settings, *extra: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "FLYWHEEL_DATA_DIR": str(settings.data_dir),
        "FLYWHEEL_DATABASE_URL": settings.database_url,
        "FLYWHEEL_SECRET_KEY": settings.secret_key,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--poll", "0.2", "--lease", "4", *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_kill_9_of_a_worker_mid_job_is_retried_and_registers_one_model(settings: Settings, factory) -> None:
    job_id = enqueue(factory, steps=40, data="demo")  # one source given as a string, not a list
    first = worker_process(settings)
    wait_for(lambda: job_row(factory, job_id).progress > 0, 120, "training progress")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert job_row(factory, job_id).status == JobStatus.running  # nobody has noticed yet: the lease runs on

    second = worker_process(settings)  # claims the job once the dead worker's lease has run out
    try:
        wait_for(lambda: job_row(factory, job_id).status != JobStatus.running, 300, "the retry to finish")
    finally:
        second.terminate()
        assert second.wait(30) == 0, second.stderr.read().decode()
    job = job_row(factory, job_id)
    assert job.status == JobStatus.succeeded and job.attempts == 2, job.error
    (version,) = model_versions(factory)
    assert version.job_id == job_id and version.kind == "base"
    assert version.training_data["data"] == ["demo"]  # one source, not the letters d, e, m, o
    model, _ = load_checkpoint(version.path)  # complete and loadable
    assert model.config.n_embd == TINY["n_embd"]
    leftovers = [p.name for p in Path(version.path).parent.iterdir() if p.name != Path(version.path).name]
    assert leftovers == []
