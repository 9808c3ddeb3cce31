"""The closed loop through HTTP with real processes (server + embedded worker), on SQLite and on PostgreSQL.

Simulated annotators rank candidate sets and a simulated user chats and thumbs answers through REST; an admin token
starts `reward` and `rl` jobs; the worker trains them; the gate promotes the new policy; it answers via /v1; and the
gold score of what the server serves rose. The chat model is the one the command trains by default: small (2 layers,
width 64) but trained enough to know some of the demo world's facts, with half of its SFT answers poor.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.jobs.bootstrap import FLYWHEEL_DEMO_MODEL, train_demo_model

LOOP = [
    "--turns",
    "1",
    "--annotators",
    "2",
    "--tasks",
    "48",
    "--chats",
    "4",
    "--eval-prompts",
    "48",
    "--eval-samples",
    "8",
    "--reward-steps",
    "120",
    "--rl-steps",
    "40",
    "--kl-coef",
    "0.5",
    "--threads",
    "1",
    "--job-timeout",
    "900",
]
# Fixed thread counts: torch sums in another order with another count, so a count taken from the machine's load
# (the worker's default) made the same run's numbers differ from one machine state to the next.


@pytest.fixture(scope="module")
def demo_chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The chat model `flywheel demo flywheel` trains when given none (about a minute on 2 cores), trained once
    here and given to both runs with --demo-model."""
    models = tmp_path_factory.mktemp("models")
    train_demo_model(models, **FLYWHEEL_DEMO_MODEL, threads=2)
    return models / "demo-sft"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_loop_raises_the_served_gold_score_through_http(
    database: str, demo_chat_model: Path, request: pytest.FixtureRequest
) -> None:
    extra = ["--database-url", request.getfixturevalue("postgres_url")] if database == "postgresql" else []
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "flywheel", "--demo-model", str(demo_chat_model), *LOOP, *extra],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("turn 0: serving demo-sft, gold "), lines
    assert lines[1].startswith("turn 1: 96 rankings + 4 thumbs; reward model accuracy"), lines
    assert "new policy active (wins" in lines[1] and "serving policy-job" in lines[1], lines  # the gate promoted it
    found = re.fullmatch(r"flywheel_turns: 1 gold_before=([\d.]+) gold_after=([\d.]+)", lines[-1])
    assert found, lines
    assert float(found[2]) > float(found[1]), lines  # what users are served got better


def test_without_a_demo_model_the_command_trains_one_and_serves_it() -> None:
    tiny = [
        "--turns",
        "0",
        "--pretrain-steps",
        "6",
        "--sft-steps",
        "3",
        "--demo-docs",
        "300",
        "--n-layer",
        "2",
        "--n-embd",
        "32",
        "--eval-prompts",
        "2",
        "--eval-samples",
        "1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "flywheel", *tiny],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ),
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("turn 0: serving demo-sft, gold ") and "Demo model ready" in result.stderr
    assert re.fullmatch(r"flywheel_turns: 0 gold_before=([\d.]+) gold_after=\1", lines[-1]), lines


def test_a_demo_model_that_is_not_a_model_is_refused_in_one_line(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "flywheel", "--demo-model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ),
    )
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith(f"flywheel demo flywheel: error: --demo-model {tmp_path}")
