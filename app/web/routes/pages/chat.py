"""Chat pages (role `user` and up): conversations, streamed answers (SSE), stop, regenerate, thumbs up/down."""

from dataclasses import asdict, replace
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from app.errors import ServiceError
from app.models import Feedback, Message, User
from app.services import chat, feedback
from app.serving import answering
from app.serving.inference import SamplingParams
from app.web.deps import CurrentUser, SessionDep
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/chat")

# The page's answer settings, posted with each message (the same bounds as the REST API's).
Temperature = Annotated[float | None, Form(ge=0, le=2)]
TopP = Annotated[float | None, Form(gt=0, le=1)]
MaxTokens = Annotated[int | None, Form(ge=1, le=4096)]


def _sampling(request: Request, temperature: float | None, top_p: float | None, max_tokens: int | None) -> dict | None:
    """How the answer is to be sampled, stored on it until it streams; None: the server's defaults."""
    if temperature is None and top_p is None and max_tokens is None:
        return None
    defaults = SamplingParams(max_tokens=request.app.state.settings.max_new_tokens)
    return asdict(
        replace(
            defaults,
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p,
            max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
        )
    )


def thread_context(session, user: User, conversation_id: int) -> dict:
    conversation = chat.get_conversation(session, user=user, conversation_id=conversation_id)
    messages = chat.messages_of(session, conversation=conversation)
    votes = {
        m.id: feedback.get_feedback(session, user=user, message_id=m.id) for m in messages if m.role == "assistant"
    }
    return {
        "conversation": conversation,
        "thread": chat.visible_thread(messages),
        "votes": votes,
        "reasons": feedback.REASONS,
        "model_names": chat.model_names(session, messages=messages),
    }


def page(
    request: Request, session: Session, user: User, conversation_id: int | None, block: str | None = None
) -> HTMLResponse:
    context = {
        "conversations": chat.list_conversations(session, user=user),
        "conversation": None,
        "thread": [],
        "votes": {},
        "reasons": feedback.REASONS,
        "model_names": {},
        "model_name": _model_name(request),
        "limit": request.app.state.inference.prompt_limit(),
        "max_chars": chat.MAX_MESSAGE_CHARS,
        "sampling": SamplingParams(max_tokens=request.app.state.settings.max_new_tokens),
    }
    if conversation_id is not None:
        context.update(thread_context(session, user, conversation_id))
    return render(request, "chat.html", context, block=block)


def _model_name(request: Request) -> str | None:
    current = request.app.state.inference.current
    return current.name if current else None


@router.get("", response_class=HTMLResponse, name="chat_home")
def chat_home(request: Request, session: SessionDep, user: CurrentUser) -> HTMLResponse:
    return page(request, session, user, None)


@router.post("", name="chat_create")
def create(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    content: Annotated[str, Form(max_length=20_000)],
    temperature: Temperature = None,
    top_p: TopP = None,
    max_tokens: MaxTokens = None,
) -> Response:
    """The first message of a new chat makes the conversation (New chat itself stores nothing). htmx gets the page
    of the new conversation (it swaps the chat and the sidebar in, and the address becomes the conversation's)."""
    answering.require_model(request.app)
    sampling = _sampling(request, temperature, top_p, max_tokens)
    conversation, _, answer = chat.start_conversation(session, user=user, content=content, sampling=sampling)
    answering.require_room(request.app, session, user=user, answer=answer)  # too long: a 413, nothing committed
    session.commit()
    url = request.url_for("chat_view", conversation_id=conversation.id)
    if is_htmx(request):
        response = page(request, session, user, conversation.id, block="chat")
        response.headers["HX-Push-Url"] = url.path
        return response
    return RedirectResponse(url, status_code=303)


@router.get("/{conversation_id}", response_class=HTMLResponse, name="chat_view")
def view(request: Request, session: SessionDep, user: CurrentUser, conversation_id: int) -> HTMLResponse:
    return page(request, session, user, conversation_id)


@router.post("/{conversation_id}/messages", name="chat_send")
def send(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    conversation_id: int,
    content: Annotated[str, Form(max_length=20_000)],
    temperature: Temperature = None,
    top_p: TopP = None,
    max_tokens: MaxTokens = None,
) -> Response:
    answering.require_model(request.app)
    sampling = _sampling(request, temperature, top_p, max_tokens)
    message, answer = chat.add_user_message(
        session, user=user, conversation_id=conversation_id, content=content, sampling=sampling
    )
    answering.require_room(request.app, session, user=user, answer=answer)  # too long: a 413, nothing committed
    session.commit()
    if is_htmx(request):  # the new turn, and out of band the sidebar and the title (the first message names a chat)
        context = {
            "items": [(message, []), (answer, [])],
            "votes": {},
            "reasons": feedback.REASONS,
            "model_names": {},
            "model_name": _model_name(request),
            "conversation": chat.get_conversation(session, user=user, conversation_id=conversation_id),
            "conversations": chat.list_conversations(session, user=user),
            "oob": True,
        }
        return render(request, "partials/messages.html", context)
    return RedirectResponse(request.url_for("chat_view", conversation_id=conversation_id), status_code=303)


@router.post("/{conversation_id}/settings", name="chat_settings")
def settings(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    conversation_id: int,
    title: Annotated[str | None, Form(max_length=500)] = None,
    allow_training: Annotated[bool, Form()] = False,
) -> Response:
    chat.update_conversation(
        session, user=user, conversation_id=conversation_id, title=title, allow_training=allow_training
    )
    session.commit()
    return RedirectResponse(request.url_for("chat_view", conversation_id=conversation_id), status_code=303)


