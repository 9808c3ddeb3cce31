"""Reward model: a scalar-head copy of the SFT model that scores prompt + answer at the answer's last token.

Trained the way InstructGPT did from annotators' rankings of K answers to one prompt: every ordered pair of a ranking
is a Bradley-Terry comparison, all pairs of one ranking sit in one batch element and its loss is their mean, so a
ranking of K counts once, not K-choose-2 times (which overfits). Ties give no pair. End users' thumbs add a logistic
loss on the reward itself (up = +1, down = -1), and a prompt with both an up and a down answer also gives a ranking.

With `head_only`, the trunk stays frozen and only the score head learns, from the trunk's features of every answer
computed once (no backward pass through the trunk): on a real model a step then costs microseconds instead of a
forward and backward of every candidate, and a linear head on a 135M trunk's features ordered held-out task-world
rankings far better from a hundred rankings than LoRA training of the trunk did (docs/benchmarks.md).

Rewards only mean something relative to each other, so after training they are shifted so that the reference answers
(`--reference` dialogues' final answers, by default every answer in the training data) average 0: a policy's mean
reward is then "better or worse than the data". The score head has no bias, so the shift is stored as
`reward_offset` in config.json's metadata and `RewardModel` applies it; always score through `RewardModel`.

Run (CPU, after ml.train.sft):
    python -m ml.train.reward --sft /tmp/fw-sft --out /tmp/fw-rm --rankings rankings.jsonl --thumbs thumbs.jsonl
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
    ComparisonBatch,
    EncodedRanking,
    Message,
    SequenceBatch,
    Thumb,
    comparison_batch,
    describe_sources,
    encode_answer,
    encode_ranking,
    load_dialogues,
    sequence_batch,
    split_heldout,
    thumb_rankings,
)
from ml.model import Transformer, scalar_model_from
from ml.screen import answers_fit, require_any, screen, skip_metrics
from ml.tokenizer import Tokenizer
from ml.train import common
from ml.train.common import Distributed, ProgressCallback
from ml.train.losses import bradley_terry_loss, logistic_loss, pairwise_accuracy


def score_sequences(model: nn.Module, batch: SequenceBatch) -> Tensor:
    """(N,) reward of each right-padded sequence, read at its last real token."""
    values, _ = model(batch.input_ids)  # (N, T): causal, so padding to the right changes nothing
    return values.gather(1, batch.last_index[:, None]).squeeze(1).float()


@torch.no_grad()
def score_encoded(
    model: nn.Module, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32
) -> Tensor:
    """(N,) raw rewards (no offset) of encoded sequences, in batches, on CPU."""
    device = next(model.parameters()).device
    scores = [
        score_sequences(model, sequence_batch(encoded[i : i + batch_size], pad_id).to(device))
        for i in range(0, len(encoded), batch_size)
    ]
    return torch.cat(scores).cpu() if scores else torch.zeros(0)


class RewardModel:
    """A trained reward model ready to score: the network, its tokenizer and the normalising offset."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, offset: float = 0.0) -> None:
        if not model.scalar_head:
            raise ValueError("a reward model needs a scalar head")
        self.model, self.tokenizer, self.offset = model.eval(), tokenizer, offset
        self.max_len = model.config.max_seq_len

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> RewardModel:
        model, meta = load_checkpoint(directory, device=device)
        if not model.scalar_head:
            raise ValueError(f"{directory} is a language model, not a reward model")
        return cls(model, Tokenizer.load(directory), float(meta.get("reward_offset", 0.0)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, prompts: list[list[Message]], answers: list[str], batch_size: int = 32) -> Tensor:
        """(N,) normalised rewards of answers[i] to prompts[i]."""
        encoded = [encode_answer(self.tokenizer, p, a, self.max_len) for p, a in zip(prompts, answers, strict=True)]
        return self.score_encoded(encoded, batch_size)

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch_size: int = 32) -> Tensor:
        """(N,) normalised rewards of token sequences (prompt ids + answer ids, scored at their last token)."""
        return self.score_encoded([(s[-self.max_len :], [1] * len(s[-self.max_len :])) for s in sequences], batch_size)

    def score_encoded(self, encoded: list[tuple[list[int], list[int]]], batch_size: int = 32) -> Tensor:
        return score_encoded(self.model, encoded, int(self.tokenizer.pad_id or 0), batch_size) + self.offset

    def __call__(self, prompt: list[Message], answer: str) -> float:
        """A scorer: (prompt messages, answer text) -> reward, like the demo world's gold scorer."""
        return float(self.score([prompt], [answer])[0])


