"""The job runner: `flywheel worker` claims jobs, runs each in a child process, heartbeats, and records the outcome.

The child does the training (app/jobs/handlers.py → ml/); the parent only talks to the database: it renews the lease,
relays progress, metrics and log lines, stops the child when the job is cancelled or its lease is lost, and registers
the model the child wrote once the child has finished cleanly.
"""

import logging
import multiprocessing as mp
import os
import queue
import secrets
import shutil
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory, transaction
from app.jobs.child import die_with_parent
from app.models import JobStatus, ModelKind, ModelStatus, ModelVersion
from app.services import app_settings, jobs, model_versions
from app.services.training_data import TrainingData
from app.settings import Settings

log = logging.getLogger("flywheel.worker")
ACTIVE_LEARNING_JOBS = frozenset({"candidates", "reward"})  # jobs that take `active_learning` (ml/active.py)


@dataclass
class WorkerConfig:
    poll_s: float = 1.0
    lease_s: float = 60.0
    heartbeat_s: float = 2.0
    kill_grace_s: float = 5.0
    nproc: int = 1  # processes per training job (local DDP, app/jobs/ranks.py); 1: the child trains alone


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def child_main(
    job_type: str,
    job_id: int,
    params: dict,
    data_dir: str,
    database_url: str,
    out: mp.Queue,
    parent_pid: int,
    nproc: int = 1,
    reward_min_labels: int = 20,
) -> None:
    """Entry point of the child process: run the handler, stream reports, send the result or the error last."""
    die_with_parent(parent_pid)
    # Ctrl-C in a terminal reaches the whole process group: the worker decides what happens to the job (it puts it
    # back in the queue), so the child must not fail it with a KeyboardInterrupt first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from app.jobs.handlers import HANDLERS, JobContext
    from app.jobs.ranks import free_cores

    torch.set_num_threads(free_cores())  # threads on busy cores make every step wait for the slowest one

    def report(
        progress: float | None = None, metrics: dict | None = None, log: str | None = None, params: dict | None = None
    ) -> None:
        out.put({"progress": progress, "metrics": metrics, "log": log, "params": params})

    try:
        handler = HANDLERS.get(job_type)
        if handler is None:
            raise ValueError(f"this worker cannot run {job_type!r} jobs yet")
        context = JobContext(job_id, params, Path(data_dir), database_url, report, nproc, reward_min_labels)
        report(log=f"{job_type} job {job_id} started\n")
        result = handler(context)
        wrote = f": wrote {Path(result.model_dir).name}" if result.model_dir else ""
        out.put({"result": result.to_message(), "log": f"training finished{wrote}\n"})
    except BaseException as exc:  # everything the child hits must reach the job row
        out.put({"error": f"{type(exc).__name__}: {exc}", "log": traceback.format_exc(limit=8)})


