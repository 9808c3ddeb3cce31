"""The whole pipeline on the demo world, with numbers: does each stage of the flywheel make the model better?

    pretrain -> SFT (on dialogues of mixed quality) -> sample K=4 candidates per train prompt from the SFT policy
    (--label-sets such sets per prompt) -> simulated annotators rank them (and thumb one) -> reward model
    -> RL (PPO, or GRPO / RLOO) [-> DPO]
    -> evaluate every policy on held-out prompts against the demo world's gold scorer

Every number is measured on held-out prompts (questions never seen in SFT, annotation or RL):

    gold        mean gold score of sampled answers (temperature 1, the distribution RL optimises), and of greedy ones
    rm_acc      the reward model's pairwise accuracy against gold on held-out candidate pairs (SFT samples, gold ties
                left out): did it learn the truth, not just the annotators' noise?
    kl          KL(policy || SFT reference) per answer, summed over its tokens (k3 estimator, sampled at T=1)

The last line is `demo_flywheel: gold_sft=X gold_rl=Y rm_acc=Z kl=K seconds=S` (gold at T=1, of the first --algo).
The rankings and thumbs are written as JSONL under --out and read back through ml/examples.py, so the experiment's
data takes the same path (and the same checks, naming the bad record) as a user's.

Run (CPU):  python -m ml.demo.experiment --quick                     (about 5 minutes on 2 cores)
            python -m ml.demo.experiment --algo ppo rloo grpo --dpo --seed 1 --out /tmp/exp-s1  (README's table)
            python -m ml.demo.experiment --summarize /tmp/exp-s0 /tmp/exp-s1 /tmp/exp-s2  (mean ± std over seeds)
            flywheel demo experiment --quick --out /tmp/fw-exp
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ml.checkpoint import load_checkpoint
from ml.demo.world import Prompt, SimulatedAnnotator, World
from ml.engine import Sampling
from ml.evaluate import policy_reward_and_kl, reward_accuracy, sample_answers
from ml.examples import load_rankings
from ml.tokenizer import Tokenizer
from ml.train import dpo, pretrain, reward, rl, sft
from ml.train.dpo import DPOConfig
from ml.train.pretrain import PretrainConfig
from ml.train.reward import RewardConfig, RewardModel
from ml.train.rl import ALGOS, RLConfig
from ml.train.sft import SFTConfig

K = 4  # candidates per prompt
Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Scale:
    """How big each stage is. `full` is the README's table; `quick` the 10-minute check; `tiny` the CI test."""

    n_layer: int
    n_embd: int
    demo_docs: int
    pretrain_steps: int
    sft_dialogues: int
    sft_steps: int
    annotated_prompts: int  # train prompts that get K candidates ranked
    reward_steps: int
    rl_steps: int
    dpo_steps: int
    eval_prompts: int  # held-out prompts
    eval_samples: int = 4  # sampled answers per held-out prompt
    label_sets: int = 1  # candidate sets of K ranked per annotated prompt in round 1 (the annotation budget)
    kl_coef: float = 0.5  # RL's KL penalty: strong, since the reward model is wrong off its data (README)
    pretrain_batch: int = 32
    block_size: int = 128
    max_new_tokens: int = 64


SCALES = {
    "full": Scale(4, 128, 8000, 1500, 2000, 400, 1024, 300, 80, 200, 160, label_sets=4),
    "quick": Scale(4, 96, 6000, 700, 1500, 300, 256, 120, 40, 120, 96),
    "tiny": Scale(
        2,
        64,
        1500,
        150,
        400,
        100,
        64,
        60,
        16,
        40,
        24,
        eval_samples=2,
        pretrain_batch=16,
        max_new_tokens=40,
        kl_coef=0.1,
    ),  # 16 RL steps: a strong penalty would leave the policy as it was
}


# ExperimentConfig fields that, when set, replace the Scale's field of the same name and must be at least 1.
COUNT_OVERRIDES = ("pretrain_steps", "sft_steps", "reward_steps", "rl_steps", "dpo_steps", "label_sets")


