"""The maths of alignment as small pure functions: reward-model losses, GAE, PPO, KL estimators, group baselines,
DPO and KTO. No loops over data, no models: tensors in, tensors out, each unit-tested on hand-worked numbers in
tests/ml/test_losses.py.

Shapes: B sequences (or rankings), K candidates per ranking, T response tokens, G samples per prompt.
A `mask` is (B, T) bool or 0/1, True on real response tokens; padded positions never contribute.

Try it on CPU:
    python -c "import torch; from ml.train.losses import *; \
print(bradley_terry_loss(torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1, 2, 3]])))"
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# ------------------------------------------------------------------------------------------------ masked helpers


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of x where mask is set (over everything, or along `dim`); 0 where nothing is set, never NaN."""
    count = mask.to(x.dtype).sum() if dim is None else mask.to(x.dtype).sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of the masked entries (a single number)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is kept (only rescaled).
    Masked-out entries come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def clip_rewards(scores: Tensor, limit: float) -> Tensor:
    """Clamp to [-limit, limit] so that one outlier score cannot dominate an update; limit <= 0 disables."""
    return scores.clamp(-limit, limit) if limit > 0 else scores


def last_index(mask: Tensor) -> Tensor:
    """(B, T) mask -> (B,) index of the last set position of each row (0 for an empty row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def entropy_from_logits(logits: Tensor) -> Tensor:
    """(..., V) logits (entries may be -inf, as top-k/top-p leave them) -> (...) entropy in nats."""
    logp = logits.float().log_softmax(dim=-1)
    p = logp.exp()
    return -(p * logp.masked_fill(p == 0, 0.0)).sum(dim=-1)


# ---------------------------------------------------------------------------------------------- reward models


def ranking_pairs(ranks: Tensor) -> Tensor:
    """(B, K) ranks (1 = best, equal = tie, <= 0 = absent) -> (B, K, K) bool, [b, i, j] = "i beat j" in ranking b."""
    present = ranks > 0
    both = present[:, :, None] & present[:, None, :]
    return both & (ranks[:, :, None] < ranks[:, None, :])


def bradley_terry_loss(rewards: Tensor, ranks: Tensor) -> Tensor:
    """InstructGPT's K-wise loss: mean over a ranking's ordered pairs of -log sigmoid(r_better - r_worse), then the
    mean over rankings that have at least one pair. rewards, ranks: (B, K). Ties and absent candidates give no pair.
    """
    better = ranking_pairs(ranks)  # (B, K, K)
    nll = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])  # (B, K, K): pair (i, j) scores r_i - r_j
    per_ranking = masked_mean(nll, better, dim=(1, 2))  # (B,)
    has_pairs = better.flatten(1).any(dim=1)
    if not bool(has_pairs.any()):
        return rewards.sum() * 0.0  # keeps the graph, contributes nothing
    return per_ranking[has_pairs].mean()


def pairwise_accuracy(rewards: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """(fraction of ordered pairs whose better answer scored higher, number of pairs); an exact tie in score counts
    half. Pooled over all pairs of all rankings."""
    better = ranking_pairs(ranks)
    diff = rewards[:, :, None] - rewards[:, None, :]
    right = (diff > 0).float() + 0.5 * (diff == 0).float()
    n = better.sum()
    return masked_sum(right, better) / n.clamp(min=1), n


def logistic_loss(rewards: Tensor, labels: Tensor) -> Tensor:
    """Thumbs up/down as a binary label on the reward: mean of -log sigmoid(y * r), y = +1 (up) or -1 (down).
    Bool labels are accepted (True = up)."""
    y = labels.to(rewards.dtype) * 2 - 1 if labels.dtype == torch.bool else labels.to(rewards.dtype)
    return -F.logsigmoid(y * rewards).mean()


# --------------------------------------------------------------------------------------------------------- PPO


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the valid tokens of each row, right to left.

    rewards, values, mask: (B, T). Masked positions are skipped (the next valid token is the successor); the
    value after the last valid token is 0 (the episode ends). Returns (advantages, returns = advantages + values),
    both (B, T) and 0 where masked.
    """
    mask = mask.to(values.dtype)
    next_value = torch.zeros_like(values[:, 0])  # (B,)
    next_adv = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.size(1))):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: Tensor
    clip_frac: Tensor  # share of tokens where the clipped term was the one used
    approx_kl: Tensor  # k3 estimate of KL(old || new), to watch how far one update moved the policy


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> PolicyLoss:
    """Clipped surrogate: mean over valid tokens of max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)),
    ratio = exp(logprobs - old_logprobs). All (B, T)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask)
    return PolicyLoss(loss, clip_frac, approx_kl)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2) -> Tensor:
    """Clipped value loss: 0.5 * mean over valid tokens of max((v - R)^2, (v_clipped - R)^2), where v_clipped stays
    within `clip` of the value at rollout time. All (B, T)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --------------------------------------------------------------------------------------------------------- KL


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, kind: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of tokens sampled from the policy.

    With log r = ref - policy: k1 = -log r (unbiased, can be negative per token), k2 = (log r)^2 / 2 (low variance,
    biased), k3 = r - 1 - log r (unbiased and never negative). See Schulman, "Approximating KL divergence".
    """
    log_r = ref_logprobs - logprobs
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return log_r.exp() - 1 - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1, k2 or k3")


def kl_shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token rewards: -beta * kl on every valid token, plus the sequence's score on its last valid token.
    scores (B,), kl and mask (B, T) -> (B, T)."""
    rewards = -beta * kl * mask.to(kl.dtype)
    last = last_index(mask)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, current_kl: float, n_samples: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): move beta proportionally towards a target KL. The error is clipped to +-20% and its
    effect scaled by n_samples / horizon, so beta drifts over about `horizon` samples, not in one jump."""

    def __init__(self, value: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, n_samples: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon


# --------------------------------------------------------------------------------------------- critic-free RL


def grpo_advantages(scores: Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> Tensor:
    """GRPO: each score minus its group's mean, divided by the group's (sample) std when `scale`.
    scores (N,) prompt-major, N = groups * group_size -> (N,)."""
    groups = scores.view(-1, group_size)  # (N / G, G)
    adv = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (groups.std(dim=1, keepdim=True) + eps)
    return adv.flatten()


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """RLOO: each score minus the mean of the other G - 1 scores of its group. scores (N,) prompt-major -> (N,)."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    groups = scores.view(-1, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).flatten()


