"""Active learning: which candidate sets are worth an annotator's time, by the disagreement of a reward ensemble.

A reward model trained on few labels is unsure where its data was thin. E small reward heads, each fit on a bootstrap
resample of the labelled rankings over one frozen trunk's features (the hidden state at an answer's last token, where
a reward model reads its score), agree where the labels pinned the order down and disagree elsewhere; a set whose K
answers the heads order differently is the one whose ranking teaches the most.

- `answer_features`: (N, D) trunk features of encoded answers, computed once, so refitting the heads is cheap;
- `fit_heads`: E Bradley-Terry heads on bootstrap resamples of the labelled sets (a `HeadEnsemble`);
- `set_disagreement`: (E, K) scores of one set's answers -> how much the heads disagree on their order, in [0, 1];
- `choose`: the acquisition itself, a pure function: the n most disputed unlabelled sets, a share of them at random;
- `fit_reward_ensemble` / `EnsembleScorer`: the heads over a trained reward model's trunk, saved beside it as
  `ensemble.pt`, and read back to score new sets (what the service's reward and candidates jobs call).

Run (CPU, on the demo world; both arms, several seeds):  python bench/active_learning.py --quick
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ml.checkpoint import load_checkpoint
from ml.examples import encode_answer, load_rankings, sequence_batch
from ml.tokenizer import Tokenizer
from ml.train.losses import ranking_pairs

ENSEMBLE_FILE = "ensemble.pt"
MODES = ("random", "disagreement")
MEASURES = ("vote", "soft")


@torch.no_grad()
def answer_features(
    model: nn.Module, encoded: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32
) -> Tensor:
    """(N, D) final hidden state at each encoded answer's last token: what a reward head on this trunk reads."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(encoded), batch_size):
        batch = sequence_batch(encoded[i : i + batch_size], pad_id).to(device)
        hidden = model.hidden_states(batch.input_ids)  # (B, T, D): causal, so right padding changes nothing
        out.append(hidden[torch.arange(len(batch.last_index)), batch.last_index].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, model.config.n_embd)


@dataclass
class HeadEnsemble:
    """E linear reward heads over standardised trunk features; `scores` gives every head's reward of every answer."""

    weight: Tensor  # (E, D)
    mean: Tensor  # (D,) feature standardisation, fixed when the heads were fit
    std: Tensor  # (D,)

    def scores(self, features: Tensor) -> Tensor:
        """(N, D) features -> (E, N) rewards."""
        return self.weight @ ((features - self.mean) / self.std).T

    def save(self, directory: str | Path) -> None:
        torch.save({"weight": self.weight, "mean": self.mean, "std": self.std}, Path(directory) / ENSEMBLE_FILE)

    @classmethod
    def load(cls, directory: str | Path) -> HeadEnsemble:
        state = torch.load(Path(directory) / ENSEMBLE_FILE, map_location="cpu", weights_only=True)
        return cls(state["weight"], state["mean"], state["std"])


def set_grid(sets: list[tuple[list[int], list[int]]]) -> tuple[Tensor, Tensor]:
    """Labelled sets as (answer row indices, ranks) -> padded (S, K) index and rank grids (rank 0 = absent)."""
    k = max(len(rows) for rows, _ in sets)
    index, ranks = torch.zeros(len(sets), k, dtype=torch.long), torch.zeros(len(sets), k, dtype=torch.long)
    for s, (rows, r) in enumerate(sets):
        index[s, : len(rows)], ranks[s, : len(r)] = torch.tensor(rows), torch.tensor(r)
    return index, ranks


