"""REST for chat under /api/v1: conversations, messages (answered as JSON or server-sent events), feedback."""

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from app.models import Message
from app.services import chat, feedback
from app.serving import answering
from app.serving.inference import SamplingParams
from app.threads import run_db, run_in_transaction
from app.web.deps import CurrentUser, SessionDep
from app.web.routes.json_body import model_response
from app.web.schemas import (
    ConversationCreate,
    ConversationDetail,
    ConversationPublic,
    ConversationUpdate,
    ExchangePublic,
    FeedbackPublic,
    FeedbackSet,
    MessageCreate,
    MessagePublic,
    StopPublic,
)

router = APIRouter(tags=["chat"])


@router.get("/conversations", response_model=list[ConversationPublic])
def list_conversations(session: SessionDep, user: CurrentUser) -> list[ConversationPublic]:
    return [ConversationPublic.model_validate(c) for c in chat.list_conversations(session, user=user)]


@router.post("/conversations", response_model=ConversationPublic, status_code=status.HTTP_201_CREATED)
async def create_conversation(body: ConversationCreate, request: Request, user: CurrentUser) -> Response:
    def create(session: Session) -> ConversationPublic:
        return ConversationPublic.model_validate(chat.create_conversation(session, user=user, title=body.title))

    conversation = await run_in_transaction(request.app.state.session_factory, create)
    return model_response(conversation, status.HTTP_201_CREATED)


@router.get("/conversations/{conversation_id}", response_model=ConversationDetail)
def get_conversation(conversation_id: int, session: SessionDep, user: CurrentUser) -> ConversationDetail:
    conversation = chat.get_conversation(session, user=user, conversation_id=conversation_id)
    messages = [MessagePublic.model_validate(m) for m in chat.messages_of(session, conversation=conversation)]
    return ConversationDetail(**ConversationPublic.model_validate(conversation).model_dump(), messages=messages)


@router.patch("/conversations/{conversation_id}", response_model=ConversationPublic)
def update_conversation(
    conversation_id: int, body: ConversationUpdate, session: SessionDep, user: CurrentUser
) -> ConversationPublic:
    conversation = chat.update_conversation(
        session, user=user, conversation_id=conversation_id, title=body.title, allow_training=body.allow_training
    )
    session.commit()
    return ConversationPublic.model_validate(conversation)


@router.delete("/conversations/{conversation_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_conversation(conversation_id: int, session: SessionDep, user: CurrentUser) -> Response:
    chat.delete_conversation(session, user=user, conversation_id=conversation_id)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/conversations/{conversation_id}/messages",
    response_model=ExchangePublic,
    status_code=status.HTTP_201_CREATED,
    responses={200: {"content": {"text/event-stream": {}}, "description": "with stream=true: delta/done events"}},
)
async def send_message(
    conversation_id: int, body: MessageCreate, request: Request, session: SessionDep, user: CurrentUser
) -> ExchangePublic | StreamingResponse:
    """Store the user's message and answer it with the served model (the whole answer, or streamed)."""
    answering.require_model(request.app)

    def store() -> tuple[Message, Message]:  # on a thread: the event loop never waits for the database
        stored = chat.add_user_message(session, user=user, conversation_id=conversation_id, content=body.content)
        answering.require_room(request.app, session, user=user, answer=stored[1])  # a 413 commits nothing
        session.commit()
        return stored

    message, answer = await run_db(store)
    params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.top_k, body.seed)
    deltas = answering.answer(request.app, user=user, message_id=answer.id, params=params)
    if body.stream:
        return StreamingResponse(_events(deltas, message.id, answer.id), media_type="text/event-stream")
    async for _ in deltas:
        pass

    def saved_answer() -> MessagePublic:
        session.expire_all()
        public = MessagePublic.model_validate(chat.get_message(session, user=user, message_id=answer.id))
        session.rollback()
        return public

    return ExchangePublic(user_message=MessagePublic.model_validate(message), answer=await run_db(saved_answer))


async def _events(deltas, user_message_id: int, answer_id: int) -> AsyncIterator[str]:
    yield answering.sse("start", {"user_message_id": user_message_id, "answer_id": answer_id})
    async for event in answering.answer_events(deltas):
        yield event


@router.post("/messages/{message_id}/stop", response_model=StopPublic)
def stop_answer(message_id: int, request: Request, session: SessionDep, user: CurrentUser) -> StopPublic:
    """Stop an answer that is still being generated, whichever web process streams it (the Stop is recorded on the
    message; that process hears it within a fraction of a second). An answer already finished is left as it is."""
    stopping = chat.request_stop(session, user=user, message_id=message_id)  # someone else's message: a 404
    session.commit()
    if stopping:
        answering.stop_here(request.app, message_id)
    return StopPublic(message_id=message_id, stopping=stopping)


@router.put("/messages/{message_id}/feedback", response_model=FeedbackPublic)
async def set_feedback(message_id: int, body: FeedbackSet, request: Request, user: CurrentUser) -> Response:
    """Async with one hop to a thread that owns its session (as a sync route it cost an anyio hop and a session
    dependency's exit stack besides): thumbs are the chat's busiest write."""

    def store(session: Session) -> FeedbackPublic:
        vote = feedback.set_feedback(
            session, user=user, message_id=message_id, value=body.value, reason=body.reason, comment=body.comment
        )
        return FeedbackPublic.model_validate(vote)

    return model_response(await run_in_transaction(request.app.state.session_factory, store))


@router.delete("/messages/{message_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_message(message_id: int, session: SessionDep, user: CurrentUser) -> Response:
    """The message and every turn after it, with what was made of them for training (one transaction)."""
    chat.delete_message(session, user=user, message_id=message_id)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.delete("/messages/{message_id}/feedback", status_code=status.HTTP_204_NO_CONTENT)
async def clear_feedback(message_id: int, request: Request, user: CurrentUser) -> Response:
    def clear(session: Session) -> None:
        feedback.clear_feedback(session, user=user, message_id=message_id)

    await run_in_transaction(request.app.state.session_factory, clear)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
