"""Serving a LoRA policy: adapters merged into the weights (what promotion does) against adapters applied at run time.

A promoted LoRA policy is saved with its adapters folded into the weights (ml/checkpoint.py), so the server decodes
it as a plain model. The alternative, keeping the frozen base and adding each adapter's two small products at every
step, would let one base serve many adapters; this bench measures what that costs per token on SmolLM2-135M-Instruct
(bench/real_model.py): decoding steps of batch 1 and 8 after a 64-token prompt, the same weights on both sides (the
run-time side's adapters are random, non-zero; the merged side holds base + B A), eager, fp32, alternating rounds so
background load hits both, each figure a side's best round.

Run:  .venv/bin/python bench/lora_serve.py          (~2 minutes on 2 cores)
The last line is `lora_runtime_vs_merged: R`, R = tokens/s with run-time adapters over merged, at batch 8.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.real_model import FLYWHEEL, real_model_dir
from ml import lora
from ml.checkpoint import load_checkpoint
from ml.model import KVCache, Transformer


def sides(rank: int) -> dict[str, Transformer]:
    """The same policy twice: base + live adapters, and the adapters folded in."""
    runtime, _ = load_checkpoint(real_model_dir() / FLYWHEEL)
    params = lora.attach(runtime, lora.LoraSpec(rank=rank, alpha=2 * rank))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:  # a trained adapter is not zero: give every matrix small random values
            p.copy_(0.01 * torch.randn(p.shape, generator=generator))
    merged = copy.deepcopy(runtime)
    for module in merged.modules():
        if getattr(module, "adapter", None) is not None:
            module.weight.data = module.effective_weight().detach()
            module.adapter = None
    assert not lora.has_adapters(merged)
    return {"merged": merged.eval(), "run-time adapters": runtime.eval()}


@torch.inference_mode()
def decode_rate(model: Transformer, batch: int, prompt_len: int, steps: int) -> float:
    """Tokens/s of `steps` greedy one-token steps for `batch` rows after a prompt (the prefill is not timed)."""
    idx = torch.randint(100, 1000, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    cache = KVCache.for_model(model, batch, prompt_len + steps + 1)
    logits, _ = model(idx, kv_cache=cache, last_only=True)
    token = logits[:, -1].argmax(-1, keepdim=True)
    start = time.perf_counter()
    for _ in range(steps):
        logits, _ = model(token, kv_cache=cache, last_only=True)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
    models = sides(args.rank)
    with torch.inference_mode():  # the two sides answer alike: they are the same policy
        probe = torch.randint(100, 1000, (1, 16), generator=torch.Generator().manual_seed(2))
        gap = (models["merged"](probe)[0] - models["run-time adapters"](probe)[0]).abs().max().item()
    print(f"rank {args.rank} on every projection; max |logit difference| merged vs run-time: {gap:.2e}")
    rates: dict[tuple[str, int], list[float]] = {}
    for model in models.values():  # warm-up, untimed
        decode_rate(model, 1, 64, 4)
    for _ in range(args.rounds):
        for batch in (1, 8):
            for name, model in models.items():
                rates.setdefault((name, batch), []).append(decode_rate(model, batch, 64, args.steps))
    print("| batch | merged tok/s | run-time adapters tok/s | run-time / merged |")
    print("| --- | --- | --- | --- |")
    for batch in (1, 8):
        merged, runtime = max(rates[("merged", batch)]), max(rates[("run-time adapters", batch)])
        print(f"| {batch} | {merged:.1f} | {runtime:.1f} | {runtime / merged:.2f} |")
    print("load average at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    ratio = max(rates[("run-time adapters", 8)]) / max(rates[("merged", 8)])
    print(f"lora_runtime_vs_merged: {ratio:.2f}")


if __name__ == "__main__":
    main()
