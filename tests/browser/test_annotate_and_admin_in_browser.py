"""An annotator ranks with the keyboard only; an admin starts a job and sees it listed."""

from playwright.sync_api import Page, expect

from app.models import PromptSource, Ranking, Role
from app.services import prompts
from tests.browser.conftest import screenshot
from tests.factories import PASSWORD, make_user


def log_in(page: Page, name: str) -> None:
    page.goto("/login")
    page.get_by_label("Username").fill(name)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("button", name="Log out")).to_be_visible()


def test_annotator_ranks_with_the_keyboard_only(served_page: Page) -> None:
    page = served_page
    with page.app.state.session_factory() as db:
        make_user(db, "keys", Role.annotator)
        prompts.add_prompts(
            db, items=[([{"role": "user", "content": "What is 3 plus 4?"}], None)], source=PromptSource.demo
        )
        db.commit()
    log_in(page, "keys")
    page.goto("/annotate")
    expect(page.locator("li.candidate")).to_have_count(4)
    screenshot(page, "annotate-task")
    page.locator("body").click(position={"x": 5, "y": 5})  # focus the page, not a form field
    expect(page.locator("#tasks-left")).to_have_text("1")  # the set just sampled for them
    page.keyboard.press("3")  # answer 3 is best
    expect(page.locator("li.candidate").first).to_have_attribute("data-key", "3")  # the card moved to the top
    page.keyboard.press("1")  # then answer 1…
    page.keyboard.press("Shift+4")  # …tied with answer 4
    page.keyboard.press("2")  # answer 2 is worst
    expect(page.locator("#ranking-status")).to_contain_text("All ranked")
    screenshot(page, "annotate-ranked")
    keys_on_screen = page.locator("li.candidate").evaluate_all("items => items.map(i => i.dataset.key)")
    assert keys_on_screen == ["3", "1", "4", "2"]  # ranked order, the tie in the order it was picked
    page.keyboard.press("Enter")
    expect(page.locator("#saved")).to_contain_text("Ranking saved")
    expect(page.locator("#done-today")).to_have_text("1")
    with page.app.state.session_factory() as db:
        ranking = db.query(Ranking).one()
        by_key = {e.candidate_id: e.rank for e in ranking.entries}
        assert ranking.status.value == "ranked" and ranking.time_spent_ms > 0
    ids = sorted(by_key)  # candidate ids in position order: keys 1..4
    assert [by_key[i] for i in ids] == [2, 3, 1, 2]


def test_admin_starts_a_job_and_sees_it_listed(served_page: Page) -> None:
    page = served_page
    with page.app.state.session_factory() as db:
        make_user(db, "boss", Role.admin)
    log_in(page, "boss")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Admin").click()
    expect(page.locator("#served-model")).to_have_text("tiny")
    screenshot(page, "admin-dashboard")
    page.get_by_role("navigation", name="Admin").get_by_role("link", name="Jobs").click()
    page.get_by_label("Job", exact=True).select_option("reward")
    page.get_by_label("Parameters (JSON, optional)").fill('{"steps": 5}')
    page.get_by_role("button", name="Start job").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text("reward")
    expect(page.locator("#job")).to_contain_text("queued")
    screenshot(page, "admin-job")
    expect(page.locator("#job-params")).to_contain_text('"steps": 5')  # as given, until a worker starts it
    page.get_by_text("Cancel this job…").click()
    expect(page.get_by_role("button", name="Yes, cancel job")).to_be_visible()  # asked twice
    page.get_by_role("link", name="← Jobs").click()
    expect(page.locator("#jobs")).to_contain_text("reward")
    assert page.console_errors == [], page.console_errors


def test_admin_sets_automatic_retraining_without_reload(served_page: Page) -> None:
    page = served_page
    with page.app.state.session_factory() as db:
        make_user(db, "boss", Role.admin)
    log_in(page, "boss")
    page.goto("/admin/settings")
    expect(page.locator("#retrain-state")).to_have_text("off")
    page.evaluate("window.notReloaded = true")
    field = page.get_by_label("Retrain after N new labels (0 = off)")
    field.fill("40")
    page.locator("#retrain-form").get_by_role("button", name="Save").click()
    expect(page.locator("#retrain-state")).to_have_text("after 40 new labels")
    expect(page.locator("#retrain").get_by_role("status")).to_have_text("saved")
    assert page.evaluate("window.notReloaded") is True  # htmx swapped the section; the page stayed
    assert page.console_errors == [], page.console_errors
    screenshot(page, "admin-retrain")
    with page.app.state.session_factory() as db:
        from app.services import app_settings

        assert app_settings.auto_retrain_after(db, default=0) == 40

    field.evaluate("el => el.removeAttribute('min')")  # past the browser's own check: the server's message shows
    field.fill("-2")
    page.locator("#retrain-form").get_by_role("button", name="Save").click()
    expect(page.locator("#retrain-error")).to_contain_text("between 0 (off) and 1000000")
    expect(page.locator("#retrain-state")).to_have_text("after 40 new labels")
    assert page.evaluate("window.notReloaded") is True


def test_a_user_asks_to_annotate_and_an_admin_approves_in_the_browser(served_page: Page, browser) -> None:
    page = served_page
    with page.app.state.session_factory() as db:
        make_user(db, "curious")
        make_user(db, "boss", Role.admin)
    log_in(page, "curious")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Annotate").click()
    page.get_by_label("A note for the admin (optional)").fill("I rank well")
    page.get_by_role("button", name="Ask to annotate").click()
    expect(page.locator("#role-request-state")).to_contain_text("waiting for an admin")
    screenshot(page, "annotate-ask")
    admin = browser.new_context(base_url=page.url.split("/annotate")[0]).new_page()
    log_in(admin, "boss")
    admin.goto("/admin/users")
    expect(admin.locator("#role-requests")).to_contain_text("I rank well")
    admin.get_by_role("button", name="Approve curious as annotator").click()
    expect(admin.locator("#no-role-requests")).to_be_visible()
    admin.context.close()
    page.goto("/annotate")
    expect(page.locator("#counters")).to_be_visible()  # an annotator now: the workspace
    assert page.console_errors == [], page.console_errors
