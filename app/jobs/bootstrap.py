"""First start: with no model to serve, train the demo model (a short pretrain + SFT on the demo world) and fill the
prompt pool from the demo world, so that chat and annotation work on a fresh machine.

`flywheel serve` enqueues it as a `bootstrap` job (`enqueue_bootstrap`) and starts listening at once; the worker
trains it (`run_bootstrap`) and registers the base and the chat model, active, when it is done, and every server
process then swaps the model in. The home page shows the stage, step and time left from the job's progress points
(`stage`: 0 pretraining, 1 fine-tuning). The bootstrap then answers the demo's held-out questions greedily and keeps
their mean gold score (`heldout_gold_greedy`) on the chat model's version. Later starts find a model and skip all of
this. `bootstrap_demo_model` does the same in the calling process (tests, `flywheel demo flywheel`).
"""

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db import make_engine, make_session_factory, transaction
from app.jobs.context import JobContext, JobOutput
from app.models import Job, JobStatus, ModelKind, PromptSource, Split
from app.services import jobs, model_versions, prompts
from app.services.model_versions import served_version
from app.services.training_data import TrainingData
from app.settings import Settings

DEMO_PROMPTS = 600
STAGES = ("pretraining", "fine-tuning")  # the `stage` of a bootstrap job's progress points, by index
GOLD_PROMPTS = 96  # held-out demo prompts the bootstrap answers greedily to measure its gold score
RETHREAD_EVERY = 20  # steps between looks at the free cores (the load average moves over a minute)

# Stage progress: (stage index, the trainer's progress dict) -> None.
StageProgress = Callable[[int, dict[str, Any]], None]


def seed_demo_prompts(settings: Settings, seed: int = 0) -> int:
    from ml.demo.world import World

    items = [(p.messages, Split(p.split)) for p in World(seed).prompts(DEMO_PROMPTS)]
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with transaction(factory) as session:
        return prompts.add_prompts(session, items=items, source=PromptSource.demo)


# The chat model `flywheel demo flywheel` trains when given none: small (2 layers, width 64, about a minute on 2 cores)
# but trained long enough to know some of the world's facts, with half of its SFT answers poor (wrong, rambling,
# rude), so that the loop has room to improve it. tests/app/test_flywheel_e2e.py trains exactly this one.
FLYWHEEL_DEMO_MODEL = {
    "pretrain_steps": 600,
    "sft_steps": 300,
    "demo_docs": 1500,
    "n_layer": 2,
    "n_embd": 64,
    "bad_fraction": 0.5,
    "pretrain_batch": 16,
    "sft_dialogues": 400,
    "sft_lr": 1e-3,
}

# The model `flywheel serve` trains on first start: the one people meet first, so it must answer the demo's questions
# right (greedy). Measured on one pretrained base (greedy, right answers on 96 train / 96 held-out prompts): SFT of
# 150 steps at lr 5e-4 with 20% poor answers got 50% / 24% right ("Where does Mira live?" -> "Gus lives in Rome.");
# 600 steps at 1e-3 with 5% poor answers got 88% / 41%, and both README questions right (2e-3: no better).
BOOTSTRAP_MODEL = {
    "pretrain_steps": 300,
    "sft_steps": 600,
    "demo_docs": 8000,
    "n_layer": 4,
    "n_embd": 128,
    "bad_fraction": 0.05,
    "pretrain_batch": 32,
    "sft_dialogues": None,
    "sft_lr": 1e-3,
}


def status_line(stage: int, info: dict[str, Any]) -> str:
    """`pretraining (1/2): step 120/300, loss 1.234, about 50s left in this stage`."""
    line = f"{STAGES[stage]} ({stage + 1}/{len(STAGES)}): step {info.get('step', 0)}/{info.get('max_steps', '?')}"
    loss, eta = info.get("loss"), info.get("eta_s")
    line += f", loss {loss:.3f}" if isinstance(loss, float) else ""
    return line + (f", about {eta:.0f}s left in this stage" if isinstance(eta, int | float) else "")


def _print_progress(stage: int, info: dict[str, Any]) -> None:
    """The terminal's progress line of `bootstrap_demo_model`, redrawn in place."""
    end = "\n" if info.get("step") == info.get("max_steps") else ""
    print(f"\r  {status_line(stage, info)} ", end=end, file=sys.stderr, flush=True)


