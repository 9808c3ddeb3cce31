"""The alignment maths on numbers worked by hand (each expected value is written out as the arithmetic it came from)."""

import math

import pytest
import torch

from ml.train.losses import (
    AdaptiveKLController,
    FixedKLController,
    bradley_terry_loss,
    clip_rewards,
    dpo_loss,
    entropy_from_logits,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_shaped_rewards,
    kto_loss,
    last_index,
    logistic_loss,
    masked_mean,
    masked_whiten,
    pairwise_accuracy,
    ppo_policy_loss,
    rloo_advantages,
    value_loss,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def nls(x: float) -> float:
    """-log sigmoid(x) = log(1 + e^-x)."""
    return math.log1p(math.exp(-x))


def close(a, b, tol=1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# ------------------------------------------------------------------------------------------------ reward models


def test_bradley_terry_averages_over_every_ordered_pair_of_a_ranking():
    # ranks 1 > 2 > 3 give the pairs (0,1): 2-0, (0,2): 2-(-1), (1,2): 0-(-1)
    loss = bradley_terry_loss(t([2.0, 0.0, -1.0]), torch.tensor([[1, 2, 3]]))
    assert close(loss, (nls(2) + nls(3) + nls(1)) / 3)


def test_bradley_terry_ties_and_absent_candidates_give_no_pair():
    tie = bradley_terry_loss(t([1.0, 0.0, 0.0]), torch.tensor([[1, 1, 2]]))  # pairs (0,2): 1, (1,2): 0
    assert close(tie, (nls(1) + nls(0)) / 2)
    absent = bradley_terry_loss(t([1.0, 5.0, 0.0]), torch.tensor([[1, 0, 2]]))  # only (0,2)
    assert close(absent, nls(1))


def test_bradley_terry_is_a_mean_over_rankings_not_over_pooled_pairs():
    rewards = t([2.0, 0.0, -1.0], [1.0, 5.0, 0.0])
    ranks = torch.tensor([[1, 2, 3], [1, 0, 2]])
    expected = ((nls(2) + nls(3) + nls(1)) / 3 + nls(1)) / 2
    assert close(bradley_terry_loss(rewards, ranks), expected)
    # a ranking with no pair at all (everything tied) does not count
    assert close(
        bradley_terry_loss(t([2.0, 0.0, -1.0], [1.0, 1.0, 1.0]), torch.tensor([[1, 2, 3], [1, 1, 1]])),
        (nls(2) + nls(3) + nls(1)) / 3,
    )


def test_bradley_terry_gradient_pushes_the_better_answer_up():
    rewards = torch.zeros(1, 2, requires_grad=True)
    bradley_terry_loss(rewards, torch.tensor([[2, 1]])).backward()
    assert rewards.grad[0, 1] < 0 < rewards.grad[0, 0]  # descending raises r_1, lowers r_0
    assert close(rewards.grad[0, 1], -0.5)  # d/dr_1 of -log sigmoid(r_1 - r_0) at 0 is -sigmoid(0)


def test_pairwise_accuracy_counts_pairs_and_half_for_equal_scores():
    acc, n = pairwise_accuracy(t([2.0, 0.0, -1.0]), torch.tensor([[3, 2, 1]]))
    assert close(acc, 0.0) and n == 3
    acc, n = pairwise_accuracy(t([1.0, 1.0, 0.0]), torch.tensor([[1, 2, 3]]))
    assert close(acc, 2.5 / 3) and n == 3


def test_logistic_loss_on_thumbs():
    loss = logistic_loss(t(0.0, 2.0).flatten(), torch.tensor([True, False]))
    assert close(loss, (math.log(2) + nls(-2)) / 2)
    assert close(logistic_loss(t(0.0, 2.0).flatten(), torch.tensor([1.0, -1.0])), loss)


# ---------------------------------------------------------------------------------------------------------- GAE


def test_gae_with_gamma_and_lambda():
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), torch.ones(1, 3), gamma=0.9, lam=0.5)
    # t=2: delta = 1 - 0.5 = 0.5, A = 0.5
    # t=1: delta = 0 + 0.9*0.5 - 0.5 = -0.05, A = -0.05 + 0.45*0.5 = 0.175
    # t=0: delta = -0.05, A = -0.05 + 0.45*0.175 = 0.02875
    assert close(adv, t([0.02875, 0.175, 0.5]))
    assert close(ret, t([0.52875, 0.675, 1.0]))


