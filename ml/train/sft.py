"""Supervised fine-tuning: a base model learns to answer in the chat format, with loss on the assistant's tokens only.

Input is dialogues in the OpenAI `messages` format (JSONL, {"messages": [...]} a line; see ml/examples.py) or the
demo world's (the default). Each dialogue is rendered by the tokenizer's chat template with a mask that is 1 on the
assistant's content and its closing turn end, so the model learns to answer and to stop, and never learns to write
the user's side. Multi-turn dialogues train on every assistant turn. Batches are right-padded, or with --packing
several dialogues share a row with `doc_ids`, so attention and positions restart at every dialogue and no example
sees another. A share of dialogues is held out; its assistant-token loss is measured before and after.

Run (CPU, ~1 minute, after ml.train.pretrain --out /tmp/fw-base):
    python -m ml.train.sft --base /tmp/fw-base --out /tmp/fw-sft --steps 200 --progress
Your own dialogues:  python -m ml.train.sft --base runs/base --out runs/sft --data chats.jsonl --packing
Two CPU processes:   torchrun --nproc_per_node 2 -m ml.train.sft --base /tmp/fw-base --out /tmp/fw-sft2
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.examples import IGNORE, SFTData, describe_sources, pad_examples
from ml.screen import Screened, dialogue_fits, screen, skip_metrics
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, ProgressCallback


@dataclass(kw_only=True)
class SFTConfig(common.LoopTrainConfig):
    """Flags of an SFT run. `data` holds 'demo', JSONL paths, or dialogue objects (from Python)."""

    base: str
    data: list[Any] = field(default_factory=lambda: ["demo"])
    max_len: int | None = None  # None: the model's max_seq_len
    packing: bool = False
    demo_dialogues: int = 3000
    demo_seed: int = 0
    demo_bad_fraction: float = 0.2  # share of the demo's answers that are wrong, rambling or rude
    # the loop's defaults for SFT
    steps: int = 300
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 20
    heldout_fraction: float = 0.05
    eval_every: int = 100

    def validate(self) -> None:
        self.require_at_least_one("steps", "batch_size", "grad_accum", "demo_dialogues")
        if self.lr <= 0 or not 0 < self.heldout_fraction < 1:
            raise ValueError("--lr must be positive and the held-out fraction between 0 and 1")
        if not 0 <= self.demo_bad_fraction <= 1:
            raise ValueError("--demo-bad-fraction must be between 0 and 1")


def train(config: SFTConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Fine-tune config.base into config.out; returns the metrics (val_loss_start, val_loss, ...)."""
    return common.run_distributed(config, _run, on_progress)


