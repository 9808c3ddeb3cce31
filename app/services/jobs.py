"""The job queue on the `jobs` table: enqueue, claim with a lease, heartbeat, finish, cancel, recover expired leases.

A claim is one conditional UPDATE (`… WHERE id = :id AND status = 'queued'`): whichever worker's update matches the
row wins and the others see zero rows, on SQLite (one writer at a time) and on PostgreSQL (row locks), so no job ever
runs twice at once. On PostgreSQL the candidate is picked with `FOR UPDATE SKIP LOCKED` so many workers on many hosts
do not queue up behind one row.
"""

from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound
from app.models import Job, JobStatus, utcnow
from app.services.training_data import TrainingData

JOB_TYPES = frozenset({"pretrain", "sft", "reward", "rl", "dpo", "kto", "evaluate", "candidates", "bootstrap"})
FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
LOG_TAIL_CHARS = 8000
MAX_METRIC_POINTS = 2000


def enqueue(
    session: Session,
    *,
    type: str,
    params: dict[str, Any] | None = None,
    created_by_id: int | None = None,
    priority: int = 0,
    max_attempts: int = 3,
) -> Job:
    if type not in JOB_TYPES:
        raise Invalid(f"unknown job type {type!r}; expected one of {', '.join(sorted(JOB_TYPES))}")
    if not 1 <= max_attempts <= 10:
        raise Invalid("max_attempts must be between 1 and 10")
    job = Job(type=type, params=params or {}, created_by_id=created_by_id, priority=priority, max_attempts=max_attempts)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, *, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} not found")
    return job


def list_jobs(session: Session, *, status: JobStatus | None = None, limit: int = 100) -> list[Job]:
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if status is not None:
        query = query.where(Job.status == status)
    return list(session.scalars(query))


def recover_expired(session: Session) -> list[int]:
    """Running jobs whose worker stopped heartbeating: back to the queue, or failed once out of attempts."""
    now = utcnow()
    expired = session.scalars(
        select(Job).where(Job.status == JobStatus.running, Job.lease_expires_at < now).with_for_update(skip_locked=True)
    ).all()
    for job in expired:
        out_of_attempts = job.attempts >= job.max_attempts
        job.status = JobStatus.failed if out_of_attempts else JobStatus.queued
        job.error = f"worker {job.worker_id} stopped heartbeating" + (" (no attempts left)" if out_of_attempts else "")
        job.worker_id = None
        job.lease_expires_at = None
        if out_of_attempts:
            job.finished_at = now
    session.flush()
    return [job.id for job in expired]


def claim(session: Session, *, worker_id: str, lease_s: float, types: frozenset[str] | None = None) -> Job | None:
    """Take the next queued job (highest priority, then oldest) for this worker, or None. Caller commits."""
    recover_expired(session)
    query = select(Job.id).where(Job.status == JobStatus.queued).order_by(Job.priority.desc(), Job.id)
    if types:
        query = query.where(Job.type.in_(types))
    for job_id in session.scalars(query.limit(5).with_for_update(skip_locked=True)).all():
        now = utcnow()
        won = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(
                status=JobStatus.running,
                worker_id=worker_id,
                attempts=Job.attempts + 1,
                started_at=now,
                heartbeat_at=now,
                lease_expires_at=now + timedelta(seconds=lease_s),
                error=None,
            )
            .execution_options(synchronize_session=False)
        ).rowcount
        if won == 1:
            return session.get(Job, job_id, populate_existing=True)
    return None


def _owned_running(session: Session, *, job_id: int, worker_id: str) -> Job | None:
    job = session.get(Job, job_id, with_for_update=True, populate_existing=True)
    if job is None or job.status != JobStatus.running or job.worker_id != worker_id:
        return None
    return job


