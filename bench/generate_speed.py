"""Sampling throughput of ml.engine.Engine against transformers' `generate` on the same weights.

The model is the train_speed shape (6 layers, width 256, 4 heads, SwiGLU 1024, vocab 4096), random, exported
through ml/hf.py and loaded with transformers' LlamaForCausalLM, fp32 on 2 CPU threads. Workload: one 64-token
prompt, 4 sampled candidates (and, separately, 1), exactly 128 new tokens each (no stop token), plain sampling at
temperature 1 (no top-k/top-p on either side). Sides alternate in rounds; each figure is a variant's best round.
Ours runs eager and with `Engine(compile=True)` (a torch.compile'd fixed-shape decode step; compiled during the
warm-up round, which is not timed); the headline ratio is the compiled engine's.

Run:
    .venv/bin/python bench/generate_speed.py            # ~1 minute on 2 cores
    .venv/bin/python bench/generate_speed.py --quick
The last line is `generate_speed_vs_hf: R`, R = our new tokens/s over transformers' for 4 candidates.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ml.engine import Engine
from ml.hf import export_hf
from ml.model import ModelConfig, Transformer

SHAPE = dict(vocab_size=4096, n_layer=6, n_head=4, n_kv_head=4, n_embd=256, intermediate_size=1024, max_seq_len=256)
PROMPT_LEN, NEW_TOKENS = 64, 128


def ours_runner(model: Transformer, prompt: list[int], n: int, compile: bool = False) -> Callable[[], int]:
    engine = Engine(model, compile=compile)

    def run() -> int:
        samples = engine.generate(prompt, n=n, max_new_tokens=NEW_TOKENS, temperature=1.0, seed=0)
        assert all(len(s.token_ids) == NEW_TOKENS for s in samples)
        return sum(len(s.token_ids) for s in samples)

    return run


def hf_runner(hf: torch.nn.Module, prompt: list[int], n: int) -> Callable[[], int]:
    ids = torch.tensor([prompt])

    def run() -> int:
        with torch.inference_mode():
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                num_return_sequences=n, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
                pad_token_id=0,
            )  # fmt: skip
        assert out.shape == (n, PROMPT_LEN + NEW_TOKENS)
        return n * NEW_TOKENS

    return run


def best_rate(run: Callable[[], int], rates: list[float]) -> None:
    t = time.perf_counter()
    tokens = run()
    rates.append(tokens / (time.perf_counter() - t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE)).eval()
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").float().eval()
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(0, SHAPE["vocab_size"], (PROMPT_LEN,)).tolist()
    variants: dict[str, Callable[[], int]] = {}
    for n in (4, 1):
        variants[f"ours compiled n={n}"] = ours_runner(model, prompt, n, compile=True)
        variants[f"ours eager n={n}"] = ours_runner(model, prompt, n)
        variants[f"transformers n={n}"] = hf_runner(hf, prompt, n)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for run in variants.values():  # warm up (and compile)
        run()
    for r in range(rounds):
        for name in variants if r % 2 == 0 else list(variants)[::-1]:
            best_rate(variants[name], rates[name])
    workload = f"{PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens per candidate"
    print(f"\n{workload}, fp32, {args.threads} threads; best of {rounds}")
    print(f"{'variant':<24}{'new tok/s':>12}{'median':>10}")
    for name, r in rates.items():
        print(f"{name:<24}{max(r):>12.0f}{sorted(r)[len(r) // 2]:>10.0f}")
    ratio = {v: max(rates[v]) / max(rates[f"transformers n={n}"]) for v in rates if "ours" in v for n in (v[-1],)}
    print("vs transformers: " + ", ".join(f"{v} {r:.2f}" for v, r in ratio.items()))
    print(f"generate_speed_vs_hf: {ratio['ours compiled n=4']:.2f}")


if __name__ == "__main__":
    main()
