"""`flywheel worker --nproc N`: a training job on N local DDP processes (gloo on CPU) succeeds and registers a model
that loads; a failing rank fails the run with its error; a cancel stops every rank."""

import os
import re
import subprocess
import sys
import threading
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
from tests.app.test_worker import TINY, wait_for

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def factory(settings: Settings) -> sessionmaker[Session]:
    migrate.upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url))


def job_row(factory, job_id: int) -> Job:
    with factory() as session:
        return session.get(Job, job_id)


def extra_rank_pids(log: str) -> list[int]:
    match = re.search(r"extra ranks: pids ([\d, ]+)", log)
    assert match, log
    return [int(p) for p in match.group(1).split(",")]


def gone(pid: int) -> bool:
    """No such process, or a zombie waiting to be reaped (it runs nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_two_process_job_trains_and_registers_a_model(settings: Settings, factory) -> None:
    with transaction(factory) as session:
        job_id = jobs.enqueue(session, type="pretrain", params={**TINY, "steps": 4}, max_attempts=1).id
    Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.3, nproc=2)).run(once=True)
    job = job_row(factory, job_id)
    assert job.status == JobStatus.succeeded, job.error
    assert job.metrics and all(point["world_size"] == 2 for point in job.metrics)
    assert "training on 2 processes" in job.log_tail
    with factory() as session:
        (version,) = session.query(ModelVersion).all()
    assert version.metrics["world_size"] == 2 and version.job_id == job_id
    model, _ = load_checkpoint(version.path)
    assert model.config.n_embd == TINY["n_embd"]
    assert all(gone(pid) for pid in extra_rank_pids(job.log_tail))


def test_cancel_stops_every_rank(settings: Settings, factory) -> None:
    with transaction(factory) as session:
        job_id = jobs.enqueue(session, type="pretrain", params={**TINY, "steps": 100_000}).id
    worker = Worker(settings, WorkerConfig(poll_s=0.1, heartbeat_s=0.3, nproc=2))
    thread = threading.Thread(target=worker.run, kwargs={"once": True})
    thread.start()
    wait_for(lambda: job_row(factory, job_id).progress > 0, 120, "training progress")
    pids = extra_rank_pids(job_row(factory, job_id).log_tail)
    assert not any(gone(pid) for pid in pids)
    with transaction(factory) as session:
        jobs.cancel(session, job_id=job_id)
    thread.join(30)
    assert not thread.is_alive(), "the worker did not stop the cancelled job"
    assert job_row(factory, job_id).status == JobStatus.cancelled
    wait_for(lambda: all(gone(pid) for pid in pids), 10, "the extra rank to die with rank 0")
    with factory() as session:
        assert session.query(ModelVersion).count() == 0


# --- run_ranks on its own, in a separate Python process: its watch thread may end the process it runs in.


def broken_trainer(config: dict, on_progress=None) -> dict:
    """Rank 1 fails (before or after joining the group, as config says); rank 0 waits for it in a collective."""
    import torch.distributed as torch_dist

    from ml.train import common

    rank = int(os.environ["RANK"])
    if rank == 1 and config["fail"] == "before joining":
        raise ValueError("rank one could not load its data")
    dist = common.init_distributed("cpu")
    try:
        if rank == 1:
            raise ValueError("rank one is broken")
        torch_dist.barrier()
        return {"world_size": dist.world_size}
    finally:
        common.close_distributed(dist)


def probe(fail: str) -> None:
    import app.jobs.ranks

    app.jobs.ranks.STALL_GRACE_S = 1.0
    try:
        app.jobs.ranks.run_ranks(
            broken_trainer,
            {"fail": fail},
            nproc=2,
            on_progress=print,
            log=lambda line: print("log:", line, end="", flush=True),
        )
    except RuntimeError as exc:
        print("raised:", exc, flush=True)


@pytest.mark.parametrize("fail", ["after joining", "before joining"])
def test_a_failing_rank_fails_the_run(fail: str) -> None:
    code = f"from tests.app.test_distributed_jobs import probe; probe({fail!r})"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    error = "rank one could not load its data" if fail == "before joining" else "rank one is broken"
    assert f"training rank 1 failed (exit code 1): ValueError: {error}" in result.stdout, result.stdout + result.stderr
    if fail == "after joining":  # rank 0's collective errors out: run_ranks names the rank that caused it
        assert result.returncode == 0 and "raised: training rank 1 failed" in result.stdout
    else:  # rank 0 is stuck waiting for rank 1 to join: the watch thread ends it so that the job fails
        assert result.returncode == 1 and "rank 0 was left waiting" in result.stdout