@dataclass(kw_only=True)
class RewardConfig(common.LoopTrainConfig):
    """Flags of a reward-model run. rankings / thumbs / reference: JSONL paths or record objects (from Python).
    batch_size counts rankings (and as many thumbs) per micro-step, over all processes."""

    sft: str
    rankings: list[Any] = field(default_factory=list)
    thumbs: list[Any] = field(default_factory=list)
    reference: list[Any] = field(default_factory=list)  # dialogues; empty: every answer in the training data
    max_len: int | None = None
    thumb_weight: float = 1.0
    lr: float = 3e-4
    head_only: bool = False  # train the score head alone on the frozen trunk's features (computed once)

    def validate(self) -> None:
        if not self.rankings and not self.thumbs:
            raise ValueError("give --rankings and/or --thumbs to train a reward model on")
        self.require_at_least_one("steps", "batch_size", "grad_accum")
        if self.lr <= 0 or not 0 <= self.heldout_fraction < 1:
            raise ValueError("--lr must be positive and the held-out fraction in [0, 1)")
        if self.head_only and self.lora:
            raise ValueError("--head-only trains the score head alone: it takes no LoRA adapters")


@dataclass
class RewardData:
    """Tokenised rankings (given ones plus those from thumbs) and thumbs, split into train / held out."""

    rankings: dict[str, list[EncodedRanking]]
    thumbs: dict[str, list[tuple[tuple[list[int], list[int]], bool]]]
    reference: list[tuple[list[int], list[int]]]
    pad_id: int
    skipped: dict[str, Any] = field(default_factory=dict)  # ml.screen.skip_metrics of the rankings and thumbs

    def batch(self, split: str, idx_r: list[int], idx_t: list[int]) -> tuple[ComparisonBatch, Tensor]:
        rankings = [self.rankings[split][i] for i in idx_r]
        thumbs = [self.thumbs[split][i] for i in idx_t]
        cb = comparison_batch(rankings, self.pad_id, extra=[enc for enc, _ in thumbs])
        return cb, torch.tensor([label for _, label in thumbs], dtype=torch.bool)


def build_reward_data(config: RewardConfig, tokenizer: Tokenizer, max_len: int) -> RewardData:
    fits = answers_fit(tokenizer, max_len)
    screened = screen(config.rankings or [], "ranking", fits), screen(config.thumbs or [], "thumb", fits)
    require_any(*screened)
    rankings, thumbs = screened[0].kept, screened[1].kept
    r_train, r_held = split_heldout(rankings, config.heldout_fraction, config.seed)
    t_train, t_held = split_heldout(thumbs, config.heldout_fraction, config.seed)
    r_train, r_held = r_train + thumb_rankings(t_train), r_held + thumb_rankings(t_held)
    if not any(min(r.ranks) < max(r.ranks) for r in r_train) and not t_train:
        raise ValueError("the training data holds no comparison (every ranking is one big tie) and no thumbs")
    if config.reference:
        pairs = [_last_answer(d.messages) for d in load_dialogues(config.reference)]
    else:
        pairs = {(repr(r.prompt), a): (r.prompt, a) for r in r_train for a in r.answers}
        pairs.update({(repr(t.prompt), t.completion): (t.prompt, t.completion) for t in t_train})
        pairs = list(pairs.values())

    def enc(t: Thumb) -> tuple[tuple[list[int], list[int]], bool]:
        return encode_answer(tokenizer, t.prompt, t.completion, max_len), t.label

    return RewardData(
        rankings={
            "train": [encode_ranking(tokenizer, r, max_len) for r in r_train],
            "heldout": [encode_ranking(tokenizer, r, max_len) for r in r_held],
        },
        thumbs={"train": [enc(t) for t in t_train], "heldout": [enc(t) for t in t_held]},
        reference=[encode_answer(tokenizer, p, a, max_len) for p, a in pairs],
        pad_id=int(tokenizer.pad_id or 0),
        skipped=skip_metrics(*screened),
    )