def dialogue_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the assistant tokens of a batch (targets elsewhere are IGNORE)."""
    return model(batch["x"], targets=batch["y"], doc_ids=batch.get("doc_ids"), loss_only=True)[1]


@torch.no_grad()
def heldout_loss(model: nn.Module, examples: list[tuple[Tensor, Tensor]], pad_id: int, batch_size: int = 16) -> float:
    """Assistant-token cross-entropy over all `examples`, weighted by tokens (not by batch), deterministic."""
    model = common.unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = pad_examples(examples[i : i + batch_size], pad_id)
        x, y = batch["x"].to(device), batch["y"].to(device)
        logits, _ = model(x)
        total += float(nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum"))
        count += int((y != IGNORE).sum())
    model.train(was_training)
    return total / max(count, 1)


def _run(config: SFTConfig, dist: Distributed, on_progress: ProgressCallback | None) -> dict[str, Any]:
    config.check_out()
    model, _ = load_checkpoint(config.base, device=dist.device)
    if model.scalar_head:
        raise ValueError(f"{config.base} is a scalar-head (reward/value) model, not a language model")
    tokenizer = Tokenizer.load(config.base)
    max_len = min(config.max_len or model.config.max_seq_len, model.config.max_seq_len)
    dialogues = _dialogues(config, tokenizer, max_len)
    data = SFTData(dialogues.require(2), tokenizer, max_len, config.heldout_fraction, config.seed, config.packing)

    torch.manual_seed(config.seed)
    model = config.with_lora(model).train()
    training = common.start_training(model, config)
    metrics: dict[str, Any] = {"train_dialogues": len(data.examples["train"]), **skip_metrics(dialogues)}
    metrics["heldout_dialogues"] = len(data.examples["heldout"])
    if not config.resume:
        metrics["val_loss_start"] = heldout_loss(model, data.examples["heldout"], data.pad_id)
    rows = dist.rows(config.batch_size)

    def next_batch() -> dict[str, Tensor]:
        batch = data.get_batch("train", config.batch_size, training.generator, rows)
        return {k: v.to(dist.device) for k, v in batch.items()}

    def evaluate() -> dict[str, float]:
        loss = heldout_loss(model, data.examples["heldout"], data.pad_id)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    record = {**asdict(config), "data": describe_sources(config.data)}
    return common.fit(
        training,
        config,
        dist,
        metrics,
        next_batch=next_batch,
        loss_fn=dialogue_loss,
        evaluate=evaluate,
        on_progress=on_progress,
        checkpoint=lambda step: {"kind": "sft", "step": step, "parent": str(config.base), "sft": record},
        tokenizer=tokenizer,
        state_extra={"config": record},
        tokens_per_row=max_len,
        unrecorded=("lr", "grad_norm", "max_steps"),
    )


def demo_dialogues(config: SFTConfig) -> list[list[dict[str, str]]]:
    """The demo world's chats that `--data demo` trains on, as `messages` lists (a caller may mix them with others)."""
    world = World(config.demo_seed)
    return world.sft_dialogues(config.demo_dialogues, seed=config.seed, bad_fraction=config.demo_bad_fraction)


def _dialogues(config: SFTConfig, tokenizer: Tokenizer, max_len: int) -> Screened:
    """The dialogues to train on; bad ones (no answer, empty, answers past max_len, ...) are skipped and counted."""
    if "demo" in config.data and config.data != ["demo"]:
        raise ValueError("--data takes either 'demo' or paths, not both")
    items = demo_dialogues(config) if config.data == ["demo"] else config.data
    return screen(items, "dialogue", dialogue_fits(tokenizer, max_len))


# --------------------------------------------------------------------------------------------------------- CLI


def _summary(metrics: dict[str, Any]) -> str:
    start = metrics.get("val_loss_start")
    before = f" (from {start:.4f})" if start is not None else ""
    return (
        f"saved {metrics['out']}: {metrics['step']} steps on {metrics['train_dialogues']} dialogues, held-out "
        f"assistant loss {metrics['val_loss']:.4f}{before}, {metrics['elapsed_s']:.0f} s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `flywheel train sft` and `python -m ml.train.sft`."""
    d = SFTConfig(base="", out="")
    add = parser.add_argument
    add("--base", required=True, metavar="DIR", help="the model directory to fine-tune (e.g. a pretrained base)")
    add("--out", required=True, metavar="DIR", help="model directory to write")
    add(
        "--data",
        nargs="+",
        default=d.data,
        metavar="demo|FILE",
        help="'demo', or JSONL files of {\"messages\": [...]} dialogues",
    )
    add("--max-len", type=int, default=None, help="tokens per dialogue / packed row (default: the model's maximum)")
    add("--packing", action="store_true", help="pack several dialogues per row (attention stays within each)")
    add("--demo-dialogues", type=int, default=d.demo_dialogues, help="dialogues generated for --data demo")
    add("--demo-seed", type=int, default=d.demo_seed, help="seed of the demo world (its facts)")
    add(
        "--demo-bad-fraction",
        type=float,
        default=d.demo_bad_fraction,
        help="share of the demo's answers that are wrong, rambling or rude (room for RL to improve)",
    )
    common.add_loop_arguments(parser, d)


def main(args: argparse.Namespace) -> int:
    return common.run_cli(SFTConfig, train, args, "sft", _summary)


if __name__ == "__main__":
    sys.exit(common.command("ml.train.sft", __doc__, add_arguments, main))