def train_demo_model(
    models: Path,
    pretrain_steps: int = 300,
    sft_steps: int = 150,
    demo_docs: int = 8000,
    n_layer: int = 4,
    n_embd: int = 128,
    bad_fraction: float = 0.2,
    pretrain_batch: int = 32,
    sft_dialogues: int | None = None,
    sft_lr: float = 5e-4,
    *,
    base_dir: Path | None = None,
    chat_dir: Path | None = None,
    threads: int = 0,
    on_progress: StageProgress | None = _print_progress,
) -> tuple[dict, dict]:
    """Pretrain `models/demo-base` (or `base_dir`) on the demo corpus, then SFT `models/demo-sft` (or `chat_dir`) on
    demo dialogues; their metrics. `threads`: torch's CPU threads (0: its default)."""
    from ml.train import pretrain, sft
    from ml.train.pretrain import PretrainConfig
    from ml.train.sft import SFTConfig

    base, chat = base_dir or models / "demo-base", chat_dir or models / "demo-sft"

    def stage(index: int):
        return None if on_progress is None else lambda info: on_progress(index, info)

    base_metrics = pretrain.train(
        PretrainConfig(
            out=str(base),
            steps=pretrain_steps,
            batch_size=pretrain_batch,
            n_layer=n_layer,
            n_embd=n_embd,
            demo_docs=demo_docs,
            eval_every=100,
            warmup=min(100, max(1, pretrain_steps // 10)),
            threads=threads,
        ),
        on_progress=stage(0),
    )
    sft_config = SFTConfig(
        base=str(base),
        out=str(chat),
        steps=sft_steps,
        lr=sft_lr,
        demo_dialogues=sft_dialogues or min(2000, demo_docs),
        warmup=min(20, sft_steps // 3),
        demo_bad_fraction=bad_fraction,
        threads=threads,
    )
    sft_metrics = sft.train(sft_config, on_progress=stage(1))
    return base_metrics, sft_metrics


def heldout_gold(chat_dir: Path, n_prompts: int = GOLD_PROMPTS) -> dict[str, float]:
    """The chat model's greedy answers to the demo's first `n_prompts` held-out prompts, judged by the gold scorer:
    their mean score and the share of answers that state the right fact."""
    from ml.checkpoint import load_checkpoint
    from ml.demo.world import World
    from ml.engine import Sampling
    from ml.evaluate import sample_answers
    from ml.tokenizer import Tokenizer

    world = World(0)
    messages = [p.messages for p in world.prompts(10_000) if p.split == "heldout"][:n_prompts]
    model, _ = load_checkpoint(chat_dir)
    _, answers = sample_answers(model, Tokenizer.load(chat_dir), messages, 1, 48, Sampling(0.0))
    pairs = list(zip(messages, answers, strict=True))
    gold = sum(world.gold_score(m, a) for m, a in pairs) / len(pairs)
    right = sum(world.judge(world.find_question(m[-1]["content"]), a) == "correct" for m, a in pairs) / len(pairs)
    return {"heldout_gold_greedy": round(gold, 4), "heldout_correct_greedy": round(right, 4)}


def bootstrap_demo_model(settings: Settings, **recipe: Any) -> bool:
    """Train and register the demo model here and now when nothing is served; False when there was nothing to do.
    `recipe` overrides BOOTSTRAP_MODEL (train_demo_model's arguments): a larger `bad_fraction` (share of poor answers
    in its SFT data) leaves more for the flywheel to improve."""
    recipe = {**BOOTSTRAP_MODEL, **recipe}
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with factory() as session:
        if served_version(session) is not None:
            return False
    models = settings.data_dir / "models"
    print("No model yet: training the demo model once (a few minutes on a laptop CPU).", file=sys.stderr)
    base_metrics, sft_metrics = train_demo_model(models, **recipe)
    sft_metrics = {**sft_metrics, **heldout_gold(models / "demo-sft")}
    with transaction(factory) as session:
        parent = model_versions.register(
            session,
            name="demo-base",
            kind=ModelKind.base,
            path=str(models / "demo-base"),
            metrics=_numbers(base_metrics),
            training_data=TrainingData(corpus=["demo"], demo_seed=0),
            activate=True,
        )
        model_versions.register(
            session,
            name="demo-sft",
            kind=ModelKind.sft,
            path=str(models / "demo-sft"),
            parent_id=parent.id,
            metrics=_numbers(sft_metrics),
            training_data=TrainingData(demo=True, demo_seed=0, extra={"bad_fraction": recipe["bad_fraction"]}),
            activate=True,
        )
    print(
        f"Demo model ready: {models / 'demo-sft'} (held-out greedy gold {sft_metrics['heldout_gold_greedy']:.3f})",
        file=sys.stderr,
    )
    return True


# ------------------------------------------------------------------------------------------- as a job in the worker


def pending_bootstrap(session: Session) -> Job | None:
    """The newest bootstrap job, if one is queued or running."""
    return session.scalar(
        select(Job)
        .where(Job.type == "bootstrap", Job.status.in_([JobStatus.queued, JobStatus.running]))
        .order_by(Job.id.desc())
        .limit(1)
    )


def enqueue_bootstrap(session: Session, **recipe: Any) -> Job | None:
    """A `bootstrap` job when no model is served and none is queued or running (a failed or cancelled one is tried
    again at the next start); None when there is nothing to do. First in the queue. Caller commits."""
    if served_version(session) is not None or pending_bootstrap(session) is not None:
        return None
    return jobs.enqueue(session, type="bootstrap", params={**BOOTSTRAP_MODEL, **recipe}, priority=100)


def run_bootstrap(ctx: JobContext) -> JobOutput:
    """The `bootstrap` job's handler: train both stages into this job's directories, measure the chat model's
    held-out greedy gold, and hand both models to the worker to register, active, the base as the chat's parent."""
    import torch

    unknown = set(ctx.params) - set(BOOTSTRAP_MODEL)
    if unknown:
        raise ValueError(f"unknown parameters for this job: {', '.join(sorted(unknown))}")
    recipe = {**BOOTSTRAP_MODEL, **ctx.params}
    threads = torch.get_num_threads()  # the worker's child sized them to the free cores; _rethread follows them
    base, chat = ctx.model_dir("demo-base"), ctx.model_dir("demo-sft")
    steps = (recipe["pretrain_steps"], recipe["sft_steps"])
    started = time.monotonic()
    ctx.report(log=f"training the demo model on {threads} thread(s): {steps[0]} pretraining + {steps[1]} SFT steps\n")

    def progress(stage: int, info: dict[str, Any]) -> None:
        step, total = int(info.get("step", 0)), max(1, int(info.get("max_steps", 1)))
        if step % RETHREAD_EVERY == 0:
            _rethread(ctx)
        point = {k: v for k, v in info.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        ctx.report(progress=(sum(steps[:stage]) + step) / sum(steps), metrics={**point, "stage": stage})
        if step * 10 // total != (step - 1) * 10 // total:  # a line in the terminal at every tenth of a stage
            print(f"  demo model: {status_line(stage, info)}", file=sys.stderr, flush=True)
        if step == total:
            ctx.report(log=f"{STAGES[stage]} done after {time.monotonic() - started:.0f}s\n")

    base_metrics, sft_metrics = train_demo_model(
        ctx.data_dir / "models", **recipe, base_dir=base, chat_dir=chat, on_progress=progress
    )
    gold = heldout_gold(chat)
    score, right = gold["heldout_gold_greedy"], gold["heldout_correct_greedy"]
    ctx.report(log=f"held-out greedy gold {score:.3f} ({right:.0%} of the answers right)\n")
    print(f"Demo model trained: held-out greedy gold {score:.3f} ({right:.0%} right)", file=sys.stderr, flush=True)
    parent = JobOutput(
        "base", str(base), _numbers(base_metrics), None, TrainingData(corpus=["demo"], demo_seed=0), True, "demo-base"
    )
    lineage = TrainingData(demo=True, demo_seed=0, extra={"bad_fraction": recipe["bad_fraction"]})
    metrics = {**_numbers(sft_metrics), **gold}
    return JobOutput("sft", str(chat), metrics, None, lineage, True, "demo-sft", parent_output=parent)


def _rethread(ctx: JobContext) -> None:
    """Follow the free cores while training: the load average at the job's start still holds what ran before it (the
    install, the server starting), and other work may come and go during it."""
    import torch

    from app.jobs.ranks import free_cores

    now = torch.get_num_threads()
    threads = free_cores(own=now)
    if threads != now:
        torch.set_num_threads(threads)
        ctx.report(log=f"now training on {threads} thread(s): the free cores changed\n")


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------ what the home page shows


@dataclass
class SetupStatus:
    """How far the first start got: `state` is "training" (or "queued"), "failed", "idle" (no model and no bootstrap
    job: an admin must train or import one) or "trained" (a model is active)."""

    state: str
    job_id: int | None = None
    stage: int = 0
    step: int = 0
    total: int = 0
    eta_s: float | None = None
    stages: list[tuple[str, int]] = field(default_factory=list)  # (stage, its steps)
    error: str | None = None

    @property
    def stage_name(self) -> str:
        return STAGES[self.stage]

    @property
    def eta_text(self) -> str | None:
        """`about 1 min 20 s left in this stage`, or None before the trainer has timed a step."""
        if self.eta_s is None:
            return None
        minutes, seconds = divmod(round(self.eta_s), 60)
        return f"about {f'{minutes} min ' if minutes else ''}{seconds} s left in this stage"


def setup_status(session: Session) -> SetupStatus:
    """The first start's progress from the newest bootstrap job's last progress point (the home page polls it)."""
    if served_version(session) is not None:
        return SetupStatus("trained")
    job = session.scalar(select(Job).where(Job.type == "bootstrap").order_by(Job.id.desc()).limit(1))
    if job is None or job.status in (JobStatus.succeeded, JobStatus.cancelled):
        return SetupStatus("idle", job.id if job else None)
    params = {**BOOTSTRAP_MODEL, **(job.params or {})}
    stages = list(zip(STAGES, (int(params["pretrain_steps"]), int(params["sft_steps"])), strict=True))
    if job.status == JobStatus.failed:
        return SetupStatus("failed", job.id, stages=stages, error=job.error)
    last = next((p for p in reversed(job.metrics or []) if "stage" in p), None)
    if job.status == JobStatus.queued or last is None:
        return SetupStatus("queued" if job.status == JobStatus.queued else "training", job.id, stages=stages)
    eta = last.get("eta_s")
    return SetupStatus(
        "training",
        job.id,
        stage=int(last["stage"]),
        step=int(last.get("step", 0)),
        total=int(last.get("max_steps", 0)),
        eta_s=float(eta) if isinstance(eta, int | float) else None,
        stages=stages,
    )
