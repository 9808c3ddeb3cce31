"""`flywheel demo flywheel`: watch the loop turn, through HTTP only, as people would drive it.

Each turn: simulated annotators (the demo world's gold scorer plus noise) rank candidate sets and a simulated user
chats and thumbs answers, all through the REST API; then an admin token starts a `reward` job and an `rl` job,
waits for them, and the gold score of the policy the server now serves is measured on held-out prompts through
`/v1/chat/completions`. With --url it drives a running server (give an admin token); alone it starts its own
(SQLite in a temporary directory, the demo model, an embedded worker) on a free port.

Last line: `flywheel_turns: T gold_before=X gold_after=Y`.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.jobs.bootstrap import FLYWHEEL_DEMO_MODEL, bootstrap_demo_model, seed_demo_prompts
from ml.demo.world import SimulatedAnnotator, World

# The flags that size the demo model this command trains when --demo-model is not given (with --bad-fraction).
SIZE_FLAGS = ("pretrain_steps", "sft_steps", "demo_docs", "n_layer", "n_embd")


class Driver:
    """Talks to one Flywheel server with an admin token; makes annotator and user accounts as needed."""

    def __init__(self, url: str, admin_token: str) -> None:
        self.url = url.rstrip("/")
        self.admin = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=600)

    def account(self, name: str, role: str) -> httpx.Client:
        known = {u["username"]: u for u in self.admin.get("/api/v1/users").raise_for_status().json()}
        user = (
            known.get(name)
            or self.admin.post(
                "/api/v1/users", json={"username": name, "password": f"{name}-demo-password", "role": role}
            )
            .raise_for_status()
            .json()
        )
        token = self.admin.post(f"/api/v1/users/{user['id']}/tokens", json={"name": "demo flywheel"})
        secret = token.raise_for_status().json()["token"]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {secret}"}, timeout=600)

    def annotate(self, client: httpx.Client, annotator: SimulatedAnnotator, tasks: int) -> int:
        done = 0
        for _ in range(tasks):
            response = client.get("/api/v1/annotation/next").raise_for_status()
            if response.status_code == 204:
                break
            task = response.json()
            ranks = annotator.rank(task["messages"], [c["content"] for c in task["candidates"]])
            ranking = [{"candidate_id": c["id"], "rank": r} for c, r in zip(task["candidates"], ranks, strict=True)]
            client.post(
                f"/api/v1/annotation/sets/{task['set_id']}/ranking", json={"ranking": ranking}
            ).raise_for_status()
            done += 1
        return done

    def chat_and_thumb(self, client: httpx.Client, user: SimulatedAnnotator, prompts: list[list[dict]]) -> int:
        for messages in prompts:  # one conversation per question: a growing history would crowd out the answers
            conversation = client.post("/api/v1/conversations", json={"title": "demo user"}).raise_for_status().json()
            body = {"content": messages[-1]["content"], "max_tokens": 48}
            exchange = client.post(f"/api/v1/conversations/{conversation['id']}/messages", json=body)
            answer = exchange.raise_for_status().json()["answer"]
            value = 1 if user.thumb(messages, answer["content"]) else -1
            client.put(f"/api/v1/messages/{answer['id']}/feedback", json={"value": value}).raise_for_status()
        return len(prompts)

    def run_job(self, type: str, params: dict, timeout_s: float) -> dict:
        job = self.admin.post("/api/v1/jobs", json={"type": type, "params": params}).raise_for_status().json()
        deadline = time.monotonic() + timeout_s
        while job["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job['id']} ({type}) did not finish in {timeout_s:.0f} s")
            time.sleep(1.0)
            job = self.admin.get(f"/api/v1/jobs/{job['id']}").raise_for_status().json()
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} ({type}) {job['status']}: {job['error']}")
        return job

    def served_gold(
        self,
        client: httpx.Client,
        world: World,
        prompts: list[list[dict]],
        samples: int,
        seed: int,
        max_tokens: int = 48,
    ) -> tuple[str, float]:
        """Mean gold score of what a chatting user gets: `samples` answers per prompt at the chat's default sampling
        (temperature 0.8, top-p 0.95), seeded so that two policies are compared on the same random draws."""
        model = client.get("/v1/models").raise_for_status().json()["data"][0]["id"]
        scores = []
        for i, messages in enumerate(prompts):
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0.8,
                "top_p": 0.95,
                "n": samples,
                "seed": seed * 100_000 + i * samples,
            }
            answer = client.post("/v1/chat/completions", json=body).raise_for_status().json()
            scores += [world.gold_score(messages, choice["message"]["content"]) for choice in answer["choices"]]
        return model, sum(scores) / len(scores)

    def wait_for_model(self, client: httpx.Client, not_named: str | None, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            data = client.get("/v1/models").json().get("data") or []
            if data and data[0]["id"] != not_named:
                return
            time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_given_model(factory, path: str) -> None:
    """Register a chat model trained on the demo world (e.g. a demo experiment's `sft`) as the active SFT model."""
    from app.db import transaction
    from app.models import ModelKind
    from app.services import model_versions
    from app.services.training_data import TrainingData
    from ml.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(path)
    except (CheckpointError, OSError, ValueError) as exc:
        raise SystemExit(f"flywheel demo flywheel: error: --demo-model {path}: {exc}") from exc
    where = Path(path).resolve()
    data = TrainingData(demo=True, demo_seed=0, extra={"given": f"demo world model {where}"})
    with transaction(factory) as session:
        model_versions.register(
            session, name=where.name, kind=ModelKind.sft, path=str(where), training_data=data, activate=True
        )


@contextmanager
def own_server(args: argparse.Namespace):
    """A fresh Flywheel (the demo model trained small, an embedded worker) on a free port; yields (url, token)."""
    from app import migrate
    from app.db import make_engine, make_session_factory, transaction
    from app.models import Role
    from app.services import tokens, users
    from app.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "FLYWHEEL_DATA_DIR": str(Path(tmp) / "data"),
            "FLYWHEEL_SECRET_KEY": "d" * 40,
            "FLYWHEEL_MODEL_POLL_S": "0.5",
            "FLYWHEEL_MAX_STREAMS_PER_USER": "16",
            "FLYWHEEL_ANNOTATIONS_PER_SET": str(args.per_set),
        }
        if args.database_url:
            env["FLYWHEEL_DATABASE_URL"] = args.database_url
        settings = Settings(data_dir=Path(tmp) / "data", secret_key="d" * 40, database_url=args.database_url)
        migrate.upgrade(settings.resolved_database_url)
        factory = make_session_factory(make_engine(settings.resolved_database_url))
        if args.demo_model:
            serve_given_model(factory, args.demo_model)
        else:
            recipe = {**FLYWHEEL_DEMO_MODEL, **{k: getattr(args, k) for k in (*SIZE_FLAGS, "bad_fraction")}}
            bootstrap_demo_model(settings, **recipe)
        seed_demo_prompts(settings)
        with transaction(factory) as session:
            admin = users.create_user(session, username="demo-admin", password="demo-admin-password", role=Role.admin)
            token = tokens.create_token(session, user=admin, name="demo flywheel")[1]
        port = free_port()
        log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
        server = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--no-bootstrap", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=log,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(f"{url}/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.5)
            yield url, token
        finally:
            server.terminate()
            server.wait(60)