class Worker:
    def __init__(self, settings: Settings, config: WorkerConfig | None = None, worker_id: str | None = None) -> None:
        self.settings = settings
        self.config = config or WorkerConfig()
        self.worker_id = worker_id or new_worker_id()
        self.factory = make_session_factory(make_engine(settings.resolved_database_url))
        self.stop = threading.Event()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: stop the training child and put its job back in the queue, then exit."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())

    def run(self, once: bool = False) -> None:
        """Claim and run jobs until stopped (or, with once=True, until the queue is empty)."""
        while not self.stop.is_set():
            with transaction(self.factory) as session:
                job = jobs.claim(session, worker_id=self.worker_id, lease_s=self.config.lease_s)
                claimed = (job.id, job.type, dict(job.params)) if job else None
            if claimed is None:
                if once:
                    return
                self._maybe_trigger()
                self.stop.wait(self.config.poll_s)
                continue
            self.run_job(*claimed)

    def _maybe_trigger(self) -> None:
        """The automatic retraining rule, read from the database at every poll (admins change it while we run);
        FLYWHEEL_AUTO_RETRAIN_AFTER is the value until an admin sets one."""
        with transaction(self.factory) as session:
            after = app_settings.auto_retrain_after(session, default=self.settings.auto_retrain_after)
            for job in jobs.maybe_trigger_retraining(session, after_labels=after):
                log.info("enough new labels: enqueued job %s (%s)", job.id, job.type)

    def run_job(self, job_id: int, job_type: str, params: dict[str, Any]) -> None:
        log.info("job %s (%s) started on %s", job_id, job_type, self.worker_id)
        if job_type in ACTIVE_LEARNING_JOBS:  # the job's own parameter wins over FLYWHEEL_ACTIVE_LEARNING
            params = {"active_learning": self.settings.active_learning.value, **params}
        self._discard_outputs(job_id)  # leftovers of an attempt whose worker died
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        child = ctx.Process(
            target=child_main,
            args=(
                job_type,
                job_id,
                params,
                str(self.settings.data_dir),
                self.settings.resolved_database_url,
                out,
                os.getpid(),
                self.config.nproc,
                self.settings.reward_min_labels,
            ),
            daemon=True,
        )
        child.start()
        final = self._supervise(job_id, child, out)
        if final is None or final.get("release"):  # cancelled, lease lost, or the worker is stopping
            self._stop_child(child)
        else:
            child.join(self.config.kill_grace_s)
            if child.is_alive():
                self._stop_child(child)
        self._record(job_id, final or {"error": "cancelled"}, cancelled=final is None)

    def _supervise(self, job_id: int, child, out: mp.Queue) -> dict | None:
        """Relay reports until the child sends its last message; None when the job must stop."""
        pending: dict[str, Any] = {"progress": None, "metrics": [], "log": "", "params": None}
        next_beat = 0.0
        while True:
            try:
                message = out.get(timeout=0.2)
            except queue.Empty:
                message = None
            if message is not None:
                if "result" in message or "error" in message:
                    if message.get("log"):
                        pending["log"] += message["log"]
                    self._beat(job_id, pending)
                    return message
                if message.get("progress") is not None:
                    pending["progress"] = message["progress"]
                if message.get("metrics"):
                    pending["metrics"].append(message["metrics"])
                if message.get("log"):
                    pending["log"] += message["log"]
                if message.get("params") is not None:
                    pending["params"] = message["params"]
            elif not child.is_alive() and out.empty():
                return {"error": f"the training process died (exit code {child.exitcode})"}
            if self.stop.is_set():
                return {"release": True}
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.config.heartbeat_s
                if not self._beat(job_id, pending):
                    return None

    def _beat(self, job_id: int, pending: dict[str, Any]) -> bool:
        with transaction(self.factory) as session:
            alive = jobs.heartbeat(
                session,
                job_id=job_id,
                worker_id=self.worker_id,
                lease_s=self.config.lease_s,
                progress=pending["progress"],
                metrics=pending["metrics"],
                log=pending["log"] or None,
                params=pending["params"],
            )
        pending.update(progress=None, metrics=[], log="", params=None)
        return alive

    def _stop_child(self, child) -> None:
        child.terminate()
        child.join(self.config.kill_grace_s)
        if child.is_alive():
            child.kill()
            child.join()

    def _record(self, job_id: int, final: dict[str, Any], cancelled: bool) -> None:
        result = final.get("result")
        with transaction(self.factory) as session:
            if final.get("release"):
                jobs.release(session, job_id=job_id, worker_id=self.worker_id)
                self._discard_outputs(job_id)
                log.info("job %s released back to the queue", job_id)
                return
            if result is None:
                status = JobStatus.cancelled if cancelled else JobStatus.failed
                jobs.finish(session, job_id=job_id, worker_id=self.worker_id, status=status, error=final.get("error"))
                self._discard_outputs(job_id)
                log.info("job %s ended: %s", job_id, final.get("error"))
                return
            if not jobs.finish(session, job_id=job_id, worker_id=self.worker_id, status=JobStatus.succeeded):
                return  # the job was taken away meanwhile: its output is not ours to register
            if result.get("model_dir"):
                version = _register(session, result, job_id)
                state = "promoted: now active" if version.status == ModelStatus.active else version.status.value
                jobs.append_log(session, job_id=job_id, text=f"registered model version {version.name} ({state})\n")
        log.info("job %s succeeded", job_id)

    def _discard_outputs(self, job_id: int) -> None:
        """Remove what a failed or killed attempt wrote (its model directory and temporary siblings), so a retry
        starts clean and nothing unregistered lingers. Names carry the job id, so other jobs' files are untouched."""
        models = self.settings.data_dir / "models"
        for leftover in models.glob(f"*-job{job_id}") if models.exists() else []:
            shutil.rmtree(leftover, ignore_errors=True)
        for leftover in models.glob(f".*-job{job_id}.tmp-*") if models.exists() else []:
            shutil.rmtree(leftover, ignore_errors=True)


def _register(session: Session, result: dict[str, Any], job_id: int) -> ModelVersion:
    """Register the model a job wrote (after any parent model the same job wrote: the bootstrap's base under its
    SFT model); the new version."""
    parent_id = result.get("parent_id")
    if result.get("parent_output"):
        parent_id = _register(session, result["parent_output"], job_id).id
    version = model_versions.register(
        session,
        name=result.get("name") or Path(result["model_dir"]).name,
        kind=ModelKind(result["model_kind"]),
        path=result["model_dir"],
        parent_id=parent_id,
        metrics=result.get("metrics") or {},
        training_data=TrainingData.from_json(result.get("training_data")),
        job_id=job_id,
        activate=bool(result.get("promote")),
    )
    return version
