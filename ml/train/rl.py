"""RL from a reward model: optimise the policy's answers to prompts, with a per-token KL penalty to the frozen SFT
reference so that it cannot drift into text the reward model was never trained on.

One step: sample n answers per prompt (ml/train/rollout.py, the engine's log-probs kept), score them, then update.

    --algo ppo   InstructGPT's PPO. A value model (initialised from the reward model, or the policy) estimates the
                 return; per-token rewards are -beta * KL on every token plus the score on the last; GAE gives
                 advantages (whitened); clipped policy and value losses over a few epochs of minibatches; optional
                 PPO-ptx mixes the pretraining loss back in (--ptx-coef).
    --algo grpo  critic-free: the advantage of an answer is its score minus the mean of its prompt's n answers,
                 divided by their std; the KL to the reference is a k3 loss term (beta * KL), as in DeepSeekMath.
    --algo rloo  critic-free: score - beta * sequence KL, minus the mean of the prompt's other n - 1 answers.

Scores are optionally whitened over the batch, then clipped to +-reward_clip. beta is fixed, or adaptive towards
--kl-target (Ziegler et al.). Every step logs mean reward, KL, entropy, clip fraction, value loss, answer length
and a few sample answers, so reward hacking and collapse are visible. The logged KL is per answer (summed over its
tokens) with the k3 estimator, which is unbiased and never negative; the classic k1 estimate is logged as kl_k1.

Run (CPU, after ml.train.sft and ml.train.reward):
    python -m ml.train.rl --policy /tmp/fw-sft --reward-model /tmp/fw-rm --out /tmp/fw-rl --steps 50 --progress
    python -m ml.train.rl --policy /tmp/fw-sft --reward-model /tmp/fw-rm --out /tmp/fw-grpo --algo grpo
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ml import lora
from ml.checkpoint import save_checkpoint
from ml.data import PackedTokens, read_documents
from ml.demo.world import World
from ml.engine import Sampling
from ml.examples import Message, describe_sources
from ml.model import Transformer, scalar_model_from
from ml.screen import Screened, prompt_fits, screen, skip_metrics
from ml.textstream import decode_text
from ml.tokenizer import Tokenizer
from ml.train import common, rollout
from ml.train.common import ProgressCallback
from ml.train.losses import (
    AdaptiveKLController,
    FixedKLController,
    clip_rewards,
    gae,
    grpo_advantages,
    kl_estimate,
    kl_shaped_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    rloo_advantages,
    value_loss,
)
from ml.train.reward import RewardModel
from ml.train.watch import WATCHED, Watch, overoptimisation

RewardFn = Callable[[list[list[Message]], list[list[int]]], Sequence[float] | Tensor]
ALGOS = ("ppo", "grpo", "rloo")


@dataclass(kw_only=True)
class RLConfig(common.TrainConfig):
    """Flags of an RL run. `prompts` holds 'demo' (the demo world's train-split prompts), JSONL paths, or objects.
    lr is the policy's; steps count rollout + update steps."""

    policy: str  # the SFT model: the starting policy and, unless --reference, the frozen reference
    reward_model: str | None = None  # a reward model directory; from Python a reward_fn may be passed instead
    reference: str | None = None
    prompts: list[Any] = field(default_factory=lambda: ["demo"])
    algo: str = "ppo"
    prompts_per_step: int = 8
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    value_lr: float | None = None  # None: 2 * lr
    ppo_epochs: int = 2
    minibatch_size: int = 16
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    kl_target: float | None = None  # set: adaptive KL coefficient towards this sequence KL
    kl_horizon: int = 10_000
    kl_estimator: str = "k1"
    whiten_rewards: bool = False
    reward_clip: float = 5.0
    stop_penalty: float = 0.0  # subtracted from the score of an answer cut off by --max-new-tokens
    value_init: str | None = None  # "reward" or "policy"; None: reward when there is a reward model
    ptx_coef: float = 0.0
    ptx_data: list[str] = field(default_factory=lambda: ["demo"])
    ptx_batch_size: int = 8
    ptx_block_size: int = 64
    log_samples: int = 2
    demo_seed: int = 0
    # over-optimisation watch (ml/train/watch.py); with --prompts demo the judge is the demo world's gold scorer
    watch_every: int = 0  # 0: off (from Python a Watch may be passed to train instead)
    watch_prompts: int = 16
    # the run's defaults for RL
    steps: int = 100
    warmup: int = 0

    def validate(self) -> None:
        if self.algo not in ALGOS:
            raise ValueError(f"--algo must be one of {ALGOS}, got {self.algo!r}")
        if self.algo != "ppo" and self.samples_per_prompt < 2:
            raise ValueError(f"--algo {self.algo} compares answers to one prompt: --samples-per-prompt must be >= 2")
        self.require_at_least_one("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "ppo_epochs")
        if self.kl_estimator not in ("k1", "k2", "k3") or self.value_init not in (None, "reward", "policy"):
            raise ValueError("--kl-estimator must be k1, k2 or k3 and --value-init reward or policy")
        if self.kl_target is not None and self.kl_target <= 0:
            raise ValueError("--kl-target must be positive")

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.top_k, self.top_p)


@dataclass
class Trainer:
    """Everything an RL run holds between steps."""

    config: RLConfig
    tokenizer: Tokenizer
    policy: Transformer
    reference: Transformer
    value_model: Transformer | None
    optimizers: list[torch.optim.Optimizer]
    kl_ctl: FixedKLController | AdaptiveKLController
    reward_fn: RewardFn
    prompts: list[list[Message]]
    generator: torch.Generator
    ptx: PackedTokens | None = None
    skipped: dict[str, Any] = field(default_factory=dict)  # ml.screen.skip_metrics of the prompts
    trunk: str = ""  # with LoRA: the model directory whose frozen weights the policy's adapters sit on


@dataclass
class Experience:
    """One batch of rollouts with everything the update needs; tensors are (N, R) unless noted."""

    rollout: rollout.Rollout
    scores: Tensor  # (N,) after whitening / clipping: what was optimised
    raw_scores: Tensor  # (N,) as the reward function gave them
    old_logprobs: Tensor
    ref_logprobs: Tensor
    kl: Tensor  # per-token KL penalty estimate (--kl-estimator) of policy vs reference, 0 on padding
    advantages: Tensor
    old_values: Tensor | None = None
    returns: Tensor | None = None


# ---------------------------------------------------------------------------------------------- experience


@torch.no_grad()
def make_experience(tr: Trainer, prompts: list[list[Message]], seed: int) -> Experience:
    """Sample, score, and compute log-probs, KL, values and advantages for one batch of prompts."""
    c = tr.config
    ro = rollout.collect(tr.policy, tr.tokenizer, prompts, c.samples_per_prompt, c.max_new_tokens, c.sampling, seed)
    mask = ro.response_mask
    old, _ = rollout.logprobs(tr.policy, ro, c.sampling)
    ref, _ = rollout.logprobs(tr.reference, ro, c.sampling)
    kl = kl_estimate(old, ref, c.kl_estimator) * mask  # the penalty
    raw = torch.as_tensor(tr.reward_fn(ro.prompts, ro.answers()), dtype=torch.float32).to(mask.device)
    scores = raw - c.stop_penalty * (~ro.finished).float().to(mask.device)
    if c.whiten_rewards:
        scores = masked_whiten(scores, torch.ones_like(scores))
    scores = clip_rewards(scores, c.reward_clip)
    exp = Experience(ro, scores, raw, old, ref, kl, advantages=torch.zeros_like(old))
    beta = tr.kl_ctl.value
    if c.algo == "ppo":
        tr.value_model.eval()
        exp.old_values = rollout.values(tr.value_model, ro)
        rewards = kl_shaped_rewards(scores, kl, mask, beta)
        adv, exp.returns = gae(rewards, exp.old_values, mask, c.gamma, c.lam)
        exp.advantages = masked_whiten(adv, mask)
    elif c.algo == "grpo":
        exp.advantages = grpo_advantages(scores, c.samples_per_prompt)[:, None] * mask
    else:
        sequence_reward = scores - beta * kl.sum(dim=1)
        exp.advantages = rloo_advantages(sequence_reward, c.samples_per_prompt)[:, None] * mask
    return exp


# --------------------------------------------------------------------------------------------------- update


def update(tr: Trainer, exp: Experience) -> dict[str, float]:
    """ppo_epochs passes over shuffled minibatches; returns the mean of each loss statistic."""
    c = tr.config
    tr.policy.train()
    if tr.value_model is not None:
        tr.value_model.train()
    stats: dict[str, list[float]] = {}
    N = exp.scores.numel()
    for _ in range(c.ppo_epochs):
        for rows in torch.randperm(N, generator=tr.generator).split(c.minibatch_size):
            rows = rows.to(exp.scores.device)
            for key, value in _minibatch_step(tr, exp, rows).items():
                stats.setdefault(key, []).append(value)
    return {k: sum(v) / len(v) for k, v in stats.items()}


def _minibatch_step(tr: Trainer, exp: Experience, rows: Tensor) -> dict[str, float]:
    c = tr.config
    ro = exp.rollout.select(rows)
    mask = ro.response_mask
    logp, entropy = rollout.logprobs(tr.policy, ro, c.sampling, with_entropy=True)
    pl = ppo_policy_loss(logp, exp.old_logprobs[rows], exp.advantages[rows], mask, c.clip)
    loss = pl.loss
    out = {"policy_loss": pl.loss.item(), "clip_frac": pl.clip_frac.item(), "approx_kl": pl.approx_kl.item()}
    out["entropy"] = float(masked_mean(entropy.detach(), mask))
    if c.algo == "grpo" and tr.kl_ctl.value > 0:
        loss = loss + tr.kl_ctl.value * masked_mean(kl_estimate(logp, exp.ref_logprobs[rows], "k3"), mask)
    if tr.value_model is not None:
        v = rollout.values(tr.value_model, ro)
        vl = value_loss(v, exp.old_values[rows], exp.returns[rows], mask, c.value_clip)
        loss = loss + c.vf_coef * vl
        out["value_loss"] = vl.item()
    if tr.ptx is not None and c.ptx_coef > 0:
        x, y = tr.ptx.get_batch("train", c.ptx_batch_size, tr.generator)
        ptx_loss = tr.policy(x.to(mask.device), targets=y.to(mask.device))[1]
        loss = loss + c.ptx_coef * ptx_loss
        out["ptx_loss"] = ptx_loss.item()
    for opt in tr.optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    if c.grad_clip > 0:
        for model in (tr.policy, tr.value_model):
            if model is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    for opt in tr.optimizers:
        opt.step()
    return out


def step_stats(tr: Trainer, exp: Experience) -> dict[str, Any]:
    """What a step logs about its rollouts: rewards, KL, lengths and a few samples."""
    mask = exp.rollout.response_mask
    lengths = mask.sum(dim=1).float()
    per_token = {k: kl_estimate(exp.old_logprobs, exp.ref_logprobs, k) * mask for k in ("k1", "k3")}
    samples = [
        {
            "prompt": exp.rollout.prompts[i][-1]["content"],
            "answer": _answer_text(tr.tokenizer, ids),
            "reward": float(exp.raw_scores[i]),
        }
        for i, ids in enumerate(exp.rollout.answers()[: tr.config.log_samples])
    ]
    return {
        "reward": float(exp.raw_scores.mean()),
        "reward_std": float(exp.raw_scores.std()) if exp.raw_scores.numel() > 1 else 0.0,
        "kl": float(per_token["k3"].sum(dim=1).mean()),  # per answer; k3: unbiased and never negative
        "kl_k1": float(per_token["k1"].sum(dim=1).mean()),  # the classic estimate: unbiased, noisy, can be < 0
        "kl_coef": tr.kl_ctl.value,
        "response_len": float(lengths.mean()),
        "finished": float(exp.rollout.finished.float().mean()),
        "samples": samples,
    }


def _answer_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    stops = set(tokenizer.stop_token_ids)
    return decode_text(tokenizer, [t for t in ids if t not in stops], skip_special=False)


# ------------------------------------------------------------------------------------------------- rewards


def reward_model_fn(rm: RewardModel, tokenizer: Tokenizer) -> RewardFn:
    """Score with a reward model: on the exact ids the policy produced when the tokenizers agree, else on text."""
    same = rm.tokenizer.to_str() == tokenizer.to_str()

    def score(prompts: list[list[Message]], answers: list[list[int]]) -> Tensor:
        if same:
            return rm.score_ids([tokenizer.render_prompt(p) + a for p, a in zip(prompts, answers, strict=True)])
        return rm.score(prompts, [_answer_text(tokenizer, a) for a in answers])

    return score


def text_reward_fn(scorer: Callable[[list[Message], str], float], tokenizer: Tokenizer) -> RewardFn:
    """Any (prompt messages, answer text) -> float scorer, e.g. the demo world's gold scorer, as a reward."""

    def score(prompts: list[list[Message]], answers: list[list[int]]) -> list[float]:
        return [scorer(p, _answer_text(tokenizer, a)) for p, a in zip(prompts, answers, strict=True)]

    return score


# --------------------------------------------------------------------------------------------------- setup


def build_trainer(config: RLConfig, reward_fn: RewardFn | None, device: torch.device) -> Trainer:
    """Load the policy, the frozen reference, the reward model and (PPO) the value model; make the optimizers."""
    policy, reference, trunk = common.load_policy_and_reference(
        config.policy, config.reference, config.lora_spec, device
    )
    if policy.scalar_head or reference.scalar_head:
        raise ValueError("the policy and the reference must be language models, not reward/value models")
    if reference.config.vocab_size != policy.config.vocab_size:
        raise ValueError("the reference and the policy have different vocabularies")
    tokenizer = Tokenizer.load(config.policy)
    rm = RewardModel.load(config.reward_model, device=device) if config.reward_model else None
    if reward_fn is None:
        if rm is None:
            raise ValueError("give --reward-model (or, from Python, a reward_fn)")
        reward_fn = reward_model_fn(rm, tokenizer)
    torch.manual_seed(config.seed)
    value_model = None
    if config.algo == "ppo":
        init = config.value_init or ("reward" if rm is not None else "policy")
        if init == "reward" and rm is None:
            raise ValueError("--value-init reward needs --reward-model")
        value_model = _value_model(config, policy, rm.model if init == "reward" and rm else None)
    optimizers = [policy.configure_optimizer(weight_decay=0.0, lr=config.lr)]
    if value_model is not None:
        optimizers.append(value_model.configure_optimizer(weight_decay=0.0, lr=config.value_lr or 2 * config.lr))
    kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.kl_target is not None
        else FixedKLController(config.kl_coef)
    )
    prompts = _prompts(config, tokenizer, policy.config.max_seq_len)
    kept = [p.messages for p in prompts.require()]
    ptx = None
    if config.ptx_coef > 0:
        documents = (
            World(config.demo_seed).pretraining_corpus(2000)
            if config.ptx_data == ["demo"]
            else read_documents(config.ptx_data)
        )
        ptx = PackedTokens(documents, tokenizer, config.ptx_block_size, seed=config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    return Trainer(
        config,
        tokenizer,
        policy,
        reference,
        value_model,
        optimizers,
        kl_ctl,
        reward_fn,
        kept,
        generator,
        ptx,
        skip_metrics(prompts),
        trunk,
    )


def _value_model(config: RLConfig, policy: Transformer, reward_model: Transformer | None) -> Transformer:
    """PPO's critic, from the reward model (or the policy). With LoRA it is that model's frozen trunk, shared, not
    copied, with its own adapters and a trainable copy of the score head."""
    source = reward_model if reward_model is not None else policy
    spec = config.lora_spec
    if spec is None:
        value_model = copy.deepcopy(source) if reward_model is not None else scalar_model_from(policy)
        return value_model.requires_grad_(True)
    value_model = lora.share_trunk(source, scalar_head=True)
    if reward_model is not None:
        value_model.score_head = copy.deepcopy(reward_model.score_head)
    lora.attach(value_model, spec)
    return value_model


def _prompts(config: RLConfig, tokenizer: Tokenizer, max_seq_len: int) -> Screened:
    """The prompts to train on; those that leave no room to answer, or are not prompts, are skipped and counted."""
    if config.prompts == ["demo"]:
        items: list[Any] = [p for p in World(config.demo_seed).prompts(10_000) if p.split == "train"]
    elif "demo" in config.prompts:
        raise ValueError("--prompts takes either 'demo' or paths, not both")
    else:
        items = config.prompts
    return screen(items, "prompt", prompt_fits(tokenizer, max_seq_len, config.max_new_tokens))


# ---------------------------------------------------------------------------------------------------- loop


def train(
    config: RLConfig,
    on_progress: ProgressCallback | None = None,
    *,
    reward_fn: RewardFn | None = None,
    watch: Watch | None = None,
) -> dict[str, Any]:
    """Train config.policy against the reward model (or `reward_fn`) into config.out; returns the metrics and the
    per-step history. One process (RL does not use DDP). `watch` (or --watch-every with demo prompts) measures the
    policy on held-out prompts as it goes and flags over-optimisation (ml/train/watch.py)."""
    config.validate()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("RL runs in one process; start it without torchrun")
    out = config.out
    if (Path(out) / "config.json").exists():
        raise ValueError(f"{out} already holds a checkpoint; choose another --out")
    common.use_threads(config.threads)
    tr = build_trainer(config, reward_fn, common.pick_device(config.device))
    watch = watch or demo_watch(config, tr.tokenizer)
    history = train_steps(tr, common.chain(RLProgress() if config.progress else None, on_progress), watch)
    record = {**asdict(config), "prompts": describe_sources(config.prompts)}
    last = history[-min(5, len(history)) :]
    metrics = {
        "reward_first": history[0]["reward"],
        "reward_last": sum(h["reward"] for h in last) / len(last),
        "kl_last": sum(h["kl"] for h in last) / len(last),
        **tr.skipped,
        **{k: v for k, v in history[-1].items() if k != "samples"},
        **watch_summary(watch),
    }
    if config.lora_spec is not None:
        metrics["adapter_base"] = tr.trunk
    extra = {
        "kind": "policy",
        "parent": config.policy,
        "reference": config.reference or config.policy,
        "reward_model": config.reward_model,
        "rl": record,
        "metrics": metrics,
        "adapter_base": tr.trunk if config.lora_spec is not None else None,
    }
    save_checkpoint(out, tr.policy, tokenizer=tr.tokenizer, extra=extra)
    return {**metrics, "history": history, "out": str(out)}


def train_steps(
    tr: Trainer, on_progress: ProgressCallback | None = None, watch: Watch | None = None
) -> list[dict[str, Any]]:
    """config.steps of sample -> score -> update; returns each step's logged statistics (with the watch's points on
    the steps it measures)."""
    c = tr.config
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    tokens = 0
    for step in range(c.steps):
        lr = common.lr_at(step, c.steps, c.warmup, c.lr, c.lr) if c.warmup else c.lr
        for opt, base in zip(tr.optimizers, (c.lr, c.value_lr or 2 * c.lr), strict=False):
            common.set_lr(opt, base * lr / c.lr)
        picks = torch.randint(0, len(tr.prompts), (c.prompts_per_step,), generator=tr.generator).tolist()
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=tr.generator))
        exp = make_experience(tr, [tr.prompts[i] for i in picks], seed)
        stats = step_stats(tr, exp)  # before the update: the statistics of the policy that sampled
        losses = update(tr, exp)
        tr.kl_ctl.update(stats["kl"], exp.scores.numel())
        tokens += int(exp.rollout.response_mask.sum())
        elapsed = time.perf_counter() - started
        info = {"step": step + 1, "max_steps": c.steps, "loss": losses["policy_loss"], "lr": lr, **losses, **stats}
        info.update(tokens=tokens, tokens_per_s=tokens / max(elapsed, 1e-9), elapsed_s=elapsed)
        info["eta_s"] = elapsed / (step + 1) * (c.steps - step - 1)
        if watch is not None and watch.due(step + 1, c.steps):
            info.update(watch_point(tr, watch, info))
        history.append(info)
        if on_progress is not None:
            on_progress(info)
    return history


