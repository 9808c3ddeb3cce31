"""What a job handler gets and gives back: the JobContext (the job's id, parameters, where to write, how to report)
and the JobOutput (the model directory it wrote, with its metrics and lineage) that the worker registers.
"""

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory
from app.jobs.params import effective_params
from app.services.training_data import TrainingData


@dataclass
class JobContext:
    job_id: int
    params: dict[str, Any]
    data_dir: Path
    database_url: str
    report: Callable[..., None]  # report(progress=None, metrics=None, log=None, params=None)
    nproc: int = 1  # processes to train with (`flywheel worker --nproc`): local DDP ranks, this process is rank 0
    reward_min_labels: int = 20  # FLYWHEEL_REWARD_MIN_LABELS: the reward-model gate's label count

    def session(self) -> Session:
        """A database session of the child's own (a forked connection pool must not be shared)."""
        if not hasattr(self, "_factory"):
            self._factory = make_session_factory(make_engine(self.database_url))
        return self._factory()

    def model_dir(self, kind: str) -> Path:
        return self.data_dir / "models" / f"{kind}-job{self.job_id}"

    def train(self, trainer: Callable[..., dict[str, Any]], config: Any) -> dict[str, Any]:
        """Run an ml/ trainer on `nproc` processes (app/jobs/ranks.py). The config is built once, here, so every rank
        trains on the same rows even while new labels arrive; each progress point says how many ranks trained."""
        from app.jobs.ranks import run_ranks

        self.record_params(config)
        return run_ranks(
            trainer, config, nproc=self.nproc, on_progress=self.on_progress, log=lambda line: self.report(log=line)
        )

    def record_params(self, config: Any, **chosen: Any) -> None:
        """Put what the job runs with (defaults filled in, the versions it chose) on the job row and in its log."""
        params = effective_params(config, **chosen)
        shown = ", ".join(f"{k}={v}" for k, v in params.items() if k in self.params or k.endswith("_version_id"))
        self.report(params=params, log=f"parameters: {shown or 'the defaults'} (all values on the job page)\n")

    def on_progress(self, info: dict[str, Any]) -> None:
        """Adapter for ml/ trainers' progress callbacks: step/max_steps → progress, the rest → a metric point."""
        step, total = info.get("step"), info.get("max_steps")
        progress = step / total if isinstance(step, int) and isinstance(total, int) and total > 0 else None
        point = {k: v for k, v in info.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.report(progress=progress, metrics=point, log=progress_line(point) if _log_due(point) else None)


LOGGED = ("loss", "val_loss", "reward", "kl", "val_acc")
LOG_LINES = 10  # progress lines per job in its log (and the first and last step, and every evaluation)


def _log_due(point: dict[str, Any]) -> bool:
    step, total = point.get("step"), point.get("max_steps")
    if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
        return False
    return step in (1, total) or step % max(1, total // LOG_LINES) == 0 or "val_loss" in point


def progress_line(point: dict[str, Any]) -> str:
    """One log line for a progress point: `step 30/300 · loss 2.41 · val_loss 2.5 · ETA 1m 20s`."""
    parts = [f"step {point.get('step')}/{point.get('max_steps')}"]
    parts += [f"{k} {point[k]:.4g}" for k in LOGGED if isinstance(point.get(k), int | float)]
    if isinstance(point.get("eta_s"), int | float):
        minutes, seconds = divmod(round(point["eta_s"]), 60)
        parts.append(f"ETA {minutes}m {seconds:02d}s" if minutes else f"ETA {seconds}s")
    return " · ".join(parts) + "\n"


@dataclass
class JobOutput:
    model_kind: str | None = None
    model_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    parent_id: int | None = None
    training_data: TrainingData = field(default_factory=TrainingData)
    promote: bool = False  # make the new version the active one of its kind (after the gate, for policies)
    name: str | None = None  # the version's name; None: the model directory's
    # a model this job also made, registered first and made this one's parent (the bootstrap's base under its SFT)
    parent_output: "JobOutput | None" = None

    def to_message(self) -> dict[str, Any]:
        """What the child sends the worker (plain data through a pipe; the record as its stored JSON)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)}
        parent = self.parent_output.to_message() if self.parent_output else None
        return {**plain, "training_data": self.training_data.to_json(), "parent_output": parent}
