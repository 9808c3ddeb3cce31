"""The promotion gates: a new policy is served only if it beats the active one on held-out prompts, and a new reward
model becomes the active one only if it was trained on enough labels and orders held-out human rankings as well.

Policies. Judged by a reward model that did not train the candidate (`judge`): the candidate's win rate against the
active policy, with a bootstrap interval over prompts, must clear 0.5 by a margin at the interval's lower bound; its
KL to the SFT reference must stay within a budget; and its perplexity on reference dialogues (written by people or
the demo world, never sampled from a policy) must not regress by more than a tolerance. The decision and every
number behind it are stored with the model version.

The perplexity check catches a policy that breaks (forgets how to write), not one that narrows its style: RL that
raises the demo's gold score stops writing the reference answers' polite openers and closers, and the perplexity of
those answers grows 1.1-2.4x while the values they state move little; a policy trained with no KL leash measured
4,500x (README).
So by default the candidate's perplexity may be at most twice the active policy's (`ppl_tolerance` 1.0).

Reward models. Rankings of held-out prompts (`Prompt.split`, a hash of the prompt's text) are never trained on;
every reward model is scored on them (pairwise accuracy with a bootstrap interval over candidate sets, since the
pairs of one set are correlated), and the active one is re-scored on the same labels at the same time
(`decide_reward`).
"""

import random
from dataclasses import dataclass
from typing import Any

GATE_DEFAULTS = {
    "gate_margin": 0.02,
    "kl_budget": 10.0,
    "ppl_tolerance": 1.0,
    "gate_prompts": 48,
    "gate_samples": 4,
    "gate_confidence": 0.9,  # two-sided: the lower bound is a one-sided 95% bound
}
# How the gate samples when the job does not say: both policies alike. An rl job's own `max_new_tokens`,
# `temperature` and `top_p` replace these, so a policy is judged at the length and sampling it was trained for (at 64
# tokens a policy trained on 32-token answers is judged on text it never learned to end).
GATE_SAMPLING = {"max_new_tokens": 64, "temperature": 0.7, "top_p": None}
REFERENCE_DIALOGUES = 64  # the most dialogues perplexity is measured on (the first ones: a fixed set)
RESAMPLES = 2000  # bootstrap resamples: the ends moved by under 0.01 across 10 seeds (48 prompts x 4 pairs)
REWARD_CONFIDENCE = 0.9  # the reward-model gate's interval
REWARD_MIN_SETS = 5  # fewer held-out sets than this: a bootstrap interval means little, the label count decides


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Interval:
    """A proportion measured over groups of correlated trials (pairs of one ranked set, samples of one prompt) and
    its bootstrap interval over the groups."""

    estimate: float
    low: float
    high: float
    trials: int  # pairs, or answer pairs
    groups: int  # the units resampled: candidate sets, or prompts

    def text(self) -> str:
        return f"{self.estimate:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_interval(
    groups: list[tuple[float, float]], *, confidence: float = 0.9, resamples: int = RESAMPLES, seed: int = 0
) -> Interval | None:
    """The pooled proportion sum(hits) / sum(trials) over `groups` of (hits, trials), with a percentile bootstrap
    interval that resamples whole groups: trials of one group are correlated (the pairs of one ranking share its
    answers; the samples of one prompt share the prompt), so resampling trials one by one would be too narrow.
    None when there is nothing to measure. Seeded: the same numbers give the same interval."""
    groups = [(float(h), float(n)) for h, n in groups if n > 0]
    if not groups:
        return None
    estimate = sum(h for h, _ in groups) / sum(n for _, n in groups)
    rng, k = random.Random(seed), len(groups)
    draws = []
    for _ in range(resamples):
        picked = [groups[rng.randrange(k)] for _ in range(k)]
        draws.append(sum(h for h, _ in picked) / sum(n for _, n in picked))
    draws.sort()
    tail = (1 - confidence) / 2
    low, high = draws[round(tail * (resamples - 1))], draws[round((1 - tail) * (resamples - 1))]
    return Interval(estimate, min(low, estimate), max(high, estimate), int(sum(n for _, n in groups)), k)


