"""Every page, as a person sees it at 1280 px and at 390 px (a phone): a screenshot of each is saved under
test-artifacts/screenshots/ (CI keeps the folder as an artifact), and no page scrolls sideways at 390 px.

To cover a new page, add a line to PAGES: its name (the screenshot's file name), its path (which may name the
seeded records: {conversation_id}, {job_id}, {failed_job_id}, {model_id}), who looks at it, and the HTTP status it is
served with when that is not 200.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from playwright.sync_api import Browser, Page

from app.models import JobStatus, User
from app.services import chat, jobs, prompts
from tests.browser.conftest import screenshot, sign_up
from tests.conftest import serving
from tests.factories import PASSWORD, make_user


@dataclass(frozen=True)
class PageToSee:
    name: str
    path: str
    who: str = "admin"  # "admin" (sees every page), "user" (the least role) or "anonymous"
    status: int = 200


PAGES = [
    PageToSee("home-anonymous", "/", who="anonymous"),
    PageToSee("login", "/login", who="anonymous"),
    PageToSee("signup", "/signup", who="anonymous"),
    PageToSee("home", "/"),
    PageToSee("chat-new", "/chat"),
    PageToSee("chat-conversation", "/chat/{conversation_id}"),
    PageToSee("annotate", "/annotate"),
    PageToSee("guidelines", "/annotate/guidelines"),
    PageToSee("tokens", "/account/tokens"),
    PageToSee("admin", "/admin"),
    PageToSee("admin-data", "/admin/data"),
    PageToSee("admin-jobs", "/admin/jobs"),
    PageToSee("admin-models", "/admin/models"),
    PageToSee("admin-settings", "/admin/settings"),
    PageToSee("admin-job", "/admin/jobs/{job_id}"),
    PageToSee("admin-job-failed", "/admin/jobs/{failed_job_id}"),
    PageToSee("admin-job-rl", "/admin/jobs/{rl_job_id}"),
    PageToSee("admin-model", "/admin/models/{model_id}"),
    PageToSee("admin-users", "/admin/users"),
    PageToSee("error-404", "/chat/999999", status=404),
    PageToSee("chat-as-user", "/chat", who="user"),
    PageToSee("ask-to-annotate", "/annotate", who="user"),
    PageToSee("error-403", "/admin", who="user", status=403),
]
WIDTHS = (1280, 390)
NARROW = 390

# What reaches past the right edge, to name in a failure: the outermost elements wider than the page, and those
# whose own text spills out of them (a long word in a box that does not scroll).
OVERFLOWING = """() => {
  const width = document.documentElement.clientWidth;
  const spills = el => el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX === "visible";
  const wide = [...document.querySelectorAll("body *")]
    .filter(el => el.getBoundingClientRect().right > width + 1 || spills(el));
  return wide.filter(el => !wide.includes(el.parentElement)).slice(0, 5)
    .map(el => `${el.tagName.toLowerCase()}${el.id ? "#" + el.id : ""}${el.className ? "." + el.className : ""}`
      + ` (right edge ${Math.round(el.getBoundingClientRect().right)} px, content ${el.scrollWidth} px wide)`);
}"""

# Long words, a long code line and a wide table: the things that push a narrow page sideways.
ANSWER = (
    "Here is **markdown** with `inline code` and a long word: "
    "Supercalifragilisticexpialidocious-and-then-some-more-letters-without-any-break-at-all.\n\n"
    "```python\nprint('a very long line of code that does not fit on a phone screen at all, not even close')\n```\n\n"
    "| column one | column two | column three | column four |\n|---|---|---|---|\n| 1 | 2 | 3 | 4 |\n"
)


# A finished PPO run's metrics, so that the job page shows its charts: reward rising as KL grows, a falling loss.
RL_METRICS = [
    {
        "step": s,
        "reward_mean": round(0.2 + 0.5 * (1 - 0.93**s) + 0.03 * (-1) ** s, 3),
        "kl": round(0.004 * s + 0.002 * (s % 3), 4),
        "loss": round(1.2 * 0.96**s + 0.05 * (s % 2), 3),
    }
    for s in range(1, 41)
]


def seed(app, username: str) -> dict[str, int]:
    """Records the pages show: a long answer, a queued, a failed and a finished RL job, a prompt to rank."""
    with app.state.session_factory() as db:
        user = db.query(User).filter_by(username=username).one()
        question = "Show me what a long answer looks like on a phone, with code and a table please"
        conversation, _, answer = chat.start_conversation(db, user=user, content=question)
        chat.finish_answer(
            db, message_id=answer.id, content=ANSWER, finish_reason="stop", model_version_id=None, sampling={}
        )
        job = jobs.enqueue(db, type="reward", params={"epochs": 2}, created_by_id=user.id)
        failed = jobs.enqueue(db, type="sft", created_by_id=user.id)
        failed.status = JobStatus.failed
        failed.error = "Traceback (most recent call last):\n" + "  File " + "/very/long/path/" * 20 + "x.py\nValueError"
        failed.log_tail = "step 1 loss=" + "9" * 200 + "\n"
        rl = jobs.enqueue(db, type="rl", params={"algo": "ppo", "steps": 40}, created_by_id=user.id)
        rl.status, rl.progress, rl.attempts, rl.metrics = JobStatus.succeeded, 1.0, 1, RL_METRICS
        rl.effective_params = {"algo": "ppo", "steps": 40, "kl_coef": 0.5, "lr": 5e-5}
        rl.log_tail = "".join(f"step {m['step']} reward_mean={m['reward_mean']} kl={m['kl']}\n" for m in RL_METRICS)
        prompts.import_jsonl(db, text='{"prompt": "Where does Mira live?"}\n')
        db.commit()
        model_id = app.state.inference.current.version_id
        ids = {"conversation_id": conversation.id, "job_id": job.id, "failed_job_id": failed.id, "rl_job_id": rl.id}
        return ids | {"model_id": model_id}


def signed_in(browser: Browser, url: str, sign_in: Callable[[Page], None]) -> dict:
    """The browser state (cookies) of a person signed in by `sign_in`."""
    context = browser.new_context(base_url=url)
    sign_in(context.new_page())
    state = context.storage_state()
    context.close()
    return state


def log_in(page: Page, name: str) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/")


@pytest.fixture
def site(browser: Browser, served_app) -> Iterator[tuple[str, dict[str, dict | None], dict[str, int]]]:
    """The served app's URL, the browser state of each kind of visitor, and the ids of the seeded records."""
    with serving(served_app) as url:
        deadline = time.monotonic() + 30
        while served_app.state.inference.current is None:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        admin = signed_in(browser, url, lambda page: sign_up(page, "walker"))  # the first account is the admin
        with served_app.state.session_factory() as db:
            make_user(db, "plain")
        states = {"anonymous": None, "admin": admin, "user": signed_in(browser, url, lambda p: log_in(p, "plain"))}
        yield url, states, seed(served_app, "walker")


