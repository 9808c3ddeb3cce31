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
from typing import Any

import torch
from torch import Tensor, nn

from ml.examples import (
    Message,
    SequenceBatch,
    describe_sources,
    encode_answer,
    preference_pairs,
    sequence_batch,
    split_heldout,
    thumb_rankings,
)
from ml.model import Transformer
from ml.screen import answers_fit, require_any, screen, skip_metrics
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, ProgressCallback
from ml.train.losses import dpo_loss, kto_loss

Example = tuple[list[Message], str]  # (prompt, answer)


def answer_logprobs(model: nn.Module, batch: SequenceBatch) -> Tensor:
    """(N,) sum of log p(token | earlier tokens) over each sequence's answer tokens. Right-padded, so no mask."""
    logits, _ = model(batch.input_ids)  # (N, T, V)
    logp = logits[:, :-1].float().log_softmax(dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (logp * batch.answer_mask[:, 1:]).sum(dim=1)


@dataclass(kw_only=True)
class DPOConfig(common.LoopTrainConfig):
    """Flags of an offline run. rankings / thumbs: JSONL paths or record objects (from Python). batch_size counts
    pairs (DPO) or examples (KTO) per micro-step, over all processes."""

    policy: str
    algo: str = "dpo"
    rankings: list[Any] = field(default_factory=list)
    thumbs: list[Any] = field(default_factory=list)
    reference: str | None = None
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    max_len: int | None = None

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
    skipped: dict[str, Any] = field(default_factory=dict)  # ml.screen.skip_metrics of the rankings and thumbs


def build_offline_data(config: DPOConfig, tokenizer: Tokenizer, max_len: int) -> OfflineData:
    """Screen the rankings and thumbs (ml.screen: bad ones are skipped and counted), split them (so no prompt's pairs
    straddle the split), then expand them."""
    fits = answers_fit(tokenizer, max_len)
    screened = screen(config.rankings or [], "ranking", fits), screen(config.thumbs or [], "thumb", fits)
    nothing = f"no training {'pairs' if config.algo == 'dpo' else 'examples'} in the data"
    require_any(*screened, nothing=nothing)
    rankings, thumbs = screened[0].kept, screened[1].kept
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
        raise ValueError(
            nothing
            + (
                f" ({'; '.join(s.summary() for s in screened if s.skipped)})"
                if any(s.skipped for s in screened)
                else ""
            )
        )
    return OfflineData(out[0], out[1], skip_metrics(*screened))


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


def train(config: DPOConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Run DPO or KTO from config.policy into config.out; returns metrics (val_margin_start, val_margin, ...)."""
    return common.run_distributed(config, _run, on_progress)


def _run(config: DPOConfig, dist: Distributed, on_progress: ProgressCallback | None) -> dict[str, Any]:
    config.check_out()
    model, reference, tokenizer, trunk = _models(config, dist.device)
    max_len = min(config.max_len or model.config.max_seq_len, model.config.max_seq_len)
    data = build_offline_data(config, tokenizer, max_len)
    torch.manual_seed(config.seed)
    model.train()
    training = common.start_training(model, config)
    heldout = data.heldout or data.train[: config.batch_size]  # no held-out split: report on a train slice
    metrics: dict[str, Any] = {"train_items": len(data.train), "heldout_items": len(data.heldout), **data.skipped}
    if not config.resume:
        start = evaluate_preferences(model, reference, tokenizer, heldout, config, max_len)
        metrics.update({f"{k}_start": v for k, v in start.items()})
    rows = dist.rows(config.batch_size)

    def next_batch() -> Any:
        picks = torch.randint(0, len(data.train), (config.batch_size,), generator=training.generator)[rows].tolist()
        return _to(_batch(tokenizer, [data.train[i] for i in picks], max_len, config.algo), dist.device)

    return common.fit(
        training,
        config,
        dist,
        metrics,
        next_batch=next_batch,
        loss_fn=lambda m, batch: preference_loss(m, reference, batch, config)[0],
        evaluate=lambda: evaluate_preferences(model, reference, tokenizer, heldout, config, max_len),
        on_progress=on_progress,
        checkpoint=lambda step: _metadata(config, step, trunk),
        tokenizer=tokenizer,
    )


def _models(config: DPOConfig, device: torch.device) -> tuple[Transformer, Transformer, Tokenizer, str]:
    """The policy to train, its frozen reference (with LoRA: the same trunk, adapters off), their tokenizer, and
    the directory the policy's adapters sit on."""
    model, reference, trunk = common.load_policy_and_reference(
        config.policy, config.reference, config.lora_spec, device
    )
    if model.scalar_head or reference.scalar_head:
        raise ValueError("DPO/KTO optimise a language model; the policy and reference may not be reward models")
    return model, reference, Tokenizer.load(config.policy), trunk


def _metadata(config: DPOConfig, step: int, trunk: str) -> dict[str, Any]:
    """How the saved policy was made, for its config.json."""
    record = {**asdict(config), **{k: describe_sources(getattr(config, k)) for k in ("rankings", "thumbs")}}
    return {
        "kind": "policy",
        "parent": config.policy,
        "reference": config.reference or config.policy,
        "method": config.algo,
        "step": step,
        "dpo": record,
        "adapter_base": trunk if config.lora_spec is not None else None,
    }


# --------------------------------------------------------------------------------------------------------- CLI


def _summary(metrics: dict[str, Any]) -> str:
    return (
        f"saved {metrics['out']}: held-out margin {metrics.get('val_margin_start', 0.0):+.4f} -> "
        f"{metrics['val_margin']:+.4f}, positive on {metrics['val_acc']:.1%}, {metrics['elapsed_s']:.0f} s"
    )


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
    common.add_loop_arguments(parser, d, batch_size="pairs (DPO) or examples (KTO) per micro-step")


def main(args: argparse.Namespace) -> int:
    return common.run_cli(DPOConfig, train, args, getattr(args, "algo", "dpo"), _summary)


if __name__ == "__main__":
    sys.exit(common.command("ml.train.dpo", __doc__, add_arguments, main))
