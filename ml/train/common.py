"""The pieces every trainer shares: devices and DDP, the lr schedule, one optimizer step, evaluation,
exact checkpoint/resume, and progress reporting. Trainers (pretrain.py, sft.py, ...) wire them into `train_loop`.

Distributed data parallel comes through torchrun: with WORLD_SIZE > 1 in the environment, `init_distributed` joins the
process group (`gloo` on CPU, `nccl` on CUDA). Every rank draws the same global batch and keeps its own rows, so N
processes compute what one process would with the same global batch; only rank 0 writes files.

Exact resume: `train_state.pt` holds the weights, the optimizer state, the step, and the RNG states (torch, python,
the data generator). A resumed run reproduces the per-step losses of an uninterrupted one bit for bit.

Run (CPU, 2 processes): torchrun --nproc_per_node 2 -m ml.train.pretrain --out /tmp/fw-ddp --steps 20 --n-layer 2
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as torch_dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

TRAIN_STATE = "train_state.pt"
Batch = Any  # whatever a trainer's loss_fn takes: (x, y) for pretraining, with masks for SFT, pairs for rewards


class ProgressCallback(Protocol):
    """Called on rank 0 after every optimizer step with a dict: step, max_steps, loss, lr, grad_norm, tokens,
    tokens_per_s, elapsed_s, eta_s, and val_loss/val_ppl after an evaluation. Raising stops training; the last
    saved checkpoint stays resumable."""

    def __call__(self, info: dict[str, Any]) -> None: ...


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
        "model": unwrap(model).state_dict(),
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
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_torch"])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    random.setstate(_as_python_rng_state(state["rng_python"]))
    generator.set_state(state["data_generator"])
    return int(state["step"]), state["extra"]


def _as_python_rng_state(state: Any) -> tuple:
    """random.setstate needs tuples; a round trip through the safe unpickler may return lists."""
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


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


def add_loop_arguments(parser: Any, defaults: Any, *, batch: str, heldout: str, eval_every: str) -> None:
    """The optimisation flags that every fine-tuning stage shares; `defaults` is the stage's config dataclass."""
    add = parser.add_argument
    add("--steps", type=int, default=defaults.steps, help="total optimizer steps (default %(default)s)")
    add("--batch-size", type=int, default=defaults.batch_size, help=batch)
    add("--grad-accum", type=int, default=defaults.grad_accum, help="micro-steps per optimizer step")
    add("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    add("--min-lr", type=float, default=None, help="learning rate at the end of the cosine decay (default lr/10)")
    add("--warmup", type=int, default=defaults.warmup, help="linear warm-up steps (default %(default)s)")
    add("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW weight decay on matrices")
    add("--grad-clip", type=float, default=defaults.grad_clip, help="clip the gradient norm to this; 0 disables")
    add("--heldout-fraction", type=float, default=defaults.heldout_fraction, help=heldout)
    add("--eval-every", type=int, default=defaults.eval_every, help=eval_every)
    add("--save-every", type=int, default=defaults.save_every, help="checkpoint every N steps; 0: at the end only")
    add("--resume", action="store_true", help="continue the run in --out from its train_state.pt")
    add("--seed", type=int, default=defaults.seed, help="seed for data order and the held-out split")
    add("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    add("--progress", action="store_true", help="draw a progress line on stderr")
