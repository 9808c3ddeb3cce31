"""A person chats in a real browser: streamed text arrives, Stop works, thumbs with a reason, `<script>` is text."""

import asyncio
import re

from playwright.sync_api import Page, expect

from app.models import Feedback, Message, MessageRole
from ml.tokenizer import Tokenizer
from tests.browser.conftest import screenshot, sign_up


def visible(text: str) -> str:
    """Letters and digits only: a random tiny model emits control characters that browsers render their own way."""
    return "".join(ch for ch in text if ch.isalnum())


def test_chat_streams_stops_and_takes_thumbs(served_page: Page, monkeypatch) -> None:
    page = served_page
    sign_up(page, "chatter")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Chat").click()
    page.get_by_role("button", name="New chat").click()
    screenshot(page, "chat-empty")

    box = page.get_by_label("Your message")
    box.fill("<script>window.hacked = 1</script> Where does Mira live?")
    box.press("Enter")
    first = page.locator("article.message.assistant").first
    expect(first.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)  # the answer finished
    expect(page.locator("article.message.user").first).to_contain_text("<script>window.hacked = 1</script>")
    assert page.evaluate("window.hacked") is None  # shown as text, never run
    streamed = first.locator(".content").first.inner_text()

    with page.app.state.session_factory() as db:
        answer = db.query(Message).filter_by(role=MessageRole.assistant).one()
        assert visible(answer.content) == visible(streamed) and answer.finish_reason in {"stop", "length"}

    first.locator("summary", has_text="Reason").click()
    first.get_by_label("Reason", exact=True).select_option("helpful")
    first.get_by_label("Comment").fill("short & <b>clear</b>")
    first.get_by_role("button", name="Thumbs up").dblclick()  # a double click is one vote
    expect(first.get_by_role("status")).to_have_text("thanks")
    expect(first.get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "true")
    with page.app.state.session_factory() as db:
        vote = db.query(Feedback).one()
        assert (vote.value, vote.reason, vote.comment) == (1, "helpful", "short & <b>clear</b>")
    screenshot(page, "chat-answered")

    # A long answer (no stop token, room for 600 tokens: a new chat, so no history eats the context) is stopped.
    monkeypatch.setattr(Tokenizer, "stop_token_ids", property(lambda self: []))
    page.app.state.inference.limits.max_new_tokens = 600
    page.app.state.settings.max_new_tokens = 600  # what the chat asks for
    fast = page.app.state.inference.stream

    async def paced(*args, **kwargs):
        """A tiny model writes 600 tokens faster than a click travels: pace them so that Stop lands mid-answer."""
        async for delta in fast(*args, **kwargs):
            await asyncio.sleep(0.02)
            yield delta

    monkeypatch.setattr(page.app.state.inference, "stream", paced)
    page.get_by_role("button", name="New chat").click()
    box = page.get_by_label("Your message")
    box.fill("Tell me a very long story")
    box.press("Enter")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    expect(page.locator("article.message.assistant .content").first).not_to_be_empty()  # streaming
    stop.dispatch_event("click")  # the button moves while text streams in: no waiting for it to settle
    last = page.locator("article.message.assistant").first
    expect(last.get_by_text("(stopped)")).to_be_visible(timeout=20_000)
    with page.app.state.session_factory() as db:
        stopped = db.query(Message).filter_by(role=MessageRole.assistant).order_by(Message.id.desc()).first()
        assert stopped.finish_reason == "stopped"
        assert len(page.app.state.inference.current.decoder) == 0 or stopped.content
    screenshot(page, "chat-stopped")
    # Closing an EventSource mid-stream logs network errors in the console; nothing else may.
    assert not [e for e in page.console_errors if not re.search(r"EventSource|net::ERR", e)], page.console_errors