def test_gae_with_gamma_lambda_one_is_monte_carlo_return_minus_value():
    adv, ret = gae(t([0.0, 0.0, 1.0]), t([0.5, 0.5, 0.5]), torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert close(ret, t([1.0, 1.0, 1.0])) and close(adv, t([0.5, 0.5, 0.5]))


def test_gae_ignores_padding_and_skips_holes():
    # right padding: the value 9 at the padded position must not leak into the last real token
    adv, ret = gae(t([0.0, 1.0, 0.0]), t([0.5, 0.5, 9.0]), t([1, 1, 0]), gamma=1.0, lam=1.0)
    assert close(adv, t([0.5, 0.5, 0.0])) and close(ret, t([1.0, 1.0, 0.0]))
    # a hole: token 2 is the successor of token 0. t=2: 1 - 0.25 = 0.75; t=0: 0 + 0.25 - 0.5 + 0.75 = 0.5
    adv, _ = gae(t([0.0, 7.0, 1.0]), t([0.5, 9.0, 0.25]), t([1, 0, 1]), gamma=1.0, lam=1.0)
    assert close(adv, t([0.5, 0.0, 0.75]))


# ---------------------------------------------------------------------------------------------------------- PPO


def test_ppo_policy_loss_clips_the_optimistic_side():
    old = torch.zeros(1, 2)
    new = torch.log(t([1.5, 0.5]))
    out = ppo_policy_loss(new, old, torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    # A = +1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5 -> max(-0.5, -0.8) = -0.5
    assert close(out.loss, (-1.2 - 0.5) / 2) and close(out.clip_frac, 0.5)
    out = ppo_policy_loss(new, old, -torch.ones(1, 2), torch.ones(1, 2), clip=0.2)
    # A = -1: ratio 1.5 -> max(1.5, 1.2) = 1.5; ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped)
    assert close(out.loss, (1.5 + 0.8) / 2) and close(out.clip_frac, 0.5)
    # approx_kl is k3 of (new relative to old): r = new/old prob, r - 1 - log r
    assert close(out.approx_kl, ((0.5 - 1 - math.log(0.5)) + (1.5 - 1 - math.log(1.5))) / 2)


def test_ppo_policy_loss_ignores_masked_tokens_and_is_zero_change_at_ratio_one():
    out = ppo_policy_loss(t([0.0, 5.0]), t([0.0, 0.0]), t([2.0, 100.0]), t([1, 0]))
    assert close(out.loss, -2.0) and close(out.clip_frac, 0.0) and close(out.approx_kl, 0.0)


def test_value_loss_takes_the_pessimistic_clipped_error():
    # v moved from 0 to 1 but may move only 0.2: max((1-2)^2, (0.2-2)^2) = 3.24, times 0.5
    assert close(value_loss(t([1.0]), t([0.0]), t([2.0]), t([1])), 1.62)
    # inside the clip range the plain error is used: max((0.1-2)^2, (0.1-2)^2) / 2
    assert close(value_loss(t([0.1]), t([0.0]), t([2.0]), t([1])), 0.5 * 1.9**2)


# ----------------------------------------------------------------------------------------------------------- KL


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25))
    log_r = math.log(0.25 / 0.5)
    assert close(kl_estimate(logp, ref, "k1"), -log_r)
    assert close(kl_estimate(logp, ref, "k2"), 0.5 * log_r**2)
    assert close(kl_estimate(logp, ref, "k3"), 0.5 - 1 - log_r)
    same = torch.randn(100)
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_estimate(same, same, kind), torch.zeros(100))
    assert (kl_estimate(torch.randn(1000), torch.randn(1000), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(same, same, "k4")


def test_k1_and_k3_are_unbiased_for_the_true_kl():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    true_kl = float((p * (p / q).log()).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[tokens], q.log()[tokens]
    for kind in ("k1", "k3"):
        assert abs(float(kl_estimate(logp, logq, kind).mean()) - true_kl) < 0.01


def test_kl_shaped_rewards_put_the_score_on_the_last_real_token():
    rewards = kl_shaped_rewards(torch.tensor([2.0]), t([0.1, 0.2, 0.3]), t([1, 1, 0]), beta=0.5)
    assert close(rewards, t([-0.05, -0.1 + 2.0, 0.0]))


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(12.0, 100)  # error 12/6 - 1 = 1, clipped to 0.2: beta *= 1 + 0.2 * 100 / 10000
    assert math.isclose(adaptive.value, 0.1 * 1.002)
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    adaptive.update(5.4, 1000)  # error -0.1: beta *= 1 - 0.1 * 0.1
    assert math.isclose(adaptive.value, 0.1 * 0.99)


# ------------------------------------------------------------------------------------------------ group baselines


def test_grpo_and_rloo_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 10.0])
    # group 1: mean 2, sample std 1; group 2: all equal -> no signal
    assert close(grpo_advantages(scores, 3), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert close(grpo_advantages(torch.tensor([1.0, 3.0]), 2, scale=False), torch.tensor([-1.0, 1.0]))
    # leave-one-out baselines: (2+3)/2, (1+3)/2, (1+2)/2
    assert close(rloo_advantages(scores, 3), torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError):
        rloo_advantages(scores, 1)


# --------------------------------------------------------------------------------------------------- DPO / KTO


def test_dpo_loss_and_implicit_rewards():
    out = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]), beta=0.5)
    # chosen log-ratio 0.5, rejected -0.5: -log sigmoid(0.5 * (0.5 + 0.5))
    assert close(out.loss, nls(0.5))
    assert close(out.chosen_reward, torch.tensor([0.25])) and close(out.rejected_reward, torch.tensor([-0.25]))


