"""Serving throughput: aggregate generated tokens/s of the running server at 1 and at 8 concurrent chats, and time
to first token, through the OpenAI-compatible API. The server batches concurrent requests on the fly, so 8 chats
at once should finish far faster than 8 in a row.

Run: .venv/bin/python bench/serve_speed.py            (trains a throwaway demo-sized model first, ~1 minute)
     .venv/bin/python bench/serve_speed.py --model DIR (serve an existing model directory)
Last line: `concurrent_speedup_8: R` (aggregate tokens/s at 8 concurrent / at 1).
"""

import argparse
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.serving import served, stream_chat


def one_chat(client: httpx.Client, i: int, max_tokens: int) -> tuple[int, float, float]:
    """(completion tokens, time to first token, total seconds) of one streamed chat."""
    body = {
        "messages": [{"role": "user", "content": f"Tell me about person number {i}."}],
        "max_tokens": max_tokens,
        "temperature": 1.0,
        "seed": i,
    }
    timing = stream_chat(client, body)
    return timing.tokens, timing.ttft, timing.total


def measure(client: httpx.Client, concurrency: int, rounds: int, max_tokens: int) -> tuple[float, float]:
    """Aggregate tokens/s and median time to first token with `concurrency` chats at once."""
    speeds, ttfts = [], []
    with ThreadPoolExecutor(concurrency) as pool:
        for r in range(rounds):
            results = list(pool.map(lambda i: one_chat(client, i, max_tokens), range(r * 100, r * 100 + concurrency)))
            wall = max(total for _, _, total in results)
            speeds.append(sum(tokens for tokens, _, _ in results) / wall)
            ttfts += [ttft for _, ttft, _ in results]
    return statistics.median(speeds), statistics.median(ttfts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model directory to serve (default: train a short demo model)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    with served(args.model) as server:
        one_chat(server.client, 0, 8)  # warm-up
        rows = {n: measure(server.client, n, args.rounds, args.max_tokens) for n in (1, 8)}
    print(f"{'concurrent chats':>16} {'tokens/s':>10} {'TTFT median ms':>15}")
    for n, (speed, ttft) in rows.items():
        print(f"{n:>16} {speed:>10.1f} {ttft * 1000:>15.1f}")
    print(f"concurrent_speedup_8: {rows[8][0] / rows[1][0]:.2f}")


if __name__ == "__main__":
    main()
