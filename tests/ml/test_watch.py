"""The over-optimisation watch: agreement between two scorers worked by hand, the flag on hand-made trends, and on a
real RL run whose judge is the opposite of its reward (the proxy rises, the judge falls: flagged) or the reward
itself (never flagged)."""

from pathlib import Path

import pytest
import torch

from ml.demo.world import World
from ml.train.rl import RLConfig, train
from ml.train.watch import Watch, overoptimisation, pairwise_agreement
from tests.ml.test_rl import target_fraction

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pairwise_agreement_counts_the_pairs_both_scorers_tell_apart() -> None:
    proxy = torch.tensor([1.0, 2.0, 3.0, 1.0, 5.0, 5.0])
    judge = torch.tensor([1.0, 3.0, 1.0, 2.0, 0.0, 9.0])
    # prompt 1: both say answer 2 is better (agree); prompt 2: they disagree; prompt 3: the proxy ties (not counted)
    assert pairwise_agreement(proxy, judge, group=2) == 0.5
    assert pairwise_agreement(torch.ones(4), judge[:4], group=2) is None
    three = torch.tensor([1.0, 2.0, 3.0])  # pairs (0,1) (0,2) (1,2): the judge reverses one of three
    assert pairwise_agreement(three, torch.tensor([1.0, 3.0, 2.0]), group=3) == pytest.approx(2 / 3)


def point(step: int, proxy: float, agreement: float | None = None, judge: float | None = None) -> dict:
    p = {"step": step, "kl": step / 10, "watch_proxy": proxy}
    p.update({"watch_agreement": agreement} if agreement is not None else {})
    p.update({"watch_judge": judge} if judge is not None else {})
    return p


def test_a_rising_proxy_with_falling_agreement_or_judge_is_flagged() -> None:
    rising_apart = [point(10, 0.1, 0.8), point(20, 0.3, 0.75), point(30, 0.5, 0.6)]
    flag = overoptimisation(rising_apart)
    assert flag is not None and "agreement with the judge fell 0.80 -> 0.60" in flag and "steps 10-30" in flag
    assert "KL 1.00 -> 3.00" in flag
    gold_falls = [point(10, 0.1, judge=0.40), point(20, 0.2, judge=0.39), point(30, 0.3, judge=0.35)]
    assert "the judge's score fell 0.400 -> 0.350" in overoptimisation(gold_falls)


def test_no_flag_without_both_trends_or_enough_points() -> None:
    assert overoptimisation([point(10, 0.1, 0.9), point(20, 0.5, 0.5)]) is None  # two points: no trend yet
    assert overoptimisation([point(10, 0.5, 0.9), point(20, 0.4, 0.7), point(30, 0.3, 0.5)]) is None  # proxy falls
    assert overoptimisation([point(10, 0.1, 0.8), point(20, 0.3, 0.8), point(30, 0.5, 0.75)]) is None  # agreement holds
    assert overoptimisation([point(10, 0.1), point(20, 0.3), point(30, 0.5)]) is None  # no judge: nothing to compare


def watched_run(tiny_base: Path, out: Path, judge) -> tuple[dict, Watch]:
    prompts = [p.messages for p in World(0).prompts(400) if p.split == "heldout"][:8]
    watch = Watch(prompts, judge, judge_name="test judge", every=6, samples=4)
    config = RLConfig(
        policy=str(tiny_base),
        out=str(out),
        algo="grpo",
        steps=24,
        prompts_per_step=4,
        samples_per_prompt=4,
        max_new_tokens=12,
        lr=3e-3,
        kl_coef=0.01,
        minibatch_size=8,
        device="cpu",
    )
    return train(config, reward_fn=target_fraction, watch=watch), watch


def test_a_judge_that_disagrees_with_the_reward_raises_the_flag(tiny_base: Path, tmp_path: Path) -> None:
    metrics, watch = watched_run(tiny_base, tmp_path / "opposed", lambda p, a: [1 - r for r in target_fraction(p, a)])
    measured = [h for h in metrics["history"] if "watch_proxy" in h]
    assert [h["step"] for h in measured] == [6, 12, 18, 24] and len(watch.history) == 4
    assert all(h["watch_agreement"] == 0.0 for h in measured if "watch_agreement" in h)  # always opposite
    assert watch.history[-1]["watch_proxy"] > watch.history[0]["watch_proxy"]  # the reward was learned
    assert metrics["overoptimisation"].startswith("possible over-optimisation") and metrics["overopt"] == 1.0
    assert metrics["watch_judge_name"] == "test judge"


def test_a_judge_that_agrees_never_raises_it(tiny_base: Path, tmp_path: Path) -> None:
    metrics, watch = watched_run(tiny_base, tmp_path / "agreeing", target_fraction)
    assert all(h.get("watch_agreement", 1.0) == 1.0 for h in watch.history)
    assert "overoptimisation" not in metrics and not watch.flags
