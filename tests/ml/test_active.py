"""Active learning (ml/active.py): the heads' disagreement and the acquisition on hand-made numbers, bootstrap heads
that disagree away from their data and agree on it, and the ensemble saved beside a reward model."""

import random
from pathlib import Path

import pytest
import torch

from ml.active import ENSEMBLE_FILE, EnsembleScorer, choose, fit_heads, fit_reward_ensemble, set_disagreement


def test_disagreement_is_zero_when_the_heads_order_alike_and_one_when_every_pair_splits_them() -> None:
    alike = torch.tensor([[3.0, 2.0, 1.0], [30.0, 0.5, -4.0]])  # different scales, same order
    assert set_disagreement(alike) == 0.0
    split = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert set_disagreement(split) == 1.0
    # 4 heads on K=3. Pairs (0,1): 3 of 4 put 0 above 1 -> 4 * 3/4 * 1/4 = 0.75; (0,2): 4 of 4 -> 0;
    # (1,2): 3 of 4 (all but the third head) -> 0.75. Mean over the 3 pairs: 1.5 / 3.
    four = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 0.0, 1.0], [1.0, 2.0, 0.0]])
    assert set_disagreement(four) == pytest.approx(1.5 / 3)
    assert set_disagreement(torch.tensor([[1.0], [2.0]])) == 0.0  # one answer: nothing to order


def test_soft_disagreement_is_the_variance_of_the_heads_win_probabilities() -> None:
    sure_opposite = torch.tensor([[20.0, 0.0], [0.0, 20.0]])
    assert set_disagreement(sure_opposite, "soft") == pytest.approx(1.0)
    assert set_disagreement(sure_opposite, "vote") == 1.0
    # Heads that find two answers all but equal: a coin-flip split by vote, no dispute at all softly.
    nearly_equal = torch.tensor([[0.001, 0.0], [0.0, 0.001]])
    assert set_disagreement(nearly_equal, "vote") == 1.0 and set_disagreement(nearly_equal, "soft") < 1e-5
    # One pair, sigmoid(ln 3) = 0.75 and sigmoid(-ln 3) = 0.25: variance 0.0625, times 4.
    log3 = torch.tensor(3.0).log().item()
    assert set_disagreement(torch.tensor([[log3, 0.0], [0.0, log3]]), "soft") == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown disagreement measure"):
        set_disagreement(sure_opposite, "entropy")


def test_choose_takes_the_most_disputed_unlabelled_items_and_random_takes_any() -> None:
    priorities = [0.1, 0.9, 0.5, 0.9, 0.0, 0.7]
    assert choose(priorities, 3, {1}, "disagreement", random.Random(0)) == [3, 5, 2]  # 1 is labelled; ties by index
    assert choose(priorities, 10, {0, 1, 2}, "disagreement", random.Random(0)) == [3, 5, 4]  # no more than are open
    explored = choose(priorities, 4, set(), "disagreement", random.Random(0), explore=0.5)
    assert explored[:2] == [1, 3] and set(explored[2:]) <= {0, 2, 4, 5} and len(set(explored)) == 4
    picked = choose(priorities, 4, {1, 3}, "random", random.Random(1))
    assert len(set(picked)) == 4 and not {1, 3} & set(picked)
    assert {tuple(choose(priorities, 2, set(), "random", random.Random(s))) for s in range(20)} != {(1, 3)}
    with pytest.raises(ValueError, match="unknown active-learning mode"):
        choose(priorities, 1, set(), "uncertainty", random.Random(0))


def test_bootstrap_heads_agree_where_the_labels_are_and_part_ways_where_they_conflict() -> None:
    """Most labelled sets vary only along feature 0 (the truth: more is better); six vary only along feature 3 and
    their labels conflict (three say more is better, three less). Each head's bootstrap resample tips feature 3 its
    own way, so the heads order feature-3 sets apart and feature-0 sets alike. (A direction no label ever moved is
    not a test of this: the L2 term shrinks it to ~1e-9 in every head, below float32's resolution of the scores.)"""
    g = torch.Generator().manual_seed(0)
    d, n_sets, n_conflict = 6, 40, 6
    seen = torch.zeros(n_sets * 2, d)
    seen[:, 0] = torch.randn(n_sets * 2, generator=g)
    disputed = torch.zeros(n_sets * 2, d)
    disputed[:, 3] = torch.randn(n_sets * 2, generator=g)
    features = torch.cat([seen, disputed])  # features 1, 2, 4, 5 never vary: nothing to learn or to dispute there
    pairs = [[2 * s, 2 * s + 1] for s in range(2 * n_sets)]
    labelled = [(rows, [1, 2] if features[rows[0], 0] > features[rows[1], 0] else [2, 1]) for rows in pairs[:n_sets]]
    conflicting = [(rows, [1, 2] if i % 2 else [2, 1]) for i, rows in enumerate(pairs[n_sets : n_sets + n_conflict])]
    heads = fit_heads(features, labelled[: n_sets // 2] + conflicting, n_heads=16, seed=0)
    scores = heads.scores(features)  # (E, N)
    on_data = [set_disagreement(scores[:, rows]) for rows in pairs[n_sets // 2 : n_sets]]  # same kind, not fit on
    off_data = [set_disagreement(scores[:, rows]) for rows in pairs[n_sets + n_conflict :]]
    assert sum(off_data) / len(off_data) > 0.5 > 0.1 > sum(on_data) / len(on_data), (on_data, off_data)
    mean = scores.mean(0)
    right = [(mean[a] > mean[b]) == (ranks[0] < ranks[1]) for (a, b), ranks in labelled[n_sets // 2 :]]
    assert sum(right) / len(right) >= 0.9  # and the heads learned the truth, not only to agree
    # Without resampling every head sees the same conflict, cancels it the same way, and the dispute is gone.
    alike = fit_heads(features, labelled[: n_sets // 2] + conflicting, n_heads=16, seed=0, bootstrap=False)
    same = [set_disagreement(alike.scores(features)[:, rows], "soft") for rows in pairs[n_sets + n_conflict :]]
    assert sum(same) / len(same) < 0.1


def test_the_ensemble_is_saved_beside_a_reward_model_and_scores_new_sets(
    make_rankings, one_thread, tiny_base: Path, tmp_path: Path
) -> None:
    import shutil

    rm = tmp_path / "rm"
    shutil.copytree(tiny_base, rm)
    assert EnsembleScorer.load(rm) is None  # no ensemble yet: callers fall back to random
    assert fit_reward_ensemble(rm, [], n_heads=4) == 0 and not (rm / ENSEMBLE_FILE).exists()
    records = make_rankings(12, 0)
    assert fit_reward_ensemble(rm, records, n_heads=4) == 12
    scorer = EnsembleScorer.load(rm)
    assert scorer is not None and scorer.heads.weight.shape[0] == 4
    sets = [(r["prompt"], r["answers"]) for r in make_rankings(5, 1)] + [(records[0]["prompt"], ["only one"])]
    values = scorer.disagreement(sets)
    assert len(values) == 6 and all(0.0 <= v <= 1.0 for v in values) and values[-1] == 0.0
