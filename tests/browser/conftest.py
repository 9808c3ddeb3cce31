"""A live uvicorn server in a thread and headless Chromium (Debian's, driven by Playwright) for browser tests."""

import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def browser():
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is required in CI (apt-get install -y chromium)")
        pytest.skip("Chromium not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server: str):
    context = browser.new_context(base_url=live_server)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.console_errors = errors
    yield page
    context.close()


SCREENSHOTS = Path(os.environ.get("FLYWHEEL_SCREENSHOTS_DIR", "test-artifacts/screenshots"))


def screenshot(page, name: str) -> Path:
    """Save what the person sees (test-artifacts/screenshots/NAME.png) for review."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    # caret="initial": hiding the caret makes Playwright inject a <style>, which the app's CSP rightly blocks
    page.screenshot(path=str(path), full_page=True, caret="initial")
    return path


def sign_up(page, name: str) -> None:
    """Create an account through the sign-up form (the first one on a server is its admin); wait until signed in."""
    from playwright.sync_api import expect

    page.goto("/signup")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password", exact=True).fill("a long password")
    page.get_by_label("Password again").fill("a long password")
    page.get_by_role("button", name="Create account").click()
    expect(page.get_by_text("Signed in as")).to_be_visible()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.factories import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("browser-model") / "tiny", max_seq_len=640)


@pytest.fixture
def served_app(settings, tiny_model_dir: Path):
    """The app with a real tiny model served (and registered), not yet started."""
    from tests.factories import app_with_active_model

    return app_with_active_model(settings, tiny_model_dir)


@pytest.fixture
def served_page(browser, served_app):
    from tests.conftest import serving

    with serving(served_app) as url:
        deadline = time.monotonic() + 30
        while served_app.state.inference.current is None:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        context = browser.new_context(base_url=url, viewport={"width": 1100, "height": 800})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.console_errors = errors
        page.app = served_app
        yield page
        context.close()
