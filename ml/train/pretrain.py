"""Pretraining: next-token cross-entropy on raw text -> a base model directory (weights, config, tokenizer).

The text is the demo world's corpus (ml/demo/world.py; the default) or the user's files: JSONL with {"text": ...} per
line, or plain text files where each blank-line separated paragraph is a document. Unless --tokenizer names an
existing one, a byte-level BPE tokenizer is trained on that text first. A share of the documents is held out to
measure loss and perplexity; the unigram entropy of the training tokens is reported beside it as the baseline that
a model ignoring context would reach.

Run (CPU, ~1 minute):   python -m ml.train.pretrain --out /tmp/fw-base --steps 300 --progress
Two CPU processes:      torchrun --nproc_per_node 2 -m ml.train.pretrain --out /tmp/fw-base --steps 300
Continue a run:         python -m ml.train.pretrain --out /tmp/fw-base --steps 600 --resume
Your own text:          python -m ml.train.pretrain --out runs/base --data notes/ corpus.jsonl --vocab-size 8192
Continue a model:       python -m ml.train.pretrain --out runs/more --init runs/base --data more.jsonl --lr 3e-4
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.data import PackedTokens, read_documents
from ml.demo.world import World
from ml.model import ModelConfig, Transformer
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, LoopConfig, ProgressCallback


@dataclass
class PretrainConfig:
    """Flags of a pretraining run (the model's shape is saved beside its weights as config.json)."""

    out: str
    data: list[str] = field(default_factory=lambda: ["demo"])
    steps: int = 600
    batch_size: int = 32  # rows per micro-step across all processes
    grad_accum: int = 1
    block_size: int = 128
    lr: float = 3e-3
    min_lr: float | None = None  # None: lr / 10
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    n_layer: int = 6
    n_embd: int = 128
    n_head: int = 4
    n_kv_head: int | None = None  # None: n_head (no grouping)
    intermediate_size: int | None = None  # None: SwiGLU's 8/3 * n_embd, rounded up to a multiple of 32
    max_seq_len: int | None = None  # None: block_size
    vocab_size: int = 1024
    tokenizer: str | None = None  # a directory with tokenizer.json to use instead of training one
    init: str | None = None  # a model directory to continue pretraining from (its weights and tokenizer)
    demo_docs: int = 20000
    demo_seed: int = 0
    heldout_fraction: float = 0.05
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 200
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0: torch's default (one per core)
    progress: bool = False

    def validate(self) -> None:
        positive = ["steps", "batch_size", "grad_accum", "block_size", "n_layer", "n_embd", "n_head", "eval_batches"]
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or not 0 < self.heldout_fraction < 1:
            raise ValueError("--lr must be positive and the held-out fraction between 0 and 1")
        if self.data != ["demo"] and "demo" in self.data:
            raise ValueError("--data takes either 'demo' or paths, not both")
        if self.init and self.tokenizer:
            raise ValueError("--init brings its own tokenizer; do not combine it with --tokenizer")

    def loop(self) -> LoopConfig:
        return LoopConfig(
            max_steps=self.steps,
            lr=self.lr,
            min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
            warmup=self.warmup,
            grad_accum=self.grad_accum,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every,
            save_every=self.save_every,
            tokens_per_step=self.batch_size * self.grad_accum * self.block_size,
        )

    def model_config(self, vocab_size: int) -> ModelConfig:
        hidden = self.intermediate_size or 32 * math.ceil(self.n_embd * 8 / 3 / 32)
        return ModelConfig(
            vocab_size=vocab_size,
            n_layer=self.n_layer,
            n_head=self.n_head,
            n_kv_head=self.n_kv_head or self.n_head,
            n_embd=self.n_embd,
            intermediate_size=hidden,
            max_seq_len=max(self.max_seq_len or 0, self.block_size),
        )


def pretrain(config: PretrainConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train (or resume) a base model into config.out. Works under torchrun.

    Returns the metrics of the last step (step, loss, val_loss, val_ppl, tokens, tokens_per_s, elapsed_s), the
    baseline unigram_entropy, params, and the per-step `losses` of this run.
    """
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    dist = common.init_distributed(config.device)
    try:
        return _run(config, dist, on_progress)
    finally:
        common.close_distributed(dist)


def _run(config: PretrainConfig, dist: Distributed, on_progress: ProgressCallback | None) -> dict[str, Any]:
    out = Path(config.out)
    state_path = out / common.TRAIN_STATE
    rows = dist.rows(config.batch_size)
    if not config.resume and (state_path.exists() or (out / "config.json").exists()):
        raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    documents = _documents(config)
    tokenizer = _tokenizer(config, documents, dist)
    data = PackedTokens(documents, tokenizer, config.block_size, config.heldout_fraction, config.seed)
    model, optimizer, generator, start_step = _model_and_state(config, tokenizer, dist)
    trained = common.wrap_ddp(model, dist)

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.get_batch("train", config.batch_size, generator, rows)
        return x.to(dist.device), y.to(dist.device)

    def evaluate() -> dict[str, float]:
        held = torch.Generator().manual_seed(config.seed + 1)  # the same batches at every evaluation
        batches = (data.get_batch("heldout", config.batch_size, held, rows) for _ in range(config.eval_batches))
        on_device = ((x.to(dist.device), y.to(dist.device)) for x, y in batches)
        return common.evaluate_loss(trained, on_device, _lm_loss, dist)

    metrics: dict[str, Any] = {"unigram_entropy": data.unigram_entropy("train"), "params": model.num_params()}

    def save(step: int) -> None:
        if dist.is_main:
            extra = {"kind": "base", "step": step, "pretrain": asdict(config)}
            save_checkpoint(out, model, tokenizer=tokenizer, extra=extra)
            common.save_train_state(state_path, model, optimizer, step, generator, extra={"config": asdict(config)})
        dist.barrier()

    def record(info: dict[str, Any]) -> None:
        metrics.update({k: v for k, v in info.items() if k not in ("lr", "grad_norm", "max_steps", "eta_s")})

    progress = common.chain(record, common.ProgressBar() if config.progress else None, on_progress)
    losses = common.train_loop(
        trained,
        optimizer,
        config.loop(),
        dist,
        start_step=start_step,
        next_batch=next_batch,
        loss_fn=_lm_loss,
        evaluate=evaluate,
        save=save,
        on_progress=progress,
    )
    return {**metrics, "losses": losses, "out": str(out), "rank": dist.rank, "world_size": dist.world_size}


def _documents(config: PretrainConfig) -> list[str]:
    if config.data == ["demo"]:
        return World(config.demo_seed).pretraining_corpus(config.demo_docs)
    return read_documents(config.data)


def _model_and_state(
    config: PretrainConfig, tokenizer: Tokenizer, dist: Distributed
) -> tuple[Transformer, torch.optim.Optimizer, torch.Generator, int]:
    """A fresh model, its optimizer and the data generator at step 0, or all of them restored from train_state.pt."""
    out = Path(config.out)
    torch.manual_seed(config.seed)
    # a resumed run keeps the shape it was saved with, whatever the shape flags say now
    if config.init and not config.resume:
        model = load_checkpoint(config.init, device=dist.device)[0].train()
    else:
        shape = ModelConfig.load(out / "config.json") if config.resume else config.model_config(tokenizer.vocab_size)
        model = Transformer(shape).to(dist.device)
    optimizer = model.configure_optimizer(weight_decay=config.weight_decay, lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    start_step = 0
    if config.resume:
        start_step, _ = common.load_train_state(out / common.TRAIN_STATE, model, optimizer, generator)
        if start_step >= config.steps:
            raise ValueError(f"{out} has already trained {start_step} steps; pass a larger --steps to continue")
    return model, optimizer, generator, start_step


def _lm_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return model(x, targets=y)[1]


def _tokenizer(config: PretrainConfig, documents: list[str], dist: Distributed) -> Tokenizer:
    """The run's tokenizer: the saved one when resuming, a given one, or BPE trained on rank 0 and broadcast."""
    if config.resume:
        return Tokenizer.load(config.out)
    if config.tokenizer or config.init:
        return Tokenizer.load(config.tokenizer or config.init)
    blob = [Tokenizer.train(documents, config.vocab_size).to_str() if dist.is_main else None]
    if dist.world_size > 1:
        torch_dist.broadcast_object_list(blob, src=0)
    return Tokenizer.from_str(blob[0])


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `flywheel train pretrain` and `python -m ml.train.pretrain`."""
    d = PretrainConfig(out="")
    add = parser.add_argument
    add("--out", required=True, help="model directory to write (weights, config.json, tokenizer, train_state.pt)")
    add(
        "--data",
        nargs="+",
        default=d.data,
        metavar="demo|PATH",
        help="'demo' for the built-in demo world, or text files / JSONL files ({\"text\": ...} per line) / folders",
    )
    add("--steps", type=int, default=d.steps, help="total optimizer steps (default %(default)s)")
    add("--batch-size", type=int, default=d.batch_size, help="sequences per micro-step, over all processes")
    add("--grad-accum", type=int, default=d.grad_accum, help="micro-steps per optimizer step (default %(default)s)")
    add("--block-size", type=int, default=d.block_size, help="tokens per training sequence (default %(default)s)")
    add("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    add("--min-lr", type=float, default=None, help="learning rate at the end of the cosine decay (default lr/10)")
    add("--warmup", type=int, default=d.warmup, help="linear warm-up steps (default %(default)s)")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices")
    add("--grad-clip", type=float, default=d.grad_clip, help="clip the gradient norm to this; 0 disables")
    add("--n-layer", type=int, default=d.n_layer, help="transformer blocks (default %(default)s)")
    add("--n-embd", type=int, default=d.n_embd, help="model width (default %(default)s)")
    add("--n-head", type=int, default=d.n_head, help="attention heads (default %(default)s)")
    add("--n-kv-head", type=int, default=None, help="key/value heads for grouped-query attention (default n-head)")
    add("--intermediate-size", type=int, default=None, help="SwiGLU hidden width (default 8/3 of n-embd)")
    add("--max-seq-len", type=int, default=None, help="longest sequence the model will handle (default block-size)")
    add("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size to train (default %(default)s)")
    add("--tokenizer", default=None, metavar="DIR", help="use the tokenizer.json in DIR instead of training one")
    add("--init", default=None, metavar="DIR", help="continue pretraining the model in DIR (weights and tokenizer)")
    add("--demo-docs", type=int, default=d.demo_docs, help="documents generated for --data demo")
    add("--demo-seed", type=int, default=d.demo_seed, help="seed of the demo world (its facts)")
    add("--heldout-fraction", type=float, default=d.heldout_fraction, help="share of documents held out")
    add("--eval-every", type=int, default=d.eval_every, help="evaluate held-out loss every N steps; 0: at the end")
    add("--eval-batches", type=int, default=d.eval_batches, help="batches per evaluation (default %(default)s)")
    add("--save-every", type=int, default=d.save_every, help="checkpoint every N steps; 0: at the end only")
    add("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    add("--seed", type=int, default=d.seed, help="seed for initialisation, data order and held-out split")
    add("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    add("--threads", type=int, default=0, help="CPU threads for torch (default: one per core; 1 on a busy machine)")
    add("--progress", action="store_true", help="draw a progress line on stderr")


def config_from_args(args: argparse.Namespace) -> PretrainConfig:
    names = PretrainConfig.__dataclass_fields__
    return PretrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(args: argparse.Namespace) -> int:
    """Run from parsed flags; a one-line error on stderr and exit status 2 for bad input, 130 when interrupted."""
    try:
        metrics = pretrain(config_from_args(args))
    except (ValueError, OSError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pretrain: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    if metrics["rank"] == 0:
        print(
            f"saved {metrics['out']}: {metrics['params'] / 1e6:.2f}M params, {metrics['step']} steps, "
            f"held-out loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.2f}) vs unigram entropy "
            f"{metrics['unigram_entropy']:.4f} nats, {metrics['tokens_per_s']:.0f} tok/s, {metrics['elapsed_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ml.train.pretrain", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
