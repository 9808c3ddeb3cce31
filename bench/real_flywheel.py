"""The flywheel on a real chat model: does a turn of rankings, thumbs, a LoRA reward model and LoRA RL make
SmolLM2-135M-Instruct better, as served, on questions it was never trained on?

Everything goes through a real server, as `flywheel demo flywheel` does for the demo model:

1. SmolLM2-135M-Instruct (bench/real_model.py) is imported with `flywheel model import-hf --activate` into a fresh
   data directory (SQLite); `flywheel serve` starts with its embedded worker;
2. the task world's prompts (ml/demo/tasks.py, both splits) are imported through `POST /api/v1/prompts/import`;
3. each turn: simulated annotators (gold plus noise) rank candidate sets the server samples from the served model
   (`GET /api/v1/annotation/next`), a simulated user chats on train prompts and gives thumbs; an admin token starts
   a `reward` job and an `rl` job with LoRA adapters (`lora` parameter), which the gate promotes or holds back; a
   promoted policy is hot-swapped in;
4. served gold: the mean gold score of answers from `/v1/chat/completions` on held-out prompts (the same seeds
   before and after, the chat's sampling: temperature 0.8, top-p 0.95).

Run:  .venv/bin/python bench/real_flywheel.py            (~40 minutes on 2 cores; fetches the model once)
      .venv/bin/python bench/real_flywheel.py --quick    (a smoke test of the wiring, a few minutes)
Last line: `real_flywheel: gold_before=X gold_after=Y minutes=M`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.cli.demo_flywheel import Driver, free_port  # noqa: E402
from bench.real_model import HF, real_model_dir  # noqa: E402
from ml.demo.tasks import TaskWorld  # noqa: E402
from ml.demo.world import SimulatedAnnotator  # noqa: E402

SECRET = "r" * 40


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"flywheel {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def admin_token(data_dir: Path) -> str:
    from app.db import make_engine, make_session_factory, transaction
    from app.models import Role
    from app.services import tokens, users
    from app.settings import Settings

    settings = Settings(data_dir=data_dir, secret_key=SECRET)
    factory = make_session_factory(make_engine(settings.resolved_database_url))
    with transaction(factory) as session:
        admin = users.create_user(session, username="bench-admin", password="bench-admin-password", role=Role.admin)
        return tokens.create_token(session, user=admin, name="real flywheel")[1]


@contextmanager
def server(args: argparse.Namespace):
    """A fresh Flywheel serving SmolLM2 (imported through the CLI) with an embedded worker; yields (url, token)."""
    with tempfile.TemporaryDirectory(prefix="real-flywheel-") as tmp:
        data = Path(tmp) / "data"
        env = {
            **os.environ,
            "FLYWHEEL_DATA_DIR": str(data),
            "FLYWHEEL_SECRET_KEY": SECRET,
            "FLYWHEEL_MODEL_POLL_S": "0.5",
            "FLYWHEEL_MAX_STREAMS_PER_USER": "16",
            "FLYWHEEL_ANNOTATIONS_PER_SET": "1",
            "FLYWHEEL_CANDIDATE_TEMPERATURE": str(args.temperature),
            "FLYWHEEL_CANDIDATE_TOP_P": str(args.top_p),
            "FLYWHEEL_CANDIDATE_MAX_TOKENS": str(args.max_tokens),
            "FLYWHEEL_REWARD_MIN_LABELS": "4" if args.quick else "20",
        }
        cli(env, "db", "upgrade")
        print(cli(env, "model", "import-hf", str(real_model_dir() / HF), "--name", "smollm2", "--activate").strip())
        token = admin_token(data)
        port = free_port()
        log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL  # noqa: SIM115
        command = [sys.executable, "-m", "app.cli", "serve", "--no-bootstrap", "--port", str(port)]
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=log)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while not _ready(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start (see --server-log)")
                time.sleep(1)
            yield url, token
        finally:
            proc.terminate()
            proc.wait(60)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def import_prompts(driver: Driver, world: TaskWorld) -> int:
    lines = [json.dumps({"messages": p.messages, "split": p.split}) for p in world.prompts(10_000)]
    response = driver.admin.post("/api/v1/prompts/import", json={"jsonl": "\n".join(lines)})
    return response.raise_for_status().json()["added"]


def job_params(args: argparse.Namespace) -> tuple[dict, dict]:
    """The reward job's and the policy job's (rl or dpo) parameters."""
    lora = {"rank": args.lora_rank, "alpha": 2 * args.lora_rank}
    reward = {"steps": args.reward_steps, "batch_size": 8, "lr": args.reward_lr, "lora": lora}
    if args.reward_head_only:  # the score head alone on the frozen trunk's cached features: cheap steps
        reward = {"steps": args.reward_steps, "batch_size": 16, "lr": args.reward_lr, "head_only": True}
        reward["weight_decay"] = args.reward_weight_decay
    sampling = {"max_new_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    gating = {"gate_prompts": args.gate_prompts, "gate_samples": 2}
    if args.policy_job == "dpo":
        dpo = {"lora": lora, "steps": args.dpo_steps, "lr": args.rl_lr, "beta": args.beta, "batch_size": 8}
        return reward, {**dpo, **sampling, **gating}
    rl = {
        "algo": args.algo,
        "lora": lora,
        "steps": args.rl_steps,
        "lr": args.rl_lr,
        **({"kl_coef": args.kl_coef} if args.kl_coef is not None else {}),
        "stop_penalty": args.stop_penalty,
        "prompts_per_step": args.prompts_per_step,
        "samples_per_prompt": args.samples_per_prompt,
        "max_new_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "gate_prompts": args.gate_prompts,
        "gate_samples": 2,
        "watch_every": 0,
    }
    return reward, rl


def turns(url: str, token: str, args: argparse.Namespace) -> tuple[float, float]:
    world, driver = TaskWorld(0), Driver(url, token)
    print(f"imported {import_prompts(driver, world)} task-world prompts", flush=True)
    annotators = [
        (driver.account(f"annotator-{i}", "annotator"), SimulatedAnnotator(world, args.noise, seed=i))
        for i in range(args.annotators)
    ]
    user_client, user = driver.account("user", "user"), SimulatedAnnotator(world, args.noise, seed=99)
    prompts = world.prompts(10_000)
    held_out = [p.messages for p in prompts if p.split == "heldout"][: args.eval_prompts]
    train = [p.messages for p in prompts if p.split == "train"]
    driver.wait_for_model(user_client, None, timeout_s=300)
    measure = lambda: driver.served_gold(user_client, world, held_out, args.eval_samples, 0, args.max_tokens)  # noqa: E731
    served, before = measure()
    print(f"turn 0: serving {served}, gold {before:.4f} ({_clock()})", flush=True)
    gold, reward_params, rl_params = before, *job_params(args)
    for turn in range(1, args.turns + 1):
        ranked = sum(driver.annotate(client, sim, args.tasks) for client, sim in annotators)
        thumbs = driver.chat_and_thumb(user_client, user, train[(turn - 1) * args.chats : turn * args.chats])
        print(f"turn {turn}: {ranked} rankings + {thumbs} thumbs ({_clock()})", flush=True)
        reward = driver.run_job("reward", reward_params, args.job_timeout)
        print(f"  reward job {reward['id']} done ({_clock()})", flush=True)
        rl = driver.run_job(args.policy_job, rl_params, args.job_timeout)
        versions = driver.admin.get("/api/v1/models").raise_for_status().json()
        rm = next(v for v in versions if v["kind"] == "reward" and v["job_id"] == reward["id"])
        policy = next(v for v in versions if v["kind"] == "policy" and v["job_id"] == rl["id"])
        if policy["status"] == "active":
            driver.wait_for_model(user_client, served, timeout_s=300)
        served, gold = measure()
        print(
            f"turn {turn}: reward model held-out accuracy {rm['metrics'].get('heldout_acc', float('nan')):.3f} "
            f"(val {rm['metrics'].get('val_acc', float('nan')):.3f}); policy {policy['status']} "
            f"({policy['metrics'].get('gate')}); serving {served}, gold {gold:.4f} ({_clock()})",
            flush=True,
        )
    return before, gold


START = time.monotonic()


def _clock() -> str:
    return f"{(time.monotonic() - START) / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="a smoke test: few labels, few steps")
    add("--turns", type=int, default=1)
    add("--annotators", type=int, default=3)
    add("--tasks", type=int, default=32, help="candidate sets each annotator ranks per turn")
    add("--chats", type=int, default=16, help="train questions the simulated user asks per turn (thumbs)")
    add("--noise", type=float, default=0.1)
    add("--eval-prompts", type=int, default=40, help="held-out prompts served gold is measured on")
    add("--eval-samples", type=int, default=2)
    add("--temperature", type=float, default=0.8, help="candidates' and rollouts' sampling")
    add("--top-p", type=float, default=0.95)
    add("--max-tokens", type=int, default=32, help="candidates', rollouts' and evaluation answers' length")
    add("--lora-rank", type=int, default=16)
    add("--reward-steps", type=int, default=30)
    add("--reward-lr", type=float, default=5e-4)
    add(
        "--reward-head-only",
        action="store_true",
        help="the reward job trains its score head alone on the frozen trunk's features (use --reward-steps 400 "
        "--reward-lr 1e-2 --reward-weight-decay 1)",
    )
    add("--reward-weight-decay", type=float, default=0.0, help="the head-only reward job's AdamW weight decay")
    add("--policy-job", default="rl", choices=["rl", "dpo"], help="rl against the reward model, or dpo on the rankings")
    add("--algo", default="grpo", choices=["ppo", "grpo", "rloo"])
    add("--dpo-steps", type=int, default=60)
    add("--beta", type=float, default=0.1, help="the dpo job's beta")
    add("--rl-steps", type=int, default=20)
    add("--rl-lr", type=float, default=2e-4)
    add("--kl-coef", type=float, default=None, help="the rl job's KL coefficient (default: the job's own, 0.5)")
    add("--stop-penalty", type=float, default=1.0, help="subtracted from the reward of an answer cut at max tokens")
    add("--prompts-per-step", type=int, default=6)
    add("--samples-per-prompt", type=int, default=4)
    add("--gate-prompts", type=int, default=24)
    add("--job-timeout", type=float, default=3600)
    add("--server-log", help="append the server's and worker's output to this file")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.chats, args.eval_prompts, args.eval_samples = 4, 4, 6, 1
        args.reward_steps, args.rl_steps, args.gate_prompts, args.prompts_per_step = 4, 2, 4, 2
    print("load average at start: " + " ".join(f"{v:.2f}" for v in os.getloadavg()), flush=True)
    print(f"settings: {vars(args)}", flush=True)
    with server(args) as (url, token):
        before, after = turns(url, token, args)
    print("load average at end: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    minutes = (time.monotonic() - START) / 60
    print(f"real_flywheel: gold_before={before:.4f} gold_after={after:.4f} minutes={minutes:.1f}")


if __name__ == "__main__":
    main()
