"""The pieces every trainer shares: the flags (`TrainConfig`, `LoopTrainConfig`), devices and DDP, the lr schedule,
one optimizer step, evaluation, exact checkpoint/resume, progress reporting and the command line (`run_cli`).
Trainers (pretrain.py, sft.py, ...) wire them into `train_loop` (or, for RL, a loop of their own).

Distributed data parallel comes through torchrun: with WORLD_SIZE > 1 in the environment, `init_distributed` joins the
process group (`gloo` on CPU, `nccl` on CUDA). Every rank draws the same global batch and keeps its own rows, so N
processes compute what one process would with the same global batch; only rank 0 writes files.

Exact resume: `train_state.pt` holds the weights, the optimizer state, the step, and the RNG states (torch, python,
the data generator). A resumed run reproduces the per-step losses of an uninterrupted one bit for bit.

Run (CPU, 2 processes): torchrun --nproc_per_node 2 -m ml.train.pretrain --out /tmp/fw-ddp --steps 20 --n-layer 2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ml import lora
from ml.checkpoint import ADAPTER_DIR, load_checkpoint, save_checkpoint
from ml.model import Transformer

TRAIN_STATE = "train_state.pt"
Batch = Any  # whatever a trainer's loss_fn takes: (x, y) for pretraining, with masks for SFT, pairs for rewards


class ProgressCallback(Protocol):
    """Called on rank 0 after every optimizer step with a dict: step, max_steps, loss, lr, grad_norm, tokens,
    tokens_per_s, elapsed_s, eta_s, and val_loss/val_ppl after an evaluation. Raising stops training; the last
    saved checkpoint stays resumable."""

    def __call__(self, info: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------------- configs


@dataclass(kw_only=True)
class TrainConfig:
    """The flags every trainer has: where the model goes, how long and how fast it trains, where it runs. Each
    trainer's config inherits them and sets its own defaults; keyword-only, so that its own fields may follow."""

    out: str  # the model directory to write
    steps: int = 200
    lr: float = 1e-4  # peak learning rate
    warmup: int = 10  # linear warm-up steps
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 0
    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0: torch's default (one per core)
    progress: bool = False  # draw progress on stderr
    lora: dict[str, Any] | None = None  # LoRA adapters (ml.lora.LoraSpec fields) on a frozen model; None: full

    def validate(self) -> None:
        """Raise ValueError naming the first bad flag; each trainer checks its own."""

    @property
    def lora_spec(self) -> lora.LoraSpec | None:
        return lora.LoraSpec.from_dict(self.lora)

    def with_lora(self, model: nn.Module) -> nn.Module:
        """The model to train: with --lora-rank, frozen and given adapters (ml.lora); else as it is."""
        if (spec := self.lora_spec) is not None:
            lora.attach(model, spec)
        return model

    def require_at_least_one(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


@dataclass(kw_only=True)
class LoopTrainConfig(TrainConfig):
    """And the flags of the trainers that run `train_loop` (all but RL): batches, the lr decay, held-out
    evaluation, checkpoints and exact resume."""

    batch_size: int = 8  # rows per micro-step, over all processes
    grad_accum: int = 1
    min_lr: float | None = None  # None: lr / 10
    weight_decay: float = 0.0
    heldout_fraction: float = 0.1
    eval_every: int = 50  # 0: at the end only
    save_every: int = 0  # 0: at the end only
    resume: bool = False

    @property
    def state_path(self) -> Path:
        return Path(self.out) / TRAIN_STATE

    def check_out(self) -> None:
        """A run writes a fresh --out, or continues the one there with --resume."""
        if not self.resume and (self.state_path.exists() or (Path(self.out) / "config.json").exists()):
            raise ValueError(
                f"{self.out} already holds a checkpoint: pass --resume to continue it, or choose another --out"
            )

    def loop(self, tokens_per_row: int = 0) -> LoopConfig:
        return LoopConfig(
            max_steps=self.steps,
            lr=self.lr,
            min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
            warmup=self.warmup,
            grad_accum=self.grad_accum,
            grad_clip=self.grad_clip,
            eval_every=self.eval_every,
            save_every=self.save_every,
            tokens_per_step=self.batch_size * self.grad_accum * tokens_per_row,
        )


Config = TypeVar("Config", bound=TrainConfig)


# ------------------------------------------------------------------------------------------------ LoRA policy


def load_policy_and_reference(
    policy: str, reference: str | None, spec: lora.LoraSpec | None, device: torch.device
) -> tuple[Transformer, Transformer, str]:
    """(policy to train, frozen KL reference, the directory of the weights the policy's adapters sit on).

    Full fine-tuning loads two models. With LoRA there is one trunk and the reference is that trunk without adapters
    (ml.lora.share_trunk: no second copy). A policy that was itself trained as adapters on this reference (an earlier
    RL round) is loaded as reference + its adapter, which goes on training, so the reference stays exact; a policy
    on another trunk gets new adapters and the reference is loaded beside it."""
    ref_dir = reference or policy
    if spec is None:
        model, ref = load_checkpoint(policy, device=device)[0], load_checkpoint(ref_dir, device=device)[0]
        return model, ref.requires_grad_(False), policy
    adapter = Path(policy) / ADAPTER_DIR
    if Path(ref_dir).resolve() != Path(policy).resolve() and lora.adapter_base(adapter) == Path(ref_dir).resolve():
        trunk, _ = load_checkpoint(ref_dir, device=device)
        lora.load_adapter(trunk, adapter)
        return trunk, lora.share_trunk(trunk), ref_dir
    model, _ = load_checkpoint(policy, device=device)
    if Path(ref_dir).resolve() == Path(policy).resolve():
        ref = lora.share_trunk(model)
    else:
        ref = load_checkpoint(ref_dir, device=device)[0].requires_grad_(False)
    lora.attach(model, spec)
    return model, ref, policy


# ------------------------------------------------------------------------------------------- devices and DDP


@dataclass
class Distributed:
    """Where this process runs and its place among the ranks (a single process is rank 0 of 1)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # whether we started the process group (and so must end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's share of a global batch of `batch_size` rows."""
        if batch_size % self.world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {self.world_size} processes")
        share = batch_size // self.world_size
        return slice(self.rank * share, (self.rank + 1) * share)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def pick_device(name: str = "auto") -> torch.device:
    """ "auto" is CUDA when available, else CPU; "cuda" without a GPU is an error rather than a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def init_distributed(device: str = "auto") -> Distributed:
    """One process, or a rank of a torchrun job (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT from the env)."""
    dev = pick_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(device=dev)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not torch_dist.is_initialized()
    if owns:
        torch_dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Distributed(dev, rank, world_size, local_rank, owns)


def close_distributed(dist: Distributed) -> None:
    if dist.owns_group and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def use_threads(threads: int) -> None:
    """--threads: torch's CPU threads for this process (0 leaves torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def run_distributed(
    config: Config,
    run: Callable[[Config, Distributed, ProgressCallback | None], dict[str, Any]],
    on_progress: ProgressCallback | None,
) -> dict[str, Any]:
    """Check the config, then `run(config, dist, on_progress)` as this process's rank (one process, or a rank of a
    torchrun job), leaving the process group however it ends."""
    config.validate()
    use_threads(config.threads)
    dist = init_distributed(config.device)
    try:
        return run(config, dist, on_progress)
    finally:
        close_distributed(dist)


