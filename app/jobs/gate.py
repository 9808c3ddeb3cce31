"""The promotion gate: a new policy is served only if it beats the active one on held-out prompts.

Judged by the newest reward model: the candidate's win rate against the active policy must clear 0.5 by a margin,
its KL to the SFT reference must stay within a budget, and its perplexity on reference dialogues (written by people
or the demo world, never sampled from a policy) must not regress by more than a tolerance. The decision and every
number behind it are stored with the model version.

The perplexity check catches a policy that breaks (forgets how to write), not one that narrows its style: RL that
raises the demo's gold score stops writing the reference answers' polite openers and closers, and the perplexity of
those answers grows 1.1-2.4x while the values they state move little; a policy trained with no KL leash measured
4,500x (README).
So by default the candidate's perplexity may be at most twice the active policy's (`ppl_tolerance` 1.0).
"""

from dataclasses import dataclass
from typing import Any

GATE_DEFAULTS = {"gate_margin": 0.02, "kl_budget": 10.0, "ppl_tolerance": 1.0, "gate_prompts": 48, "gate_samples": 4}
REFERENCE_DIALOGUES = 64  # the most dialogues perplexity is measured on (the first ones: a fixed set)


@dataclass
class GateResult:
    promote: bool
    reason: str
    metrics: dict[str, float]


def decide(metrics: dict[str, float], *, gate_margin: float, kl_budget: float, ppl_tolerance: float) -> GateResult:
    """Pure decision over measured numbers (unit-tested): win rate, KL, perplexity against the active policy's."""
    win, kl = metrics["win_rate"], metrics["kl"]
    ppl_new, ppl_old = metrics["ppl_candidate"], metrics["ppl_active"]
    if win < 0.5 + gate_margin:
        return GateResult(False, f"win rate {win:.3f} is below {0.5 + gate_margin:.3f}", metrics)
    if kl > kl_budget:
        return GateResult(False, f"KL to the reference {kl:.3f} exceeds the budget {kl_budget}", metrics)
    if ppl_new > ppl_old * (1 + ppl_tolerance):
        return GateResult(
            False,
            f"held-out perplexity {ppl_new:.3f} regressed from {ppl_old:.3f} (more than {1 + ppl_tolerance:.2f}x)",
            metrics,
        )
    ratio = ppl_new / ppl_old if ppl_old else 1.0
    return GateResult(True, f"wins {win:.3f} with KL {kl:.3f} and perplexity {ppl_new:.3f} ({ratio:.2f}x)", metrics)


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
    reward_dir: str,
    prompts: list[list[dict[str, str]]],
    dialogues: list[Any],
    params: dict[str, Any],
) -> GateResult:
    """Measure the candidate against the active policy and apply the gate."""
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
    rm = RewardModel.load(reward_dir)
    prompts, held_out, skipped = _usable(tokenizer, candidate.config.max_seq_len, prompts, dialogues, params)
    sampling = Sampling(temperature=0.7)
    wins = win_rate(candidate, active, tokenizer, prompts, rm, sampling=sampling, n=int(params["gate_samples"]))
    kl = policy_reward_and_kl(candidate, reference, tokenizer, prompts, rm, sampling=sampling)
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
        "gate_pairs": wins["wins"] + wins["ties"] + wins["losses"],
        "gate_dialogues": len(held_out),
        **skipped,
    }
    return decide(
        metrics,
        gate_margin=float(params["gate_margin"]),
        kl_budget=float(params["kl_budget"]),
        ppl_tolerance=float(params["ppl_tolerance"]),
    )