@dataclass
class ExperimentConfig:
    """Flags of an experiment. Step counts left at None come from the scale (`quick` or not)."""

    out: str | None = None  # work directory; None: a new temporary one
    seed: int = 0  # the demo world's facts and every stage's seed
    quick: bool = False
    scale: str | None = None  # overrides quick: "full", "quick" or "tiny"
    algos: list[str] = field(default_factory=lambda: ["ppo"])
    rounds: int = 1  # turns of the flywheel: round r annotates the round r-1 policy's answers, retrains RM and RL
    dpo: bool = False
    noise: float = 0.1  # std of the annotators' noise on the gold score
    annotators: int = 3
    bad_fraction: float = 0.5  # share of SFT answers that are wrong, rambling or rude
    sft_lr: float = 1e-3  # twice SFTConfig's default: the chat format is new to a base model this small
    rl_lr: float = 1e-4
    dpo_beta: float = 0.1
    pretrain_steps: int | None = None
    sft_steps: int | None = None
    reward_steps: int | None = None
    rl_steps: int | None = None
    dpo_steps: int | None = None
    label_sets: int | None = None
    kl_coef: float | None = None
    threads: int = 1  # torch CPU threads: one is fastest for models this small on a shared machine
    device: str = "auto"
    progress: bool = False

    def validate(self) -> None:
        if bad := [a for a in self.algos if a not in ALGOS]:
            raise ValueError(f"--algo must be among {ALGOS}, got {bad}")
        if not self.algos:
            raise ValueError("give at least one --algo")
        if self.scale is not None and self.scale not in SCALES:
            raise ValueError(f"--scale must be one of {sorted(SCALES)}")
        if self.kl_coef is not None and self.kl_coef < 0:
            raise ValueError("--kl-coef must be >= 0")
        if self.noise < 0 or not 0 <= self.bad_fraction <= 1 or self.annotators < 1:
            raise ValueError("--noise must be >= 0, --bad-fraction in [0, 1] and --annotators >= 1")
        if self.rounds < 1:
            raise ValueError("--rounds must be at least 1")
        if any(getattr(self, s) is not None and getattr(self, s) < 1 for s in COUNT_OVERRIDES):
            raise ValueError("step counts and --label-sets must be at least 1")

    def resolved_scale(self) -> Scale:
        """The scale with the flags that override it (step counts, label sets, KL coefficient) applied."""
        scale = SCALES[self.scale or ("quick" if self.quick else "full")]
        names = (*COUNT_OVERRIDES, "kl_coef")
        return replace(scale, **{s: getattr(self, s) for s in names if getattr(self, s) is not None})


# ------------------------------------------------------------------------------------------------- progress