def decide(metrics: dict[str, Any], *, gate_margin: float, kl_budget: float, ppl_tolerance: float) -> GateResult:
    """Pure decision over measured numbers (unit-tested): the win rate's lower bound (the point estimate when no
    interval was measured), KL, perplexity against the active policy's."""
    win, kl = metrics["win_rate"], metrics["kl"]
    has_interval = "win_rate_low" in metrics
    low = metrics["win_rate_low"] if has_interval else win
    ppl_new, ppl_old = metrics["ppl_candidate"], metrics["ppl_active"]
    if low < 0.5 + gate_margin:
        measured = f"win rate {win:.3f}"
        if has_interval:
            measured += f" (interval {low:.3f}-{metrics['win_rate_high']:.3f}): its lower bound"
        return GateResult(False, f"{measured} is below {0.5 + gate_margin:.3f}", metrics)
    if kl > kl_budget:
        return GateResult(False, f"KL to the reference {kl:.3f} exceeds the budget {kl_budget}", metrics)
    if ppl_new > ppl_old * (1 + ppl_tolerance):
        return GateResult(
            False,
            f"held-out perplexity {ppl_new:.3f} regressed from {ppl_old:.3f} (more than {1 + ppl_tolerance:.2f}x)",
            metrics,
        )
    ratio = ppl_new / ppl_old if ppl_old else 1.0
    wins = f"wins {win:.3f}" + (f" (lower bound {low:.3f})" if has_interval else "")
    return GateResult(True, f"{wins} with KL {kl:.3f} and perplexity {ppl_new:.3f} ({ratio:.2f}x)", metrics)


def decide_reward(
    *,
    labels: int,
    min_labels: int,
    candidate: Interval | None,
    active: Interval | None,
    min_sets: int = REWARD_MIN_SETS,
) -> GateResult:
    """Pure decision for a new reward model (unit-tested): at least `min_labels` training labels, and held-out
    accuracy no worse than the active model's on the same held-out labels (chance, 0.5, when none is active).

    "No worse" is non-inferiority: the candidate's interval must reach the active one's point estimate
    (candidate.high >= active.estimate). A model trained on more labels is expected to be at least as good, so it is
    held back only when the held-out labels show it worse beyond their noise; demanding that it be *better* beyond
    noise would hold back nearly every retraining while the held-out set is small. With fewer than `min_sets`
    held-out sets ranked (none, early on) the interval means little, and the label count alone decides."""
    metrics: dict[str, Any] = {"gate_labels": labels, "gate_min_labels": min_labels}
    if labels < min_labels:
        return GateResult(False, f"trained on {labels} labels, fewer than the {min_labels} required", metrics)
    sets = candidate.groups if candidate else 0
    if candidate is None or sets < min_sets:
        reason = f"{labels} labels; {sets} held-out sets ranked (fewer than {min_sets}): promoted on the label count"
        return GateResult(True, reason, metrics)
    baseline = f"the active model's {active.estimate:.3f}" if active else "chance (0.500; no active model)"
    measured = f"held-out accuracy {candidate.text()} on {candidate.trials} pairs of {sets} sets"
    if candidate.high < (active.estimate if active else 0.5):
        return GateResult(False, f"{measured} is below {baseline}", metrics)
    return GateResult(True, f"{measured} is no worse than {baseline}; {labels} labels", metrics)


def _usable(
    tokenizer: Any, max_seq_len: int, prompts: list[Any], dialogues: list[Any], params: dict[str, Any]
) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """The held-out prompts and reference dialogues the gate can measure on (ml.screen: one too long for the model,
    or malformed, is skipped and counted, `gate_skipped_<reason>`), and those counts; none usable: an error."""
    from ml.screen import MIN_ANSWER_TOKENS, dialogue_fits, prompt_fits, screen, skip_metrics

    screened_prompts = screen(prompts, "prompt", prompt_fits(tokenizer, max_seq_len, MIN_ANSWER_TOKENS))
    screened_dialogues = screen(dialogues, "dialogue", dialogue_fits(tokenizer, max_seq_len))
    kept = [p.messages for p in screened_prompts.require()][: int(params["gate_prompts"])]
    skipped = skip_metrics(screened_prompts, screened_dialogues)
    return kept, screened_dialogues.kept[:REFERENCE_DIALOGUES], {f"gate_{k}": v for k, v in skipped.items()}


