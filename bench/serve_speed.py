"""Serving throughput: aggregate generated tokens/s of the running server at 1 and at 8 concurrent chats, and time
to first token, through the OpenAI-compatible API. The server batches concurrent requests on the fly, so 8 chats
at once should finish far faster than 8 in a row.

Run: .venv/bin/python bench/serve_speed.py            (trains a throwaway demo-sized model first, ~1 minute)
     .venv/bin/python bench/serve_speed.py --model DIR (serve an existing model directory)
Last line: `concurrent_speedup_8: R` (aggregate tokens/s at 8 concurrent / at 1).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(data_dir: Path, model: str | None) -> str:
    """Register a model as the served one (training a short demo model unless one is given); returns a token."""
    from app import migrate
    from app.bootstrap import bootstrap_demo_model
    from app.db import make_engine, make_session_factory, transaction
    from app.models import ModelKind, ModelStatus, ModelVersion, Role
    from app.services import tokens, users
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, secret_key="b" * 40)
    migrate.upgrade(settings.resolved_database_url)
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    if model:
        with transaction(factory) as session:
            session.add(ModelVersion(name="bench", kind=ModelKind.sft, path=model, status=ModelStatus.active))
    else:
        bootstrap_demo_model(settings, pretrain_steps=40, sft_steps=20, demo_docs=2000)
    with transaction(factory) as session:
        user = users.create_user(session, username="bench", password="bench password", role=Role.user)
        return tokens.create_token(session, user=user, name="bench")[1]


def one_chat(client: httpx.Client, i: int, max_tokens: int) -> tuple[int, float, float]:
    """(completion tokens, time to first token, total seconds) of one streamed chat."""
    body = {"messages": [{"role": "user", "content": f"Tell me about person number {i}."}], "max_tokens": max_tokens,
            "temperature": 1.0, "seed": i, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start = time.perf_counter()
    first, tokens = None, 0
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return tokens, first or total, total


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
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        token = prepare(data_dir, args.model)
        port = free_port()
        env = {**os.environ, "FLYWHEEL_DATA_DIR": str(data_dir), "FLYWHEEL_SECRET_KEY": "b" * 40,
               "FLYWHEEL_MAX_STREAMS_PER_USER": "16"}  # fmt: skip
        server = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--no-worker", "--no-bootstrap",
                                   "--port", str(port)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                                  timeout=300)  # fmt: skip
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/v1/models").json()["data"]:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("the server did not come up with a model")
                time.sleep(0.5)
            one_chat(client, 0, 8)  # warm-up
            rows = {n: measure(client, n, args.rounds, args.max_tokens) for n in (1, 8)}
        finally:
            server.terminate()
            server.wait(30)
    print(f"{'concurrent chats':>16} {'tokens/s':>10} {'TTFT median ms':>15}")
    for n, (speed, ttft) in rows.items():
        print(f"{n:>16} {speed:>10.1f} {ttft * 1000:>15.1f}")
    print(f"concurrent_speedup_8: {rows[8][0] / rows[1][0]:.2f}")


if __name__ == "__main__":
    main()