def watch_point(tr: Trainer, watch: Watch, info: dict[str, Any]) -> dict[str, float]:
    """Measure the policy on the watch's held-out prompts; `overopt` 1.0 when the trend is flagged."""
    c = tr.config
    point = watch.measure(tr.policy, tr.tokenizer, tr.reward_fn, c.max_new_tokens, c.sampling)
    watch.history.append({"step": info["step"], "kl": info["kl"], **point})
    flag = overoptimisation(watch.history)
    if flag is not None:
        watch.flags.append(flag)
    return {**point, "overopt": 1.0 if flag else 0.0}


def watch_summary(watch: Watch | None) -> dict[str, Any]:
    """The run's watch in its metrics: the judge, the last point, and the first flag raised (if any)."""
    if watch is None or not watch.history:
        return {}
    last = {k: v for k, v in watch.history[-1].items() if k.startswith("watch_")}
    flagged = {"overoptimisation": watch.flags[0]} if watch.flags else {}
    return {"watch_judge_name": watch.judge_name, **last, **flagged}


def demo_watch(config: RLConfig, tokenizer: Tokenizer) -> Watch | None:
    """--watch-every with the demo world's prompts: its held-out prompts, judged by its gold scorer."""
    if config.watch_every <= 0 or config.prompts != ["demo"]:
        return None
    world = World(config.demo_seed)
    prompts = [p.messages for p in world.prompts(10_000) if p.split == "heldout"][: config.watch_prompts]
    judge = text_reward_fn(world.gold_score, tokenizer)
    return Watch(prompts, judge, judge_name="gold", every=config.watch_every)


