"""Offline preference optimisation, for when online RL is beyond the budget: DPO from ranked pairs, KTO from thumbs.

    --algo dpo  every ordered pair of every ranking (and every up/down pair of thumbs on one prompt) is a (chosen,
                rejected) pair; the policy raises beta * [log pi/ref (chosen) - log pi/ref (rejected)] through
                -log sigmoid (Rafailov et al., 2023). No reward model, no sampling.
    --algo kto  every thumb is a desirable or undesirable answer on its own (ranking winners and losers count too);
                the policy raises or lowers beta * log pi/ref of it relative to a reference point, the batch's KL
                estimated on mismatched prompt/answer pairs (Ethayarajh et al., 2024).

The reference is the frozen starting policy (--reference to choose another). Sequence log-probs are sums over the
answer's tokens (its final assistant turn, closing turn end included). Held-out metrics: the loss, the implicit
reward margin (chosen - rejected), how often it is positive, and the policy's own log-prob margin.

Run (CPU):  python -m ml.train.dpo --policy /tmp/fw-sft --out /tmp/fw-dpo --rankings rankings.jsonl
            python -m ml.train.dpo --policy /tmp/fw-sft --out /tmp/fw-kto --algo kto --thumbs thumbs.jsonl
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ml.checkpoint import load_checkpoint, save_checkpoint
from ml.examples import (
    Message,
    SequenceBatch,
    describe_sources,
    encode_answer,
    load_rankings,
    load_thumbs,
    preference_pairs,
    sequence_batch,
    split_heldout,
    thumb_rankings,
)
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, LoopConfig, ProgressCallback
from ml.train.losses import dpo_loss, kto_loss

Example = tuple[list[Message], str]  # (prompt, answer)


def answer_logprobs(model: nn.Module, batch: SequenceBatch) -> Tensor:
    """(N,) sum of log p(token | earlier tokens) over each sequence's answer tokens. Right-padded, so no mask."""
    logits, _ = model(batch.input_ids)  # (N, T, V)
    logp = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (logp * batch.answer_mask[:, 1:]).sum(dim=1)


@dataclass
class DPOConfig:
    """Flags of an offline run. rankings / thumbs: JSONL paths or record objects (from Python)."""

    policy: str
    out: str
    algo: str = "dpo"
    rankings: list[Any] = field(default_factory=list)
    thumbs: list[Any] = field(default_factory=list)
    reference: str | None = None
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    steps: int = 200
    batch_size: int = 8  # pairs (DPO) or examples (KTO) per micro-step, over all processes
    grad_accum: int = 1
    max_len: int | None = None
    lr: float = 1e-4
    min_lr: float | None = None
    warmup: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    heldout_fraction: float = 0.1
    eval_every: int = 50
    save_every: int = 0
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    progress: bool = False

    def validate(self) -> None:
        if self.algo not in ("dpo", "kto"):
            raise ValueError(f"--algo must be dpo or kto, got {self.algo!r}")
        if not self.rankings and not self.thumbs:
            raise ValueError("give --rankings and/or --thumbs")
        if self.beta <= 0 or self.lr <= 0 or self.steps < 1 or self.batch_size < 1:
            raise ValueError("--beta, --lr, --steps and --batch-size must be positive")


@dataclass
class OfflineData:
    """Train / held-out DPO pairs (prompt, chosen, rejected) or KTO examples (prompt, answer, desirable)."""

    train: list[tuple]
    heldout: list[tuple]


def build_offline_data(config: DPOConfig) -> OfflineData:
    """Split rankings and thumbs first (so no prompt's pairs straddle the split), then expand them."""
    rankings = load_rankings(config.rankings) if config.rankings else []
    thumbs = load_thumbs(config.thumbs) if config.thumbs else []
    splits = [
        split_heldout(rankings, config.heldout_fraction, config.seed),
        split_heldout(thumbs, config.heldout_fraction, config.seed),
    ]
    out = []
    for r, t in zip(*splits, strict=True):
        if config.algo == "dpo":
            out.append(preference_pairs(r + thumb_rankings(t)))
        else:
            out.append([(x.prompt, x.completion, x.label) for x in t] + _ranking_extremes(r))
    if not out[0]:
        raise ValueError(f"no training {'pairs' if config.algo == 'dpo' else 'examples'} in the data")
    return OfflineData(out[0], out[1])


def _ranking_extremes(rankings: list) -> list[tuple[list[Message], str, bool]]:
    """For KTO: a ranking's best answers are desirable and its worst undesirable (a full tie gives nothing)."""
    out = []
    for r in rankings:
        best, worst = min(r.ranks), max(r.ranks)
        if best < worst:
            out += [
                (r.prompt, a, rank == best) for a, rank in zip(r.answers, r.ranks, strict=True) if rank in (best, worst)
            ]
    return out


def dpo_batch(tokenizer: Tokenizer, pairs: list[tuple], max_len: int) -> SequenceBatch:
    """B pairs -> 2B sequences: the chosen answers, then the rejected ones."""
    encoded = [encode_answer(tokenizer, p, c, max_len) for p, c, _ in pairs]
    encoded += [encode_answer(tokenizer, p, r, max_len) for p, _, r in pairs]
    return sequence_batch(encoded, int(tokenizer.pad_id or 0))


