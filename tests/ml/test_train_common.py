"""Shared training pieces: the lr schedule on hand-worked numbers, gradient accumulation, evaluation, the saved
train state, and the progress line."""

import io
import math
import random

import pytest
import torch

from ml.model import ModelConfig, Transformer
from ml.train import common
from ml.train.common import Distributed, format_progress, lr_at


def test_lr_schedule_hand_worked() -> None:
    # lr 1.0 -> min 0.1, 10 warm-up steps, 110 steps: the cosine runs over steps 10..110 (100 steps).
    assert lr_at(0, 110, 10, 1.0, 0.1) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(4, 110, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert lr_at(9, 110, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(10, 110, 10, 1.0, 0.1) == pytest.approx(1.0)  # cos(0) = 1: the peak
    assert lr_at(35, 110, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # a quarter: cos(pi/4)
    assert lr_at(60, 110, 10, 1.0, 0.1) == pytest.approx(0.55)  # halfway: cos(pi/2) = 0
    assert lr_at(110, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(500, 110, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(3, 10, 0, 2.0, 0.0) == pytest.approx(1.0 + math.cos(math.pi * 0.3))  # no warm-up


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.tiny(vocab_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2))


def _lm_loss(model, batch):
    x, y = batch
    return model(x, targets=y)[1]


def test_gradient_accumulation_equals_one_big_batch() -> None:
    x = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    a, b = _model(), _model()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    dist = Distributed()
    loss_a, norm_a = common.train_step(a, opt_a, [(x, y)], _lm_loss, 1, 1.0, dist)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    loss_b, norm_b = common.train_step(b, opt_b, halves, _lm_loss, 2, 1.0, dist)
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and norm_a == pytest.approx(norm_b, rel=1e-4)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_evaluate_loss_reports_perplexity() -> None:
    model = _model()
    x, y = torch.randint(0, 64, (2, 4, 12), generator=torch.Generator().manual_seed(1))
    metrics = common.evaluate_loss(model, [(x, y)], _lm_loss, Distributed())
    assert metrics["val_ppl"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert abs(metrics["val_loss"] - math.log(64)) < 0.5  # an untrained model is near uniform
    assert model.training


def test_train_state_restores_everything(tmp_path) -> None:
    model = _model()
    optimizer = model.configure_optimizer(0.1, 1e-2, (0.9, 0.95))
    x = torch.randint(0, 64, (4, 12))
    common.train_step(model, optimizer, [(x, x)], _lm_loss, 1, 1.0, Distributed())
    gen = torch.Generator().manual_seed(11)
    torch.randint(0, 9, (3,), generator=gen)
    random.seed(5)
    torch.manual_seed(6)
    common.save_train_state(tmp_path / "train_state.pt", model, optimizer, 7, gen, extra={"note": "hi"})
    expected = (torch.randint(0, 10**6, (4,), generator=gen), random.random(), torch.rand(2))

    fresh, gen2 = _model(), torch.Generator()
    opt2 = fresh.configure_optimizer(0.1, 1e-2, (0.9, 0.95))
    step, extra = common.load_train_state(tmp_path / "train_state.pt", fresh, opt2, gen2)
    assert step == 7 and extra == {"note": "hi"}
    assert torch.equal(torch.randint(0, 10**6, (4,), generator=gen2), expected[0])
    assert random.random() == expected[1] and torch.equal(torch.rand(2), expected[2])
    for pa, pb in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert str(opt2.state_dict()["state"]) == str(optimizer.state_dict()["state"])
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        common.load_train_state(tmp_path / "nothing.pt", fresh, opt2, gen2)


def test_progress_line_and_bar() -> None:
    info = {"step": 50, "max_steps": 200, "loss": 2.5, "lr": 3e-4, "tokens_per_s": 12345.0, "eta_s": 252.0}
    line = format_progress(info, width=8)
    assert line == "[##......] 50/200 | loss 2.5000 | lr 3.00e-04 | 12.3k tok/s | ETA 4m12s"
    assert "val 1.2500" in format_progress({**info, "val_loss": 1.25})
    assert "ETA 1h01m" in format_progress({**info, "eta_s": 3700})
    stream = io.StringIO()
    bar = common.ProgressBar(stream)
    for step in range(1, 41):
        bar({**info, "step": step, "max_steps": 40})
    assert len(stream.getvalue().splitlines()) == 20  # not a terminal: one line per 5%


def test_rank_rows_and_devices() -> None:
    dist = Distributed(rank=1, world_size=2)
    assert dist.rows(8) == slice(4, 8) and not dist.is_main
    with pytest.raises(ValueError, match="divisible"):
        dist.rows(7)
    assert common.pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert common.pick_device("auto").type == "cpu"
        with pytest.raises(ValueError, match="CUDA"):
            common.pick_device("cuda")
