"""A person chats in a real browser: streamed text arrives, Stop works, thumbs with a reason, `<script>` is text."""

import asyncio
import re

from playwright.sync_api import Page, expect

from app.models import Feedback, Message, MessageRole, User
from app.services import chat
from ml.tokenizer import Tokenizer
from tests.browser.conftest import screenshot, sign_up


def test_chat_streams_stops_and_takes_thumbs(served_page: Page, monkeypatch) -> None:
    page = served_page
    sign_up(page, "chatter")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Chat").click()
    page.get_by_role("link", name="New chat").click()
    screenshot(page, "chat-empty")
    with page.app.state.session_factory() as db:
        assert db.query(Message).count() == 0  # New chat stored nothing

    page.get_by_text("Answer settings").click()
    page.get_by_label("Temperature (0–2)").fill("0.25")
    page.get_by_label("Longest answer (tokens)").fill("40")
    page.get_by_label("Longest answer (tokens)").blur()  # a change: kept in this browser
    box = page.get_by_label("Your message")
    box.fill("<script>window.hacked = 1</script> Where does Mira live?")
    box.press("Enter")
    first = page.locator("article.message.assistant").first
    expect(first.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)  # the answer finished
    expect(page.locator("article.message.user").first).to_contain_text("<script>window.hacked = 1</script>")
    assert page.evaluate("window.hacked") is None  # shown as text, never run
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    first.get_by_role("button", name="Copy answer").click()  # the answer's markdown source, as the model wrote it
    expect(first.get_by_role("button", name="Copy answer")).to_have_text("Copied")
    copied = page.evaluate("navigator.clipboard.readText()")

    with page.app.state.session_factory() as db:
        answer = db.query(Message).filter_by(role=MessageRole.assistant).one()
        # An HTML page cannot hold a carriage return (the parser makes every CR a LF); the random model writes some.
        assert copied == re.sub(r"\r\n?", "\n", answer.content) and answer.finish_reason in {"stop", "length"}
        assert answer.model_version_id is not None
        assert (answer.sampling_params["temperature"], answer.sampling_params["max_tokens"]) == (0.25, 40)
    expect(page.get_by_label("Temperature (0–2)")).to_have_value("0.25")  # still set for the next message
    model_name = page.app.state.inference.current.name
    expect(first.locator(".model-name")).to_have_text(model_name)  # which model version answered
    # The new chat got its title from the first message, in the sidebar and the heading, without a reload.
    title = "<script>window.hacked = 1</script> Where does Mira live?"
    expect(page.locator("#conversation-list a[aria-current=page]")).to_have_text(title)
    expect(page.get_by_role("heading", level=1)).to_have_text(title)
    assert re.search(r"/chat/\d+$", page.url)  # the address is the new conversation's

    first.locator("summary", has_text="Reason").click()
    first.get_by_label("Reason", exact=True).select_option("helpful")
    first.get_by_label("Comment").fill("short & <b>clear</b>")
    first.get_by_role("button", name="Thumbs up").dblclick()  # a double click is one vote
    expect(first.get_by_role("status")).to_have_text("thanks")
    expect(first.get_by_role("button", name="Thumbs up")).to_have_attribute("aria-pressed", "true")
    with page.app.state.session_factory() as db:
        vote = db.query(Feedback).one()
        assert (vote.value, vote.reason, vote.comment) == (1, "helpful", "short & <b>clear</b>")
    # A reason or comment changed after the thumb is saved as soon as it is chosen: no second click on the thumb.
    first.get_by_label("Reason", exact=True).select_option("concise")
    expect(first.get_by_role("status")).to_have_text("reason saved")
    first.get_by_label("Comment").fill("short")
    first.get_by_label("Comment").press("Enter")  # saves the comment; does not click the first thumb
    expect(first.get_by_label("Comment")).to_have_value("short")
    with page.app.state.session_factory() as db:
        vote = db.query(Feedback).one()
        assert (vote.value, vote.reason, vote.comment) == (1, "concise", "short")
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
    page.get_by_role("link", name="New chat").click()
    page.get_by_text("Answer settings").click()
    page.get_by_label("Longest answer (tokens)").fill("600")  # this browser still asks for 40 otherwise
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


def test_a_chat_made_over_rest_is_titled_live_by_its_first_message(served_page: Page) -> None:
    """A conversation the REST API made empty ("New chat") takes its title from the first message sent on the page:
    the sidebar and the heading change without a reload (out-of-band swaps), and the turn is added once."""
    page = served_page
    sign_up(page, "rester")
    with page.app.state.session_factory() as db:
        user = db.query(User).filter_by(username="rester").one()
        conversation_id = chat.create_conversation(db, user=user).id
        db.commit()
    page.goto(f"/chat/{conversation_id}")
    expect(page.locator("#chat-title")).to_have_text("New chat")
    page.evaluate("window.__notReloaded = true")
    box = page.get_by_label("Your message")
    box.fill("Which city does Mira live in?\nSecond line")
    box.press("Enter")
    expect(page.locator("#chat-title")).to_have_text("Which city does Mira live in?")
    expect(page.locator(f"#conversation-{conversation_id}")).to_have_text("Which city does Mira live in?")
    expect(page.locator("#conversation-list")).to_have_count(1)
    expect(page.locator("article.message.user")).to_have_count(1)
    expect(page.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)
    assert page.evaluate("window.__notReloaded") is True
    assert page.title() == "Which city does Mira live in? · Flywheel"


def test_a_reason_picked_the_instant_the_thumb_lands_is_saved(served_page: Page) -> None:
    """The fastest possible person: the reason changes in the same breath as the thumb's answer is swapped in. htmx
    binds new content when it settles, so the app settles at once (defaultSettleDelay 0) or the change is lost."""
    page = served_page
    sign_up(page, "quick")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Chat").click()
    page.get_by_role("link", name="New chat").click()
    box = page.get_by_label("Your message")
    box.fill("Where does Mira live?")
    box.press("Enter")
    answer = page.locator("article.message.assistant").first
    expect(answer.get_by_role("button", name="Regenerate")).to_be_visible(timeout=20_000)
    # A mutation observer runs right after the swap's own task, before anything a timer would run.
    page.evaluate(
        """() => new MutationObserver((changes, observer) => {
            const select = document.querySelector("article.message.assistant form.feedback select[name=reason]");
            if (!select || !document.querySelector("form.feedback [role=status]")) return;
            observer.disconnect();
            select.value = "concise";
            select.dispatchEvent(new Event("change", {bubbles: true}));
        }).observe(document.body, {childList: true, subtree: true})"""
    )
    answer.get_by_role("button", name="Thumbs up").click()
    expect(answer.get_by_role("status")).to_have_text("reason saved")
    with page.app.state.session_factory() as db:
        vote = db.query(Feedback).one()
        assert (vote.value, vote.reason) == (1, "concise")
