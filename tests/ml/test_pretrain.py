"""Pretraining end to end: held-out loss falls well below the corpus' unigram entropy, a resumed run repeats the
uninterrupted losses exactly, two DDP processes match one, and the CLI's flags and errors."""

import argparse
import json
import math
import os
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.tokenizer import Tokenizer
from ml.train.pretrain import PretrainConfig, add_arguments, main, train

TINY = dict(
    demo_docs=400,
    vocab_size=400,
    block_size=32,
    batch_size=4,
    n_layer=2,
    n_embd=32,
    n_head=4,
    n_kv_head=2,
    eval_batches=2,
    warmup=2,
    lr=3e-3,
    threads=1,
)


@pytest.fixture(autouse=True)
def _restore_threads():
    """threads=1 keeps these tests fast on a busy machine (OpenMP threads that wait for a core are slow)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_pretraining_beats_unigram_entropy(tmp_path: Path) -> None:
    config = PretrainConfig(
        out=str(tmp_path / "base"),
        demo_docs=1500,
        vocab_size=512,
        block_size=64,
        batch_size=8,
        steps=150,
        warmup=10,
        lr=4e-3,
        n_layer=2,
        n_embd=64,
        n_head=4,
        eval_every=0,
        eval_batches=4,
        threads=1,
    )
    metrics = train(config)
    tokenizer = Tokenizer.load(config.out)
    counts = Counter()
    for doc in World(config.demo_seed).pretraining_corpus(config.demo_docs):
        counts.update([tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id])
    total = sum(counts.values())
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    assert abs(entropy - metrics["unigram_entropy"]) < 0.05  # the trainer's baseline agrees with a direct count
    assert metrics["val_loss"] < entropy - 2.5, (metrics["val_loss"], entropy)
    assert metrics["losses"][-1] < metrics["losses"][0] - 2.0
    model, _ = load_checkpoint(config.out)
    assert model.config.vocab_size == tokenizer.vocab_size and (Path(config.out) / "train_state.pt").is_file()


class Crash(Exception):
    pass


def test_resume_repeats_the_uninterrupted_losses_exactly(tmp_path: Path) -> None:
    base = dict(TINY, steps=8, save_every=4, eval_every=4)
    whole = train(PretrainConfig(out=str(tmp_path / "whole"), **base))["losses"]

    def crash_after_the_save_at_step_4(info: dict) -> None:
        if info["step"] == 5:
            raise Crash

    with pytest.raises(Crash):
        train(PretrainConfig(out=str(tmp_path / "cut"), **base), on_progress=crash_after_the_save_at_step_4)
    resumed = train(PretrainConfig(out=str(tmp_path / "cut"), resume=True, **base))
    assert len(whole) == 8 and resumed["losses"] == whole[4:]  # exact equality, not approximate
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(PretrainConfig(out=str(tmp_path / "cut"), **base))


def _ddp_worker(rank: int, world_size: int, port: int, config: dict, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world_size)
    metrics = train(PretrainConfig(**config))
    if rank == 0:
        Path(result).write_text(json.dumps({"losses": metrics["losses"], "val_loss": metrics["val_loss"]}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ddp_processes_match_one(tmp_path: Path) -> None:
    config = dict(TINY, steps=4, grad_accum=2, eval_every=0, device="cpu")
    single = train(PretrainConfig(out=str(tmp_path / "one"), **config))
    result = tmp_path / "ddp.json"
    args = (2, _free_port(), dict(config, out=str(tmp_path / "two")), str(result))
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    ddp = json.loads(result.read_text())
    torch.testing.assert_close(ddp["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    assert ddp["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    one, _ = load_checkpoint(tmp_path / "one")
    two, _ = load_checkpoint(tmp_path / "two")
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_every_flag_has_help() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        assert action.help, action.dest


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(_parse("--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.txt"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.txt" in err
    assert main(_parse("--out", str(tmp_path / "x"), "--steps", "0")) == 2
    assert "--steps" in capsys.readouterr().err


def test_cli_trains_on_user_text(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"Line {i}: the quick brown fox jumps over the lazy dog."}) for i in range(60)]
    corpus.write_text("\n".join(lines) + "\n")
    argv = ["--out", str(tmp_path / "m"), "--data", str(corpus), "--steps", "3", "--vocab-size", "300"]
    argv += ["--block-size", "16", "--batch-size", "2", "--n-layer", "1", "--n-embd", "32", "--heldout-fraction", "0.2"]
    assert main(_parse(*argv)) == 0
    assert "held-out loss" in capsys.readouterr().out
    model, _ = load_checkpoint(tmp_path / "m")
    assert model.config.n_layer == 1
    more = ["--out", str(tmp_path / "more"), "--init", str(tmp_path / "m"), "--n-layer", "3"]  # the shape is init's
    assert main(_parse(*more, *argv[2:])) == 0
    assert load_checkpoint(tmp_path / "more")[0].config.n_layer == 1
    assert (tmp_path / "more" / "tokenizer.json").read_text() == (tmp_path / "m" / "tokenizer.json").read_text()