def evaluate_candidate(
    candidate_dir: str,
    active_dir: str,
    reference_dir: str,
    judge_dir: str,
    prompts: list[list[dict[str, str]]],
    dialogues: list[Any],
    params: dict[str, Any],
) -> GateResult:
    """Measure the candidate against the active policy, scored by the judge reward model, and apply the gate."""
    from ml.checkpoint import load_checkpoint
    from ml.engine import Sampling
    from ml.evaluate import dialogue_perplexity, policy_reward_and_kl, win_rate
    from ml.tokenizer import Tokenizer
    from ml.train.reward import RewardModel

    candidate, _ = load_checkpoint(candidate_dir)
    active, _ = load_checkpoint(active_dir)
    # The first RL candidate is measured against the SFT model, which is also the reference: load it once.
    reference = active if reference_dir == active_dir else load_checkpoint(reference_dir)[0]
    tokenizer = Tokenizer.load(candidate_dir)
    judge = RewardModel.load(judge_dir)
    prompts, held_out, skipped = _usable(tokenizer, candidate.config.max_seq_len, prompts, dialogues, params)
    n = int(params["gate_samples"])
    how = {**GATE_SAMPLING, **{k: params[k] for k in GATE_SAMPLING if params.get(k) is not None}}
    sampling = Sampling(temperature=float(how["temperature"]), top_p=how["top_p"] and float(how["top_p"]))
    length = int(how["max_new_tokens"])
    wins = win_rate(candidate, active, tokenizer, prompts, judge, max_new_tokens=length, sampling=sampling, n=n)
    interval = bootstrap_interval([(w, n) for w in wins["prompt_wins"]], confidence=float(params["gate_confidence"]))
    kl = policy_reward_and_kl(candidate, reference, tokenizer, prompts, judge, max_new_tokens=length, sampling=sampling)
    ppl_new = dialogue_perplexity(candidate, tokenizer, held_out)["ppl"] if held_out else 1.0
    ppl_old = dialogue_perplexity(active, tokenizer, held_out)["ppl"] if held_out else 1.0
    metrics = {
        "win_rate": wins["win_rate"],
        "reward_candidate": wins["score_a"],
        "reward_active": wins["score_b"],
        "kl": kl["kl"],
        "ppl_candidate": ppl_new,
        "ppl_active": ppl_old,
        "gate_prompts": len(prompts),
        "gate_max_new_tokens": length,
        "gate_pairs": wins["wins"] + wins["ties"] + wins["losses"],
        "gate_dialogues": len(held_out),
        **skipped,
    }
    if interval is not None:
        metrics.update(win_rate_low=interval.low, win_rate_high=interval.high)
    return decide(
        metrics,
        gate_margin=float(params["gate_margin"]),
        kl_budget=float(params["kl_budget"]),
        ppl_tolerance=float(params["ppl_tolerance"]),
    )


def score_reward_model(reward_dir: str, rankings: list[dict[str, Any]], sets: list[int]) -> Interval | None:
    """A reward model's accuracy on held-out rankings (one record per ranking, `sets` its candidate set), with a
    bootstrap interval over the sets: several annotators' rankings of one set are one group."""
    from ml.evaluate import ranking_pair_counts
    from ml.examples import load_rankings
    from ml.train.reward import RewardModel

    if not rankings:
        return None
    counts = ranking_pair_counts(RewardModel.load(reward_dir), load_rankings(rankings))
    by_set: dict[int, tuple[float, float]] = {}
    for set_id, (right, pairs) in zip(sets, counts, strict=True):
        had = by_set.get(set_id, (0.0, 0.0))
        by_set[set_id] = (had[0] + right, had[1] + pairs)
    return bootstrap_interval(list(by_set.values()), confidence=REWARD_CONFIDENCE)
