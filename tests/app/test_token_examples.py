"""The API tokens page (issue #18): a new token has a Copy button, and the curl and `openai` examples it shows are
filled in with this server's address and the served model's name, and run as shown."""

import html
import io
import json
import re
import shutil
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import httpx
import pytest

from app.settings import Settings
from tests.conftest import serving
from tests.factories import app_with_active_model, login, make_user, wait_for_model


def example(page: str, name: str) -> str:
    found = re.search(rf'<pre id="example-{name}"><code>(.*?)</code></pre>', page, re.S)
    assert found, f"no {name} example"
    return html.unescape(found.group(1))


def test_the_examples_name_this_server_and_model_and_run_as_shown(
    settings: Settings, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = app_with_active_model(settings, model_dir)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client, app.state.session_factory() as db:
        wait_for_model(app)
        make_user(db, "tina")
        csrf = login(client, "tina")
        page = client.post("/account/tokens", data={"name": "laptop", "csrf_token": csrf}).text
        secret = re.search(r'<code id="new-token" class="secret">([^<]+)</code>', page).group(1)
        assert 'data-copy-from="#new-token"' in page
        model = app.state.inference.current.name
        assert example(page, "env") == f"export FLYWHEEL_TOKEN={secret}"
        python, curl = example(page, "python"), example(page, "curl")
        assert f'OpenAI(base_url="{url}/v1"' in python and f'model="{model}"' in python
        assert curl.startswith(f"curl {url}/v1/chat/completions") and f'"model": "{model}"' in curl

        monkeypatch.setenv("FLYWHEEL_TOKEN", secret)
        printed = io.StringIO()
        with redirect_stdout(printed):
            exec(compile(python, "tokens-page-example", "exec"), {})  # the page's Python, as a person would paste it
        assert printed.getvalue().endswith("\n")

        if shutil.which("curl") and shutil.which("bash"):
            ran = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
            answer = json.loads(ran.stdout)
            assert answer["model"] == model and answer["choices"][0]["message"]["role"] == "assistant"


def test_without_a_new_token_the_examples_use_a_placeholder(settings: Settings, model_dir: Path) -> None:
    app = app_with_active_model(settings, model_dir)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as client, app.state.session_factory() as db:
        make_user(db, "tom")
        login(client, "tom")
        page = client.get("/account/tokens").text
        assert example(page, "env") == "export FLYWHEEL_TOKEN=fw_…"
        assert f"curl {url}/v1/chat/completions" in example(page, "curl")
