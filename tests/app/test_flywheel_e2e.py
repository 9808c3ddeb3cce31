"""The closed loop through HTTP with real processes (server + embedded worker), on SQLite and on PostgreSQL.

Simulated annotators rank sets and a simulated user chats and thumbs answers through REST; an admin token starts
`reward` and `rl` jobs; the worker trains them; the gate decides; the served policy answers via /v1. Tiny sizes:
this proves the wiring end to end, not that the policy improved (see the demo experiment for that).
"""

import os
import subprocess
import sys

import pytest

TINY = ["--turns", "1", "--annotators", "2", "--tasks", "3", "--chats", "2", "--eval-prompts", "4",
        "--reward-steps", "3", "--rl-steps", "2", "--pretrain-steps", "6", "--sft-steps", "3", "--demo-docs", "300",
        "--n-layer", "2", "--n-embd", "32", "--eval-samples", "2", "--job-timeout", "600"]  # fmt: skip


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_the_loop_turns_through_http(database: str, request: pytest.FixtureRequest) -> None:
    extra = ["--database-url", request.getfixturevalue("postgres_url")] if database == "postgresql" else []
    result = subprocess.run([sys.executable, "-m", "app.cli", "demo", "flywheel", *TINY, *extra],
                            capture_output=True, text=True, timeout=1200, env=dict(os.environ))  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("turn 0: serving demo-sft")
    assert lines[1].startswith("turn 1: 6 rankings + 2 thumbs; reward model accuracy")
    assert lines[-1].startswith("flywheel_turns: 1 gold_before=") and "gold_after=" in lines[-1]


def test_a_demo_model_that_is_not_a_model_is_refused_in_one_line(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "app.cli", "demo", "flywheel", "--demo-model", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))  # fmt: skip
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith(f"flywheel demo flywheel: error: --demo-model {tmp_path}")