def visit(page: Page, seen: PageToSee, ids: dict[str, int], width: int) -> list[str]:
    """Open the page, save its screenshot; what is wrong with it (empty when nothing)."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    response = page.goto(seen.path.format(**ids))
    page.wait_for_load_state("load")
    page.wait_for_timeout(300)  # let htmx and the page's scripts settle (markdown, charts)
    screenshot(page, f"{seen.name}-{width}")
    problems = []
    if response is None or response.status != seen.status:
        problems.append(f"status {response.status if response else None}, expected {seen.status}")
    expected = f"status of {seen.status}" if seen.status != 200 else None
    problems += [f"console: {e}" for e in errors if not (expected and expected in e)]
    if width == NARROW:
        scroll, client = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        if scroll > client:
            problems.append(f"scrolls sideways ({scroll} > {client} px): {page.evaluate(OVERFLOWING)}")
    return [f"{seen.name} at {width} px: {p}" for p in problems]


def test_every_page_fits_and_is_photographed_at_1280_and_390_px(browser: Browser, site) -> None:
    url, states, ids = site
    problems: list[str] = []
    for width in WIDTHS:
        for who, state in states.items():
            context = browser.new_context(base_url=url, viewport={"width": width, "height": 900}, storage_state=state)
            page = context.new_page()
            for seen in (p for p in PAGES if p.who == who):
                problems += visit(page, seen, ids, width)
            context.close()
    assert problems == [], "\n".join(problems)
