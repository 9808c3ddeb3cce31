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
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.demo.world import World
from ml.examples import IGNORE, SFTData, describe_sources, load_dialogues, pad_examples
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, LoopConfig, ProgressCallback


@dataclass
class SFTConfig:
    """Flags of an SFT run. `data` holds 'demo', JSONL paths, or dialogue objects (from Python)."""

    base: str
    out: str
    data: list[Any] = field(default_factory=lambda: ["demo"])
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    max_len: int | None = None  # None: the model's max_seq_len
    packing: bool = False
    lr: float = 5e-4
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.05
    demo_dialogues: int = 3000
    demo_seed: int = 0
    demo_bad_fraction: float = 0.2  # share of the demo's answers that are wrong, rambling or rude
    eval_every: int = 100
    save_every: int = 0
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    progress: bool = False

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "demo_dialogues"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or not 0 < self.heldout_fraction < 1:
            raise ValueError("--lr must be positive and the held-out fraction between 0 and 1")
        if not 0 <= self.demo_bad_fraction <= 1:
            raise ValueError("--demo-bad-fraction must be between 0 and 1")


def sft(config: SFTConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Fine-tune config.base into config.out; returns the metrics (val_loss_start, val_loss, ...)."""
    config.validate()
    dist = common.init_distributed(config.device)
    try:
        return _run(config, dist, on_progress)
    finally:
        common.close_distributed(dist)


def dialogue_loss(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy over the assistant tokens of a batch (targets elsewhere are IGNORE)."""
    return model(batch["x"], targets=batch["y"], doc_ids=batch.get("doc_ids"))[1]


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
    out = Path(config.out)
    state_path = out / common.TRAIN_STATE
    if not config.resume and (state_path.exists() or (out / "config.json").exists()):
        raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    model, _ = load_checkpoint(config.base, device=dist.device)
    if model.scalar_head:
        raise ValueError(f"{config.base} is a scalar-head (reward/value) model, not a language model")
    tokenizer = Tokenizer.load(config.base)
    max_len = min(config.max_len or model.config.max_seq_len, model.config.max_seq_len)
    data = SFTData(_dialogues(config), tokenizer, max_len, config.heldout_fraction, config.seed, config.packing)

    torch.manual_seed(config.seed)
    model.train()
    optimizer = model.configure_optimizer(weight_decay=config.weight_decay, lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    start_step = 0
    metrics: dict[str, Any] = {"train_dialogues": len(data.examples["train"])}
    metrics["heldout_dialogues"] = len(data.examples["heldout"])
    if config.resume:
        start_step, _ = common.load_train_state(state_path, model, optimizer, generator)
        if start_step >= config.steps:
            raise ValueError(f"{out} has already trained {start_step} steps; pass a larger --steps to continue")
    else:
        metrics["val_loss_start"] = heldout_loss(model, data.examples["heldout"], data.pad_id)
    trained = common.wrap_ddp(model, dist)
    rows = dist.rows(config.batch_size)

    def next_batch() -> dict[str, Tensor]:
        return {k: v.to(dist.device) for k, v in data.get_batch("train", config.batch_size, generator, rows).items()}

    def evaluate() -> dict[str, float]:
        loss = heldout_loss(trained, data.examples["heldout"], data.pad_id)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def save(step: int) -> None:
        if dist.is_main:
            record = {**asdict(config), "data": describe_sources(config.data)}
            extra = {"kind": "sft", "step": step, "parent": str(config.base), "sft": record}
            save_checkpoint(out, model, tokenizer=tokenizer, extra=extra)
            common.save_train_state(state_path, model, optimizer, step, generator, extra={"config": record})
        dist.barrier()

    def record(info: dict[str, Any]) -> None:
        metrics.update({k: v for k, v in info.items() if k not in ("lr", "grad_norm", "max_steps")})

    progress = common.chain(record, common.ProgressBar() if config.progress else None, on_progress)
    losses = common.train_loop(
        trained,
        optimizer,
        _loop_config(config, max_len),
        dist,
        start_step=start_step,
        next_batch=next_batch,
        loss_fn=dialogue_loss,
        evaluate=evaluate,
        save=save,
        on_progress=progress,
    )
    return {**metrics, "losses": losses, "out": str(out), "rank": dist.rank, "world_size": dist.world_size}


def _loop_config(config: SFTConfig, max_len: int) -> LoopConfig:
    return LoopConfig(
        max_steps=config.steps,
        lr=config.lr,
        min_lr=config.lr / 10 if config.min_lr is None else config.min_lr,
        warmup=config.warmup,
        grad_accum=config.grad_accum,
        grad_clip=config.grad_clip,
        eval_every=config.eval_every,
        save_every=config.save_every,
        tokens_per_step=config.batch_size * config.grad_accum * max_len,
    )


def demo_dialogues(config: SFTConfig) -> list[list[dict[str, str]]]:
    """The demo world's chats that `--data demo` trains on, as `messages` lists (a caller may mix them with others)."""
    world = World(config.demo_seed)
    return world.sft_dialogues(config.demo_dialogues, seed=config.seed, bad_fraction=config.demo_bad_fraction)


def _dialogues(config: SFTConfig) -> list:
    if config.data == ["demo"]:
        return load_dialogues(demo_dialogues(config))
    if "demo" in config.data:
        raise ValueError("--data takes either 'demo' or paths, not both")
    return load_dialogues(config.data)


# --------------------------------------------------------------------------------------------------------- CLI


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
    common.add_loop_arguments(
        parser,
        d,
        batch="rows per micro-step, over all processes",
        heldout="share of dialogues held out",
        eval_every="held-out loss every N steps; 0: at the end only",
    )


def main(args: argparse.Namespace) -> int:
    """Run from parsed flags; a one-line error on stderr and exit status 2 for bad input, 130 when interrupted."""
    try:
        metrics = sft(SFTConfig(**{k: v for k, v in vars(args).items() if k in SFTConfig.__dataclass_fields__}))
    except (ValueError, OSError) as e:
        print(f"sft: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sft: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    if metrics["rank"] == 0:
        start = metrics.get("val_loss_start")
        before = f" (from {start:.4f})" if start is not None else ""
        print(
            f"saved {metrics['out']}: {metrics['step']} steps on {metrics['train_dialogues']} dialogues, held-out "
            f"assistant loss {metrics['val_loss']:.4f}{before}, {metrics['elapsed_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ml.train.sft", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
