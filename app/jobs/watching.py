"""The over-optimisation watch of an `rl` job (ml/train/watch.py): which held-out prompts it samples and who judges.

The judge must not be the reward model the policy trains against (that one can only agree with itself). In the demo
world it is the gold scorer, when the reference policy learned from the demo world (its prompts are the world's, so
gold is defined on them). Elsewhere it is the gate's judge (`model_versions.judge_for`): the reward model most recently
active other than the trainer, an independent reading of the same human labels. With neither, the watch logs the
held-out proxy reward against KL only and cannot flag anything.
"""

from typing import Any

from sqlalchemy.orm import Session

from app.models import ModelVersion, Split
from app.services import datasets, model_versions
from app.services.training_data import TrainingData

WATCH_POINTS = 8  # measurements over a job, when `watch_every` is not given
WATCH_PROMPTS = 16


def watch_every(params: dict[str, Any], steps: int) -> int:
    """The job's `watch_every` (0: off), else about WATCH_POINTS measurements over its steps."""
    given = params.get("watch_every")
    return max(1, steps // WATCH_POINTS) if given is None else int(given)


def build_watch(session: Session, *, reference: ModelVersion, trainer: ModelVersion, every: int, tokenizer_dir: str):
    """An ml Watch for this job, or None when `every` is 0 or there are no held-out prompts."""
    from ml.demo.world import World
    from ml.tokenizer import Tokenizer
    from ml.train.reward import RewardModel
    from ml.train.rl import reward_model_fn, text_reward_fn
    from ml.train.watch import Watch

    prompts = [r["messages"] for r in datasets.prompt_records(session, Split.heldout).records][:WATCH_PROMPTS]
    if every <= 0 or not prompts:
        return None
    tokenizer = Tokenizer.load(tokenizer_dir)
    data = TrainingData.from_json(reference.training_data)
    if data.learned_from_demo:
        judge, name = text_reward_fn(World(data.demo_seed or 0).gold_score, tokenizer), "gold (demo world)"
    elif (other := model_versions.judge_for(session, trainer_id=trainer.id)) is not None:
        judge, name = reward_model_fn(RewardModel.load(other.path), tokenizer), f"reward model {other.name}"
    else:
        judge, name = None, "none (no other reward model yet)"
    return Watch(prompts, judge, judge_name=name, every=every)


def flag_logger(ctx: Any, watch: Any):
    """The job's progress callback, plus one log line the first time the watch raises its flag."""

    def on_progress(info: dict[str, Any]) -> None:
        ctx.on_progress(info)
        if info.get("overopt") and len(watch.flags) == 1:  # the step that raised the first flag: it is logged once
            ctx.report(log=f"warning: {watch.flags[0]} (judge: {watch.judge_name})\n")

    return on_progress