@router.post("/{conversation_id}/delete", name="chat_delete")
def delete(request: Request, session: SessionDep, user: CurrentUser, conversation_id: int) -> Response:
    chat.delete_conversation(session, user=user, conversation_id=conversation_id)
    session.commit()
    return RedirectResponse(request.url_for("chat_home"), status_code=303)


@router.post("/messages/{message_id}/delete", name="chat_message_delete")
def delete_message(request: Request, session: SessionDep, user: CurrentUser, message_id: int) -> Response:
    """The message and every turn after it, with what was made of them for training (one transaction)."""
    conversation_id = chat.delete_message(session, user=user, message_id=message_id)
    session.commit()
    return RedirectResponse(request.url_for("chat_view", conversation_id=conversation_id), status_code=303)


@router.get("/messages/{message_id}/stream", name="chat_stream")
async def stream(request: Request, user: CurrentUser, message_id: int) -> StreamingResponse:
    """Server-sent events: `delta` {text} as tokens arrive, then `done` {finish_reason} (or `error` {detail})."""
    deltas = answering.answer(request.app, user=user, message_id=message_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    try:
        first = await anext(deltas, None)  # errors before the first token become a normal 4xx/5xx response
    except ServiceError as exc:
        await deltas.aclose()
        if "text/event-stream" not in request.headers.get("accept", ""):
            raise
        # The page's EventSource cannot read an error response: tell it why as an `error` event it can show.
        event = answering.sse("error", {"detail": exc.message, "status": exc.status_code})
        return StreamingResponse(iter([event]), media_type="text/event-stream", headers=headers)

    return StreamingResponse(answering.answer_events(deltas, first), media_type="text/event-stream", headers=headers)


@router.post("/messages/{message_id}/stop", name="chat_stop")
def stop(request: Request, session: SessionDep, user: CurrentUser, message_id: int) -> Response:
    """204: the answer is not finished and the Stop is recorded; the process streaming it, this one or another, ends
    it with finish reason `stopped` (a stream opened after the Stop is not stopped by it). 200: the answer was already
    finished, there is nothing to stop."""
    stopped = chat.request_stop(session, user=user, message_id=message_id)  # ownership first: a 404
    session.commit()
    if stopped:
        answering.stop_here(request.app, message_id)
    return Response(status_code=204 if stopped else 200)


@router.get("/messages/{message_id}", response_class=HTMLResponse, name="chat_message")
def message_fragment(request: Request, session: SessionDep, user: CurrentUser, message_id: int) -> HTMLResponse:
    message = chat.get_message(session, user=user, message_id=message_id)
    context = thread_context(session, user, message.conversation_id)
    item = next(((m, older) for m, older in context["thread"] if m.id == message.id), (message, []))
    return render(request, "partials/messages.html", {**context, "items": [item]})


@router.post("/messages/{message_id}/regenerate", name="chat_regenerate")
def regenerate(request: Request, session: SessionDep, user: CurrentUser, message_id: int) -> Response:
    answer: Message = chat.regenerate(session, user=user, message_id=message_id)
    answering.require_room(request.app, session, user=user, answer=answer)
    session.commit()
    if is_htmx(request):
        context = thread_context(session, user, answer.conversation_id)
        item = next((m, older) for m, older in context["thread"] if m.id == answer.id)
        return render(request, "partials/messages.html", {**context, "items": [item]})
    return RedirectResponse(request.url_for("chat_view", conversation_id=answer.conversation_id), status_code=303)


@router.post("/messages/{message_id}/feedback", name="chat_feedback")
def rate(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    message_id: int,
    value: Annotated[int, Form()],
    reason: Annotated[str | None, Form(max_length=64)] = None,
    comment: Annotated[str | None, Form(max_length=4000)] = None,
) -> Response:
    vote = feedback.set_feedback(session, user=user, message_id=message_id, value=value, reason=reason, comment=comment)
    session.commit()
    # The reason stays open after a thumb: picking one now saves it at once (rate_reason).
    return _feedback_response(request, session, user, message_id, vote, saved="thanks", reason_open=True)


@router.post("/messages/{message_id}/feedback/reason", name="chat_feedback_reason")
def rate_reason(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    message_id: int,
    reason: Annotated[str | None, Form(max_length=64)] = None,
    comment: Annotated[str | None, Form(max_length=4000)] = None,
) -> Response:
    """A reason or comment picked after the thumb is saved at once on the vote (409 when there is no vote yet)."""
    vote = feedback.set_reason(session, user=user, message_id=message_id, reason=reason, comment=comment)
    session.commit()
    return _feedback_response(request, session, user, message_id, vote, saved="reason saved", reason_open=True)


def _feedback_response(
    request: Request,
    session: Session,
    user: User,
    message_id: int,
    vote: Feedback,
    *,
    saved: str,
    reason_open: bool = False,
) -> Response:
    """htmx: the feedback form again, saying what was saved; without JavaScript, back to the conversation."""
    if is_htmx(request):
        message = chat.get_message(session, user=user, message_id=message_id)
        context = {
            "message": message,
            "vote": vote,
            "reasons": feedback.REASONS,
            "saved": True,
            "saved_text": saved,
            "reason_open": reason_open,
        }
        return render(request, "partials/feedback.html", context)
    message = chat.get_message(session, user=user, message_id=message_id)
    return RedirectResponse(request.url_for("chat_view", conversation_id=message.conversation_id), status_code=303)
