"""The real model served for real: `flywheel serve` streaming SmolLM2-135M-Instruct to 1, 4 and 8 concurrent
chats, against transformers' batched `generate` of as many sequences on the same weights.

bench/generate_speed.py compares the engines in-process; this measures what a client of the OpenAI-compatible API
gets, HTTP, tokenizer, continuous batcher and all. The server (one web process, FLYWHEEL_TORCH_THREADS=--threads)
serves bench/real_model.py's `flywheel/` directory; transformers runs in this process on its `hf/` twin, fp32, on
--threads threads. Every chat samples at temperature 1 (no top-k/top-p) exactly --new-tokens tokens (`ignore_eos`),
each from a distinct short prompt; transformers gets the same prompts, rendered by our tokenizer and left-padded.
For each concurrency the server and transformers take turns, never at once, --rounds times each; each side's figure
is its best round's aggregate tokens/s (all completion tokens / the round's wall time, prefill included).

Run: FLYWHEEL_REAL_MODEL_CACHE=/tmp/smol/cache .venv/bin/python bench/real_serve.py           (several minutes)
     FLYWHEEL_REAL_MODEL_CACHE=/tmp/smol/cache .venv/bin/python bench/real_serve.py --quick   (16 tokens, 1 round)
Last line: `real_serve_vs_hf: R`, R the lowest of the three ratios (ours tok/s / transformers' tok/s).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.real_model import FLYWHEEL, HF, real_model_dir
from bench.serving import ChatTiming, Served, served, stream_chat

CONCURRENCY = (1, 4, 8)
TOPICS = ["the moon", "fresh bread", "a lighthouse", "winter rain", "an old map", "bicycles", "a jazz band", "owls"]


@dataclass
class Round:
    rate: float  # completion tokens / wall seconds, all sequences together
    ttfts: list[float] = field(default_factory=list)  # seconds, one per chat (server only)
    gaps: list[float] = field(default_factory=list)  # seconds between content chunks, all chats (server only)
    chunks: int = 0  # content chunks received (server only): fewer than tokens when a chunk held several


@dataclass
class Row:
    ours: Round
    hf: Round
    rss_mb: float


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a short story about {TOPICS[i % len(TOPICS)]}."}]


def server_round(client: httpx.Client, n: int, new_tokens: int, seed: int) -> Round:
    """n chats at once, one thread each; all must produce exactly new_tokens tokens."""

    def chat(i: int) -> ChatTiming:
        body = {
            "messages": messages(i),
            "max_tokens": new_tokens,
            "temperature": 1.0,
            "seed": seed + i,
            "ignore_eos": True,
        }
        return stream_chat(client, body)

    with ThreadPoolExecutor(n) as pool:
        start = time.perf_counter()
        timings = list(pool.map(chat, range(n)))
        wall = time.perf_counter() - start
    counts = [t.tokens for t in timings]
    if any(c != new_tokens for c in counts):
        raise SystemExit(f"the server returned {counts} tokens, not {new_tokens} each: is `ignore_eos` honoured?")
    return Round(
        sum(counts) / wall,
        [t.ttft for t in timings],
        [g for t in timings for g in t.gaps],
        sum(len(t.chunks) for t in timings),
    )


@cache
def tokenizer():
    from ml.tokenizer import Tokenizer

    return Tokenizer.load(real_model_dir() / FLYWHEEL)


def hf_inputs(n: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The server's n prompts, rendered by our tokenizer (as the server does) and left-padded: (ids, mask), (n, T)."""
    prompts = [tokenizer().render_prompt(messages(i)) for i in range(n)]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def hf_round(hf: torch.nn.Module, n: int, new_tokens: int) -> Round:
    pad_id = hf.generation_config.pad_token_id or 0
    ids, mask = hf_inputs(n, pad_id)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=pad_id,
        )
    wall = time.perf_counter() - start
    assert out.shape == (n, ids.shape[1] + new_tokens)
    return Round(n * new_tokens / wall)


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (psutil when installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")
    return psutil.Process(pid).memory_info().rss / 2**20


def measure(server: Served, hf: torch.nn.Module, n: int, rounds: int, new_tokens: int) -> Row:
    """Server and transformers in turn (each side first in every other round); each side's best round."""
    sides: dict[str, Callable[[int], Round]] = {
        "ours": lambda r: server_round(server.client, n, new_tokens, seed=100 * r),
        "hf": lambda r: hf_round(hf, n, new_tokens),
    }
    results: dict[str, list[Round]] = {"ours": [], "hf": []}
    for r in range(rounds):
        for side in sides if r % 2 == 0 else list(sides)[::-1]:
            results[side].append(sides[side](r))
    best = {side: max(rs, key=lambda x: x.rate) for side, rs in results.items()}
    return Row(best["ours"], best["hf"], rss_mb(server.process.pid))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_table(rows: dict[int, Row]) -> None:
    print(
        f"{'concurrency':>11} | {'ours tok/s':>10} | {'HF tok/s':>8} | {'ratio':>5} | {'TTFT p50 ms':>11} | "
        f"{'inter-token p50 ms':>18} | {'inter-token p99 ms':>18} | {'server RSS MB':>13}"
    )
    for n, row in rows.items():
        o = row.ours
        print(
            f"{n:>11} | {o.rate:>10.1f} | {row.hf.rate:>8.1f} | {o.rate / row.hf.rate:>5.2f} | "
            f"{statistics.median(o.ttfts) * 1000:>11.1f} | {percentile(o.gaps, 0.5) * 1000:>18.1f} | "
            f"{percentile(o.gaps, 0.99) * 1000:>18.1f} | {row.rss_mb:>13.0f}"
        )


def server_errors(log: Path) -> list[str]:
    """Lines of the server's log that tell of a failure (tracebacks, errors, 5xx answers)."""
    marks = ("Traceback", "ERROR", "Error:", "Exception", '" 500 ', '" 503 ')
    return [line for line in log.read_text(errors="replace").splitlines() if any(m in line for m in marks)]


def report_log(log: Path) -> None:
    if not log.exists():
        return
    lines, errors = len(log.read_text(errors="replace").splitlines()), server_errors(log)
    print(f"server log: {lines} lines, {len(errors)} of them errors" + "".join(f"\n  {e}" for e in errors[:20]))


def load_hf(threads: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    hf = AutoModelForCausalLM.from_pretrained(real_model_dir() / HF, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{CONCURRENCY} still, but 16 new tokens and 1 round")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server and of transformers")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    rounds, new_tokens = (1, 16) if args.quick else (args.rounds, args.new_tokens)
    print("load average at start: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    hf = load_hf(args.threads)
    hf_round(hf, 2, 4)  # warm-up
    env = {"FLYWHEEL_TORCH_THREADS": str(args.threads), "FLYWHEEL_MAX_NEW_TOKENS": str(max(256, new_tokens))}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        try:
            with served(str(real_model_dir() / FLYWHEEL), env=env, log=log, timeout_s=180) as server:
                server_round(server.client, 1, 4, seed=0)  # warm-up
                rows = {n: measure(server, hf, n, rounds, new_tokens) for n in CONCURRENCY}
        finally:
            report_log(log)
    print(
        f"\nSmolLM2-135M-Instruct, fp32, {args.threads} threads, {new_tokens} new tokens per chat, "
        f"sampling at temperature 1; best of {rounds} round(s) per side"
    )
    print_table(rows)
    chunks, tokens = sum(r.ours.chunks for r in rows.values()), sum(n * new_tokens for n in rows)
    print(f"content chunks / completion tokens (server): {chunks} / {tokens}")
    print("load average at end: " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"real_serve_vs_hf: {min(r.ours.rate / r.hf.rate for r in rows.values()):.2f}")


if __name__ == "__main__":
    main()
