"""Peak memory of a PPO job on a real model: LoRA adapters against full fine-tuning, the same batch.

Each side runs `python -m ml.train.rl --algo ppo` in a process of its own on SmolLM2-135M-Instruct (bench/real_model.py)
against a reward model made from the same weights (a scalar head on SmolLM2's trunk), with the same prompts, batch,
sampling and steps; the figure is the process's peak resident set (ru_maxrss, from os.wait4).

What LoRA saves: full fine-tuning holds four models (policy, frozen reference, reward model, critic), AdamW's two
moments and the gradients of the two that train; with LoRA the reference is the policy's trunk without adapters and
the critic is the reward model's trunk with adapters of its own (ml/lora.py: shared, not copied), and only the
adapters have gradients and moments. Activations for the update are the same on both sides.

Run:  .venv/bin/python bench/lora_memory.py    (~5 minutes on 2 cores; fetches the model once)
The last line is `ppo_peak_rss_lora_vs_full: R`, R = the LoRA job's peak RSS over the full job's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.real_model import FLYWHEEL, real_model_dir  # noqa: E402


def reward_model(policy: Path, out: Path) -> Path:
    """A reward model on the policy's trunk (a fresh scalar head): what a first reward job would start from."""
    from ml.checkpoint import load_checkpoint, save_checkpoint
    from ml.model import scalar_model_from
    from ml.tokenizer import Tokenizer

    lm, _ = load_checkpoint(policy)
    return save_checkpoint(out, scalar_model_from(lm), tokenizer=Tokenizer.load(policy), extra={"kind": "reward"})


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """Run `command`; (its peak RSS in MB, seconds). A failure is shown and ends the bench."""
    t = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"lora_memory: the job failed:\n{output[-3000:]}")
    print(output.strip().splitlines()[-1] if output.strip() else "(no output)", flush=True)
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--samples-per-prompt", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
    policy = real_model_dir() / FLYWHEEL
    rows = {}
    with tempfile.TemporaryDirectory(prefix="lora-memory-") as tmp:
        rm = reward_model(policy, Path(tmp) / "rm")
        common = [sys.executable, "-m", "ml.train.rl", "--algo", "ppo", "--policy", str(policy)]
        common += ["--reward-model", str(rm), "--steps", str(args.steps), "--threads", str(args.threads)]
        common += [
            "--prompts-per-step",
            str(args.prompts_per_step),
            "--samples-per-prompt",
            str(args.samples_per_prompt),
        ]
        common += ["--max-new-tokens", str(args.max_new_tokens), "--minibatch-size", str(args.prompts_per_step)]
        common += ["--temperature", "0.7", "--top-p", "0.9"]
        for name, extra in (("full", []), ("lora", ["--lora-rank", str(args.rank)])):
            rows[name] = peak_rss_mb([*common, "--out", str(Path(tmp) / name), *extra])
    print(f"\nPPO on SmolLM2-135M: {args.steps} steps of {args.prompts_per_step} prompts x {args.samples_per_prompt}")
    print(f"sample(s), {args.max_new_tokens} new tokens, fp32, {args.threads} threads; LoRA rank {args.rank} on every")
    print("projection")
    print(f"{'side':<8}{'peak RSS MB':>13}{'seconds':>10}")
    for name, (mb, seconds) in rows.items():
        print(f"{name:<8}{mb:>13.0f}{seconds:>10.0f}")
    print("load average at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(f"ppo_peak_rss_lora_vs_full: {rows['lora'][0] / rows['full'][0]:.2f}")


if __name__ == "__main__":
    main()