def wrap_ddp(model: nn.Module, dist: Distributed) -> nn.Module:
    """The model as trained: DDP-wrapped across ranks (gradients averaged), or itself in one process."""
    if dist.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[dist.local_rank] if dist.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 elsewhere. Parameters and optimizer state stay fp32 either way."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def mean_across_ranks(value: Tensor, dist: Distributed) -> float:
    """The mean of a scalar over ranks (gloo has no AVG, so SUM / world_size)."""
    value = value.detach().float().clone()
    if dist.world_size > 1:
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        value /= dist.world_size
    return value.item()


# ------------------------------------------------------------------------------------------- schedule and step


def lr_at(step: int, max_steps: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up over `warmup` steps to `lr` (step 0 gets lr/warmup), then cosine decay to `min_lr` at
    `max_steps`; `min_lr` after that."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= max_steps:
        return min_lr
    progress = (step - warmup) / max(1, max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    grad_accum: int,
    grad_clip: float,
    dist: Distributed,
) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches -> (loss averaged over micro-batches and ranks, grad norm).

    Each micro-batch loss is divided by grad_accum so the summed gradient is the mean's; DDP's gradient all-reduce
    runs only on the last micro-batch (no_sync before it).
    """
    total = torch.zeros((), device=dist.device)
    for i, batch in enumerate(micro_batches):
        last = i == grad_accum - 1
        sync = contextlib.nullcontext() if last or dist.world_size == 1 else model.no_sync()
        with sync:  # the backward must run inside no_sync too
            with autocast(dist.device):
                loss = loss_fn(model, batch) / grad_accum
            loss.backward()
        total += loss.detach()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip > 0 else torch.zeros(())
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_across_ranks(total, dist), float(norm)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, batches: Iterable[Batch], loss_fn: Callable[[nn.Module, Batch], Tensor], dist: Distributed
) -> dict[str, float]:
    """Mean held-out loss over `batches` (and over ranks) and its perplexity exp(loss)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    losses = []
    for batch in batches:
        with autocast(dist.device):
            losses.append(loss_fn(model, batch).float())
    model.train(was_training)
    loss = mean_across_ranks(torch.stack(losses).mean(), dist)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


# --------------------------------------------------------------------------------------------- exact resume


def save_train_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    generator: torch.Generator,
    extra: dict[str, Any] | None = None,
) -> None:
    """Everything needed to continue bit for bit, written atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": _model_state(unwrap(model)),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": random.getstate(),
        "data_generator": generator.get_state(),
        "extra": extra or {},
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_train_state(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> tuple[int, dict[str, Any]]:
    """Restore what save_train_state wrote into `model`, `optimizer`, `generator` and the global RNGs.
    Returns (step, extra)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no {path.name} in {path.parent}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(state["model"], strict=not lora.has_adapters(unwrap(model)))
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate(_as_python_rng_state(state["rng_python"]))
    generator.set_state(state["data_generator"])
    return int(state["step"]), state["extra"]


