"""RL: log-probs are those of the sampling distribution, the KL of a policy to itself is exactly 0, and PPO, GRPO
and RLOO really raise a programmatic reward on a tiny model (fixed seed)."""

import argparse
from pathlib import Path

import pytest
import torch

from ml.checkpoint import load_checkpoint
from ml.demo.world import World
from ml.engine import Sampling
from ml.evaluate import policy_reward_and_kl
from ml.tokenizer import Tokenizer
from ml.train.rl import RLConfig, add_arguments, build_trainer, main, make_experience, step_stats, train

pytestmark = pytest.mark.usefixtures("one_thread")
TARGET = set(range(100, 140))  # 40 of the 400 token ids


def target_fraction(prompts, answers) -> list[float]:
    """The reward: the share of an answer's tokens that fall in TARGET (about 0.1 for a random model)."""
    return [sum(t in TARGET for t in a) / max(1, len(a)) for a in answers]


@pytest.mark.parametrize("sampling", [Sampling(1.0), Sampling(0.7, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_kl_of_a_policy_against_itself_is_zero(tiny_base: Path, tmp_path: Path, sampling: Sampling, algo) -> None:
    config = RLConfig(
        policy=str(tiny_base),
        out=str(tmp_path / "rl"),
        algo=algo,
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        max_new_tokens=10,
        device="cpu",
    )
    tr = build_trainer(config, target_fraction, torch.device("cpu"))
    assert tr.reference is not tr.policy
    exp = make_experience(tr, tr.prompts[:4], seed=0)
    mask = exp.rollout.response_mask
    assert mask.any() and torch.equal(exp.kl, torch.zeros_like(exp.kl))
    assert torch.equal(exp.old_logprobs, exp.ref_logprobs)
    stats = step_stats(tr, exp)
    assert stats["kl"] == 0.0 and stats["kl_k1"] == 0.0
    # the recomputed log-probs are those the engine sampled with (temperature, top-k and top-p included)
    torch.testing.assert_close(exp.old_logprobs[mask], exp.rollout.sample_logprobs[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_rl_raises_a_programmatic_reward(tiny_base: Path, tmp_path: Path, algo: str) -> None:
    config = RLConfig(
        policy=str(tiny_base),
        out=str(tmp_path / algo),
        algo=algo,
        steps=30,
        prompts_per_step=4,
        samples_per_prompt=4,
        max_new_tokens=12,
        lr=3e-3,
        kl_coef=0.01,
        minibatch_size=8,
        device="cpu",
    )
    metrics = train(config, reward_fn=target_fraction)
    assert all(h["kl"] >= 0 for h in metrics["history"])  # k3 per answer: never negative
    assert {"reward", "kl", "entropy", "clip_frac", "response_len", "samples"} <= metrics["history"][0].keys()
    assert ("value_loss" in metrics["history"][0]) == (algo == "ppo")
    policy, meta = load_checkpoint(config.out)
    base, _ = load_checkpoint(tiny_base)
    assert meta["kind"] == "policy" and meta["rl"]["algo"] == algo
    tok = Tokenizer.load(config.out)
    prompts = [p.messages for p in World(0).prompts(200) if p.split == "heldout"][:16]

    def judge(prompt, answer):  # the same reward, on text: re-encode the answer
        return target_fraction(None, [tok.encode(answer)])[0]

    args = dict(n=4, max_new_tokens=12, seed=123)
    before = policy_reward_and_kl(base, base, tok, prompts, judge, **args)
    after = policy_reward_and_kl(policy, base, tok, prompts, judge, **args)
    assert before["kl"] == 0.0
    assert after["reward_mean"] > before["reward_mean"] + 0.1, (before, after)  # measured: about +0.2 in 30 steps
    assert 0 < after["kl"] < 50


def test_ppo_with_a_reward_model_value_init_ptx_and_adaptive_kl(tiny_base: Path, tmp_path: Path) -> None:
    from ml.checkpoint import save_checkpoint
    from ml.model import scalar_model_from

    policy, _ = load_checkpoint(tiny_base)
    rm_dir = save_checkpoint(tmp_path / "rm", scalar_model_from(policy), tokenizer=Tokenizer.load(tiny_base))
    config = RLConfig(
        policy=str(tiny_base),
        reward_model=str(rm_dir),
        out=str(tmp_path / "rl"),
        steps=2,
        prompts_per_step=2,
        samples_per_prompt=2,
        max_new_tokens=6,
        ptx_coef=0.1,
        ptx_block_size=32,
        kl_target=1.0,
        top_k=50,
        whiten_rewards=True,
        stop_penalty=0.5,
        device="cpu",
    )
    metrics = train(config)
    assert "ptx_loss" in metrics["history"][0] and metrics["history"][-1]["kl_coef"] != config.kl_coef
    assert "value_loss" in metrics


def test_cli_errors(tiny_base: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--policy",
            str(tiny_base),
            "--reward-model",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "o"),
            "--algo",
            "grpo",
            "--samples-per-prompt",
            "1",
        ]
    )
    assert main(args) == 2
    assert "--samples-per-prompt must be >= 2" in capsys.readouterr().err
    args.samples_per_prompt = 2
    assert main(args) == 2
    assert "none" in capsys.readouterr().err
