"""Stored XSS in a real browser: markup stored through the real routes (chat messages, model output, titles, thumbs
comments, token names, imported prompts, sampled candidates, flag reasons, guidelines, job parameters and errors,
model names, file names) is rendered by every page that shows it, and no script runs: no dialog opens, the global the
payloads set stays unset, no element gains an event handler or a `javascript:` link, the browser reports no CSP
violation, and the text is shown as the person typed it.
"""

import asyncio
import json
import re

import pytest
from playwright.sync_api import Page, expect

from app.models import Job, ModelKind, ModelVersion, Ranking
from app.serving.inference import Delta
from tests.browser.conftest import screenshot, sign_up

PAYLOAD = (
    '<img src=x onerror="window.__xss=1;alert(1)"><script>window.__xss=2;alert(2)</script>'
    '<a href="javascript:window.__xss=3">x</a>"\'><svg onload="window.__xss=4">'
)
SHORT = '"><img src=x onerror="window.__xss=5;alert(5)">'  # for fields of at most 100 characters
GUIDELINES = "Rank by truth. </textarea><script>window.__xss=6;alert(6)</script>" + PAYLOAD

# Everything that could have become live markup, read from the page as the browser built it.
FIND_LIVE_MARKUP = """() => {
  const found = [];
  for (const el of document.querySelectorAll("*")) {
    for (const attr of el.attributes) {
      if (/^on/i.test(attr.name)) found.push(`${el.tagName} ${attr.name}`);
      if (/^\\s*javascript:/i.test(attr.value)) found.push(`${el.tagName} ${attr.name}=${attr.value}`);
    }
  }
  for (const s of document.scripts) {
    const url = s.src ? new URL(s.src) : null;
    if (!url || url.origin !== location.origin || !url.pathname.startsWith("/static/")) {
      found.push(`script ${s.src || s.textContent.slice(0, 60)}`);
    }
  }
  for (const el of document.querySelectorAll("img, iframe, object, embed, svg:not(figure.chart svg)")) {
    found.push(el.tagName);
  }
  return found;
}"""


def answering_with(page: Page, monkeypatch: pytest.MonkeyPatch, text: str, pause: float = 0.005) -> Page:
    """Every dialog recorded (and dismissed), and the model answering `text`, streamed in pieces that split its tags
    (model output is untrusted too)."""
    page.dialogs = []
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))

    async def payload_stream(messages, params, *, user_id=None):
        for i in range(0, len(text), 7):
            yield Delta(text[i : i + 7])
            await asyncio.sleep(pause)
        yield Delta("", finish_reason="stop", tokens=40)

    monkeypatch.setattr(page.app.state.inference, "stream", payload_stream)
    return page


@pytest.fixture
def watched(served_page: Page, monkeypatch: pytest.MonkeyPatch) -> Page:
    """The served page, the model answering with the payload."""
    return answering_with(served_page, monkeypatch, PAYLOAD)


def assert_inert(page: Page, where: str, page_status: int | None = None) -> None:
    """`page_status`: the error status the page itself was served with (the browser logs that as a console error)."""
    page.wait_for_load_state()
    assert page.dialogs == [], f"{where}: a dialog opened: {page.dialogs}"
    assert page.evaluate("window.__xss") is None, f"{where}: a payload ran"
    assert page.evaluate(FIND_LIVE_MARKUP) == [], f"{where}: markup came alive"
    # A CSP violation is logged as a console error: the policy caught an injection that escaping let through.
    expected = f"the server responded with a status of {page_status} " if page_status else "EventSource"
    errors = [e for e in page.console_errors if not re.search(rf"EventSource|net::ERR_ABORTED|{expected}", e)]
    assert errors == [], f"{where}: {errors}"


def test_chat_text_model_output_titles_comments_and_token_names_stay_text(watched: Page) -> None:
    page = watched
    sign_up(page, "first")
    page.goto("/chat")
    page.get_by_role("link", name="New chat").click()
    box = page.get_by_label("Your message")
    box.fill(PAYLOAD)
    box.press("Enter")
    answer = page.locator("article.message.assistant").first
    expect(answer.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)  # streamed, then swapped
    expect(page.locator("article.message.user .content").first).to_have_text(PAYLOAD)
    expect(answer.locator(".content").first).to_have_text(PAYLOAD)
    assert_inert(page, "chat after a streamed answer")

    page.locator("details.chat-settings summary").click()
    page.get_by_label("Title").fill(PAYLOAD)
    page.get_by_role("button", name="Save", exact=True).click()
    expect(page.locator("#conversation-list a[aria-current=page]")).to_have_text(PAYLOAD)
    expect(page.locator("#chat-title")).to_have_text(PAYLOAD)
    assert page.title() == f"{PAYLOAD} · Flywheel"
    assert page.get_by_label("Title").input_value() == PAYLOAD
    assert_inert(page, "chat with a markup title")

    answer = page.locator("article.message.assistant").first
    answer.locator("summary", has_text="Reason").click()
    answer.get_by_label("Comment").fill(PAYLOAD)
    answer.get_by_role("button", name="Thumbs down").click()
    expect(answer.get_by_role("status")).to_have_text("thanks")
    page.reload()
    assert page.locator("article.message.assistant").first.get_by_label("Comment").input_value() == PAYLOAD
    assert_inert(page, "chat with a markup comment")

    page.locator("article.message.assistant").first.get_by_role("button", name="Regenerate").click()
    newest = page.locator("article.message.assistant").first
    expect(newest.locator("details.older summary")).to_have_text("1 earlier answer", timeout=20_000)
    expect(newest.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)
    newest.locator("details.older summary").click()
    expect(newest.locator(".content.earlier")).to_have_text(PAYLOAD)
    page.goto("/chat")  # the list of conversations alone
    expect(page.locator("#conversation-list a").first).to_have_text(PAYLOAD)
    assert_inert(page, "chat after regenerating")

    page.goto("/account/tokens")
    page.get_by_label("Name").fill(SHORT)
    page.get_by_role("button", name="Create token").click()
    expect(page.locator("#tokens td").first).to_have_text(SHORT)
    page.reload()
    expect(page.locator("#tokens td").first).to_have_text(SHORT)
    assert_inert(page, "API tokens")
    screenshot(page, "xss-tokens")