class StageBar:
    """One progress line per stage on stderr: redrawn in place on a terminal, every 10% in a log file."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, info: dict[str, Any]) -> None:
        step, total = info["step"], max(1, info["max_steps"])
        filled = round(20 * step / total)
        parts = [f"{info['stage']:<10} [{'#' * filled}{'.' * (20 - filled)}] {step}/{total}"]
        for key in ("loss", "reward", "kl", "val_loss", "val_acc"):
            if isinstance(info.get(key), float):
                parts.append(f"{key} {info[key]:.4f}")
        if "eta_s" in info:
            parts.append(f"ETA {info['eta_s']:.0f}s")
        line, last = " | ".join(parts), step >= total
        if self.tty:
            self.stream.write("\r" + line + "\033[K" + ("\n" if last else ""))
        elif last or step % max(1, total // 10) == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def _stage_progress(stage: str, sinks: list[Progress]) -> Progress:
    def call(info: dict[str, Any]) -> None:
        tagged = {**info, "stage": stage}
        for sink in sinks:
            sink(tagged)

    return call


def _counter(stage: str, total: int, report: Progress) -> Callable[[int], None]:
    """Progress of a stage that is not a trainer: report(done) with an ETA from the elapsed time."""
    started = time.perf_counter()

    def tick(done: int) -> None:
        elapsed = time.perf_counter() - started
        report({"step": done, "max_steps": total, "eta_s": elapsed / max(done, 1) * (total - done)})

    return tick


# ------------------------------------------------------------------------------------ candidates and labels


def sample_candidate_sets(
    policy_dir: Path,
    prompts: list[Prompt],
    k: int,
    max_new_tokens: int,
    seed: int,
    tick: Callable[[int], None],
    min_answers: int = 2,
) -> tuple[list[tuple[list[dict[str, str]], list[str]]], dict[str, int]]:
    """K answers per prompt sampled from a policy at temperature 1, as (prompt, distinct non-empty answers) sets.

    An empty answer cannot be ranked (a ranking record rejects it) and identical answers are one answer to a
    reader, so both are dropped from a set, and a set left with fewer than `min_answers` answers is dropped; both
    are counted.
    """
    model, _ = load_checkpoint(policy_dir)
    tokenizer = Tokenizer.load(policy_dir)
    sets, counts = [], {"sets": 0, "empty_answers": 0, "duplicate_answers": 0, "dropped_sets": 0}
    chunk = 32
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        _, texts = sample_answers(
            model, tokenizer, [p.messages for p in part], k, max_new_tokens, Sampling(1.0), seed + start
        )
        for i, p in enumerate(part):
            answers = texts[i * k : (i + 1) * k]
            kept = [a for a in dict.fromkeys(answers) if a.strip()]
            counts["empty_answers"] += sum(not a.strip() for a in answers)
            counts["duplicate_answers"] += len([a for a in answers if a.strip()]) - len(kept)
            if len(kept) >= min_answers:
                sets.append((p.messages, kept))
            else:
                counts["dropped_sets"] += 1
        tick(min(start + chunk, len(prompts)))
    counts["sets"] = len(sets)
    return sets, counts


def annotate(
    world: World, sets: list[tuple[list[dict[str, str]], list[str]]], config: ExperimentConfig, directory: Path
) -> tuple[Path, Path, dict[str, float]]:
    """Rankings (each set by one of `annotators` simulated annotators, in turn) and thumbs (one end user per set, on
    its first answer) written as JSONL; and how often a second annotator agrees with the first on an ordered pair."""
    pool = [SimulatedAnnotator(world, config.noise, seed=1000 * config.seed + i) for i in range(config.annotators)]
    users = SimulatedAnnotator(world, config.noise, seed=1000 * config.seed + 999)
    rankings, thumbs, agree, pairs = [], [], 0, 0
    for n, (prompt, answers) in enumerate(sets):
        ranks = pool[n % len(pool)].rank(prompt, answers)
        rankings.append({"prompt": prompt, "answers": answers, "ranking": ranks})
        thumbs.append({"prompt": prompt, "completion": answers[0], "label": users.thumb(prompt, answers[0])})
        second = pool[(n + 1) % len(pool)].rank(prompt, answers)
        for i in range(len(answers)):
            for j in range(i + 1, len(answers)):
                if ranks[i] != ranks[j] and second[i] != second[j]:
                    agree += (ranks[i] < ranks[j]) == (second[i] < second[j])
                    pairs += 1
    directory.mkdir(parents=True, exist_ok=True)
    paths = directory / "rankings.jsonl", directory / "thumbs.jsonl"
    for path, records in zip(paths, (rankings, thumbs), strict=True):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    stats = {
        "rankings": len(rankings),
        "thumbs": len(thumbs),
        "thumbs_up": sum(t["label"] for t in thumbs) / len(thumbs),
    }
    stats["annotator_agreement"] = agree / max(pairs, 1)
    return paths[0], paths[1], stats


def _next_round_data(
    config: ExperimentConfig,
    world: World,
    scale: Scale,
    out: Path,
    dirs: tuple[str, str],
    prompts: list[Prompt],
    seed: int,
    report: Progress,
) -> tuple[Path, Path, dict[str, float]]:
    """The next turn's labels: per train prompt, K/2 answers of the last policy beside K/2 of the SFT model, ranked
    by the simulated annotators. The policy's answers are the ones the last reward model over-rated (fluent but
    wrong, off-topic), so ranking them against SFT's teaches the next reward model what it missed."""
    policy, data = dirs
    tick = _counter("sample", 2 * len(prompts), report)
    mine, _ = sample_candidate_sets(out / policy, prompts, K // 2, scale.max_new_tokens, seed, tick, min_answers=1)
    theirs, _ = sample_candidate_sets(
        out / "sft", prompts, K // 2, scale.max_new_tokens, seed + 1, lambda n: tick(len(prompts) + n), min_answers=1
    )
    from_sft = {json.dumps(p): answers for p, answers in theirs}
    sets = []
    for prompt, answers in mine:
        merged = list(dict.fromkeys(answers + from_sft.get(json.dumps(prompt), [])))
        if len(merged) >= 2:
            sets.append((prompt, merged))
    return annotate(world, sets, config, out / data)


def merge_label_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """Counts summed and rates averaged (weighted by rankings) over several annotated files."""
    n = sum(p["rankings"] for p in parts)
    merged = {k: sum(p[k] for p in parts) for k in ("rankings", "thumbs")}
    for rate in ("thumbs_up", "annotator_agreement"):
        merged[rate] = sum(p[rate] * p["rankings"] for p in parts) / max(n, 1)
    return merged


def gold_rankings(world: World, sets: list[tuple[list[dict[str, str]], list[str]]], path: Path) -> Path:
    """Held-out candidate sets ranked by the gold scorer itself (noise 0; equal gold scores tie), as JSONL."""
    truth = SimulatedAnnotator(world, noise=0.0)
    records = [{"prompt": p, "answers": a, "ranking": truth.rank(p, a)} for p, a in sets]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- stages


def _heldout_prompts(world: World, n: int) -> list[Prompt]:
    return [p for p in world.prompts(10_000) if p.split == "heldout"][:n]


def evaluate_policy(
    world: World, policy_dir: Path, reference_dir: Path, prompts: list[Prompt], scale: Scale, seed: int
) -> dict[str, float]:
    """Gold score of the policy's answers on held-out prompts, sampled at T=1 and greedy, and its KL to the
    reference (per answer, on the T=1 samples, where it is an honest estimate of KL(policy || reference))."""
    policy, _ = load_checkpoint(policy_dir)
    reference, _ = load_checkpoint(reference_dir)
    tokenizer = Tokenizer.load(policy_dir)
    messages = [p.messages for p in prompts]
    sampled = policy_reward_and_kl(
        policy,
        reference,
        tokenizer,
        messages,
        world.gold_score,
        n=scale.eval_samples,
        max_new_tokens=scale.max_new_tokens,
        sampling=Sampling(1.0),
        seed=seed,
    )
    _, greedy = sample_answers(policy, tokenizer, messages, 1, scale.max_new_tokens, Sampling(0.0), seed)
    gold_greedy = sum(world.gold_score(m, a) for m, a in zip(messages, greedy, strict=True)) / len(messages)
    return {
        "gold": sampled["reward_mean"],
        "gold_greedy": gold_greedy,
        "kl": sampled["kl"],
        "response_len": sampled["response_len"],
    }


def _pretrain_stage(config: ExperimentConfig, scale: Scale, out: Path, report: Progress) -> dict[str, Any]:
    m = pretrain.train(
        PretrainConfig(
            out=str(out / "base"),
            steps=scale.pretrain_steps,
            batch_size=scale.pretrain_batch,
            block_size=scale.block_size,
            n_layer=scale.n_layer,
            n_embd=scale.n_embd,
            n_head=4,
            warmup=min(100, scale.pretrain_steps // 10),
            demo_docs=scale.demo_docs,
            demo_seed=config.seed,
            seed=config.seed,
            eval_every=0,
            save_every=0,
            device=config.device,
        ),
        on_progress=report,
    )
    keys = ("params", "val_loss", "val_ppl", "unigram_entropy")
    return {k: m[k] for k in keys}


def _sft_stage(config: ExperimentConfig, world: World, scale: Scale, out: Path, report: Progress) -> dict[str, Any]:
    dialogues = world.sft_dialogues(scale.sft_dialogues, seed=config.seed, bad_fraction=config.bad_fraction)
    m = sft.train(
        SFTConfig(
            base=str(out / "base"),
            out=str(out / "sft"),
            data=dialogues,
            steps=scale.sft_steps,
            lr=config.sft_lr,
            eval_every=0,
            seed=config.seed,
            device=config.device,
        ),
        on_progress=report,
    )
    return {
        "dialogues": len(dialogues),
        "bad_fraction": config.bad_fraction,
        "val_loss_start": m["val_loss_start"],
        "val_loss": m["val_loss"],
    }


def _reward_stage(
    config: ExperimentConfig,
    scale: Scale,
    out: Path,
    rm: str,
    data: tuple[list[Path], list[Path], Path],
    report: Progress,
) -> dict[str, Any]:
    """A reward model `rm` from the SFT model on every ranking and thumb file so far; steps grow with the rounds."""
    rankings, thumbs, heldout = data
    m = reward.train(
        RewardConfig(
            sft=str(out / "sft"),
            out=str(out / rm),
            rankings=rankings,
            thumbs=thumbs,
            steps=scale.reward_steps * len(rankings),
            eval_every=0,
            seed=config.seed,
            device=config.device,
        ),
        on_progress=report,
    )
    gold = reward_accuracy(RewardModel.load(out / rm), load_rankings([heldout]))
    return {
        "val_acc_annotators": m.get("val_acc", math.nan),
        "val_thumb_acc": m.get("val_thumb_acc", math.nan),
        "rm_acc_gold": gold["accuracy"],
        "gold_pairs": gold["pairs"],
    }


def _rl_stage(
    config: ExperimentConfig,
    algo: str,
    scale: Scale,
    out: Path,
    dirs: tuple[str, str],
    train: list[Prompt],
    report: Progress,
):
    """RL from the SFT model against the reward model dirs[0], into dirs[1]: every round restarts from SFT, so a
    round's gain comes from its better reward model, not from more RL steps."""
    rm, policy = dirs
    m = rl.train(
        RLConfig(
            policy=str(out / "sft"),
            out=str(out / policy),
            reward_model=str(out / rm),
            prompts=train,
            algo=algo,
            steps=scale.rl_steps,
            max_new_tokens=scale.max_new_tokens,
            lr=config.rl_lr,
            kl_coef=scale.kl_coef,
            seed=config.seed,
            device=config.device,
        ),
        on_progress=report,
    )
    return {"reward_first": m["reward_first"], "reward_last": m["reward_last"], "kl_last": m["kl_last"]}


def _dpo_stage(config: ExperimentConfig, scale: Scale, out: Path, rankings: list[Path], report: Progress):
    m = dpo.train(
        DPOConfig(
            policy=str(out / "sft"),
            out=str(out / "dpo"),
            rankings=rankings,
            beta=config.dpo_beta,
            steps=scale.dpo_steps,
            eval_every=0,
            seed=config.seed,
            device=config.device,
        ),
        on_progress=report,
    )
    return {"pairs": m["train_items"], "val_acc": m.get("val_acc", math.nan), "val_margin": m.get("val_margin")}


# ------------------------------------------------------------------------------------------------ experiment


def run_experiment(config: ExperimentConfig, on_progress: Progress | None = None) -> dict[str, Any]:
    """Run every stage into config.out; returns the metrics of each stage, of each policy, and the headline numbers
    (gold_sft, gold_rl, rm_acc, kl, seconds). `on_progress` gets every stage's step info with a "stage" key."""
    config.validate()
    out = _work_dir(config.out)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(config, config.resolved_scale(), out, on_progress)
    finally:
        torch.set_num_threads(threads)


def _work_dir(out: str | None) -> Path:
    if out is None:
        return Path(tempfile.mkdtemp(prefix="flywheel-experiment-"))
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} is not empty: choose a new --out (every stage writes a fresh model directory)")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class _Run:
    """One experiment under way: its settings, the world, and each finished stage's metrics and seconds."""

    config: ExperimentConfig
    scale: Scale
    out: Path
    world: World
    sinks: list[Progress]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stage(self, name: str, fn: Callable[[Progress], Any]) -> Any:
        """Run one stage; its metrics (when it returns a dict) and its seconds go into the table."""
        t0 = time.perf_counter()
        value = fn(_stage_progress(name, self.sinks))
        if isinstance(value, dict) and name != "evaluate":
            self.stages[name] = value
        self.stages.setdefault(name, {})["seconds"] = round(time.perf_counter() - t0, 1)
        return value


def _run(config: ExperimentConfig, scale: Scale, out: Path, on_progress: Progress | None) -> dict[str, Any]:
    started = time.perf_counter()
    sinks = [s for s in (StageBar() if config.progress else None, on_progress) if s is not None]
    run = _Run(config, scale, out, World(config.seed), sinks)
    run.stage("pretrain", lambda r: _pretrain_stage(config, scale, out, r))
    run.stage("sft", lambda r: _sft_stage(config, run.world, scale, out, r))
    train = [p for p in run.world.prompts(10_000) if p.split == "train"]
    heldout = _heldout_prompts(run.world, scale.eval_prompts)
    annotated = train[: scale.annotated_prompts]  # every round ranks answers to the same train prompts
    train_sets, heldout_sets = run.stage("sample", lambda r: _sample_stage(run, annotated, heldout, r))
    files, heldout_path = _first_labels(run, train_sets, heldout_sets)
    run.stage("reward", lambda r: _reward_stage(config, scale, out, "rm", (*files, heldout_path), r))
    policies, final_rm = ["sft"], {}
    for algo in config.algos:
        policies += _rl_rounds(run, algo, files, heldout_path, annotated, train)
        final_rm[algo] = run.stages[f"reward-{algo}-r{config.rounds}" if config.rounds > 1 else "reward"]["rm_acc_gold"]
    if config.dpo:
        run.stage("dpo", lambda r: _dpo_stage(config, scale, out, files[0], r))
        policies.append("dpo")
    evaluation = run.stage("evaluate", lambda r: _evaluate_stage(run, policies, heldout, r))
    return _results(run, evaluation, final_rm, time.perf_counter() - started)


def _sample_stage(run: _Run, annotated: list[Prompt], heldout: list[Prompt], report: Progress) -> tuple[list, list]:
    """`label_sets` candidate sets per annotated prompt (each its own ranking), and one per held-out prompt."""
    config, scale, sft_dir = run.config, run.scale, run.out / "sft"
    n = len(annotated)
    tick = _counter("sample", n * scale.label_sets + len(heldout), report)
    train_sets, totals = [], {}
    for i in range(scale.label_sets):
        part, counts = sample_candidate_sets(
            sft_dir, annotated, K, scale.max_new_tokens, config.seed + 50 * i, lambda done, i=i: tick(n * i + done)
        )
        train_sets.append(part)
        totals = {k: totals.get(k, 0) + v for k, v in counts.items()}
    b, held_counts = sample_candidate_sets(
        sft_dir, heldout, K, scale.max_new_tokens, config.seed + 1, lambda d: tick(n * scale.label_sets + d)
    )
    run.stages["sample"] = {**totals, "heldout_sets": held_counts["sets"]}
    return train_sets, b


def _first_labels(run: _Run, train_sets: list, heldout_sets: list) -> tuple[tuple[list[Path], list[Path]], Path]:
    """Round one's labels: the simulated annotators' rankings and thumbs of each label set (one data folder each),
    and the held-out sets ranked by gold. Returns (ranking files, thumb files), and the gold rankings' file."""
    labelled = [
        annotate(run.world, sets, run.config, run.out / ("data" if i == 0 else f"data-{i + 1}"))
        for i, sets in enumerate(train_sets)
    ]
    heldout_path = gold_rankings(run.world, heldout_sets, run.out / "data" / "heldout_gold_rankings.jsonl")
    run.stages["annotate"] = merge_label_stats([stats for _, _, stats in labelled])
    return ([r for r, _, _ in labelled], [t for _, t, _ in labelled]), heldout_path


def _rl_rounds(
    run: _Run,
    algo: str,
    files: tuple[list[Path], list[Path]],
    heldout_path: Path,
    annotated: list[Prompt],
    train: list[Prompt],
) -> list[str]:
    """RL with `algo` against the first reward model; then each further round annotates the last policy's answers,
    retrains the reward model on every label so far and runs RL again. Returns the names of the policies made."""
    config, scale, out = run.config, run.scale, run.out
    run.stage(f"rl-{algo}", lambda r: _rl_stage(config, algo, scale, out, ("rm", f"rl-{algo}"), train, r))
    policies = [f"rl-{algo}"]
    for n in range(2, config.rounds + 1):
        policy, rm = f"rl-{algo}-r{n}", f"rm-{algo}-r{n}"
        seed = config.seed + 100 * n + ALGOS.index(algo)
        new = run.stage(
            f"annotate-{algo}-r{n}",
            lambda r, d=(policies[-1], f"data-{algo}-r{n}"), s=seed: _next_round_data(
                config, run.world, scale, out, d, annotated, s, r
            ),
        )
        run.stages[f"annotate-{algo}-r{n}"].update(new[2])
        files = (files[0] + [new[0]], files[1] + [new[1]])
        run.stage(
            f"reward-{algo}-r{n}",
            lambda r, m=rm, f=files: _reward_stage(config, scale, out, m, (f[0], f[1], heldout_path), r),
        )
        run.stage(policy, lambda r, d=(rm, policy): _rl_stage(config, algo, scale, out, d, train, r))
        policies.append(policy)
    return policies


def _evaluate_stage(run: _Run, policies: list[str], heldout: list[Prompt], report: Progress) -> dict[str, dict]:
    tick, results = _counter("evaluate", len(policies), report), {}
    for i, name in enumerate(policies):
        results[name] = evaluate_policy(
            run.world, run.out / name, run.out / "sft", heldout, run.scale, run.config.seed + 7
        )
        tick(i + 1)
    return results


def _results(run: _Run, evaluation: dict[str, dict], final_rm: dict[str, float], seconds: float) -> dict[str, Any]:
    """The headline numbers (of the first --algo's last round), every policy's and stage's metrics; also written
    to results.json."""
    config = run.config
    first = f"rl-{config.algos[0]}" + (f"-r{config.rounds}" if config.rounds > 1 else "")
    result = {
        "gold_sft": evaluation["sft"]["gold"],
        "gold_rl": evaluation[first]["gold"],
        "rm_acc": final_rm[config.algos[0]],
        "kl": evaluation[first]["kl"],
        "seconds": seconds,
        "policies": evaluation,
        "stages": run.stages,
        "out": str(run.out),
        "config": asdict(config),
        "scale": asdict(run.scale),
    }
    (run.out / "results.json").write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    return result


def format_report(result: dict[str, Any]) -> str:
    """Every stage's metrics, the policies side by side, and the headline as the last line."""
    lines = [f"{'stage':<16} {'metric':<22} value", "-" * 54]
    for name, metrics in result["stages"].items():
        for key, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) and key != "seconds" else str(value)
            lines.append(f"{name:<16} {key:<22} {shown}")
            name = ""
    lines += ["", f"{'policy':<12} {'gold (T=1)':>11} {'gold (greedy)':>14} {'KL to SFT':>10} {'length':>7}", "-" * 58]
    for name, m in result["policies"].items():
        lines.append(
            f"{name:<12} {m['gold']:>11.4f} {m['gold_greedy']:>14.4f} {m['kl']:>10.4f} {m['response_len']:>7.1f}"
        )
    lines += ["", f"work directory: {result['out']}", headline(result)]
    return "\n".join(lines)


