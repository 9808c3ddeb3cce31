"""Evaluation: a policy against itself wins exactly half and has KL 0; perplexities agree with their losses;
any scorer plugs in."""

import math
from pathlib import Path

import pytest

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.engine import Sampling
from ml.evaluate import dialogue_perplexity, policy_reward_and_kl, text_perplexity, win_rate
from ml.examples import load_dialogues
from ml.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_policy_against_itself(tiny_base: Path) -> None:
    policy, _ = load_checkpoint(tiny_base)
    other, _ = load_checkpoint(tiny_base)
    tok = Tokenizer.load(tiny_base)
    world = World(0)
    prompts = [p.messages for p in world.prompts(40) if p.split == "heldout"][:6]
    result = win_rate(policy, other, tok, prompts, world.gold_score, max_new_tokens=8, seed=1)
    assert result["win_rate"] == 0.5 and result["ties"] == len(prompts)  # same seed, same weights: same answers
    longer = win_rate(policy, other, tok, prompts, lambda p, a: float(len(a)), max_new_tokens=8, seed=1, n=3)
    assert longer["wins"] + longer["ties"] + longer["losses"] == 3 * len(prompts) and longer["win_rate"] == 0.5
    assert result["prompt_wins"] == [0.5] * len(prompts)  # one tie per prompt: half a win each
    assert len(longer["prompt_wins"]) == len(prompts) and sum(longer["prompt_wins"]) == 0.5 * 3 * len(prompts)

    def length(prompt, answer):  # any (prompt, answer) -> float plugs in
        return float(len(answer))

    stats = policy_reward_and_kl(policy, other, tok, prompts, length, n=2, max_new_tokens=8, sampling=Sampling(0.8, 30))
    assert stats["kl"] == 0.0 and stats["kl_k1"] == 0.0 and stats["reward_mean"] > 0


def test_perplexities(tiny_base: Path) -> None:
    model, _ = load_checkpoint(tiny_base)
    tok = Tokenizer.load(tiny_base)
    world = World(0)
    d = dialogue_perplexity(model, tok, load_dialogues(world.sft_dialogues(8)))
    t = text_perplexity(model, tok, world.pretraining_corpus(8))
    for out in (d, t):
        assert math.isclose(out["ppl"], math.exp(out["loss"])) and 0 < out["loss"] < 2 * math.log(tok.vocab_size)
