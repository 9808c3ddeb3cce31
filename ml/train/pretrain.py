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

from ml.checkpoint import load_checkpoint
from ml.data import PackedTokens, read_documents
from ml.demo.world import World
from ml.model import ModelConfig, Transformer
from ml.screen import Screened, skip_metrics
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, ProgressCallback


@dataclass(kw_only=True)
class PretrainConfig(common.LoopTrainConfig):
    """Flags of a pretraining run (the model's shape is saved beside its weights as config.json)."""

    data: list[str] = field(default_factory=lambda: ["demo"])
    block_size: int = 128
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
    eval_batches: int = 8
    # the loop's defaults for pretraining
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    heldout_fraction: float = 0.05
    eval_every: int = 100
    save_every: int = 200

    def validate(self) -> None:
        self.require_at_least_one(
            "steps", "batch_size", "grad_accum", "block_size", "n_layer", "n_embd", "n_head", "eval_batches"
        )
        if self.lr <= 0 or not 0 < self.heldout_fraction < 1:
            raise ValueError("--lr must be positive and the held-out fraction between 0 and 1")
        if self.lora:
            raise ValueError("pretraining trains every weight: LoRA (--lora-rank) is for fine-tuning")
        if self.data != ["demo"] and "demo" in self.data:
            raise ValueError("--data takes either 'demo' or paths, not both")
        if self.init and self.tokenizer:
            raise ValueError("--init brings its own tokenizer; do not combine it with --tokenizer")

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


def train(config: PretrainConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train (or resume) a base model into config.out. Works under torchrun.

    Returns the metrics of the last step (step, loss, val_loss, val_ppl, tokens, tokens_per_s, elapsed_s), the
    baseline unigram_entropy, params, and the per-step `losses` of this run.
    """
    return common.run_distributed(config, _run, on_progress)


def _run(config: PretrainConfig, dist: Distributed, on_progress: ProgressCallback | None) -> dict[str, Any]:
    rows = dist.rows(config.batch_size)
    config.check_out()
    screened = _documents(config)
    documents = screened.require()
    tokenizer = _tokenizer(config, documents, dist)
    data = PackedTokens(documents, tokenizer, config.block_size, config.heldout_fraction, config.seed)
    training = common.start_training(_model(config, tokenizer, dist), config)
    model = training.model

    def next_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x, y = data.get_batch("train", config.batch_size, training.generator, rows)
        return x.to(dist.device), y.to(dist.device)

    def evaluate() -> dict[str, float]:
        held = torch.Generator().manual_seed(config.seed + 1)  # the same batches at every evaluation
        batches = (data.get_batch("heldout", config.batch_size, held, rows) for _ in range(config.eval_batches))
        on_device = ((x.to(dist.device), y.to(dist.device)) for x, y in batches)
        return common.evaluate_loss(model, on_device, _lm_loss, dist)

    metrics: dict[str, Any] = {"unigram_entropy": data.unigram_entropy("train"), "params": model.num_params()}
    metrics.update(skip_metrics(screened))
    return common.fit(
        training,
        config,
        dist,
        metrics,
        next_batch=next_batch,
        loss_fn=_lm_loss,
        evaluate=evaluate,
        on_progress=on_progress,
        checkpoint=lambda step: {"kind": "base", "step": step, "pretrain": asdict(config)},
        tokenizer=tokenizer,
        state_extra={"config": asdict(config)},
        tokens_per_row=config.block_size,
        unrecorded=("lr", "grad_norm", "max_steps", "eta_s"),
    )


def _documents(config: PretrainConfig) -> Screened:
    """The documents; a bad JSONL line or an empty text is skipped and counted (ml.screen), not an error."""
    if config.data == ["demo"]:
        return Screened("document", World(config.demo_seed).pretraining_corpus(config.demo_docs))
    screened = Screened("document")
    screened.kept = read_documents(config.data, on_bad=screened.skip)
    return screened


def _model(config: PretrainConfig, tokenizer: Tokenizer, dist: Distributed) -> Transformer:
    """A fresh model, the --init one, or (resuming) one of the saved shape, its weights restored later."""
    out = Path(config.out)
    torch.manual_seed(config.seed)
    # a resumed run keeps the shape it was saved with, whatever the shape flags say now
    if config.init and not config.resume:
        model = load_checkpoint(config.init, device=dist.device)[0].train()
    else:
        shape = ModelConfig.load(out / "config.json") if config.resume else config.model_config(tokenizer.vocab_size)
        model = Transformer(shape).to(dist.device)
    return model


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


def _summary(metrics: dict[str, Any]) -> str:
    return (
        f"saved {metrics['out']}: {metrics['params'] / 1e6:.2f}M params, {metrics['step']} steps, "
        f"held-out loss {metrics['val_loss']:.4f} (perplexity {metrics['val_ppl']:.2f}) vs unigram entropy "
        f"{metrics['unigram_entropy']:.4f} nats, {metrics['tokens_per_s']:.0f} tok/s, {metrics['elapsed_s']:.0f} s"
    )


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
    add("--block-size", type=int, default=d.block_size, help="tokens per training sequence (default %(default)s)")
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
    add("--eval-batches", type=int, default=d.eval_batches, help="batches per evaluation (default %(default)s)")
    common.add_loop_arguments(parser, d)


def main(args: argparse.Namespace) -> int:
    return common.run_cli(PretrainConfig, train, args, "pretrain", _summary)


if __name__ == "__main__":
    sys.exit(common.command("ml.train.pretrain", __doc__, add_arguments, main))