# ----------------------------------------------------------------------------------------------- offline RL


class PreferenceLoss(NamedTuple):
    loss: Tensor
    chosen_reward: Tensor  # (B,) beta * (policy - reference) log-prob of the chosen answer: the implicit reward
    rejected_reward: Tensor  # (B,)


def dpo_loss(
    policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float
) -> PreferenceLoss:
    """DPO (Rafailov et al.): mean of -log sigmoid(beta * [(pi_c - ref_c) - (pi_r - ref_r)]) over pairs; inputs are
    (B,) sequence log-probs of whole answers."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return PreferenceLoss(loss, beta * chosen.detach(), beta * rejected.detach())


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """KTO (Ethayarajh et al.): with z = policy - ref log-prob of an answer and the reference point kl >= 0,
    a desirable answer costs w_d * (1 - sigmoid(beta * (z - kl))), an undesirable one w_u * (1 - sigmoid(beta *
    (kl - z))). policy_logps, ref_logps, desirable: (B,); kl: a scalar, detached (it is a baseline, not a target)."""
    z = policy_logps - ref_logps
    kl = kl.detach().clamp(min=0)
    good = desirable_weight * (1 - torch.sigmoid(beta * (z - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - z)))
    return torch.where(desirable.bool(), good, bad).mean()
