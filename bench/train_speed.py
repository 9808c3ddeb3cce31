"""Training throughput of ml.model.Transformer against transformers' LlamaForCausalLM of the same shape.

One step = forward + backward + fused AdamW on a (16, 256) batch of a 6-layer, width-256, 4-head model with SwiGLU
hidden 1024 and vocab 4096, fp32 on 2 CPU threads. transformers runs eager and under torch.compile; ours runs
compiled (or eager with --no-compile). Sides alternate in rounds so that background load hits all of them; each
figure is a variant's best round. MFU is against the fp32 matmul peak measured in the same process.

Two ceiling rows time only the kernels every variant must run, at the same shapes: the linear layers' GEMMs
(forward and both backward products), then those plus the attention kernel. No implementation on this BLAS can
beat them, so `R at most` bounds what any rewrite of the model could reach against transformers.

Both sides share one process-wide allocator setting (see tune_malloc): glibc otherwise returns every large freed
tensor to the kernel and page-faults it back in on the next step, which costs ~30% of a step on CPU.

Run:
    .venv/bin/python bench/train_speed.py            # full (~5 minutes on 2 cores)
    .venv/bin/python bench/train_speed.py --quick    # fewer rounds and steps
The last line is `train_speed_vs_hf: R`, R = our tokens/s over the faster transformers variant.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ml.model import ModelConfig, Transformer

SHAPE = dict(vocab_size=4096, n_layer=6, n_head=4, n_kv_head=4, n_embd=256, intermediate_size=1024, max_seq_len=256)
BATCH, BLOCK = 16, 256


def tune_malloc() -> bool:
    """Keep freed memory in the heap (glibc mallopt) so big activations are not page-faulted in every step."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 34)
    return bool(ok and libc.mallopt(m_top_pad, 1 << 28))


