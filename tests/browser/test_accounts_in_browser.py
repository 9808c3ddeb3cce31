"""A new person signs up, becomes admin, creates and revokes an API token through htmx, and logs out."""

import re

from playwright.sync_api import Page, expect


def test_signup_token_and_logout(page: Page) -> None:
    page.goto("/")
    page.get_by_role("link", name="create an account").click()
    page.get_by_label("Username").fill("founder")
    page.get_by_label("Password", exact=True).fill("a long password")
    page.get_by_label("Password again").fill("a long password")
    page.get_by_role("button", name="Create account").click()

    expect(page.get_by_text("Signed in as")).to_contain_text("founder")
    nav = page.get_by_role("navigation", name="Main")
    expect(nav.get_by_role("link", name="People")).to_be_visible()  # the first account is admin

    nav.get_by_role("link", name="API tokens").click()
    page.get_by_label("Name").fill("<script>alert(1)</script>")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#new-token")
    expect(secret).to_have_text(re.compile(r"^fw_"))
    assert "/account/tokens" in page.url  # swapped in place by htmx, not a full navigation
    expect(page.locator("#tokens td").first).to_have_text("<script>alert(1)</script>")  # shown as text, escaped

    page.on("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke").click()
    expect(page.locator("#tokens")).to_contain_text("revoked")
    expect(page.locator("#new-token")).to_have_count(0)  # the secret is never shown again

    page.get_by_role("button", name="Log out").click()
    expect(nav.get_by_role("link", name="Log in")).to_be_visible()
    assert page.console_errors == [], page.console_errors  # CSP and htmx run without errors


def test_people_page_changes_a_role_without_reload(page: Page, db) -> None:
    from app.models import Role
    from tests.factories import PASSWORD, make_user

    make_user(db, "boss", Role.admin)
    make_user(db, "worker")
    page.goto("/login")
    page.get_by_label("Username").fill("boss")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    page.goto("/admin/users")
    row = page.locator("tr", has_text="worker")
    row.get_by_label("Role of worker").select_option("annotator")
    row.get_by_role("button", name="Save").click()
    expect(page.locator("tr", has_text="worker").get_by_role("status")).to_have_text("saved")
    page.reload()
    expect(page.get_by_label("Role of worker")).to_have_value("annotator")