def headline(result: dict[str, Any]) -> str:
    return (
        f"demo_flywheel: gold_sft={result['gold_sft']:.4f} gold_rl={result['gold_rl']:.4f} "
        f"rm_acc={result['rm_acc']:.4f} kl={result['kl']:.4f} seconds={result['seconds']:.0f}"
    )


def summarize(results: list[dict[str, Any]]) -> str:
    """Several runs (seeds) side by side as mean ± std: each policy's gold, greedy gold, KL and length, the reward
    model's accuracy against gold, and each policy's gain over SFT; the README's table."""

    def stat(values: list[float]) -> str:
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {std:.3f}"

    seeds = [r["config"]["seed"] for r in results]
    names = [n for n in results[0]["policies"] if all(n in r["policies"] for r in results)]
    lines = [
        f"{len(results)} runs, seeds {seeds}",
        "",
        f"{'policy':<12} {'gold (T=1)':>15} {'gain over SFT':>15} {'gold (greedy)':>15} {'KL to SFT':>15} "
        f"{'length':>15}",
        "-" * 96,
    ]
    for name in names:
        col = {k: [r["policies"][name][k] for r in results] for k in ("gold", "gold_greedy", "kl", "response_len")}
        gain = [r["policies"][name]["gold"] - r["policies"]["sft"]["gold"] for r in results]
        lines.append(
            f"{name:<12} {stat(col['gold']):>15} {stat(gain):>15} {stat(col['gold_greedy']):>15} "
            f"{stat(col['kl']):>15} {stat(col['response_len']):>15}"
        )
    first = [r["stages"]["reward"]["rm_acc_gold"] for r in results]
    agreement = [r["stages"]["annotate"]["annotator_agreement"] for r in results]
    last = [r["rm_acc"] for r in results]
    lines += [
        "",
        f"reward model accuracy against gold: {stat(first)} (first round), {stat(last)} (last round, first "
        f"--algo); annotator agreement: {stat(agreement)}",
    ]
    lines.append(f"minutes per run: {stat([r['seconds'] / 60 for r in results])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `flywheel demo experiment` and `python -m ml.demo.experiment`."""
    d = ExperimentConfig()
    add = parser.add_argument
    add("--out", default=None, metavar="DIR", help="an empty or new work directory (default: a new temporary one)")
    add("--seed", type=int, default=d.seed, help="seed of the demo world and of every stage (default %(default)s)")
    add("--quick", action="store_true", help="a smaller run that finishes in a few minutes on 2 CPU cores")
    add("--scale", choices=sorted(SCALES), default=None, help="full, quick or tiny (the CI test's); overrides --quick")
    add(
        "--algo",
        dest="algos",
        nargs="+",
        choices=ALGOS,
        default=d.algos,
        help="RL algorithm(s): ppo, or critic-free grpo / rloo; several run side by side",
    )
    add("--dpo", action="store_true", help="also run offline DPO from the same rankings")
    add(
        "--rounds",
        type=int,
        default=d.rounds,
        help="turns of the flywheel: each later round ranks the last policy's answers beside SFT's, retrains the "
        "reward model on all rankings so far, and reruns RL from SFT (default %(default)s)",
    )
    add("--noise", type=float, default=d.noise, help="std of the annotators' noise on the gold score")
    add("--annotators", type=int, default=d.annotators, help="simulated annotators sharing the ranking work")
    add("--bad-fraction", type=float, default=d.bad_fraction, help="share of wrong/rambling/rude SFT answers")
    add("--rl-lr", type=float, default=d.rl_lr, help="RL policy learning rate (default %(default)s)")
    add(
        "--kl-coef",
        type=float,
        default=None,
        help="RL KL penalty coefficient beta (default: from the scale, 0.5; 0.1 for tiny)",
    )
    add("--dpo-beta", type=float, default=d.dpo_beta, help="DPO beta (default %(default)s)")
    for stage in ("pretrain", "sft", "reward", "rl", "dpo"):
        add(f"--{stage}-steps", type=int, default=None, help=f"{stage} steps (default: from the scale)")
    add(
        "--label-sets",
        type=int,
        default=None,
        help="sets of K candidates ranked per annotated prompt in round 1; reward steps grow with them "
        "(default: from the scale, 4 at full size)",
    )
    add("--threads", type=int, default=d.threads, help="torch CPU threads; 0: torch's default (default %(default)s)")
    add("--device", default=d.device, help="auto, cpu, cuda or cuda:N (default %(default)s)")
    add("--no-progress", dest="progress", action="store_false", help="no progress bars on stderr")
    add(
        "--summarize",
        nargs="+",
        metavar="DIR",
        default=None,
        help="run nothing: print mean ± std over finished runs' work directories (one per seed)",
    )


def main(args: argparse.Namespace) -> int:
    """Run from parsed flags; print the report (its last line the headline); exit 2 on bad input."""
    names = ExperimentConfig.__dataclass_fields__
    if args.summarize:
        try:
            runs = [json.loads((Path(d) / "results.json").read_text(encoding="utf-8")) for d in args.summarize]
        except (OSError, ValueError) as e:
            print(f"experiment: error: cannot read a finished run's results.json: {e}", file=sys.stderr)
            return 2
        print(summarize(runs))
        return 0
    try:
        result = run_experiment(ExperimentConfig(**{k: v for k, v in vars(args).items() if k in names}))
    except (ValueError, OSError) as e:
        print(f"experiment: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("experiment: interrupted", file=sys.stderr)
        return 130
    print(format_report(result))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m ml.demo.experiment", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