def fit_heads(
    features: Tensor,
    sets: list[tuple[list[int], list[int]]],
    n_heads: int = 8,
    seed: int = 0,
    steps: int = 300,
    l2: float = 1e-2,
    bootstrap: bool = True,
) -> HeadEnsemble:
    """`n_heads` Bradley-Terry heads on `features` (N, D); `sets` are labelled sets as (rows of features, ranks).
    Each head sees its own bootstrap resample of the sets (bootstrap=False: every head sees all of them once), so
    where the labels are few or conflicting the heads part ways; the L2 term keeps an unconstrained direction at 0."""
    g = torch.Generator().manual_seed(seed)
    mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
    x = (features - mean) / std  # (N, D)
    index, ranks = set_grid(sets)
    better = ranking_pairs(ranks).float()  # (S, K, K)
    n_pairs = better.sum((1, 2)).clamp(min=1)  # (S,)
    if bootstrap:
        counts = torch.stack(
            [
                torch.bincount(torch.randint(0, len(sets), (len(sets),), generator=g), minlength=len(sets))
                for _ in range(n_heads)
            ]
        )
    else:
        counts = torch.ones(n_heads, len(sets))
    counts = counts.float() * (better.sum((1, 2)) > 0)  # (E, S): sets with no pair teach nothing
    weight = (0.01 * torch.randn(n_heads, x.size(1), generator=g)).requires_grad_()
    opt = torch.optim.Adam([weight], lr=0.05)
    for _ in range(steps):
        grid = (weight @ x.T)[:, index]  # (E, S, K)
        nll = -F.logsigmoid(grid[:, :, :, None] - grid[:, :, None, :])  # (E, S, K, K)
        per_set = (nll * better).sum((2, 3)) / n_pairs  # (E, S)
        loss = ((per_set * counts).sum(1) / counts.sum(1).clamp(min=1)).sum() + l2 * (weight**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return HeadEnsemble(weight.detach(), mean, std)


def set_disagreement(scores: Tensor, measure: str = "vote") -> float:
    """(E, K) every head's reward of one set's K answers -> the heads' disagreement on the answers' order, in [0, 1].

    `vote`: over the K(K-1)/2 pairs, the mean of 4 p (1 - p), p = the share of heads that put the first answer above
    the second. 0: every head orders every pair alike; 1: every pair splits the heads half and half.
    `soft`: over the pairs, 4 x the variance across heads of sigmoid(r_i - r_j), each head's Bradley-Terry probability
    that i beats j. Two answers every head finds equal (0.5 each) are not disputed, only unknowable, so they score 0
    where `vote` counts them as a coin-flip split; heads sure of opposite orders score 1."""
    if measure not in MEASURES:
        raise ValueError(f"unknown disagreement measure {measure!r}; expected one of {MEASURES}")
    k = scores.size(1)
    if k < 2:
        return 0.0
    i, j = torch.triu_indices(k, k, offset=1)
    if measure == "soft":
        q = torch.sigmoid(scores[:, i] - scores[:, j])  # (E, pairs)
        return float((4 * q.var(0, unbiased=False)).mean())
    above = (scores[:, :, None] > scores[:, None, :]).float().mean(0)  # (K, K): share of heads with i above j
    p = above[i, j]
    return float((4 * p * (1 - p)).mean())


def choose(
    priorities: list[float], n: int, labelled: set[int], mode: str, rng: random.Random, explore: float = 0.0
) -> list[int]:
    """Which `n` unlabelled items (indices into `priorities`) to label next. `random`: uniformly at random;
    `disagreement`: the most disputed first (ties by index), except a share `explore` drawn at random from the rest,
    so that a wrong ensemble still sees the data it is wrong about."""
    if mode not in MODES:
        raise ValueError(f"unknown active-learning mode {mode!r}; expected one of {MODES}")
    open_ = [i for i in range(len(priorities)) if i not in labelled]
    n = min(n, len(open_))
    if mode == "random":
        return rng.sample(open_, n)
    n_random = round(n * explore)
    ranked = sorted(open_, key=lambda i: (-priorities[i], i))
    top = ranked[: n - n_random]
    return top + rng.sample(ranked[n - n_random :], n_random)


class EnsembleScorer:
    """A reward model's trunk and the heads saved beside it: the disagreement of new candidate sets."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, heads: HeadEnsemble) -> None:
        self.model, self.tokenizer, self.heads = model.eval(), tokenizer, heads

    @classmethod
    def load(cls, reward_dir: str | Path) -> EnsembleScorer | None:
        """None when the directory has no ensemble (a reward model trained before there were any)."""
        if not (Path(reward_dir) / ENSEMBLE_FILE).exists():
            return None
        model, _ = load_checkpoint(reward_dir)
        return cls(model, Tokenizer.load(reward_dir), HeadEnsemble.load(reward_dir))

    def disagreement(self, sets: list[tuple[list[dict[str, str]], list[str]]]) -> list[float]:
        """`set_disagreement` of each (prompt messages, answers) set, all answers in one pass of the trunk."""
        encoded, spans = [], []
        for prompt, answers in sets:
            spans.append((len(encoded), len(encoded) + len(answers)))
            encoded += [encode_answer(self.tokenizer, prompt, a, self.model.config.max_seq_len) for a in answers]
        if not encoded:
            return [0.0] * len(sets)
        scores = self.heads.scores(answer_features(self.model, encoded, int(self.tokenizer.pad_id or 0)))
        return [set_disagreement(scores[:, a:b]) for a, b in spans]


def fit_reward_ensemble(reward_dir: str | Path, rankings: list, n_heads: int = 8, seed: int = 0) -> int:
    """Fit `n_heads` bootstrap heads over a trained reward model's trunk on its rankings (records or JSONL paths) and
    save them beside it; returns the number of sets fit on (0: nothing saved, there was no ranking)."""
    records = load_rankings(rankings) if rankings else []
    if not records:
        return 0
    model, _ = load_checkpoint(reward_dir)
    tokenizer = Tokenizer.load(reward_dir)
    encoded, sets = [], []
    for r in records:
        sets.append((list(range(len(encoded), len(encoded) + len(r.answers))), list(r.ranks)))
        encoded += [encode_answer(tokenizer, r.prompt, a, model.config.max_seq_len) for a in r.answers]
    features = answer_features(model, encoded, int(tokenizer.pad_id or 0))
    fit_heads(features, sets, n_heads, seed).save(reward_dir)
    return len(sets)
