"""Active learning on the demo world: with the same label budget, does labelling the candidate sets a reward ensemble
disagrees on give a better reward model than labelling sets at random?

Per seed: a demo SFT model is trained once (pretrain -> SFT on the seed's world; both arms share it). It samples a
pool of candidate sets (K=4 answers to each of --pool train prompts) and a held-out set per held-out prompt (ranked by
the gold scorer; held-out prompts are never in the pool). Simulated annotators (the world's default noise) hold a
ranking of every pool set, revealed only when a set is chosen. Both arms start from the same random seed batch, then
label --round sets per round until --budget sets:

    random        the next sets at random
    disagreement  E bootstrap Bradley-Terry heads on the SFT trunk's features (ml/active.py) are refit on the labels
                  so far; the next sets are those whose answers the heads order most differently

Each arm's labels then train a reward model with ml.train.reward (same steps, same seed), and rm_acc is its pairwise
accuracy against gold on the held-out sets, as in ml/demo/experiment.py. The per-seed table also shows head_acc (one
linear head on the frozen SFT trunk, fit on all the arm's labels), how many of the arm's labelled sets are not one
big tie. The random arm is drawn --random-draws times (3) per seed and X is their mean: two random draws of 96 sets
differ by up to 0.13 in rm_acc (seed 4), the noise any gain must clear (their min-max is in the table).

Run:  python bench/active_learning.py            (5 seeds, 6-20 minutes on 2 shared cores)
      python bench/active_learning.py --quick    (1 seed, smaller; a smoke test)
The last line is `active_learning: rm_acc_random=X rm_acc_active=Y labels=N seeds=S` (means over seeds; X also over
the random draws).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ml.active import answer_features, choose, fit_heads, set_disagreement
from ml.checkpoint import load_checkpoint
from ml.demo.experiment import K, gold_rankings, sample_candidate_sets
from ml.demo.world import SimulatedAnnotator, World
from ml.evaluate import reward_accuracy
from ml.examples import encode_answer, load_rankings
from ml.tokenizer import Tokenizer
from ml.train import pretrain, reward, sft
from ml.train.pretrain import PretrainConfig
from ml.train.reward import RewardConfig, RewardModel
from ml.train.sft import SFTConfig

Sets = list[tuple[list[dict[str, str]], list[str]]]


@dataclass
class Material:
    """One seed's fixed material: the pool, its hidden labels, the held-out gold rankings and everyone's features."""

    sft_dir: Path
    pool: Sets
    labels: list[list[int]]  # the annotators' ranking of each pool set
    rows: list[list[int]]  # feature rows of each pool set's answers
    features: torch.Tensor
    heldout_path: Path
    heldout_rows: list[tuple[list[int], list[int]]]  # (feature rows, gold ranks) of each held-out set
    encoded: list[tuple[list[int], list[int]]]  # every pool and held-out answer, tokenised (the feature rows' order)


def train_sft(world: World, out: Path, args: argparse.Namespace, seed: int) -> Path:
    """The demo world's small chat model for this seed (the bench's one slow step, shared by both arms)."""
    pretrain.train(
        PretrainConfig(
            out=str(out / "base"),
            steps=args.pretrain_steps,
            batch_size=16,
            block_size=128,
            n_layer=2,
            n_embd=64,
            n_head=4,
            warmup=args.pretrain_steps // 10,
            demo_docs=1500,
            demo_seed=seed,
            seed=seed,
            eval_every=0,
            save_every=0,
        )
    )
    dialogues = world.sft_dialogues(600, seed=seed, bad_fraction=0.5)
    sft.train(
        SFTConfig(
            base=str(out / "base"),
            out=str(out / "sft"),
            data=dialogues,
            steps=args.sft_steps,
            lr=1e-3,
            eval_every=0,
            seed=seed,
        )
    )
    return out / "sft"


def build(world: World, out: Path, args: argparse.Namespace, seed: int) -> Material:
    """Sample the pool and the held-out sets, label the pool (hidden), rank held-out by gold, compute features."""
    sft_dir = train_sft(world, out, args, seed)
    prompts = world.prompts(10_000)
    train = [p for p in prompts if p.split == "train"][: args.pool]
    heldout = [p for p in prompts if p.split == "heldout"][: args.heldout]
    pool, _ = sample_candidate_sets(sft_dir, train, K, 40, seed, lambda _: None)
    held, _ = sample_candidate_sets(sft_dir, heldout, K, 40, seed + 1, lambda _: None)
    annotators = [SimulatedAnnotator(world, args.noise, seed=1000 * seed + i) for i in range(3)]
    labels = [annotators[n % 3].rank(p, a) for n, (p, a) in enumerate(pool)]
    heldout_path = gold_rankings(world, held, out / "heldout_gold.jsonl")
    model, _ = load_checkpoint(sft_dir)
    tokenizer = Tokenizer.load(sft_dir)
    encoded, rows, held_rows = [], [], []
    for prompt, answers in pool:
        rows.append(list(range(len(encoded), len(encoded) + len(answers))))
        encoded += [encode_answer(tokenizer, prompt, a, model.config.max_seq_len) for a in answers]
    gold = SimulatedAnnotator(world, noise=0.0)
    for prompt, answers in held:
        held_rows.append((list(range(len(encoded), len(encoded) + len(answers))), gold.rank(prompt, answers)))
        encoded += [encode_answer(tokenizer, prompt, a, model.config.max_seq_len) for a in answers]
    features = answer_features(model, encoded, int(tokenizer.pad_id or 0))
    return Material(sft_dir, pool, labels, rows, features, heldout_path, held_rows, encoded)


def committee_scores(w: Material, chosen: list[int], args: argparse.Namespace, seed: int, work: Path) -> torch.Tensor:
    """(E, N) every committee member's reward of every answer. `heads`: E bootstrap linear heads on the frozen SFT
    trunk's features; `models`: E full reward models, each trained (--committee-steps) on a bootstrap resample of the
    labels so far, so the committee disagrees where the reward model that will be trained is itself unsure."""
    if args.committee == "heads":
        return fit_heads(w.features, [(w.rows[i], w.labels[i]) for i in chosen], args.heads, seed).scores(w.features)
    g, rows = random.Random(seed), []
    for member in range(args.heads):
        sample = [chosen[g.randrange(len(chosen))] for _ in chosen]
        records = [{"prompt": w.pool[i][0], "answers": w.pool[i][1], "ranking": w.labels[i]} for i in sample]
        out = work / f"committee-{seed}-{member}"
        config = RewardConfig(
            sft=str(w.sft_dir),
            out=str(out),
            rankings=records,
            steps=args.committee_steps,
            heldout_fraction=0.0,
            eval_every=0,
            seed=seed * 100 + member,
        )
        try:
            reward.train(config)
        except ValueError:  # a resample with no comparison at all: this member sits out
            continue
        rows.append(RewardModel.load(out).score_encoded(w.encoded))
        shutil.rmtree(out)
    return torch.stack(rows)


def coreset(w: Material, chosen: list[int], n: int) -> list[int]:
    """k-centre greedy (Sener & Savarese): the n sets farthest from every labelled one, one at a time, a set being the
    mean of its answers' standardised trunk features: coverage of what the pool holds instead of disagreement."""
    x = (w.features - w.features.mean(0)) / w.features.std(0).clamp(min=1e-6)
    sets = torch.stack([x[rows].mean(0) for rows in w.rows])  # (S, D)
    nearest = torch.cdist(sets, sets[chosen]).min(1).values  # (S,)
    picked = []
    for _ in range(n):
        i = int(nearest.argmax())
        picked.append(i)
        nearest = torch.minimum(nearest, torch.cdist(sets, sets[i : i + 1])[:, 0])
    return picked