def _last_answer(messages: list[Message]) -> tuple[list[Message], str]:
    i = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:i], messages[i]["content"]


def comparison_loss(cb: ComparisonBatch, scores: Tensor, labels: Tensor, thumb_weight: float = 1.0) -> Tensor:
    """Bradley-Terry over the rankings' pairs plus thumb_weight * logistic loss on the thumbs."""
    loss = bradley_terry_loss(cb.grid(scores), cb.ranks) if cb.ranks.numel() else scores.sum() * 0.0
    if labels.numel():
        loss = loss + thumb_weight * logistic_loss(cb.extra_scores(scores), labels)
    return loss


def batch_scores(
    model: nn.Module,
    cb: ComparisonBatch,
    split: str,
    idx_r: list[int],
    idx_t: list[int],
    features: CachedFeatures | None = None,
) -> Tensor:
    """(N,) a batch's scores: one forward of the model, or (head_only) its score head over the cached features of
    the rankings and thumbs the batch was built from."""
    if features is None:
        return score_sequences(model, cb.sequences)
    return features.scores(common.unwrap(model).score_head, split, idx_r, idx_t)


@torch.no_grad()
def evaluate_rewards(
    model: nn.Module,
    data: RewardData,
    split: str = "heldout",
    batch_size: int = 16,
    features: CachedFeatures | None = None,
) -> dict:
    """Held-out BT loss, pairwise accuracy over all pairs, thumbs accuracy (sign of the reward), all deterministic.
    With `features` (head_only) the score head reads them instead of a forward of the model."""
    model = common.unwrap(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses, right, pairs, thumbs_right = [], 0.0, 0, 0
    n_r, n_t = len(data.rankings[split]), len(data.thumbs[split])
    for i in range(0, n_r, batch_size):
        idx = list(range(i, min(i + batch_size, n_r)))
        cb, _ = data.batch(split, idx, [])
        cb = cb.to(device)
        grid = cb.grid(batch_scores(model, cb, split, idx, [], features))
        losses.append(float(bradley_terry_loss(grid, cb.ranks)) * len(cb.ranks))
        acc, n = pairwise_accuracy(grid, cb.ranks)
        right, pairs = right + float(acc) * int(n), pairs + int(n)
    for i in range(0, n_t, batch_size):
        idx = list(range(i, min(i + batch_size, n_t)))
        cb, labels = data.batch(split, [], idx)
        cb = cb.to(device)
        scores = cb.extra_scores(batch_scores(model, cb, split, [], idx, features)).cpu()
        thumbs_right += int(((scores > 0) == labels).sum())
    model.train(was_training)
    out: dict[str, float] = {}
    if pairs:
        out.update(val_loss=sum(losses) / n_r, val_acc=right / pairs, val_pairs=pairs)
    if n_t:
        out["val_thumb_acc"] = thumbs_right / n_t
    return out


@torch.no_grad()
def trunk_features(model: Transformer, encoded: list[tuple[list[int], list[int]]], pad_id: int) -> Tensor:
    """(N, n_embd): the final hidden state at each sequence's last token, which is what the score head reads."""
    device, out = next(model.parameters()).device, []
    for i in range(0, len(encoded), 32):
        batch = sequence_batch(encoded[i : i + 32], pad_id).to(device)
        hidden = model.hidden_states(batch.input_ids)
        out.append(hidden[torch.arange(len(hidden), device=device), batch.last_index].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.n_embd)


@dataclass
class CachedFeatures:
    """The frozen trunk's features of every answer in the data, standardised with the train split's mean and
    spread (so that one learning rate and weight decay suit any trunk); `fold` puts the spread into the head."""

    rankings: dict[str, list[Tensor]]  # per split: (K, n_embd) per ranking
    thumbs: dict[str, Tensor]  # per split: (n_thumbs, n_embd)
    mean: Tensor
    std: Tensor

    @classmethod
    def compute(cls, model: Transformer, data: RewardData) -> CachedFeatures:
        model.eval()
        rankings, thumbs = {}, {}
        for split in ("train", "heldout"):
            ranked = data.rankings[split]
            flat = trunk_features(model, [c for r in ranked for c in r.candidates], data.pad_id)
            rankings[split] = list(flat.split([len(r.candidates) for r in ranked])) if ranked else []
            thumbs[split] = trunk_features(model, [e for e, _ in data.thumbs[split]], data.pad_id)
        train = torch.cat([*rankings["train"], thumbs["train"]])
        return cls(
            rankings,
            thumbs,
            train.mean(0),
            train.std(0).clamp_min(1e-4) if len(train) > 1 else torch.ones(train.shape[1]),
        )

    def scores(self, head: nn.Module, split: str, idx_r: list[int], idx_t: list[int]) -> Tensor:
        """(N,) the head's scores in a ComparisonBatch's order: the rankings' candidates, then the thumbs."""
        x = torch.cat([*(self.rankings[split][i] for i in idx_r), self.thumbs[split][idx_t]])
        x = (x - self.mean) / self.std
        return head(x.to(head.weight.device, head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def fold(self, head: nn.Module) -> None:
        """Make the head read raw features: w / std (its weight is (in, out)). What the mean adds is one constant,
        which `normalise` removes."""
        head.weight /= self.std.to(head.weight.device, head.weight.dtype)[:, None]


def normalise(model: Transformer, reference: list[tuple[list[int], list[int]]], pad_id: int) -> float:
    """The offset that makes the reference answers' mean reward 0; folded into the score head's bias if it has one
    (and 0 returned), else returned for the checkpoint's metadata."""
    model.eval()
    with torch.no_grad():
        offset = -float(score_encoded(model, reference, pad_id).mean()) if reference else 0.0
        if model.score_head.bias is not None:
            model.score_head.bias += offset
            return 0.0
    return offset


def train(config: RewardConfig, on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Train a reward model into config.out; returns metrics (val_acc, val_loss, reward_mean, reward_std, ...)."""
    return common.run_distributed(config, _run, on_progress)


def _run(config: RewardConfig, dist: Distributed, on_progress: ProgressCallback | None) -> dict[str, Any]:
    config.check_out()
    model, tokenizer = _reward_model(config, dist.device)
    max_len = min(config.max_len or model.config.max_seq_len, model.config.max_seq_len)
    data = build_reward_data(config, tokenizer, max_len)
    features = None
    if config.head_only:
        model.requires_grad_(False)
        features = CachedFeatures.compute(model, data)
        model.score_head.requires_grad_(True)
    model.train()
    training = common.start_training(model, config)
    # The head-only loss is not a forward of the DDP-wrapped model, so DDP averages nothing: every rank takes the
    # whole batch (the generator is the same on every rank) and makes the same update.
    rows = slice(None) if features is not None else dist.rows(config.batch_size)
    n_r, n_t = len(data.rankings["train"]), len(data.thumbs["train"])

    def pick(n: int) -> list[int]:
        return torch.randint(0, n, (config.batch_size,), generator=training.generator)[rows].tolist() if n else []

    def next_batch() -> tuple[ComparisonBatch, Tensor, list[int], list[int]]:
        idx_r, idx_t = pick(n_r), pick(n_t)  # the indices let a head-only run find the batch's cached features
        cb, labels = data.batch("train", idx_r, idx_t)
        return cb.to(dist.device), labels.to(dist.device), idx_r, idx_t

    def loss_fn(m: nn.Module, batch: tuple[ComparisonBatch, Tensor, list[int], list[int]]) -> Tensor:
        cb, labels, idx_r, idx_t = batch
        return comparison_loss(cb, batch_scores(m, cb, "train", idx_r, idx_t, features), labels, config.thumb_weight)

    metrics: dict[str, Any] = {"train_rankings": n_r, "train_thumbs": n_t, **data.skipped}
    metrics.update(heldout_rankings=len(data.rankings["heldout"]), heldout_thumbs=len(data.thumbs["heldout"]))
    result = common.fit(  # saves only the train state: the model is saved at the end, with its offset
        training,
        config,
        dist,
        metrics,
        next_batch=next_batch,
        loss_fn=loss_fn,
        evaluate=lambda: evaluate_rewards(model, data, features=features),
        on_progress=on_progress,
    )
    if features is not None:
        features.fold(model.score_head)
    return {**result, **_finish(config, model, tokenizer, data, dist)}


def _reward_model(config: RewardConfig, device: torch.device) -> tuple[Transformer, Tokenizer]:
    """The model to train: a reward model continues; a language model gives its trunk to a new score head."""
    lm, _ = load_checkpoint(config.sft, device=device)
    torch.manual_seed(config.seed)  # the new score head's initialisation
    model = lm if lm.scalar_head else scalar_model_from(lm)
    return config.with_lora(model), Tokenizer.load(config.sft)


def _finish(
    config: RewardConfig, model: Transformer, tokenizer: Tokenizer, data: RewardData, dist: Distributed
) -> dict:
    """Normalise, measure the rewards of the held-out answers, and save the model with its offset."""
    offset = normalise(model, data.reference, data.pad_id)
    scorer = RewardModel(model, tokenizer, offset)
    held = [c for r in data.rankings["heldout"] for c in r.candidates] + [e for e, _ in data.thumbs["heldout"]]
    scores = scorer.score_encoded(held or data.reference)
    metrics = {"reward_offset": offset, "reward_mean": float(scores.mean()), "reward_std": float(scores.std())}
    metrics["reference_mean"] = float(scorer.score_encoded(data.reference).mean()) if data.reference else 0.0
    if dist.is_main:
        record = {**asdict(config), **{k: describe_sources(getattr(config, k)) for k in ("rankings", "thumbs")}}
        record["reference"] = describe_sources(config.reference)
        extra = {"kind": "reward", "parent": str(config.sft), "reward_offset": offset, "reward": record}
        save_checkpoint(config.out, model, tokenizer=tokenizer, extra=extra)
    dist.barrier()
    return metrics


# --------------------------------------------------------------------------------------------------------- CLI


def _summary(metrics: dict[str, Any]) -> str:
    acc = f"held-out pairwise accuracy {metrics['val_acc']:.3f}, " if "val_acc" in metrics else ""
    return (
        f"saved {metrics['out']}: {acc}reward mean {metrics['reward_mean']:+.3f} std {metrics['reward_std']:.3f} "
        f"(reference answers at 0), {metrics['elapsed_s']:.0f} s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `flywheel train reward` and `python -m ml.train.reward`."""
    d = RewardConfig(sft="", out="")
    add = parser.add_argument
    add("--sft", required=True, metavar="DIR", help="the SFT model whose trunk initialises the reward model")
    add("--out", required=True, metavar="DIR", help="model directory to write")
    add("--rankings", nargs="*", default=[], metavar="FILE", help="JSONL: {prompt, answers, ranking|order}")
    add("--thumbs", nargs="*", default=[], metavar="FILE", help="JSONL: {prompt, completion, label}")
    add(
        "--reference",
        nargs="*",
        default=[],
        metavar="FILE",
        help="JSONL dialogues whose final answers average reward 0 (default: the training answers)",
    )
    add("--max-len", type=int, default=None, help="longest prompt + answer in tokens (default: the model's)")
    add(
        "--head-only",
        action="store_true",
        help="train the score head alone on the frozen trunk's features, computed once (fast on a real model)",
    )
    add("--thumb-weight", type=float, default=d.thumb_weight, help="weight of the thumbs' logistic loss")
    common.add_loop_arguments(parser, d, batch_size="rankings (and thumbs) per micro-step")


def main(args: argparse.Namespace) -> int:
    return common.run_cli(RewardConfig, train, args, "reward", _summary)


if __name__ == "__main__":
    sys.exit(common.command("ml.train.reward", __doc__, add_arguments, main))