class RLProgress:
    """One line per step on stderr (reward, KL, entropy, clip fraction, value loss, length) and sample answers
    every `every` steps, so that collapse or reward hacking shows while it happens."""

    def __init__(self, stream: Any = None, every: int = 10) -> None:
        self.stream, self.every = stream if stream is not None else sys.stderr, every

    def __call__(self, info: dict[str, Any]) -> None:
        parts = [
            f"step {info['step']}/{info['max_steps']}",
            f"reward {info['reward']:+.4f}",
            f"kl {info['kl']:.4f}",
            f"entropy {info['entropy']:.3f}",
            f"clip {info['clip_frac']:.3f}",
        ]
        if "value_loss" in info:
            parts.append(f"vf {info['value_loss']:.4f}")
        parts += [f"len {info['response_len']:.1f}", f"beta {info['kl_coef']:.4f}", f"ETA {info['eta_s']:.0f}s"]
        parts += [f"{k.removeprefix('watch_')} {info[k]:.3f}" for k in WATCHED if k in info]
        self.stream.write(" | ".join(parts) + "\n")
        if info.get("overopt"):
            self.stream.write("    warning: the held-out proxy reward rises while the judge disagrees more\n")
        if info["step"] % self.every == 0 or info["step"] == info["max_steps"]:
            for s in info["samples"]:
                self.stream.write(f"    {s['prompt']!r} -> {s['answer']!r} ({s['reward']:+.3f})\n")
        self.stream.flush()