def test_prompts_candidates_flag_reasons_and_guidelines_stay_text(watched: Page) -> None:
    page = watched
    sign_up(page, "first")
    page.goto("/admin/data")
    page.get_by_label("Import", exact=True).select_option("prompts")
    line = json.dumps({"prompt": PAYLOAD}).encode()
    page.set_input_files("#import-file", files=[{"name": "p.jsonl", "mimeType": "text/plain", "buffer": line}])
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.get_by_role("status").filter(has_text="Imported prompts")).to_be_visible()
    assert_inert(page, "admin after an import")

    page.goto("/annotate")  # samples K candidates from the (payload-answering) model for the imported prompt
    expect(page.locator("li.candidate")).to_have_count(page.app.state.settings.candidates_per_set)
    expect(page.locator("section.prompt .turn .content")).to_have_text(PAYLOAD)
    for content in page.locator("li.candidate .content").all():
        expect(content).to_have_text(PAYLOAD)
    assert_inert(page, "annotation task")
    screenshot(page, "xss-annotate")

    page.get_by_label("Flag reason").fill(PAYLOAD)
    page.get_by_role("button", name="Flag all as bad (F)").click()
    expect(page.locator("#no-task")).to_be_visible()
    with page.app.state.session_factory() as db:
        assert db.query(Ranking).one().flag_reason == PAYLOAD  # stored as typed
    assert_inert(page, "annotation after flagging")

    page.goto("/annotate/guidelines")
    page.get_by_label("Guidelines (plain text)").fill(GUIDELINES)
    page.get_by_role("button", name="Save guidelines").click()
    expect(page.locator("div.guidelines")).to_have_text(GUIDELINES)
    assert page.get_by_label("Guidelines (plain text)").input_value().strip() == GUIDELINES
    assert_inert(page, "guidelines")


def test_job_parameters_errors_model_names_notices_and_file_names_stay_text(watched: Page) -> None:
    page = watched
    sign_up(page, "first")
    page.goto("/admin/jobs")
    page.get_by_label("Job", exact=True).select_option("reward")
    page.get_by_label("Parameters (JSON, optional)").fill(json.dumps({"note": PAYLOAD}))
    page.get_by_role("button", name="Start job").click()
    expect(page.locator("#job pre").first).to_contain_text('"note"')
    assert json.loads(page.locator("#job pre").first.inner_text())["note"] == PAYLOAD
    job_id = int(page.url.rsplit("/", 1)[1])

    # What training reports (an error, the log) may quote data; the job page, polling by htmx, swaps it in.
    with page.app.state.session_factory() as db:
        job = db.get(Job, job_id)
        job.error, job.log_tail = PAYLOAD, f"step 1\n{PAYLOAD}\n"
        version = ModelVersion(
            name=SHORT,
            kind=ModelKind.policy,
            path=f"/models/{SHORT}",
            training_data={"files": [SHORT]},
            metrics={"gate": PAYLOAD, "promoted": False, "load_error": PAYLOAD, "loss": 1.5},
        )
        db.add(version)
        db.commit()
        version_id = version.id
    expect(page.locator("#job-error")).to_have_text(PAYLOAD, timeout=10_000)
    expect(page.locator("#job pre.log")).to_contain_text(PAYLOAD)
    assert_inert(page, "job page after an htmx refresh")

    page.goto("/admin/jobs")
    with page.expect_response(lambda r: r.url.endswith("/admin/jobs"), timeout=10_000):
        pass  # the jobs table refreshes itself (htmx, every 3 s): wait for one refresh to be swapped in
    expect(page.locator(f"#job-{job_id} td.error")).to_have_text(PAYLOAD.splitlines()[-1][:160])
    assert_inert(page, "jobs page")
    page.goto("/admin/models")
    expect(page.locator(f"#model-{version_id} td").first).to_have_text(SHORT)
    expect(page.locator(f"#model-{version_id} .load-error")).to_have_text(PAYLOAD)
    expect(page.locator(f"#model-{version_id}")).to_contain_text(PAYLOAD)  # the gate's reason
    assert_inert(page, "admin dashboard")
    screenshot(page, "xss-admin")

    page.goto(f"/admin/models/{version_id}")
    expect(page.get_by_role("heading", level=1)).to_contain_text(SHORT)
    expect(page.locator("main")).to_contain_text(PAYLOAD)
    assert page.title() == f"Model {SHORT} · Flywheel"
    assert_inert(page, "model page")

    page.goto("/admin?message=" + PAYLOAD.replace("#", "%23"))  # a link cannot write the notice
    expect(page.locator("p.notice")).to_have_count(0)
    assert_inert(page, "admin with a notice in the link")

    page.goto("/admin/data")
    page.get_by_label("Import", exact=True).select_option("prompts")
    bad_name = "<img src=x onerror=alert(7)>.jsonl"  # no quotes: browsers send those as %22 in a file name
    page.set_input_files("#import-file", files=[{"name": bad_name, "mimeType": "text/plain", "buffer": b"\xff\xfe"}])
    page.get_by_role("button", name="Import", exact=True).click()
    expect(page.get_by_role("alert")).to_contain_text(f"{bad_name}: not UTF-8 text")
    assert_inert(page, "error page naming the file", page_status=422)


