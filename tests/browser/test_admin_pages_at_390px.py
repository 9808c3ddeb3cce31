"""The admin's pages and the annotator's hold long content (a long worker id, a long traceback, long paths and
names, model output without spaces) within a 390 px wide phone screen: no page scrolls sideways."""

from playwright.sync_api import Page

from app.models import JobStatus, ModelKind, ModelVersion, PromptSource, Role
from app.services import jobs, prompts, role_requests
from tests.browser.conftest import screenshot
from tests.browser.test_annotate_and_admin_in_browser import log_in
from tests.factories import make_user

# The elements that stick out past the right edge, for the failure message.
OVERFLOWING = """() => Array.from(document.querySelectorAll('body *'))
  .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 1)
  .slice(0, 5).map(e => e.tagName + '.' + e.className + '#' + e.id)"""


def long_content(page: Page) -> tuple[int, int]:
    """A failed RL job with a long traceback, log and parameters, and a LoRA policy with long names: (job, version)."""
    worker = "worker-" + "w" * 60
    with page.app.state.session_factory() as db:
        make_user(db, "boss", Role.admin)
        role_requests.ask(db, user=make_user(db, "asker-with-a-long-name"), message="word " * 80)
        prompts.add_prompts(db, items=[([{"role": "user", "content": "3 plus 4?"}], None)], source=PromptSource.demo)
        job = jobs.enqueue(db, type="rl", params={"steps": 5, "a_very_long_parameter_name": "x" * 120})
        jobs.claim(db, worker_id=worker, lease_s=60)
        points = [{"step": s, "loss": 1 / s, "reward": 0.1 * s, "kl": 0.01 * s * s} for s in range(1, 30)]
        ran_with = {"steps": 5, "policy": "/very/long/path/" * 10}
        jobs.heartbeat(db, job_id=job.id, worker_id=worker, lease_s=60, metrics=points, log="x" * 300, params=ran_with)
        jobs.finish(db, job_id=job.id, worker_id=worker, status=JobStatus.failed, error="Traceback: " + "y" * 500)
        version = ModelVersion(
            name="policy-job-with-a-rather-long-name-123",
            kind=ModelKind.policy,
            path="/m/" + "p" * 100,
            parent_id=1,
            training_data={"data": "demo dialogues", "adapter": {"rank": 8, "alpha": 16, "targets": ["q", "v"]}},
            metrics={"rank": 0, "val_acc": 0.8, "win_rate": 0.6, "gate": "held back " * 30},
        )
        db.add(version)
        db.commit()
        return job.id, version.id


def test_no_admin_or_annotate_page_scrolls_sideways_at_390px(served_page: Page) -> None:
    page = served_page
    job_id, version_id = long_content(page)
    page.set_viewport_size({"width": 390, "height": 800})
    log_in(page, "boss")
    wide = []
    pages = ["/admin", "/admin/data", "/admin/jobs", f"/admin/jobs/{job_id}", "/admin/models"]
    pages += [f"/admin/models/{version_id}", "/admin/users", "/admin/settings", "/annotate"]
    for path in pages:
        page.goto(path)
        screenshot(page, "390px" + path.replace("/", "-"))
        if page.evaluate("document.documentElement.scrollWidth > document.documentElement.clientWidth"):
            wide.append((path, page.evaluate(OVERFLOWING)))
    page.context.clear_cookies()
    log_in(page, "asker-with-a-long-name")
    page.goto("/annotate")  # the page that asks for the role
    if page.evaluate("document.documentElement.scrollWidth > document.documentElement.clientWidth"):
        wide.append(("/annotate as a user", page.evaluate(OVERFLOWING)))
    assert not wide, wide
    assert page.console_errors == [], page.console_errors