def test_kto_loss_against_the_reference_point():
    z = torch.tensor([1.0])
    good = kto_loss(z, torch.zeros(1), torch.tensor([True]), torch.tensor(0.5), beta=1.0)
    bad = kto_loss(z, torch.zeros(1), torch.tensor([False]), torch.tensor(0.5), beta=1.0, undesirable_weight=2.0)
    assert close(good, 1 - 1 / (1 + math.exp(-0.5)))  # 1 - sigmoid(1 - 0.5)
    assert close(bad, 2 * (1 - 1 / (1 + math.exp(0.5))))  # 2 * (1 - sigmoid(0.5 - 1))
    negative_kl = kto_loss(z, torch.zeros(1), torch.tensor([True]), torch.tensor(-3.0), beta=1.0)
    assert close(negative_kl, 1 - 1 / (1 + math.exp(-1.0)))  # the reference point is clamped at 0


# ------------------------------------------------------------------------------------------------------ helpers


def test_masked_helpers():
    x, mask = t([1.0, 2.0, 3.0, 100.0]), t([1, 1, 1, 0])
    assert close(masked_mean(x, mask), 2.0)
    assert close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # empty: 0, not NaN
    std = math.sqrt(2 / 3)
    assert close(masked_whiten(x, mask), t([-1 / std, 0.0, 1 / std, 0.0]), tol=1e-4)
    assert close(masked_whiten(x, mask, shift_mean=False), t([-1 / std + 2, 2.0, 1 / std + 2, 0.0]), tol=1e-4)
    assert close(clip_rewards(torch.tensor([-9.0, 0.5, 9.0]), 5.0), torch.tensor([-5.0, 0.5, 5.0]))
    assert torch.equal(last_index(t([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0])), torch.tensor([1, 3, 0]))


def test_entropy_handles_cut_tokens():
    assert close(entropy_from_logits(torch.zeros(4)), math.log(4))
    assert close(entropy_from_logits(torch.tensor([0.0, 0.0, float("-inf")])), math.log(2))
