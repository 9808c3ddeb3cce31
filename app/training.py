"""What each job type does, run inside the worker's child process: build inputs, call an `ml/` trainer, report.

A handler takes a JobContext and returns a JobOutput naming the model directory it wrote; the worker (the parent
process) registers that directory as a model version only after the handler returned, so a crash or a cancel never
leaves a half-written model registered.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class JobContext:
    job_id: int
    params: dict[str, Any]
    data_dir: Path
    database_url: str
    report: Callable[..., None]  # report(progress=None, metrics=None, log=None)

    def model_dir(self, kind: str) -> Path:
        return self.data_dir / "models" / f"{kind}-job{self.job_id}"

    def on_progress(self, info: dict[str, Any]) -> None:
        """Adapter for ml/ trainers' progress callbacks: step/max_steps → progress, the rest → a metric point."""
        step, total = info.get("step"), info.get("max_steps")
        progress = step / total if isinstance(step, int) and isinstance(total, int) and total > 0 else None
        point = {k: v for k, v in info.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        self.report(progress=progress, metrics=point)


@dataclass
class JobOutput:
    model_kind: str | None = None
    model_dir: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    parent_id: int | None = None
    training_data: dict[str, Any] = field(default_factory=dict)


def _params(ctx: JobContext, allowed: set[str]) -> dict[str, Any]:
    unknown = set(ctx.params) - allowed
    if unknown:
        raise ValueError(f"unknown parameters for this job: {', '.join(sorted(unknown))}")
    return dict(ctx.params)


def run_pretrain(ctx: JobContext) -> JobOutput:
    """Pretrain a base model on the demo corpus (or files on the server) with ml.train.pretrain."""
    from dataclasses import fields

    from ml.train.pretrain import PretrainConfig, pretrain

    allowed = {f.name for f in fields(PretrainConfig)} - {"out", "resume", "progress"}
    out = ctx.model_dir("base")
    config = PretrainConfig(out=str(out), **_params(ctx, allowed))
    metrics = pretrain(config, on_progress=ctx.on_progress)
    return JobOutput(
        model_kind="base", model_dir=str(out), metrics=_plain(metrics), training_data={"data": config.data}
    )


def _plain(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool) or v is None}


HANDLERS: dict[str, Callable[[JobContext], JobOutput]] = {
    "pretrain": run_pretrain,
}
