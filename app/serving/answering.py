"""Generate the answer of a stored assistant message: stream it from the served model and save it when done.

Used by the chat page (SSE), the REST API and regenerate. The answer is saved once, at the end, in one transaction,
whether it finished, was stopped or the client went away (then with what was generated so far).

Stop works whatever web process receives it (`serve --workers N`): it is recorded on the message in the database,
and the process streaming the answer hears it there (`process_state.LiveAnswers`), or at once when it is that process.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, fields
from datetime import datetime

from fastapi import FastAPI
from sqlalchemy.orm import Session

from app.db import transaction
from app.errors import Conflict, ServiceError
from app.models import Message, User
from app.services import chat
from app.serving.inference import Delta, InferenceService, ModelUnavailable, SamplingParams
from app.serving.process_state import process_state
from app.threads import run_db

ERROR = "error"  # finish_reason of an answer the model refused before its first token (the stream said why)


def _prepare(
    app: FastAPI, user: User, message_id: int
) -> tuple[list[dict[str, str]], datetime | None, SamplingParams | None]:
    """The history the model answers, the Stop already recorded on the message (one from before this stream
    started is not for it), and the sampling asked for when the message was stored (the page's answer settings)."""
    with app.state.session_factory() as session:
        message = chat.get_message(session, user=user, message_id=message_id)
        if message.finish_reason != chat.STREAMING:
            raise Conflict(f"message {message_id} is already answered")
        conversation = chat.get_conversation(session, user=user, conversation_id=message.conversation_id)
        history = chat.history_for_model(chat.messages_of(session, conversation=conversation), upto=message)
        return history, message.stop_requested_at, sampling_from(message.sampling_params)


def sampling_from(stored: dict | None) -> SamplingParams | None:
    """The sampling parameters stored on a message (keys this version does not know are ignored)."""
    if not stored:
        return None
    known = {f.name for f in fields(SamplingParams)}
    return SamplingParams(**{k: v for k, v in stored.items() if k in known})


def _save(
    app: FastAPI, message_id: int, text: str, finish: str, version_id: int | None, sampling: dict, seen: datetime | None
) -> None:
    with transaction(app.state.session_factory) as session:
        message = session.get(Message, message_id)
        if finish == "cancelled" and message is not None and message.stop_requested_at != seen:
            finish = "stopped"  # Stop came, then the client went away before it was heard (the page closes its stream)
        chat.finish_answer(
            session,
            message_id=message_id,
            content=text,
            finish_reason=finish,
            model_version_id=version_id,
            sampling=sampling,
        )


async def answer(
    app: FastAPI, *, user: User, message_id: int, params: SamplingParams | None = None
) -> AsyncIterator[Delta]:
    """Deltas of the answer; stops early when a Stop sets the message's stop event."""
    service: InferenceService = app.state.inference
    live = process_state(app).answers
    # Ownership first: someone else's message is a 404 whether or not it is streaming (no 409 that reveals it is).
    history, seen, asked = await run_db(_prepare, app, user, message_id)
    params = params or asked or SamplingParams(max_tokens=app.state.settings.max_new_tokens)
    stop = live.claim(message_id, seen)  # a 409 when this process streams it already
    version_id = service.current.version_id if service.current else None
    parts: list[str] = []
    finish = "cancelled"
    try:
        async for delta in service.stream(history, params, user_id=user.id):
            parts.append(delta.text)
            if delta.finish_reason:
                finish = delta.finish_reason
            yield delta
            if stop.is_set():
                finish = "stopped"
                break
    except ServiceError:
        if not parts:  # refused before a token (too long for the model now served, none served): say so, not "stopped"
            finish = ERROR
        raise
    finally:
        live.release(message_id)
        text, sampling = "".join(parts), asdict(params)
        await asyncio.shield(run_db(_save, app, message_id, text, finish, version_id, sampling, seen))


def require_model(app: FastAPI) -> None:
    """Refuse a message before storing it when there is nothing to answer it."""
    if app.state.inference.current is None:
        raise ModelUnavailable("no model is being served yet; an admin must train or import one")


def require_room(app: FastAPI, session: Session, *, user: User, answer: Message) -> None:
    """Refuse (413, saying the limit and how far over) an answer whose conversation the served model cannot take:
    called on a thread after the message and its empty answer are flushed and before they are committed, so a
    refusal stores nothing. The history is exactly the one `answer()` will send (`_prepare`)."""
    if app.state.inference.current is None:  # no model: nothing to measure against (send refuses with require_model)
        return
    conversation = chat.get_conversation(session, user=user, conversation_id=answer.conversation_id)
    history = chat.history_for_model(chat.messages_of(session, conversation=conversation), upto=answer)
    app.state.inference.encode_chat(history)


def stop_here(app: FastAPI, message_id: int) -> None:
    """After a Stop is recorded (`chat.request_stop`, committed): the fast path when the answer streams in this
    process. Elsewhere, that process reads the Stop from the database within `LiveAnswers.poll_s`."""
    process_state(app).answers.stop_here(message_id)


def sse(event: str, data: dict) -> str:
    """One server-sent event with a JSON payload."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def answer_events(deltas: AsyncIterator[Delta], first: Delta | None = None) -> AsyncIterator[str]:
    """`delta` {text} events as tokens arrive, then `done` {finish_reason}, sent only once the answer is saved
    (so a client that fetches the message right after `done` finds it finished). `first`: a delta already read."""
    finish = "stopped"
    try:
        delta = first if first is not None else await anext(deltas, None)
        while delta is not None:
            if delta.text:
                yield sse("delta", {"text": delta.text})
            if delta.finish_reason:
                finish = delta.finish_reason
                break
            delta = await anext(deltas, None)
        await deltas.aclose()  # runs answer()'s finally, which saves the answer
        yield sse("done", {"finish_reason": finish})
    finally:
        await deltas.aclose()
