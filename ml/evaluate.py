"""Evaluation of each stage: held-out perplexity, reward-model accuracy, a policy's mean reward and KL to its
reference, and the win rate of two policies judged by a reward model or by any scorer (the demo's gold scorer).

A scorer is any `(prompt messages, answer text) -> float`; a `RewardModel` is one (and is scored in batches).
Sampling is seeded, so an evaluation repeats exactly.

Run (CPU, after the trainers):
    python -m ml.evaluate --policy /tmp/fw-rl --reference /tmp/fw-sft --reward-model /tmp/fw-rm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.engine import Sampling
from ml.examples import Dialogue, Message, Ranking, encode_ranking, tokenize_dialogue
from ml.textstream import decode_text
from ml.tokenizer import Tokenizer
from ml.train import rollout
from ml.train.losses import bradley_terry_loss, kl_estimate, pairwise_accuracy
from ml.train.reward import RewardModel
from ml.train.sft import heldout_loss

Scorer = Callable[[list[Message], str], float]


def score_answers(scorer: Scorer, prompts: Sequence[list[Message]], answers: Sequence[str]) -> Tensor:
    """(N,) scores; a RewardModel scores in batches, any other scorer one answer at a time."""
    if isinstance(scorer, RewardModel):
        return scorer.score(list(prompts), list(answers))
    return torch.tensor([float(scorer(p, a)) for p, a in zip(prompts, answers, strict=True)])


def dialogue_perplexity(model: nn.Module, tokenizer: Tokenizer, dialogues: list[Dialogue]) -> dict[str, float]:
    """Held-out cross-entropy (nats/token) and perplexity on the assistant tokens of dialogues."""
    max_len = model.config.max_seq_len
    examples = [tokenize_dialogue(tokenizer, d, max_len) for d in dialogues]
    loss = heldout_loss(model, examples, int(tokenizer.pad_id or 0))
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def text_perplexity(model: nn.Module, tokenizer: Tokenizer, documents: list[str]) -> dict[str, float]:
    """Cross-entropy and perplexity of plain documents (<|bos|> text <|eos|>, each cut to the model's length)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for doc in documents:
        ids = [i for i in (tokenizer.bos_id, *tokenizer.encode(doc), tokenizer.eos_id) if i is not None]
        ids = torch.tensor(ids[: model.config.max_seq_len + 1], device=device)[None]
        logits, _ = model(ids[:, :-1])
        total += float(nn.functional.cross_entropy(logits[0].float(), ids[0, 1:], reduction="sum"))
        count += ids.size(1) - 1
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


@torch.no_grad()
def reward_accuracy(reward_model: RewardModel, rankings: list[Ranking], batch_size: int = 16) -> dict[str, float]:
    """Pairwise accuracy of a reward model over every ordered pair of the rankings, and its mean BT loss."""
    tok, max_len = reward_model.tokenizer, reward_model.max_len
    right, pairs, loss = 0.0, 0, 0.0
    for i in range(0, len(rankings), batch_size):
        chunk = [encode_ranking(tok, r, max_len) for r in rankings[i : i + batch_size]]
        flat = [c for r in chunk for c in r.candidates]
        scores = reward_model.score_encoded(flat)
        K = max(len(r.ranks) for r in chunk)
        grid, ranks = torch.zeros(len(chunk), K), torch.zeros(len(chunk), K, dtype=torch.long)
        at = 0
        for b, r in enumerate(chunk):
            grid[b, : len(r.ranks)], ranks[b, : len(r.ranks)] = scores[at : at + len(r.ranks)], torch.tensor(r.ranks)
            at += len(r.ranks)
        acc, n = pairwise_accuracy(grid, ranks)
        right, pairs = right + float(acc) * int(n), pairs + int(n)
        loss += float(bradley_terry_loss(grid, ranks)) * len(chunk)
    return {"accuracy": right / max(pairs, 1), "pairs": pairs, "loss": loss / max(len(rankings), 1)}


@torch.no_grad()
def ranking_pair_counts(
    reward_model: RewardModel, rankings: list[Ranking], batch_size: int = 32
) -> list[tuple[float, int]]:
    """Per ranking: (its ordered pairs the reward model scores the right way round, an exact tie counting half; its
    number of ordered pairs). Kept per ranking so that an interval can resample whole rankings or sets."""
    encoded = [encode_ranking(reward_model.tokenizer, r, reward_model.max_len) for r in rankings]
    scores = reward_model.score_encoded([c for r in encoded for c in r.candidates], batch_size).tolist()
    counts, at = [], 0
    for r in encoded:
        s, ranks = scores[at : at + len(r.ranks)], r.ranks
        at += len(ranks)
        better = [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]
        right = sum(1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for i, j in better)
        counts.append((right, len(better)))
    return counts


def sample_answers(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[Message]],
    n: int = 1,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
) -> tuple[rollout.Rollout, list[str]]:
    """n answers per prompt (prompt-major) as a rollout and as text (stop tokens removed)."""
    ro = rollout.collect(model, tokenizer, prompts, n, max_new_tokens, sampling, seed)
    stops = set(tokenizer.stop_token_ids)
    return ro, [decode_text(tokenizer, [t for t in a if t not in stops], skip_special=False) for a in ro.answers()]