# Markdown written to run script: links and images with javascript: (and data:) addresses in every spelling, raw
# HTML of every kind between the markdown, in a table, by reference, inside and around code. The markdown itself must
# render (heading, bold, code block, an https link); the rest stays text or loses its address.
MARKDOWN = (
    "# Heading\n\n**bold** and `<b>code</b>`\n\n```python\nprint('<img src=x onerror=alert(1)>')\n```\n\n"
    "[click](javascript:window.__xss=7) [ok](https://example.org/) [mixed](JaVaScRiPt:window.__xss=8)\n\n"
    "[spaced]( javascript:window.__xss=9 ) [entity](&#106;avascript:window.__xss=10) [ref][r]\n\n"
    "[r]: javascript:window.__xss=11\n\n"
    "![pic](javascript:window.__xss=12) ![remote](https://example.org/x.png)\n\n"
    '<img src=x onerror="window.__xss=13;alert(13)">\n\n'
    "<script>window.__xss=14;alert(14)</script>\n\n"
    'inline <a href="javascript:window.__xss=15">raw link</a> and <svg onload="window.__xss=16">\n\n'
    "<details open><summary>s</summary><iframe src=javascript:alert(17)></iframe></details>\n\n"
    "| a | b |\n|---|---|\n| <img src=x onerror=alert(18)> | [x](data:text/html;base64,PHNjcmlwdD4=) |\n\n"
    "<style>body{display:none}</style>\n\n<https://example.org/auto> <javascript:alert(19)>\n"
)


def test_markdown_in_answers_renders_but_never_runs(served_page: Page, monkeypatch: pytest.MonkeyPatch) -> None:
    page = answering_with(served_page, monkeypatch, MARKDOWN, pause=0.02)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    sign_up(page, "first")
    page.goto("/chat")
    box = page.get_by_label("Your message")
    mine = "**not bold** [link](javascript:window.__xss=20) <b>x</b>"
    box.fill(mine)  # the person's own message is shown as typed: never rendered
    box.press("Enter")
    answer = page.locator("article.message.assistant").first
    expect(answer.locator(".content h1")).to_have_text("Heading")  # rendered while it streams
    assert_inert(page, "markdown while it streams")

    expect(answer.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)  # finished and swapped
    expect(page.locator("article.message.user .content")).to_have_text(mine)
    content = answer.locator(".content")
    expect(content.locator("strong")).to_have_text("bold")
    expect(content.locator("p code")).to_have_text("<b>code</b>")
    expect(content.locator("pre code")).to_have_text("print('<img src=x onerror=alert(1)>')\n")
    ok = content.get_by_role("link", name="ok")
    expect(ok).to_have_attribute("href", "https://example.org/")
    expect(ok).to_have_attribute("rel", "noopener noreferrer nofollow")
    for name in ("click", "mixed", "spaced", "entity", "ref", "pic", "x"):  # shown, but go nowhere
        expect(content.get_by_text(name, exact=True)).not_to_have_attribute("href", re.compile("."))
    expect(content).to_contain_text('<img src=x onerror="window.__xss=13;alert(13)">')  # raw HTML is text
    expect(content).to_contain_text("<script>window.__xss=14;alert(14)</script>")
    expect(content).to_contain_text("<style>body{display:none}</style>")
    assert content.locator("details, iframe, style, svg, img, script").count() == 0
    assert_inert(page, "a markdown answer")
    screenshot(page, "xss-markdown")

    answer.get_by_role("button", name="Copy answer").click()  # Copy gives the markdown as the model wrote it
    expect(answer.get_by_role("button", name="Copy answer")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == MARKDOWN
    page.reload()  # rendered again from the stored text
    expect(page.locator("article.message.assistant .content h1")).to_have_text("Heading")
    assert_inert(page, "a markdown answer after a reload")
