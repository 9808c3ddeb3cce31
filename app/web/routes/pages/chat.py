"""Chat pages (role `user` and up): conversations, streamed answers (SSE), stop, regenerate, thumbs up/down."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from app.errors import ServiceError
from app.models import Message, User
from app.services import chat, feedback
from app.serving import answering
from app.web.deps import CurrentUser, SessionDep
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/chat")


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
    }


def page(request: Request, session, user: User, conversation_id: int | None, **extra) -> HTMLResponse:
    context = {
        "conversations": chat.list_conversations(session, user=user),
        "conversation": None,
        "thread": [],
        "votes": {},
        "reasons": feedback.REASONS,
        "model_name": _model_name(request),
        "limit": request.app.state.inference.prompt_limit(),
        "max_chars": chat.MAX_MESSAGE_CHARS,
        **extra,
    }
    if conversation_id is not None:
        context.update(thread_context(session, user, conversation_id))
    return render(request, "chat.html", context)


def _model_name(request: Request) -> str | None:
    current = request.app.state.inference.current
    return current.name if current else None


@router.get("", response_class=HTMLResponse, name="chat_home")
def chat_home(request: Request, session: SessionDep, user: CurrentUser) -> HTMLResponse:
    return page(request, session, user, None)


@router.post("", name="chat_create")
def create(request: Request, session: SessionDep, user: CurrentUser) -> Response:
    conversation = chat.create_conversation(session, user=user)
    session.commit()
    return RedirectResponse(request.url_for("chat_view", conversation_id=conversation.id), status_code=303)


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
) -> Response:
    answering.require_model(request.app)
    message, answer = chat.add_user_message(session, user=user, conversation_id=conversation_id, content=content)
    answering.require_room(request.app, session, user=user, answer=answer)  # too long: a 413, nothing committed
    session.commit()
    if is_htmx(request):
        context = {"items": [(message, []), (answer, [])], "votes": {}, "reasons": feedback.REASONS}
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
    try:
        first = await anext(deltas, None)  # errors before the first token become a normal 4xx/5xx response
    except ServiceError:
        await deltas.aclose()
        raise

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
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
    if is_htmx(request):
        message = chat.get_message(session, user=user, message_id=message_id)
        context = {"message": message, "vote": vote, "reasons": feedback.REASONS, "saved": True}
        return render(request, "partials/feedback.html", context)
    message = chat.get_message(session, user=user, message_id=message_id)
    return RedirectResponse(request.url_for("chat_view", conversation_id=message.conversation_id), status_code=303)