@torch.no_grad()
def policy_reward_and_kl(
    policy: nn.Module,
    reference: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[Message]],
    scorer: Scorer,
    n: int = 1,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
) -> dict[str, float]:
    """Mean (and std) score of the policy's sampled answers, and its KL to the reference per answer (k3: unbiased,
    never negative; k1 beside it), both under the distribution that sampled."""
    ro, texts = sample_answers(policy, tokenizer, prompts, n, max_new_tokens, sampling, seed)
    scores = score_answers(scorer, ro.prompts, texts)
    logp, _ = rollout.logprobs(policy, ro, sampling)
    ref, _ = rollout.logprobs(reference, ro, sampling)
    mask = ro.response_mask
    kl = {k: (kl_estimate(logp, ref, k) * mask).sum(dim=1).mean().item() for k in ("k1", "k3")}
    return {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
        "kl": kl["k3"],
        "kl_k1": kl["k1"],
        "response_len": float(mask.sum(dim=1).float().mean()),
    }


@torch.no_grad()
def win_rate(
    policy_a: nn.Module,
    policy_b: nn.Module,
    tokenizer: Tokenizer,
    prompts: list[list[Message]],
    scorer: Scorer,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    n: int = 1,
) -> dict[str, Any]:
    """How often policy A's answer to a prompt scores above policy B's (ties count half), and both mean scores.
    `n` pairs per prompt (the i-th answer of A against the i-th of B, same seeds): more pairs, less noise.
    `prompt_wins`: each prompt's wins out of its n pairs, for an interval over prompts."""
    ro, a = sample_answers(policy_a, tokenizer, prompts, n, max_new_tokens, sampling, seed)
    _, b = sample_answers(policy_b, tokenizer, prompts, n, max_new_tokens, sampling, seed)
    sa, sb = score_answers(scorer, ro.prompts, a), score_answers(scorer, ro.prompts, b)
    wins, ties = int((sa > sb).sum()), int((sa == sb).sum())
    per_prompt = ((sa > sb).float() + 0.5 * (sa == sb).float()).reshape(len(prompts), n).sum(dim=1)
    return {
        "win_rate": (wins + 0.5 * ties) / max(len(a), 1),
        "prompt_wins": per_prompt.tolist(),  # wins (ties half) of each prompt's n pairs: an interval resamples prompts
        "wins": wins,
        "ties": ties,
        "losses": len(a) - wins - ties,
        "score_a": float(sa.mean()),
        "score_b": float(sb.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    """Mean reward and KL of a policy, and its win rate over the reference, on the demo world's held-out prompts
    (scored by --reward-model, or by the demo's gold scorer when none is given)."""
    parser = argparse.ArgumentParser(prog="python -m ml.evaluate", description=main.__doc__)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--reward-model", default=None)
    parser.add_argument("--prompts", type=int, default=64, help="held-out demo prompts to use")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    policy, _ = load_checkpoint(args.policy)
    reference, _ = load_checkpoint(args.reference)
    tokenizer = Tokenizer.load(args.policy)
    world = World(0)
    scorer: Any = RewardModel.load(args.reward_model) if args.reward_model else world.gold_score
    prompts = [p.messages for p in world.prompts(10_000) if p.split == "heldout"][: args.prompts]
    out = policy_reward_and_kl(policy, reference, tokenizer, prompts, scorer, max_new_tokens=args.max_new_tokens)
    out.update(win_rate(policy, reference, tokenizer, prompts, scorer, args.max_new_tokens, seed=args.seed))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
