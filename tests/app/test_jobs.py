"""The job queue on both databases: order, exclusive claims under concurrency, leases, retries, cancel."""

import threading
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from app import migrate
from app.db import make_engine, make_session_factory, transaction
from app.errors import Conflict, Invalid
from app.models import Job, JobStatus, utcnow
from app.services import jobs


@pytest.fixture
def factory(any_db_url: str) -> Iterator[sessionmaker[Session]]:
    migrate.upgrade(any_db_url)
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def enqueue(factory, **kwargs) -> int:
    with transaction(factory) as session:
        return jobs.enqueue(session, **{"type": "reward", **kwargs}).id


def claim(factory, worker: str = "w1", lease_s: float = 60) -> Job | None:
    with transaction(factory) as session:
        return jobs.claim(session, worker_id=worker, lease_s=lease_s)


def test_claims_by_priority_then_age(factory) -> None:
    low, high, later_high = enqueue(factory), enqueue(factory, priority=5), enqueue(factory, priority=5)
    assert [claim(factory).id for _ in range(3)] == [high, later_high, low]
    assert claim(factory) is None


def test_unknown_type_is_refused(factory) -> None:
    with transaction(factory) as session, pytest.raises(Invalid, match="unknown job type"):
        jobs.enqueue(session, type="mine-bitcoin")


def test_two_workers_never_claim_the_same_job(factory) -> None:
    ids = {enqueue(factory) for _ in range(30)}
    claimed: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            while (job := claim(factory, worker=name)) is not None:
                claimed[name].append(job.id)
        except BaseException as exc:  # surface thread failures in the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(name,)) for name in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    everything = [job_id for got in claimed.values() for job_id in got]
    assert sorted(everything) == sorted(ids)  # each job exactly once
    assert len(everything) == len(set(everything))


def test_expired_lease_is_retried_then_failed(factory) -> None:
    job_id = enqueue(factory, max_attempts=2)
    for attempt in (1, 2):
        job = claim(factory, worker=f"w{attempt}", lease_s=-1)  # a lease that has already run out: a dead worker
        assert job.id == job_id and job.attempts == attempt
    with transaction(factory) as session:
        assert jobs.recover_expired(session) == [job_id]
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.failed and "no attempts left" in job.error
    assert claim(factory) is None


def test_a_worker_that_lost_its_lease_cannot_report(factory) -> None:
    job_id = enqueue(factory)
    claim(factory, worker="old", lease_s=-1)
    assert claim(factory, worker="new").id == job_id  # recovered and claimed again
    with transaction(factory) as session:
        assert not jobs.heartbeat(session, job_id=job_id, worker_id="old", lease_s=60)
        assert not jobs.finish(session, job_id=job_id, worker_id="old", status=JobStatus.succeeded)
        assert jobs.finish(session, job_id=job_id, worker_id="new", status=JobStatus.succeeded)
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.status == JobStatus.succeeded and job.progress == 1.0 and job.attempts == 2


def test_heartbeat_records_progress_metrics_and_log(factory) -> None:
    job_id = enqueue(factory)
    claim(factory)
    with transaction(factory) as session:
        before = session.get(Job, job_id).lease_expires_at
        assert jobs.heartbeat(
            session,
            job_id=job_id,
            worker_id="w1",
            lease_s=600,
            progress=0.5,
            metrics=[{"step": 1, "loss": 2.0}],
            log="step 1\n",
        )
        assert jobs.heartbeat(
            session,
            job_id=job_id,
            worker_id="w1",
            lease_s=600,
            metrics=[{"step": 2, "loss": 1.5}],
            log="x" * (jobs.LOG_TAIL_CHARS + 10),
        )
    with factory() as session:
        job = session.get(Job, job_id)
        assert job.progress == 0.5 and [m["step"] for m in job.metrics] == [1, 2]
        assert len(job.log_tail) == jobs.LOG_TAIL_CHARS and job.lease_expires_at > before


def test_cancel(factory) -> None:
    queued, running = enqueue(factory), enqueue(factory, priority=9)
    claim(factory)
    with transaction(factory) as session:
        assert jobs.cancel(session, job_id=queued).status == JobStatus.cancelled
        assert jobs.cancel(session, job_id=running).cancel_requested
    with transaction(factory) as session:
        assert not jobs.heartbeat(session, job_id=running, worker_id="w1", lease_s=60)  # the worker is told to stop
        assert jobs.finish(session, job_id=running, worker_id="w1", status=JobStatus.failed, error="stopped")
    with transaction(factory) as session:
        assert session.get(Job, running).status == JobStatus.cancelled
        with pytest.raises(Conflict, match="already cancelled"):
            jobs.cancel(session, job_id=queued)


def test_timestamps_are_utc(factory) -> None:
    job_id = enqueue(factory)
    claim(factory)
    with factory() as session:
        job = session.get(Job, job_id)
        assert abs(job.started_at - utcnow()) < timedelta(minutes=1)


def test_automatic_retraining_after_enough_new_labels(factory) -> None:
    from app.models import ModelKind, ModelVersion, Role
    from app.services import annotation, prompts
    from tests.factories import make_user

    with factory() as session:
        assert jobs.maybe_trigger_retraining(session, after_labels=0) == []  # off
        prompts.add_prompts(session, items=[([{"role": "user", "content": "Hi?"}], None)], source="demo")
        cset = annotation.create_set(
            session, prompt_id=1, answers=[("a", 1), ("b", 1)], model_version_id=None, params={}
        )
        for i in range(3):
            annotator = make_user(session, f"ann{i}", Role.annotator)
            annotation.submit_ranking(session, annotator=annotator, set_id=cset.id, status="skipped", entries=[])
        session.commit()
        assert jobs.maybe_trigger_retraining(session, after_labels=4) == []  # 3 < 4
        queued = jobs.maybe_trigger_retraining(session, after_labels=3)
        assert [j.type for j in queued] == ["reward", "rl"] and queued[0].priority > queued[1].priority
        session.commit()
        assert jobs.maybe_trigger_retraining(session, after_labels=3) == []  # already waiting
        for job in queued:
            jobs.cancel(session, job_id=job.id)
        session.add(ModelVersion(name="rm", kind=ModelKind.reward, path="/x", training_data={"ranking_id": 3}))
        session.commit()
        assert jobs.labels_since_last_reward_model(session) == 0  # the newest reward model saw them all
