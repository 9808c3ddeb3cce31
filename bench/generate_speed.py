"""Sampling throughput of ml.engine.Engine against transformers' `generate` on the same weights.

The model is the train_speed shape (6 layers, width 256, 4 heads, SwiGLU 1024, vocab 4096), random, exported
through ml/hf.py and loaded with transformers' LlamaForCausalLM, fp32 on 2 CPU threads. Workload: one 64-token
prompt, 4 sampled candidates (and, separately, 1), exactly 128 new tokens each (no stop token), plain sampling at
temperature 1 (no top-k/top-p on either side). Sides alternate in rounds; each figure is a variant's best round.
Ours runs eager and with `Engine(compile=True)` (a torch.compile'd fixed-shape decode step; compiled during the
warm-up round, which is not timed); the headline ratio is the compiled engine's.

With --real the model is SmolLM2-135M-Instruct instead (bench/real_model.py: our `flywheel/` directory against
transformers on its `hf/` twin, fp32): one chat prompt rendered by our tokenizer, 4 candidates only, ours eager
(add --compile for the compiled engine too, which then gives the headline ratio; compiling it takes minutes).

Run:
    .venv/bin/python bench/generate_speed.py            # ~1 minute on 2 cores
    .venv/bin/python bench/generate_speed.py --quick
    FLYWHEEL_REAL_MODEL_CACHE=/tmp/smol/cache .venv/bin/python bench/generate_speed.py --real   # a few minutes
    FLYWHEEL_REAL_MODEL_CACHE=/tmp/smol/cache .venv/bin/python bench/generate_speed.py --real --quick --new-tokens 16
The last line is `generate_speed_vs_hf: R`, R = our new tokens/s over transformers' for 4 candidates; the line
before it names the model.
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
REAL_MODEL, REAL_QUESTION = "SmolLM2-135M-Instruct", "Write a short story about a lighthouse keeper."


def ours_runner(
    model: Transformer, prompt: list[int], n: int, compile: bool = False, new_tokens: int = NEW_TOKENS
) -> Callable[[], int]:
    engine = Engine(model, compile=compile)

    def run() -> int:
        samples = engine.generate(prompt, n=n, max_new_tokens=new_tokens, temperature=1.0, seed=0)
        assert all(len(s.token_ids) == new_tokens for s in samples)
        return sum(len(s.token_ids) for s in samples)

    return run


def hf_runner(hf: torch.nn.Module, prompt: list[int], n: int, new_tokens: int = NEW_TOKENS) -> Callable[[], int]:
    ids = torch.tensor([prompt])

    def run() -> int:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.shape == (n, len(prompt) + new_tokens)
        return n * new_tokens

    return run


def random_models() -> tuple[Transformer, torch.nn.Module, list[int], str]:
    """The random train_speed-shaped model, its transformers twin, a random 64-token prompt, and its name."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**SHAPE)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "hf")
        hf = AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf").float().eval()
    prompt = torch.randint(0, SHAPE["vocab_size"], (PROMPT_LEN,)).tolist()
    return model, hf, prompt, "random 6-layer model"


def real_models() -> tuple[Transformer, torch.nn.Module, list[int], str]:
    """SmolLM2-135M-Instruct (our directory and its transformers twin), a one-question chat prompt, and its name."""
    from transformers import AutoModelForCausalLM

    from bench.real_model import FLYWHEEL, HF, real_model_dir
    from ml.checkpoint import load_checkpoint
    from ml.tokenizer import Tokenizer

    root = real_model_dir()
    model, _ = load_checkpoint(root / FLYWHEEL)
    hf = AutoModelForCausalLM.from_pretrained(root / HF, dtype=torch.float32).eval()
    prompt = Tokenizer.load(root / FLYWHEEL).render_prompt([{"role": "user", "content": REAL_QUESTION}])
    return model, hf, prompt, f"{REAL_MODEL} (real)"


def build_variants(
    model: Transformer, hf: torch.nn.Module, prompt: list[int], args: argparse.Namespace
) -> dict[str, Callable[[], int]]:
    """Default: ours compiled and eager and transformers, for 4 candidates and for 1. --real: 4 candidates, ours
    eager (and compiled with --compile) and transformers."""
    compiled = args.compile or not args.real
    variants: dict[str, Callable[[], int]] = {}
    for n in (4,) if args.real else (4, 1):
        if compiled:
            variants[f"ours compiled n={n}"] = ours_runner(model, prompt, n, True, args.new_tokens)
        variants[f"ours eager n={n}"] = ours_runner(model, prompt, n, new_tokens=args.new_tokens)
        variants[f"transformers n={n}"] = hf_runner(hf, prompt, n, args.new_tokens)
    return variants


def best_rate(run: Callable[[], int], rates: list[float]) -> None:
    t = time.perf_counter()
    tokens = run()
    rates.append(tokens / (time.perf_counter() - t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--real", action="store_true", help=f"the real {REAL_MODEL} instead of the random model")
    parser.add_argument("--compile", action="store_true", help="--real: also the compiled engine (the headline)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="new tokens per candidate")
    args = parser.parse_args()
    rounds = 2 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    model, hf, prompt, name = real_models() if args.real else random_models()
    hf.generation_config.eos_token_id = None
    variants = build_variants(model, hf, prompt, args)
    rates: dict[str, list[float]] = {variant: [] for variant in variants}
    for run in variants.values():  # warm up (and compile)
        run()
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else list(variants)[::-1]:
            best_rate(variants[variant], rates[variant])
    workload = f"{len(prompt)}-token prompt, {args.new_tokens} new tokens per candidate"
    print(f"\n{workload}, fp32, {args.threads} threads; best of {rounds}")
    print(f"{'variant':<24}{'new tok/s':>12}{'median':>10}")
    for variant, r in rates.items():
        print(f"{variant:<24}{max(r):>12.0f}{sorted(r)[len(r) // 2]:>10.0f}")
    ratio = {v: max(rates[v]) / max(rates[f"transformers n={n}"]) for v in rates if "ours" in v for n in (v[-1],)}
    print("vs transformers: " + ", ".join(f"{v} {r:.2f}" for v, r in ratio.items()))
    if args.real:
        print(f"model: {name}")
    headline = "ours compiled n=4" if "ours compiled n=4" in ratio else "ours eager n=4"
    print(f"generate_speed_vs_hf: {ratio[headline]:.2f}")


if __name__ == "__main__":
    main()
