"""First start: with no model to serve, train the demo model (short pretrain + SFT on the demo world) and fill the
prompt pool from the demo world, so that chat and annotation work on a fresh machine. Runs in `flywheel serve`
before the web server starts, with a progress line; later starts find the model and skip all of this.
"""

import sys
import time
from pathlib import Path
from typing import Any

from app.db import make_engine, make_session_factory, transaction
from app.models import ModelKind, PromptSource, Split
from app.services import model_versions, prompts
from app.services.model_versions import served_version
from app.services.training_data import TrainingData
from app.settings import Settings

DEMO_PROMPTS = 600


def _progress(stage: str):
    bar_start = time.monotonic()

    def report(info: dict) -> None:
        step, total = info.get("step", 0), info.get("max_steps", 1)
        loss = info.get("loss")
        line = f"\r  {stage}: step {step}/{total}" + (f"  loss {loss:.3f}" if isinstance(loss, float) else "")
        print(f"{line}  {time.monotonic() - bar_start:.0f}s ", end="", file=sys.stderr, flush=True)

    return report


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
) -> tuple[dict, dict]:
    """Pretrain `models/demo-base` on the demo corpus, then SFT `models/demo-sft` on demo dialogues; their metrics."""
    from ml.train import pretrain, sft
    from ml.train.pretrain import PretrainConfig
    from ml.train.sft import SFTConfig

    base, chat = models / "demo-base", models / "demo-sft"
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
        ),
        on_progress=_progress("pretrain"),
    )
    print(file=sys.stderr)
    sft_config = SFTConfig(
        base=str(base),
        out=str(chat),
        steps=sft_steps,
        lr=sft_lr,
        demo_dialogues=sft_dialogues or min(2000, demo_docs),
        warmup=min(20, sft_steps // 3),
        demo_bad_fraction=bad_fraction,
    )
    sft_metrics = sft.train(sft_config, on_progress=_progress("sft"))
    print(file=sys.stderr)
    return base_metrics, sft_metrics


def bootstrap_demo_model(settings: Settings, bad_fraction: float = 0.2, **recipe: Any) -> bool:
    """Train and register the demo model when nothing is served; False when there was nothing to do. A larger
    `bad_fraction` (share of poor answers in its SFT data) leaves more for the flywheel to improve; `recipe` takes
    the other arguments of train_demo_model (the model's size and steps)."""
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with factory() as session:
        if served_version(session) is not None:
            return False
    models = settings.data_dir / "models"
    print("No model yet: training the demo model once (a few minutes on a laptop CPU).", file=sys.stderr)
    base_metrics, sft_metrics = train_demo_model(models, bad_fraction=bad_fraction, **recipe)
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
            training_data=TrainingData(demo=True, demo_seed=0, extra={"bad_fraction": bad_fraction}),
            activate=True,
        )
    print(f"Demo model ready: {models / 'demo-sft'}", file=sys.stderr)
    return True


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