def acquire(
    w: Material, mode: str, args: argparse.Namespace, seed: int, draw: int = 0, work: Path = Path(".")
) -> list[int]:
    """The pool sets one arm labels: the shared random seed batch, then --round sets per round up to --budget.
    `draw` > 0: another random draw of the later rounds (the control arm)."""
    chosen = choose([0.0] * len(w.pool), args.round, set(), "random", random.Random(seed))
    rng, n_round = random.Random(seed + 1 + 1000 * draw), 0
    while len(chosen) < args.budget:
        n = min(args.round, args.budget - len(chosen))
        priorities = [0.0] * len(w.pool)
        if mode == "disagreement" and args.acquire == "coreset":
            chosen += coreset(w, chosen, n)
            n_round += 1
            continue
        if mode == "disagreement":
            scores = committee_scores(w, chosen, args, seed + n_round, work)  # (E, N)
            priorities = [set_disagreement(scores[:, rows], args.measure) for rows in w.rows]
        chosen += choose(priorities, n, set(chosen), mode, rng, args.explore)
        n_round += 1
    return chosen


def evaluate_arm(w: Material, chosen: list[int], out: Path, args: argparse.Namespace, seed: int) -> dict[str, float]:
    """Train the arm's reward model on its labels; its accuracy (and the heads') against gold on held-out sets."""
    records = [{"prompt": w.pool[i][0], "answers": w.pool[i][1], "ranking": w.labels[i]} for i in chosen]
    reward.train(
        RewardConfig(
            sft=str(w.sft_dir),
            out=str(out),
            rankings=records,
            steps=args.reward_steps,
            heldout_fraction=0.0,
            eval_every=0,
            seed=seed,
        )
    )
    rm_acc = reward_accuracy(RewardModel.load(out), load_rankings([w.heldout_path]))["accuracy"]
    heads = fit_heads(w.features, [(w.rows[i], w.labels[i]) for i in chosen], 1, seed, bootstrap=False)
    scores = heads.scores(w.features)[0]
    right = pairs = 0
    for rows, ranks in w.heldout_rows:
        for a in range(len(rows)):
            for b in range(len(rows)):
                if ranks[a] < ranks[b]:
                    pairs += 1
                    right += float(scores[rows[a]] > scores[rows[b]]) + 0.5 * float(scores[rows[a]] == scores[rows[b]])
    informative = sum(min(w.labels[i]) < max(w.labels[i]) for i in chosen)
    return {"rm_acc": rm_acc, "head_acc": right / max(pairs, 1), "informative": informative}


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, dict[str, float]]:
    t0 = time.perf_counter()
    w = build(World(seed), work / f"seed{seed}", args, seed)
    result: dict = {"random": []}
    for draw in range(args.random_draws):  # several random arms: their spread is the noise the active arm must beat
        chosen = acquire(w, "random", args, seed, draw)
        result["random"].append(evaluate_arm(w, chosen, work / f"seed{seed}" / f"rm-random-{draw}", args, seed))
    chosen = acquire(w, "disagreement", args, seed, work=work / f"seed{seed}")
    result["disagreement"] = evaluate_arm(w, chosen, work / f"seed{seed}" / "rm-disagreement", args, seed)
    result["seconds"] = time.perf_counter() - t0
    result["pool"], result["heldout_pairs"] = (
        len(w.pool),
        sum(sum(ra < rb for ra in r for rb in r) for _, r in w.heldout_rows),
    )
    return result


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    """The per-seed table and the last line; `random` is the mean over the random draws, min-max beside it."""
    print()
    print(
        f"{'seed':>4} {'rm_acc random (mean)':>20} {'random min-max':>15} {'rm_acc active':>14} {'delta':>7} "
        f"{'head random':>12} {'head active':>12} {'non-tied sets r/a':>18}"
    )
    means = []
    for seed, r in zip(args.seeds, rows, strict=True):
        draws, b = r["random"], r["disagreement"]
        acc = [d["rm_acc"] for d in draws]
        mean = sum(acc) / len(acc)
        means.append(mean)
        head = sum(d["head_acc"] for d in draws) / len(draws)
        tied = sum(d["informative"] for d in draws) / len(draws)
        spread, sets = f"{min(acc):.4f}-{max(acc):.4f}", f"{tied:.0f}/{b['informative']}"
        print(
            f"{seed:>4} {mean:>20.4f} {spread:>15} {b['rm_acc']:>14.4f} "
            f"{b['rm_acc'] - mean:>+7.4f} {head:>12.4f} {b['head_acc']:>12.4f} {sets:>18}"
        )
    x = sum(means) / len(means)
    y = sum(r["disagreement"]["rm_acc"] for r in rows) / len(rows)
    print("load average at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"active_learning: rm_acc_random={x:.4f} rm_acc_active={y:.4f} labels={args.budget} seeds={len(rows)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer steps: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pool", type=int, default=480, help="train prompts with a candidate set in the pool")
    parser.add_argument("--heldout", type=int, default=160, help="held-out prompts (gold-ranked sets)")
    parser.add_argument("--budget", type=int, default=96, help="sets labelled per arm")
    parser.add_argument("--round", type=int, default=16, help="sets per round (the seed batch is one round)")
    parser.add_argument("--heads", type=int, default=8, help="E: bootstrap heads in the ensemble")
    parser.add_argument("--acquire", choices=["disagreement", "coreset"], default="disagreement", help="active arm")
    parser.add_argument("--committee", choices=["heads", "models"], default="heads", help="the ensemble's members")
    parser.add_argument("--committee-steps", type=int, default=60, help="training steps of each committee model")
    parser.add_argument("--measure", choices=["vote", "soft"], default="vote", help="disagreement (ml/active.py)")
    parser.add_argument("--explore", type=float, default=0.0, help="share of each active round chosen at random")
    parser.add_argument("--noise", type=float, default=0.1, help="annotators' noise (the demo's default: 0.1)")
    parser.add_argument("--random-draws", type=int, default=3, help="random arms per seed (X is their mean)")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--reward-steps", type=int, default=120)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.pool, args.heldout, args.budget = args.seeds[:1], 160, 64, 48
        args.pretrain_steps, args.sft_steps, args.reward_steps = 150, 80, 60
    torch.set_num_threads(1)
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()), flush=True)
    print(f"settings: {vars(args)}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="active-learning-") as tmp:
        for seed in args.seeds:
            r = run_seed(seed, args, Path(tmp))
            rows.append(r)
            draws = " ".join(f"{d['rm_acc']:.4f}" for d in r["random"])
            print(
                f"seed {seed}: rm_acc random draws {draws}, disagreement {r['disagreement']['rm_acc']:.4f} | pool "
                f"{r['pool']}, held-out pairs {r['heldout_pairs']} | {r['seconds']:.0f}s",
                flush=True,
            )
    report(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
