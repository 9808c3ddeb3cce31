"""Reward model: learns a synthetic preference to high held-out accuracy, from rankings and from thumbs; its rewards
are normalised so the reference answers average 0."""

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.evaluate import ranking_pair_counts, reward_accuracy
from ml.examples import load_rankings
from ml.train.reward import RewardConfig, RewardModel, train

FAST = dict(steps=40, batch_size=8, lr=3e-3, warmup=4, eval_every=0, device="cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained_rm(
    make_rankings, one_thread, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("rm") / "rm"
    metrics = train(RewardConfig(sft=str(tiny_base), out=str(out), rankings=make_rankings(240, 0), **FAST))
    return out, metrics


def test_reward_model_learns_the_preference_on_heldout_rankings(make_rankings, trained_rm) -> None:
    out, metrics = trained_rm
    assert metrics["val_acc"] >= 0.9 and metrics["val_pairs"] >= 30, metrics
    assert metrics["losses"][-1] < metrics["losses"][0]
    rm = RewardModel.load(out)
    fresh = load_rankings(make_rankings(40, seed=99))  # new answers, new draws
    assert reward_accuracy(rm, fresh)["accuracy"] >= 0.9
    prompt = World(0).prompts(1)[0].messages
    assert rm(prompt, "the blue cat lives") > rm(prompt, "the red cat lives")


def test_rewards_are_normalised_to_the_reference_answers(make_rankings, trained_rm) -> None:
    out, metrics = trained_rm
    _, meta = load_checkpoint(out)
    assert meta["kind"] == "reward" and meta["scalar_head"] and meta["reward_offset"] == metrics["reward_offset"]
    rm = RewardModel.load(out)
    train = load_rankings(make_rankings(240, 0))
    answers = {(repr(r.prompt), a): (r.prompt, a) for r in train for a in r.answers}  # every training answer
    prompts, texts = zip(*answers.values(), strict=True)
    assert abs(float(rm.score(list(prompts), list(texts)).mean())) < 0.1  # not exactly: the split keeps some out
    assert abs(metrics["reference_mean"]) < 1e-4 and metrics["reward_std"] > 0.5


def test_reward_model_from_thumbs(make_rankings, tiny_base: Path, tmp_path: Path) -> None:
    thumbs = [
        {"prompt": r["prompt"], "completion": a, "label": rank == 1}
        for r in make_rankings(200, 1)
        for a, rank in zip(r["answers"], r["ranking"], strict=True)
    ]
    config = RewardConfig(sft=str(tiny_base), out=str(tmp_path / "rm"), thumbs=thumbs, **{**FAST, "steps": 60})
    metrics = train(config)
    assert metrics["val_thumb_acc"] >= 0.85, metrics  # the sign of the reward (measured: 0.95)
    assert metrics["heldout_rankings"] > 0 and metrics["val_acc"] >= 0.8  # a prompt with an up and a down: a pair


def test_pair_counts_per_ranking_pool_to_the_accuracy(make_rankings, trained_rm) -> None:
    """The per-ranking counts an interval resamples add up to reward_accuracy's pooled numbers."""
    rm = RewardModel.load(trained_rm[0])
    fresh = load_rankings(make_rankings(40, seed=99))
    counts = ranking_pair_counts(rm, fresh)
    pooled = reward_accuracy(rm, fresh)
    assert len(counts) == len(fresh) and all(0 <= right <= pairs for right, pairs in counts)
    assert sum(p for _, p in counts) == pooled["pairs"]
    assert sum(r for r, _ in counts) / pooled["pairs"] == pytest.approx(pooled["accuracy"], abs=1e-9)


def test_head_only_trains_the_score_head_alone_on_cached_features(
    make_rankings, tiny_base: Path, tmp_path: Path
) -> None:
    """The trunk stays exactly the base's; the loss falls; the saved head reads raw features (the standardisation is
    folded in) and so orders held-out rankings as well as training measured."""
    rankings, thumbs = make_rankings(240, 0), []
    for r in make_rankings(40, 3):
        pairs = zip(r["answers"], r["ranking"], strict=True)
        thumbs += [{"prompt": r["prompt"], "completion": a, "label": k == 1} for a, k in pairs]
    fast = {**FAST, "steps": 200, "lr": 3e-2}
    config = RewardConfig(
        sft=str(tiny_base), out=str(tmp_path / "rm"), rankings=rankings, thumbs=thumbs, head_only=True, **fast
    )
    metrics = train(config)
    assert sum(metrics["losses"][-20:]) < 0.8 * sum(metrics["losses"][:20]), metrics["losses"]
    base, _ = load_checkpoint(tiny_base)
    rm = RewardModel.load(tmp_path / "rm")
    trunk = {k: v for k, v in rm.model.state_dict().items() if not k.startswith("score_head")}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in trunk.items())
    fresh = reward_accuracy(rm, load_rankings(make_rankings(40, seed=99)))["accuracy"]
    assert metrics["val_acc"] >= 0.75 and fresh >= 0.75, (metrics["val_acc"], fresh)
    assert abs(metrics["reference_mean"]) < 1e-4


def test_head_only_refuses_lora(tiny_base: Path, tmp_path: Path) -> None:
    config = RewardConfig(sft=str(tiny_base), out=str(tmp_path / "rm"), rankings=[{}], head_only=True, lora={"rank": 4})
    with pytest.raises(ValueError, match="no LoRA"):
        config.validate()


def _head_only_rank(rank: int, port: int, config: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = "2"
    train(RewardConfig(**config))


def test_head_only_on_two_processes_saves_the_head_one_process_trains(
    make_rankings, tiny_base: Path, tmp_path: Path
) -> None:
    """The head trains outside DDP's forward, so DDP cannot average its gradients: every rank must take the whole
    batch and make the same update, or rank 0 saves a head that saw half the data."""
    config = dict(
        sft=str(tiny_base), rankings=make_rankings(60, 0), head_only=True, **{**FAST, "steps": 20, "lr": 3e-2}
    )
    train(RewardConfig(out=str(tmp_path / "one"), **config))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_head_only_rank, args=(port, dict(config, out=str(tmp_path / "two"))), nprocs=2, join=True)
    one, two = RewardModel.load(tmp_path / "one"), RewardModel.load(tmp_path / "two")
    torch.testing.assert_close(two.model.score_head.weight, one.model.score_head.weight, rtol=1e-4, atol=1e-6)