def matmul_peak(n: int = 4096, reps: int = 5) -> float:
    """Best observed fp32 GEMM FLOP/s: the ceiling for MFU."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def kernel_floor_tokens_per_s(reps: int = 3) -> tuple[float, float]:
    """Tokens/s of a step that did nothing but its GEMMs, then its GEMMs plus attention: a ceiling for any
    implementation of this model on this BLAS, since every variant must run exactly these kernels.

    Per linear layer: forward x @ W, backward dY @ W^T and X^T @ dY, at the bench's shapes (the tied head
    included); attention is the SDPA kernel's causal forward + backward on (B, n_head, BLOCK, head_dim).
    """
    tokens, d, hidden = BATCH * BLOCK, SHAPE["n_embd"], SHAPE["intermediate_size"]
    shapes = [(d, 3 * d), (d, d), (d, 2 * hidden), (hidden, d)] * SHAPE["n_layer"] + [(d, SHAPE["vocab_size"])]
    mats = [(torch.randn(tokens, k), torch.randn(k, n), torch.randn(tokens, n)) for k, n in shapes]
    head_dim = d // SHAPE["n_head"]
    qkv = [torch.randn(BATCH, SHAPE["n_head"], BLOCK, head_dim, requires_grad=True) for _ in range(3)]
    grad = torch.randn(BATCH, SHAPE["n_head"], BLOCK, head_dim)

    def gemms() -> None:
        for x, w, dy in mats:
            x @ w, dy @ w.T, x.T @ dy

    def attention() -> None:
        for _ in range(SHAPE["n_layer"]):
            y = torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=True)
            torch.autograd.grad(y, qkv, grad)

    def best_seconds(fn: Callable[[], None]) -> float:
        fn()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        return best

    g, a = best_seconds(gemms), best_seconds(attention)
    return tokens / g, tokens / (g + a)


def hf_model() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=SHAPE["vocab_size"],
        hidden_size=SHAPE["n_embd"],
        intermediate_size=SHAPE["intermediate_size"],
        num_hidden_layers=SHAPE["n_layer"],
        num_attention_heads=SHAPE["n_head"],
        num_key_value_heads=SHAPE["n_kv_head"],
        max_position_embeddings=SHAPE["max_seq_len"],
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg)


class Variant:
    """A model, its optimizer and a one-step closure; `rates` collects tokens/s per round."""

    def __init__(self, name: str, model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> None:
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        self.rates: list[float] = []

    def step(self) -> None:
        loss = self.loss_fn()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int) -> None:
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.rates.append(steps * BATCH * BLOCK / (time.perf_counter() - t))


def build_variants(compile_ours: bool, x: torch.Tensor, y: torch.Tensor, with_eager_ours: bool) -> list[Variant]:
    ours = Transformer(ModelConfig(**SHAPE))
    ours_fwd = torch.compile(ours) if compile_ours else ours
    variants = [Variant("ours" + (" (compiled)" if compile_ours else " (eager)"), ours, lambda: ours_fwd(x, y)[1])]
    if with_eager_ours and compile_ours:
        eager = Transformer(ModelConfig(**SHAPE))
        variants.append(Variant("ours (eager)", eager, lambda: eager(x, y)[1]))
    hf = hf_model()
    variants.append(Variant("transformers (eager)", hf, lambda: hf(input_ids=x, labels=y).loss))
    hf2 = hf_model()
    hf2_fwd = torch.compile(hf2)
    variants.append(Variant("transformers (compiled)", hf2, lambda: hf2_fwd(input_ids=x, labels=y).loss))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 steps")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--no-compile", action="store_true", help="run our model eager")
    parser.add_argument("--eager-ours", action="store_true", help="also time our model eager")
    parser.add_argument("--no-malloc-tuning", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    rounds, steps = (2, 2) if args.quick else (args.rounds, args.steps)
    torch.set_num_threads(args.threads)
    tuned = False if args.no_malloc_tuning else tune_malloc()
    torch.manual_seed(0)
    x = torch.randint(0, SHAPE["vocab_size"], (BATCH, BLOCK))
    y = torch.randint(0, SHAPE["vocab_size"], (BATCH, BLOCK))
    variants = build_variants(not args.no_compile, x, y, args.eager_ours)
    for v in variants:  # warm up: compile, allocate optimizer state
        t = time.perf_counter()
        v.step()
        v.step()
        print(f"warm-up {v.name}: {time.perf_counter() - t:.1f}s", flush=True)
    peak = matmul_peak()
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            v.run(steps)
        peak = max(peak, matmul_peak(reps=2))
    flops = Transformer(ModelConfig(**SHAPE)).estimate_flops_per_token(BLOCK)
    gemm_only, gemm_attention = kernel_floor_tokens_per_s()
    print(
        f"\nfp32 matmul peak {peak / 1e9:.0f} GFLOP/s, {flops / 1e6:.1f} MFLOP/token, {args.threads} threads, "
        f"malloc tuned: {tuned}"
    )
    print(f"{'variant':<26}{'best tok/s':>12}{'median':>10}{'MFU':>8}")
    for v in variants:
        best, med = max(v.rates), sorted(v.rates)[len(v.rates) // 2]
        print(f"{v.name:<26}{best:>12.0f}{med:>10.0f}{best * flops / peak:>8.1%}")
    ours, hf_best = max(variants[0].rates), max(max(v.rates) for v in variants if v.name.startswith("transformers"))
    print(
        f"{'ceiling: GEMMs only':<26}{gemm_only:>12.0f}{'':>10}{gemm_only * flops / peak:>8.1%}"
        f"   (R at most {gemm_only / hf_best:.2f})"
    )
    print(
        f"{'ceiling: GEMMs+attention':<26}{gemm_attention:>12.0f}{'':>10}{gemm_attention * flops / peak:>8.1%}"
        f"   (R at most {gemm_attention / hf_best:.2f}; norms, loss, optimizer free)"
    )
    print(f"train_speed_vs_hf: {ours / hf_best:.2f}")


if __name__ == "__main__":
    main()