def heartbeat(
    session: Session,
    *,
    job_id: int,
    worker_id: str,
    lease_s: float,
    progress: float | None = None,
    metrics: list[dict[str, Any]] | None = None,
    log: str | None = None,
    params: dict[str, Any] | None = None,
) -> bool:
    """Renew the lease and record progress (and the parameters the trainer runs with, once known). False when the job
    is no longer this worker's or a cancel was asked: the worker must then stop the training."""
    job = _owned_running(session, job_id=job_id, worker_id=worker_id)
    if job is None:
        return False
    now = utcnow()
    job.heartbeat_at = now
    job.lease_expires_at = now + timedelta(seconds=lease_s)
    if progress is not None:
        job.progress = min(1.0, max(0.0, progress))
    if metrics:
        job.metrics = (list(job.metrics or []) + metrics)[-MAX_METRIC_POINTS:]
    if log:
        job.log_tail = ((job.log_tail or "") + log)[-LOG_TAIL_CHARS:]
    if params is not None:
        job.effective_params = params
    return not job.cancel_requested


def append_log(session: Session, *, job_id: int, text: str) -> None:
    """Add a line to a job's log after it finished (the worker names the version it registered)."""
    job = get_job(session, job_id=job_id)
    job.log_tail = ((job.log_tail or "") + text)[-LOG_TAIL_CHARS:]


def finish(session: Session, *, job_id: int, worker_id: str, status: JobStatus, error: str | None = None) -> bool:
    """Record the outcome; False if the job was taken away from this worker meanwhile (its result must be dropped)."""
    if status not in FINISHED:
        raise Invalid(f"{status.value} is not a final status")
    job = _owned_running(session, job_id=job_id, worker_id=worker_id)
    if job is None:
        return False
    if job.cancel_requested and status == JobStatus.failed:
        status = JobStatus.cancelled
    job.status = status
    job.error = error
    job.finished_at = utcnow()
    job.lease_expires_at = None
    if status == JobStatus.succeeded:
        job.progress = 1.0
    return True


def release(session: Session, *, job_id: int, worker_id: str) -> bool:
    """Give a running job back to the queue (the worker is shutting down); the attempt is not counted."""
    job = _owned_running(session, job_id=job_id, worker_id=worker_id)
    if job is None:
        return False
    job.status = JobStatus.cancelled if job.cancel_requested else JobStatus.queued
    job.attempts = max(0, job.attempts - 1)
    job.worker_id = None
    job.lease_expires_at = None
    return True


def cancel(session: Session, *, job_id: int) -> Job:
    """A queued job is cancelled at once; a running one is asked to stop (its worker sees it at the next heartbeat)."""
    job = get_job(session, job_id=job_id)
    if job.status in FINISHED:
        raise Conflict(f"job {job_id} already {job.status.value}")
    if job.status == JobStatus.queued:
        job.status = JobStatus.cancelled
        job.finished_at = utcnow()
    else:
        job.cancel_requested = True
    session.flush()
    return job


def labels_since_last_reward_model(session: Session) -> int:
    """Rankings and thumbs collected after the newest reward model's training data (its watermarks)."""
    from sqlalchemy import func

    from app.models import Feedback, ModelKind, ModelVersion, Ranking

    newest = session.scalar(
        select(ModelVersion).where(ModelVersion.kind == ModelKind.reward).order_by(ModelVersion.id.desc()).limit(1)
    )
    seen = TrainingData.from_json(newest.training_data if newest is not None else {})
    last_ranking, last_thumb = (rows.last_id if rows else 0 for rows in (seen.rankings, seen.thumbs))
    rankings = session.scalar(select(func.count()).where(Ranking.id > last_ranking)) or 0
    thumbs = session.scalar(select(func.count()).where(Feedback.id > last_thumb)) or 0
    return rankings + thumbs


def maybe_trigger_retraining(session: Session, *, after_labels: int) -> list[Job]:
    """The automatic rule: once `after_labels` new labels arrived since the last reward model, enqueue reward then
    RL (unless such jobs are already waiting or running). Off when after_labels is 0."""
    if after_labels <= 0:
        return []
    busy = session.scalar(
        select(Job.id).where(Job.type.in_(("reward", "rl")), Job.status.in_((JobStatus.queued, JobStatus.running)))
    )
    if busy is not None or labels_since_last_reward_model(session) < after_labels:
        return []
    return [enqueue(session, type="reward", priority=1), enqueue(session, type="rl", priority=0)]