# --------------------------------------------------------------------------------------------------------- CLI


def _summary(metrics: dict[str, Any]) -> str:
    return (
        f"saved {metrics['out']}: reward {metrics['reward_first']:+.4f} -> {metrics['reward_last']:+.4f}, "
        f"KL {metrics['kl_last']:.4f}, {metrics['elapsed_s']:.0f} s"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `flywheel train rl` and `python -m ml.train.rl`."""
    d = RLConfig(policy="", out="")
    add = parser.add_argument
    add("--policy", required=True, metavar="DIR", help="the SFT model to optimise (also the reference by default)")
    add("--reward-model", required=True, metavar="DIR", help="the reward model directory (ml.train.reward)")
    add("--out", required=True, metavar="DIR", help="model directory to write the policy to")
    add("--reference", default=None, metavar="DIR", help="frozen KL reference (default: --policy)")
    add("--prompts", nargs="+", default=d.prompts, metavar="demo|FILE", help="'demo' or JSONL files of prompts")
    add("--algo", choices=ALGOS, default=d.algo, help="ppo (value model + GAE), grpo or rloo (critic-free)")
    add("--prompts-per-step", type=int, default=d.prompts_per_step, help="prompts sampled per step")
    add("--samples-per-prompt", type=int, default=d.samples_per_prompt, help="answers per prompt (n)")
    add("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest answer in tokens")
    add("--temperature", type=float, default=d.temperature, help="sampling temperature (log-probs use the same)")
    add("--top-k", type=int, default=None, help="sample from the k likeliest tokens (log-probs use the same)")
    add("--top-p", type=float, default=None, help="nucleus sampling (log-probs use the same)")
    add("--value-lr", type=float, default=None, help="value model learning rate (default 2 * lr)")
    add("--ppo-epochs", type=int, default=d.ppo_epochs, help="passes over each batch of rollouts")
    add("--minibatch-size", type=int, default=d.minibatch_size, help="answers per gradient step")
    add("--clip", type=float, default=d.clip, help="policy ratio clip range")
    add("--value-clip", type=float, default=d.value_clip, help="value clip range")
    add("--vf-coef", type=float, default=d.vf_coef, help="weight of the value loss")
    add("--gamma", type=float, default=d.gamma, help="discount")
    add("--lam", type=float, default=d.lam, help="GAE lambda")
    add("--kl-coef", type=float, default=d.kl_coef, help="beta: weight of the KL penalty (initial, if adaptive)")
    add("--kl-target", type=float, default=None, help="adapt beta towards this KL per answer (default: fixed)")
    add("--kl-horizon", type=int, default=d.kl_horizon, help="samples over which adaptive beta moves")
    add("--kl-estimator", choices=("k1", "k2", "k3"), default=d.kl_estimator, help="per-token KL in the reward")
    add("--whiten-rewards", action="store_true", help="whiten scores over each batch before clipping")
    add("--reward-clip", type=float, default=d.reward_clip, help="clip scores to +-this; 0 disables")
    add("--stop-penalty", type=float, default=d.stop_penalty, help="subtracted from answers cut by the length limit")
    add("--value-init", choices=("reward", "policy"), default=None, help="initialise the value model from")
    add("--ptx-coef", type=float, default=d.ptx_coef, help="PPO-ptx: weight of the pretraining loss (0: off)")
    add("--ptx-data", nargs="+", default=d.ptx_data, metavar="demo|PATH", help="pretraining text for PPO-ptx")
    add("--log-samples", type=int, default=d.log_samples, help="sample answers logged per step")
    add("--demo-seed", type=int, default=d.demo_seed, help="seed of the demo world")
    add(
        "--watch-every",
        type=int,
        default=d.watch_every,
        help="with --prompts demo: held-out proxy reward and gold every N steps; flags over-optimisation (0: off)",
    )
    add("--watch-prompts", type=int, default=d.watch_prompts, help="held-out prompts the watch samples")
    common.add_run_arguments(
        parser,
        d,
        steps="rollout + update steps (default %(default)s)",
        lr="policy learning rate (default %(default)s)",
        grad_clip="clip each model's gradient norm; 0 disables",
        seed="seed for prompts, sampling and minibatches",
        progress="print one line per step on stderr",
    )


def main(args: argparse.Namespace) -> int:
    return common.run_cli(RLConfig, train, args, "rl", _summary)


if __name__ == "__main__":
    sys.exit(common.command("ml.train.rl", __doc__, add_arguments, main))
