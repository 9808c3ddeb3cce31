"""Over-optimisation watch for RL (Gao et al., 2022, "Scaling laws for reward model overoptimization").

As RL pushes a policy away from its reference, the proxy reward (the reward model it trains against) keeps rising,
while the true quality rises first and then falls: the policy finds what the reward model gets wrong. The training
reward alone cannot show that turn. So every `every` steps the watch samples the policy on a fixed set of held-out
prompts (the same prompts and seed each time, so points compare) and scores the answers twice:

- with the proxy (the training reward function);
- with a judge that did not train the policy: the demo world's gold scorer where there is one, else another reward
  model.

It logs `watch_proxy`, `watch_judge` and `watch_agreement` (how often proxy and judge order two answers to the same
prompt the same way) beside the step's KL. `overoptimisation` flags a rising proxy with falling agreement (or a
falling judge).

Try it on CPU (tiny model, gold as the judge):  python -m ml.train.rl --policy DIR --prompts demo --watch-every 5 ...
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ml.examples import Message
from ml.train import rollout

Scorer = Callable[[list[list[Message]], list[list[int]]], Sequence[float] | Tensor]

WATCHED = ("watch_proxy", "watch_judge", "watch_agreement")  # what a watch point holds
WINDOW = 3  # watch points a trend is read over
AGREEMENT_DROP = 0.1  # agreement falling by this much over the window, while the proxy rises, is flagged
JUDGE_DROP = 0.02  # so is the judge's mean score falling by this much (gold is in [0, 1])


@dataclass
class Watch:
    """What to measure the policy on, and with which judge. `history` keeps every point measured."""

    prompts: list[list[Message]]  # held-out prompts: never trained on
    judge: Scorer | None  # None: only the proxy is watched (no agreement, no flag from the judge)
    judge_name: str = "none"
    every: int = 10
    samples: int = 4  # answers per prompt: agreement is read over the pairs of one prompt's answers
    seed: int = 20_221_010
    history: list[dict[str, float]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # every flag raised, in order

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == last)

    def measure(self, policy: Any, tokenizer: Any, proxy: Scorer, max_new_tokens: int, sampling: Any) -> dict:
        """Sample the policy on the held-out prompts and score the answers with the proxy and the judge."""
        ro = rollout.collect(policy, tokenizer, self.prompts, self.samples, max_new_tokens, sampling, self.seed)
        answers = ro.answers()
        proxy_scores = torch.as_tensor(proxy(ro.prompts, answers), dtype=torch.float32).cpu()
        point = {"watch_proxy": float(proxy_scores.mean())}
        if self.judge is not None:
            judge_scores = torch.as_tensor(self.judge(ro.prompts, answers), dtype=torch.float32).cpu()
            point["watch_judge"] = float(judge_scores.mean())
            agreement = pairwise_agreement(proxy_scores, judge_scores, self.samples)
            if agreement is not None:
                point["watch_agreement"] = agreement
        return point


def pairwise_agreement(a: Tensor, b: Tensor, group: int) -> float | None:
    """Over every pair of answers to the same prompt (rows come `group` per prompt) that both scorers tell apart, the
    share that they order the same way; None when no pair is told apart by both."""
    a, b = a.reshape(-1, group), b.reshape(-1, group)
    i, j = torch.triu_indices(group, group, offset=1)
    da, db = a[:, i] - a[:, j], b[:, i] - b[:, j]
    counted = (da != 0) & (db != 0)
    if not bool(counted.any()):
        return None
    return float(((da > 0) == (db > 0))[counted].float().mean())


def overoptimisation(points: list[dict[str, float]], window: int = WINDOW) -> str | None:
    """A rising proxy with falling agreement or a falling judge over the last `window` points, in words; else None.
    Each point holds `watch_proxy` and, where measured, `watch_agreement`, `watch_judge` and the step's `kl`."""
    if len(points) < window:
        return None
    first, last = points[-window], points[-1]
    proxy_rise = last["watch_proxy"] - first["watch_proxy"]
    if proxy_rise <= 0:
        return None
    falls = []
    if "watch_agreement" in first and "watch_agreement" in last:
        drop = first["watch_agreement"] - last["watch_agreement"]
        if drop >= AGREEMENT_DROP:
            falls.append(
                f"agreement with the judge fell {first['watch_agreement']:.2f} -> {last['watch_agreement']:.2f}"
            )
    if "watch_judge" in first and "watch_judge" in last:
        drop = first["watch_judge"] - last["watch_judge"]
        if drop >= JUDGE_DROP:
            falls.append(f"the judge's score fell {first['watch_judge']:.3f} -> {last['watch_judge']:.3f}")
    if not falls:
        return None
    where = f"steps {first.get('step', '?')}-{last.get('step', '?')}"
    kl = f", KL {first['kl']:.2f} -> {last['kl']:.2f}" if "kl" in first and "kl" in last else ""
    rise = f"{first['watch_proxy']:+.3f} -> {last['watch_proxy']:+.3f}"
    return f"possible over-optimisation ({where}{kl}): the proxy reward rose {rise} while " + " and ".join(falls)
