"""SFT: the held-out assistant-token loss falls, gradients flow only from assistant tokens, and bad data fails with a
message naming the record."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.examples import IGNORE, SFTData, load_dialogues
from ml.tokenizer import Tokenizer
from ml.train.sft import SFTConfig, add_arguments, dialogue_loss, main, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sft_lowers_the_heldout_assistant_loss(tiny_base: Path, tmp_path: Path) -> None:
    config = SFTConfig(
        base=str(tiny_base),
        out=str(tmp_path / "sft"),
        demo_dialogues=300,
        steps=30,
        batch_size=8,
        lr=3e-3,
        warmup=3,
        eval_every=0,
        heldout_fraction=0.1,
        packing=True,
        device="cpu",
    )
    metrics = train(config)
    assert metrics["val_loss"] < metrics["val_loss_start"] - 0.5, metrics
    model, meta = load_checkpoint(config.out)
    assert meta["kind"] == "sft" and meta["sft"]["data"] == ["demo"] and not model.scalar_head
    assert Tokenizer.load(config.out).vocab_size == model.config.vocab_size


def test_gradients_come_only_from_assistant_tokens(tiny_base: Path) -> None:
    model, _ = load_checkpoint(tiny_base)
    model.train()
    tok = Tokenizer.load(tiny_base)
    dialogues = load_dialogues(World(0).sft_dialogues(20))
    captured = {}

    def keep(module, inputs, output):
        output.retain_grad()
        captured["hidden"] = output

    for packing in (False, True):
        batch = SFTData(dialogues, tok, 128, packing=packing).get_batch("train", 4, torch.Generator().manual_seed(0))
        handle = model.norm.register_forward_hook(keep)  # the final hidden states, (B, T, n_embd)
        dialogue_loss(model, batch).backward()
        handle.remove()
        touched = captured["hidden"].grad.abs().sum(dim=-1) > 0  # (B, T): positions the loss depends on
        assert torch.equal(touched, batch["y"] != IGNORE)
        model.zero_grad()
        # and those targets are exactly the tokens that follow an assistant header, up to and including <|end|>
        for x, y in zip(batch["x"], batch["y"], strict=True):
            for t in (y != IGNORE).nonzero().flatten().tolist():
                before = x[: t + 1].tolist()
                last_role = max(i for i, v in enumerate(before) if v in (tok.user_id, tok.assistant_id, tok.system_id))
                assert before[last_role] == tok.assistant_id


def test_cli_names_the_bad_record(tiny_base: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--base", str(tiny_base), "--out", str(tmp_path / "o"), "--data", str(data)])
    assert main(args) == 2
    assert f"{data}:2: the dialogue has no assistant turn" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class Crash(Exception):
    pass


def test_resume_repeats_the_uninterrupted_losses(tiny_base: Path, tmp_path: Path) -> None:
    run = dict(base=str(tiny_base), demo_dialogues=60, steps=6, batch_size=4, save_every=3, eval_every=3, device="cpu")
    whole = train(SFTConfig(out=str(tmp_path / "whole"), **run))["losses"]

    def crash_after_step_4(info: dict) -> None:
        if info["step"] == 4:
            raise Crash

    with pytest.raises(Crash):
        train(SFTConfig(out=str(tmp_path / "cut"), **run), on_progress=crash_after_step_4)
    resumed = train(SFTConfig(out=str(tmp_path / "cut"), resume=True, **run))["losses"]
    assert resumed == whole[3:]