def _model_state(model: nn.Module) -> dict[str, Tensor]:
    """What resuming needs of the model: all of it, or with LoRA only what trains (the base is the checkpoint's)."""
    return lora.trainable_state_dict(model) if lora.has_adapters(model) else model.state_dict()


def _as_python_rng_state(state: Any) -> tuple:
    """random.setstate needs tuples; a round trip through the safe unpickler may return lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


@dataclass
class Training:
    """What `fit` trains: the model (unwrapped), its optimizer, the data order's generator, the step to start at."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    start_step: int


def start_training(model: nn.Module, config: LoopTrainConfig) -> Training:
    """AdamW (betas 0.9, 0.95), the data order's generator and step 0; or with --resume, all of them restored from
    the train_state.pt in --out."""
    optimizer = model.configure_optimizer(weight_decay=config.weight_decay, lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    start_step = 0
    if config.resume:
        start_step, _ = load_train_state(config.state_path, model, optimizer, generator)
        if start_step >= config.steps:
            raise ValueError(f"{config.out} has already trained {start_step} steps; pass a larger --steps to continue")
    return Training(model, optimizer, generator, start_step)


# ------------------------------------------------------------------------------------------------------ the loop


@dataclass
class LoopConfig:
    """The schedule of a training run; every trainer builds one from its flags."""

    max_steps: int
    lr: float
    min_lr: float
    warmup: int
    grad_accum: int = 1
    grad_clip: float = 1.0
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 0  # 0: save at the end only
    tokens_per_step: int = 0  # global tokens per optimizer step, for throughput


def train_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: LoopConfig,
    dist: Distributed,
    *,
    start_step: int,
    next_batch: Callable[[], Batch],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    evaluate: Callable[[], dict[str, float]] | None = None,
    save: Callable[[int], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[float]:
    """Steps start_step .. max_steps-1: set lr, step, then evaluate / save / report. Returns the per-step losses.

    A step's number in reports and checkpoints is the count of completed steps; evaluation and saving always
    happen after the last step too.
    """
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(start_step, config.max_steps):
        lr = lr_at(step, config.max_steps, config.warmup, config.lr, config.min_lr)
        set_lr(optimizer, lr)
        micro_batches = (next_batch() for _ in range(config.grad_accum))
        loss, grad_norm = train_step(
            model, optimizer, micro_batches, loss_fn, config.grad_accum, config.grad_clip, dist
        )
        losses.append(loss)
        done = step + 1
        info: dict[str, Any] = {"step": done, "max_steps": config.max_steps, "loss": loss, "lr": lr}
        info["grad_norm"] = grad_norm
        info.update(_throughput(done - start_step, config, time.perf_counter() - started))
        last = done == config.max_steps
        if evaluate is not None and (last or _due(done, config.eval_every)):
            info.update(evaluate())
        if save is not None and (last or _due(done, config.save_every)):
            save(done)
        if on_progress is not None and dist.is_main:
            on_progress(info)
    return losses


def fit(
    training: Training,
    config: LoopTrainConfig,
    dist: Distributed,
    metrics: dict[str, Any],
    *,
    next_batch: Callable[[], Batch],
    loss_fn: Callable[[nn.Module, Batch], Tensor],
    evaluate: Callable[[], dict[str, float]],
    on_progress: ProgressCallback | None,
    checkpoint: Callable[[int], dict[str, Any]] | None = None,
    tokenizer: Any = None,
    state_extra: dict[str, Any] | None = None,
    tokens_per_row: int = 0,
    unrecorded: tuple[str, ...] = ("lr", "grad_norm"),
) -> dict[str, Any]:
    """`train_loop` as every trainer but RL runs it: DDP-wrapped, reporting to the progress bar (--progress) and
    `on_progress`, the last step's numbers but `unrecorded` kept in `metrics`. Each save writes train_state.pt (with
    `state_extra`) and, given `checkpoint` (step -> the model's metadata), the model and `tokenizer` to --out.
    Returns the metrics, the per-step `losses`, out, rank and world_size."""
    model, optimizer = training.model, training.optimizer
    trained = wrap_ddp(model, dist)

    def save(step: int) -> None:
        if dist.is_main:
            if checkpoint is not None:
                save_checkpoint(config.out, model, tokenizer=tokenizer, extra=checkpoint(step))
            save_train_state(config.state_path, model, optimizer, step, training.generator, extra=state_extra)
        dist.barrier()

    def record(info: dict[str, Any]) -> None:
        metrics.update({k: v for k, v in info.items() if k not in unrecorded})

    progress = chain(record, ProgressBar() if config.progress else None, on_progress)
    hooks = dict(next_batch=next_batch, loss_fn=loss_fn, evaluate=evaluate, save=save, on_progress=progress)
    losses = train_loop(trained, optimizer, config.loop(tokens_per_row), dist, start_step=training.start_step, **hooks)
    return {**metrics, "losses": losses, "out": str(Path(config.out)), "rank": dist.rank, "world_size": dist.world_size}


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _throughput(steps_this_run: int, config: LoopConfig, elapsed: float) -> dict[str, float]:
    per_step = elapsed / max(1, steps_this_run)
    return {
        "tokens": steps_this_run * config.tokens_per_step,
        "tokens_per_s": steps_this_run * config.tokens_per_step / max(elapsed, 1e-9),
        "elapsed_s": elapsed,
        "eta_s": per_step * (config.max_steps - steps_this_run),
    }


# ------------------------------------------------------------------------------------------------------ progress


def format_progress(info: dict[str, Any], width: int = 20) -> str:
    """One line: bar, step, loss, lr, throughput, ETA (and held-out loss when there is one)."""
    frac = info["step"] / max(1, info["max_steps"])
    filled = round(width * frac)
    parts = [
        f"[{'#' * filled}{'.' * (width - filled)}] {info['step']}/{info['max_steps']}",
        f"loss {info['loss']:.4f}",
    ]
    if "val_loss" in info:
        parts.append(f"val {info['val_loss']:.4f}")
    parts += [f"lr {info['lr']:.2e}", f"{info['tokens_per_s'] / 1000:.1f}k tok/s", f"ETA {_clock(info['eta_s'])}"]
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class ProgressBar:
    """A tqdm-free progress line on stderr: redrawn in place on a terminal, one line per 5% (and per evaluation)
    when stderr is a file or pipe."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, info: dict[str, Any]) -> None:
        line = format_progress(info)
        last = info["step"] == info["max_steps"]
        if self.tty:
            self.stream.write("\r" + line + "\033[K" + ("\n" if last else ""))
        elif last or "val_loss" in info or _due(info["step"], max(1, info["max_steps"] // 20)):
            self.stream.write(line + "\n")
        self.stream.flush()


def chain(*callbacks: ProgressCallback | None) -> ProgressCallback | None:
    """One callback calling each of `callbacks` that is not None."""
    present = [c for c in callbacks if c is not None]
    if not present:
        return None

    def call(info: dict[str, Any]) -> None:
        for callback in present:
            callback(info)

    return call


def iterate(fn: Callable[[], Batch], n: int) -> Iterator[Batch]:
    """`n` batches from a batch function, drawn lazily."""
    return (fn() for _ in range(n))


# --------------------------------------------------------------------------------------------- command line

RUN_HELP = {
    "steps": "total optimizer steps (default %(default)s)",
    "lr": "peak learning rate (default %(default)s)",
    "warmup": "linear warm-up steps (default %(default)s)",
    "grad_clip": "clip the gradient norm to this; 0 disables",
    "seed": "seed for initialisation, data order and the held-out split",
    "device": "auto, cpu, cuda or cuda:N (default %(default)s)",
    "threads": "CPU threads for torch (default: one per core; 1 on a busy machine)",
    "progress": "draw a progress line on stderr",
}
LOOP_HELP = {
    "batch_size": "rows per micro-step, over all processes",
    "grad_accum": "micro-steps per optimizer step (default %(default)s)",
    "min_lr": "learning rate at the end of the cosine decay (default lr/10)",
    "weight_decay": "AdamW weight decay on matrices",
    "heldout_fraction": "share of the data (documents, dialogues, rankings/thumbs) held out",
    "eval_every": "held-out loss (and metrics) every N steps; 0: at the end only",
    "save_every": "checkpoint every N steps; 0: at the end only",
    "resume": "continue the run in --out from its train_state.pt",
}


def add_run_arguments(parser: argparse.ArgumentParser, defaults: TrainConfig, **help: str) -> None:
    """The flags of TrainConfig but --out (each trainer says what it writes); `help` rewords any of them."""
    h = {**RUN_HELP, **help}
    add = parser.add_argument
    add("--steps", type=int, default=defaults.steps, help=h["steps"])
    add("--lr", type=float, default=defaults.lr, help=h["lr"])
    add("--warmup", type=int, default=defaults.warmup, help=h["warmup"])
    add("--grad-clip", type=float, default=defaults.grad_clip, help=h["grad_clip"])
    add("--seed", type=int, default=defaults.seed, help=h["seed"])
    add("--device", default=defaults.device, help=h["device"])
    add("--threads", type=int, default=defaults.threads, help=h["threads"])
    add("--progress", action="store_true", help=h["progress"])
    add("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank on the frozen model (0: off)")
    add("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default: twice the rank)")
    add("--lora-targets", default=",".join(lora.TARGETS), help="comma-separated projections to adapt (HF names)")


def add_loop_arguments(parser: argparse.ArgumentParser, defaults: LoopTrainConfig, **help: str) -> None:
    """The flags of LoopTrainConfig but --out; `help` rewords any of them."""
    add_run_arguments(parser, defaults, **help)
    h = {**LOOP_HELP, **help}
    add = parser.add_argument
    add("--batch-size", type=int, default=defaults.batch_size, help=h["batch_size"])
    add("--grad-accum", type=int, default=defaults.grad_accum, help=h["grad_accum"])
    add("--min-lr", type=float, default=defaults.min_lr, help=h["min_lr"])
    add("--weight-decay", type=float, default=defaults.weight_decay, help=h["weight_decay"])
    add("--heldout-fraction", type=float, default=defaults.heldout_fraction, help=h["heldout_fraction"])
    add("--eval-every", type=int, default=defaults.eval_every, help=h["eval_every"])
    add("--save-every", type=int, default=defaults.save_every, help=h["save_every"])
    add("--resume", action="store_true", help=h["resume"])


def config_from_args(config_type: type[Config], args: argparse.Namespace) -> Config:
    """The config of parsed flags (flags that are not its fields, such as a subcommand's, are left out)."""
    names = {f.name for f in fields(config_type)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "lora_rank", 0):
        alpha = args.lora_alpha or 2.0 * args.lora_rank
        targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
        values["lora"] = {"rank": args.lora_rank, "alpha": alpha, "targets": targets}
    return config_type(**values)


def run_cli(
    config_type: type[Config],
    train: Callable[[Config], dict[str, Any]],
    args: argparse.Namespace,
    name: str,
    summary: Callable[[dict[str, Any]], str],
) -> int:
    """A trainer run from parsed flags: `summary(metrics)` on stdout (rank 0 only) and exit status 0; a one-line
    error on stderr and exit status 2 for bad input; 130 when interrupted, saying how to continue if it can."""
    try:
        metrics = train(config_from_args(config_type, args))
    except (ValueError, OSError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = any(f.name == "resume" for f in fields(config_type))
        hint = f"; continue with --resume --out {args.out}" if resumable else ""
        print(f"{name}: interrupted{hint}", file=sys.stderr)
        return 130
    if metrics.get("rank", 0) == 0:
        if metrics.get("skipped"):  # rows left out (ml.screen): say so beside the summary, never silently
            print(f"{name}: {metrics['skipped']}", file=sys.stderr)
        print(summary(metrics))
    return 0


def command(module: str, doc: str, add_arguments: Callable[[argparse.ArgumentParser], None], main: Any) -> int:
    """`python -m ml.train.NAME`: parse the flags that `add_arguments` declares and run `main` on them."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n\n")[0])
    add_arguments(parser)
    return main(parser.parse_args())
