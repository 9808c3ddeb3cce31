"""DPO raises the held-out margin of chosen over rejected answers; KTO raises desirable and lowers undesirable."""

from pathlib import Path

import pytest

from ml.checkpoint import load_checkpoint
from ml.train.dpo import DPOConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = dict(steps=30, batch_size=8, lr=3e-3, warmup=3, eval_every=0, beta=0.1, device="cpu")


def test_dpo_raises_the_chosen_over_rejected_margin(make_rankings, tiny_base: Path, tmp_path: Path) -> None:
    config = DPOConfig(policy=str(tiny_base), out=str(tmp_path / "dpo"), rankings=make_rankings(150, 0), **FAST)
    metrics = train(config)
    assert metrics["val_margin_start"] == 0.0 and metrics["val_acc_start"] == 0.0  # policy == reference at start
    assert metrics["val_margin"] > 0.5 and metrics["val_acc"] >= 0.8, metrics
    assert metrics["val_logp_margin"] > metrics["val_logp_margin_start"] + 5.0
    _, meta = load_checkpoint(config.out)
    assert meta["kind"] == "policy" and meta["method"] == "dpo"


def test_kto_from_thumbs(make_rankings, tiny_base: Path, tmp_path: Path) -> None:
    thumbs = [
        {"prompt": r["prompt"], "completion": a, "label": rank == 1}
        for r in make_rankings(120, 1)
        for a, rank in zip(r["answers"], r["ranking"], strict=True)
    ]
    run = {**FAST, "steps": 80}
    config = DPOConfig(policy=str(tiny_base), out=str(tmp_path / "kto"), algo="kto", thumbs=thumbs, **run)
    metrics = train(config)
    assert metrics["val_margin_start"] == 0.0
    # desirable answers' implicit reward beats undesirable ones' (measured: margin 1.0, 83% of pairs)
    assert metrics["val_margin"] > 0.5 and metrics["val_acc"] >= 0.7, metrics


def test_no_data_is_an_error(tiny_base: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="give --rankings and/or --thumbs"):
        train(DPOConfig(policy=str(tiny_base), out=str(tmp_path / "x")))
    tie = {"prompt": "Hi?", "answers": ["a", "b"], "ranking": [1, 1]}
    with pytest.raises(ValueError, match="no training pairs"):
        train(DPOConfig(policy=str(tiny_base), out=str(tmp_path / "x"), rankings=[tie, tie]))