def kto_batch(tokenizer: Tokenizer, examples: list[tuple], max_len: int) -> tuple[SequenceBatch, Tensor]:
    """B examples -> 2B sequences: the examples, then mismatched pairs (prompt i, answer i+1) for the reference
    point; and the (B,) desirable labels."""
    encoded = [encode_answer(tokenizer, p, a, max_len) for p, a, _ in examples]
    shifted = examples[1:] + examples[:1]
    encoded += [encode_answer(tokenizer, p, a, max_len) for (p, _, _), (_, a, _) in zip(examples, shifted, strict=True)]
    labels = torch.tensor([d for _, _, d in examples], dtype=torch.bool)
    return sequence_batch(encoded, int(tokenizer.pad_id or 0)), labels


def preference_loss(
    model: nn.Module, reference: nn.Module, batch: Any, config: DPOConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """The DPO or KTO loss of one batch and its statistics (implicit rewards, log-prob margins)."""
    if config.algo == "dpo":
        seqs = batch
        policy = answer_logprobs(model, seqs)
        with torch.no_grad():
            ref = answer_logprobs(reference, seqs)
        B = len(policy) // 2
        out = dpo_loss(policy[:B], policy[B:], ref[:B], ref[B:], config.beta)
        margin = out.chosen_reward - out.rejected_reward
        return out.loss, {"margin": margin, "logp_margin": (policy[:B] - policy[B:]).detach()}
    seqs, labels = batch
    policy = answer_logprobs(model, seqs)
    with torch.no_grad():
        ref = answer_logprobs(reference, seqs)
    B = len(labels)
    kl = (policy[B:] - ref[B:]).mean().detach().clamp(min=0)
    loss = kto_loss(policy[:B], ref[:B], labels, kl, config.beta, config.desirable_weight, config.undesirable_weight)
    reward = config.beta * (policy[:B] - ref[:B]).detach()
    return loss, {"reward": reward, "label": labels}


@torch.no_grad()
def evaluate_preferences(
    model: nn.Module, reference: nn.Module, tokenizer: Tokenizer, items: list[tuple], config: DPOConfig, max_len: int
) -> dict[str, float]:
    """Held-out loss and implicit-reward margin. DPO: mean chosen - rejected, how often it is positive, and the
    policy's own log-prob margin. KTO: mean desirable - mean undesirable, and the share of (desirable, undesirable)
    pairs that the implicit reward orders right."""
    model = common.unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, stats = [], {}
    size = max(2, config.batch_size)
    for i in range(0, len(items), size):
        chunk = items[i : i + size]
        batch = _to(_batch(tokenizer, chunk, max_len, config.algo), device)
        loss, s = preference_loss(model, reference, batch, config)
        losses.append(float(loss) * len(chunk))
        for k, v in s.items():
            stats.setdefault(k, []).append(v.cpu())
    model.train(was_training)
    out = {"val_loss": sum(losses) / len(items)}
    if config.algo == "dpo":
        margin = torch.cat(stats["margin"])
        out.update(val_margin=float(margin.mean()), val_acc=float((margin > 0).float().mean()))
        out["val_logp_margin"] = float(torch.cat(stats["logp_margin"]).mean())
        return out
    reward, label = torch.cat(stats["reward"]), torch.cat(stats["label"])
    good, bad = reward[label], reward[~label]
    if len(good) and len(bad):  # how well the implicit reward separates desirable from undesirable answers
        out["val_margin"] = float(good.mean() - bad.mean())
        out["val_acc"] = float((good[:, None] > bad[None, :]).float().mean())
    return out


def _batch(tokenizer: Tokenizer, items: list[tuple], max_len: int, algo: str) -> Any:
    return dpo_batch(tokenizer, items, max_len) if algo == "dpo" else kto_batch(tokenizer, items, max_len)


def _to(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if isinstance(batch, SequenceBatch) else (batch[0].to(device), batch[1].to(device))


def train_preferences(config: DPOConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run DPO or KTO from config.policy into config.out; returns metrics (val_margin_start, val_margin, ...)."""
    config.validate()
    dist = common.init_distributed(config.device)
    try:
        return _run(config, dist, on_progress)
    finally:
        common.close_distributed(dist)


def _run(config: DPOConfig, dist: Distributed, on_progress: ProgressCallback | None) -> dict[str, Any]:
    out = Path(config.out)
    state_path = out / common.TRAIN_STATE
    if not config.resume and (state_path.exists() or (out / "config.json").exists()):
        raise ValueError(f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out")
    model, _ = load_checkpoint(config.policy, device=dist.device)
    reference, _ = load_checkpoint(config.reference or config.policy, device=dist.device)
    if model.scalar_head or reference.scalar_head:
        raise ValueError("DPO/KTO optimise a language model; the policy and reference may not be reward models")
    reference.requires_grad_(False)
    tokenizer = Tokenizer.load(config.policy)
    max_len = min(config.max_len or model.config.max_seq_len, model.config.max_seq_len)
    data = build_offline_data(config)
    torch.manual_seed(config.seed)
    model.train()
    optimizer = model.configure_optimizer(weight_decay=config.weight_decay, lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed)
    start_step = 0
    heldout = data.heldout or data.train[: config.batch_size]  # no held-out split: report on a train slice
    metrics: dict[str, Any] = {"train_items": len(data.train), "heldout_items": len(data.heldout)}
    if config.resume:
        start_step, _ = common.load_train_state(state_path, model, optimizer, generator)
    else:
        start = evaluate_preferences(model, reference, tokenizer, heldout, config, max_len)
        metrics.update({f"{k}_start": v for k, v in start.items()})
    trained = common.wrap_ddp(model, dist)
    rows = dist.rows(config.batch_size)

    def next_batch() -> Any:
        picks = torch.randint(0, len(data.train), (config.batch_size,), generator=generator)[rows].tolist()
        return _to(_batch(tokenizer, [data.train[i] for i in picks], max_len, config.algo), dist.device)

    def loss_fn(m: nn.Module, batch: Any) -> Tensor:
        return preference_loss(m, reference, batch, config)[0]

    def save(step: int) -> None:
        if dist.is_main:
            record = {**asdict(config), **{k: describe_sources(getattr(config, k)) for k in ("rankings", "thumbs")}}
            extra = {
                "kind": "policy",
                "parent": config.policy,
                "reference": config.reference or config.policy,
                "method": config.algo,
                "step": step,
                "dpo": record,
            }
            save_checkpoint(out, model, tokenizer=tokenizer, extra=extra)
            common.save_train_state(state_path, model, optimizer, step, generator)
        dist.barrier()

    def record(info: dict[str, Any]) -> None:
        metrics.update({k: v for k, v in info.items() if k not in ("lr", "grad_norm")})

    loop = LoopConfig(
        max_steps=config.steps,
        lr=config.lr,
        min_lr=config.lr / 10 if config.min_lr is None else config.min_lr,
        warmup=config.warmup,
        grad_accum=config.grad_accum,
        grad_clip=config.grad_clip,
        eval_every=config.eval_every,
        save_every=config.save_every,
    )
    progress = common.chain(record, common.ProgressBar() if config.progress else None, on_progress)
    losses = common.train_loop(
        trained,
        optimizer,
        loop,
        dist,
        start_step=start_step,
        next_batch=next_batch,
        loss_fn=loss_fn,
        evaluate=lambda: evaluate_preferences(trained, reference, tokenizer, heldout, config, max_len),
        save=save,
        on_progress=progress,
    )
    return {**metrics, "losses": losses, "out": str(out), "rank": dist.rank, "world_size": dist.world_size}


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser, algo: str | None = None) -> None:
    """The flags of `flywheel train dpo|kto` (algo fixed by the subcommand) and `python -m ml.train.dpo`."""
    d = DPOConfig(policy="", out="")
    add = parser.add_argument
    add("--policy", required=True, metavar="DIR", help="the SFT model to optimise (also the reference by default)")
    add("--out", required=True, metavar="DIR", help="model directory to write")
    if algo is None:
        add("--algo", choices=("dpo", "kto"), default=d.algo, help="dpo (ranked pairs) or kto (thumbs)")
    else:
        parser.set_defaults(algo=algo)
    add("--rankings", nargs="*", default=[], metavar="FILE", help="JSONL: {prompt, answers, ranking|order}")
    add("--thumbs", nargs="*", default=[], metavar="FILE", help="JSONL: {prompt, completion, label}")
    add("--reference", default=None, metavar="DIR", help="frozen reference model (default: --policy)")
    add("--beta", type=float, default=d.beta, help="strength of the KL regularisation (default %(default)s)")
    add("--desirable-weight", type=float, default=d.desirable_weight, help="KTO: weight of desirable answers")
    add("--undesirable-weight", type=float, default=d.undesirable_weight, help="KTO: weight of undesirable answers")
    add("--max-len", type=int, default=None, help="longest prompt + answer in tokens (default: the model's)")
    common.add_loop_arguments(
        parser,
        d,
        batch="pairs (DPO) or examples (KTO) per micro-step",
        heldout="share of rankings/thumbs held out",
        eval_every="held-out metrics every N steps; 0: at the end",
    )


def main(args: argparse.Namespace) -> int:
    try:
        metrics = train_preferences(
            DPOConfig(**{k: v for k, v in vars(args).items() if k in DPOConfig.__dataclass_fields__})
        )
    except (ValueError, OSError) as e:
        print(f"{getattr(args, 'algo', 'dpo')}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{getattr(args, 'algo', 'dpo')}: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    if metrics["rank"] == 0:
        print(
            f"saved {metrics['out']}: held-out margin {metrics.get('val_margin_start', 0.0):+.4f} -> "
            f"{metrics['val_margin']:+.4f}, positive on {metrics['val_acc']:.1%}, {metrics['elapsed_s']:.0f} s"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ml.train.dpo", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