def turns(url: str, token: str, args: argparse.Namespace) -> tuple[float, float]:
    world = World(0)  # the demo model's and the prompt pool's world; --seed varies the people, not the facts
    driver = Driver(url, token)
    people = 1000 * args.seed
    annotators = [
        (driver.account(f"sim-annotator-{i}", "annotator"), SimulatedAnnotator(world, args.noise, people + i))
        for i in range(args.annotators)
    ]
    user_client, user = driver.account("sim-user", "user"), SimulatedAnnotator(world, args.noise, people + 999)
    held_out = [p.messages for p in world.prompts(400) if p.split == "heldout"][: args.eval_prompts]
    measure = lambda: driver.served_gold(user_client, world, held_out, args.eval_samples, args.seed)  # noqa: E731
    train = [p.messages for p in world.prompts(400) if p.split == "train"]
    driver.wait_for_model(user_client, None)
    served, gold_before = measure()
    print(f"turn 0: serving {served}, gold {gold_before:.3f}", flush=True)
    gold = gold_before
    for turn in range(1, args.turns + 1):
        ranked = sum(driver.annotate(client, sim, args.tasks) for client, sim in annotators)
        chats = train[(turn - 1) * args.chats : turn * args.chats]
        thumbs = driver.chat_and_thumb(user_client, user, chats)
        threads = {"threads": args.threads} if args.threads else {}
        reward = driver.run_job("reward", {"steps": args.reward_steps, **threads}, args.job_timeout)
        rl_params = {"steps": args.rl_steps, "kl_coef": args.kl_coef, "gate_prompts": args.eval_prompts, **threads}
        rl = driver.run_job("rl", rl_params, args.job_timeout)
        versions = driver.admin.get("/api/v1/models").raise_for_status().json()
        rm = next(v for v in versions if v["kind"] == "reward" and v["job_id"] == reward["id"])
        policy = next(v for v in versions if v["kind"] == "policy" and v["job_id"] == rl["id"])
        if policy["status"] == "active":
            driver.wait_for_model(user_client, served)
        served, gold = measure()
        print(
            f"turn {turn}: {ranked} rankings + {thumbs} thumbs; reward model accuracy "
            f"{rm['metrics'].get('val_acc', float('nan')):.3f}; new policy {policy['status']} "
            f"({policy['metrics'].get('gate')}); serving {served}, gold {gold:.3f}",
            flush=True,
        )
    return gold_before, gold


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="drive this running server (needs --token) instead of starting one")
    parser.add_argument("--token", help="an admin API token for --url")
    parser.add_argument("--database-url", help="for the server this command starts (default: SQLite)")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--annotators", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=20, help="candidate sets each annotator ranks per turn")
    parser.add_argument(
        "--per-set",
        type=int,
        default=1,
        help="distinct annotators who rank each set, for the server this command starts (default "
        "%(default)s: more prompts for the same labour)",
    )
    parser.add_argument("--chats", type=int, default=10, help="questions the simulated user asks per turn")
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument(
        "--eval-prompts", type=int, default=48, help="held-out questions the gold score is taken on (and the gate on)"
    )
    parser.add_argument("--eval-samples", type=int, default=8, help="answers per held-out question (at most 8)")
    parser.add_argument("--reward-steps", type=int, default=150)
    parser.add_argument("--rl-steps", type=int, default=40)
    parser.add_argument(
        "--kl-coef",
        type=float,
        default=0.5,
        help="the rl job's KL penalty (default %(default)s, as in the demo experiment)",
    )
    parser.add_argument(
        "--demo-model",
        metavar="DIR",
        help="serve this chat model trained on the demo world (e.g. a demo experiment's sft "
        "directory) instead of training one; for the server this command starts",
    )
    for flag in SIZE_FLAGS:
        parser.add_argument(
            f"--{flag.replace('_', '-')}",
            type=int,
            default=FLYWHEEL_DEMO_MODEL[flag],
            help="size of the demo model trained when none is given (default %(default)s)",
        )
    parser.add_argument(
        "--bad-fraction",
        type=float,
        default=FLYWHEEL_DEMO_MODEL["bad_fraction"],
        help="share of poor answers in the started server's SFT data (default %(default)s, as in the "
        "demo experiment: room for the loop to improve)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of the reward and rl jobs (default: the worker's, fewer on a busy machine); a fixed "
        "count makes a run's numbers the same however busy the machine is",
    )
    parser.add_argument("--job-timeout", type=float, default=3600)
    parser.add_argument("--seed", type=int, default=0, help="the simulated people's noise and the evaluation's draws")
    parser.add_argument("--server-log", help="append the started server's and worker's output to this file")


def main(args: argparse.Namespace) -> int:
    if args.url and not args.token:
        print("flywheel demo flywheel: error: --url needs --token (an admin API token)", file=sys.stderr)
        return 2
    # SIGTERM as an exit, so that the server this command started is stopped too rather than left running.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    start = time.monotonic()
    if args.url:
        before, after = turns(args.url, args.token, args)
    else:
        with own_server(args) as (url, token):
            before, after = turns(url, token, args)
    print(f"({time.monotonic() - start:.0f} s)")
    print(f"flywheel_turns: {args.turns} gold_before={before:.4f} gold_after={after:.4f}")
    return 0
