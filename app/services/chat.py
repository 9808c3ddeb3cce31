"""Conversations and messages, always scoped to their owner (another user's chat looks like it does not exist)."""

from datetime import datetime

from sqlalchemy import Row, Select, bindparam, delete, func, select
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound
from app.models import Conversation, Message, MessageRole, ModelVersion, User, utcnow
from app.services import withdrawal
from app.services.text import clean

MAX_MESSAGE_CHARS = 8000
MAX_TITLE_CHARS = 200
TITLE_FROM_MESSAGE_CHARS = 60  # a title made from the first message fits the sidebar
DEFAULT_TITLE = "New chat"
STREAMING = "streaming"  # finish_reason of an assistant message whose answer is being generated


def list_conversations(session: Session, *, user: User, limit: int = 200) -> list[Conversation]:
    query = (
        select(Conversation)
        .where(Conversation.user_id == user.id)
        .order_by(Conversation.updated_at.desc(), Conversation.id.desc())
        .limit(limit)
    )
    return list(session.scalars(query))


def get_conversation(session: Session, *, user: User, conversation_id: int) -> Conversation:
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.user_id != user.id:
        raise NotFound(f"conversation {conversation_id} not found")
    return conversation


def create_conversation(session: Session, *, user: User, title: str | None = None) -> Conversation:
    conversation = Conversation(user_id=user.id, title=_clean_title(clean(title or DEFAULT_TITLE)))
    session.add(conversation)
    session.flush()
    return conversation


def start_conversation(
    session: Session, *, user: User, content: str, sampling: dict | None = None
) -> tuple[Conversation, Message, Message]:
    """A conversation is made only with its first message (the chat page never leaves empty ones behind): the
    conversation, titled from the message, the message and its empty answer; one transaction with the caller."""
    conversation = create_conversation(session, user=user)
    message, answer = add_user_message(
        session, user=user, conversation_id=conversation.id, content=content, sampling=sampling
    )
    return conversation, message, answer


def title_from(content: str) -> str:
    """A title from a message: its first non-empty line, cut at a word near TITLE_FROM_MESSAGE_CHARS."""
    line = next((" ".join(x.split()) for x in content.splitlines() if x.strip()), "") or DEFAULT_TITLE
    if len(line) <= TITLE_FROM_MESSAGE_CHARS:
        return line
    cut = line[:TITLE_FROM_MESSAGE_CHARS]
    if " " in cut[TITLE_FROM_MESSAGE_CHARS // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "…"


def _clean_title(title: str) -> str:
    title = " ".join(title.split())
    if not 1 <= len(title) <= MAX_TITLE_CHARS:
        raise Invalid(f"a title must be 1–{MAX_TITLE_CHARS} characters")
    return title


def update_conversation(
    session: Session, *, user: User, conversation_id: int, title: str | None = None, allow_training: bool | None = None
) -> Conversation:
    conversation = get_conversation(session, user=user, conversation_id=conversation_id)
    if title is not None:
        conversation.title = _clean_title(clean(title))
    if allow_training is False and conversation.allow_training:
        withdrawal.withdraw(session, reason="training switched off", conversations=_one(conversation.id))
    if allow_training is not None:  # switched on again: the next sync makes new prompts of it (no old rankings)
        conversation.allow_training = allow_training
    conversation.updated_at = utcnow()
    session.flush()
    return conversation


def _one(conversation_id: int) -> Select[tuple[int]]:
    return select(Conversation.id).where(Conversation.id == conversation_id)


def delete_conversation(session: Session, *, user: User, conversation_id: int) -> None:
    """The chat, its messages and thumbs, and whatever was made of it for training (app/services/withdrawal.py)."""
    conversation = get_conversation(session, user=user, conversation_id=conversation_id)
    withdrawal.withdraw(session, reason="conversation deleted", conversations=_one(conversation.id))
    session.execute(delete(Conversation).where(Conversation.id == conversation.id))
    session.expunge(conversation)


def delete_message(session: Session, *, user: User, message_id: int) -> int:
    """A message and every message that follows from it (its answers, the turns after it), with what was made of
    them for training; earlier turns stay. Returns the conversation's id."""
    conversation_id = owned_message(session, user=user, message_id=message_id).conversation_id
    children: dict[int | None, list[int]] = {}
    for m_id, parent_id in session.execute(
        select(Message.id, Message.parent_id).where(Message.conversation_id == conversation_id)
    ):
        children.setdefault(parent_id, []).append(m_id)
    doomed, todo = [], [message_id]
    while todo:
        doomed.append(todo.pop())
        todo += children.get(doomed[-1], [])
    withdrawal.withdraw(
        session,
        reason="message deleted",
        conversations=_one(conversation_id),
        messages=select(Message.id).where(Message.id.in_(doomed)),
    )
    session.execute(delete(Message).where(Message.id.in_(doomed)), execution_options={"synchronize_session": False})
    session.expire_all()
    session.get(Conversation, conversation_id).updated_at = utcnow()
    session.flush()
    return conversation_id


def messages_of(session: Session, *, conversation: Conversation) -> list[Message]:
    query = select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id)
    return list(session.scalars(query))


def model_names(session: Session, *, messages: list[Message]) -> dict[int, str]:
    """The name of the model version that wrote each answer, by version id (the page shows who answered)."""
    ids = {m.model_version_id for m in messages if m.model_version_id is not None}
    if not ids:
        return {}
    rows = session.execute(select(ModelVersion.id, ModelVersion.name).where(ModelVersion.id.in_(ids)))
    return {version_id: name for version_id, name in rows}


def visible_thread(messages: list[Message]) -> list[tuple[Message, list[Message]]]:
    """The thread as shown: each turn with the earlier answers it replaced (regenerated siblings), newest last."""
    siblings: dict[int | None, list[Message]] = {}
    for m in messages:
        if m.role == MessageRole.assistant:
            siblings.setdefault(m.parent_id, []).append(m)
    thread = []
    for m in messages:
        if m.role != MessageRole.assistant:
            thread.append((m, []))
        elif siblings[m.parent_id][-1] is m:
            thread.append((m, siblings[m.parent_id][:-1]))
    return thread


def history_for_model(messages: list[Message], upto: Message) -> list[dict[str, str]]:
    """The `messages` list a model answers: the visible thread before `upto` (latest answer of each turn), without
    the earlier answers to `upto`'s own turn (a regenerated answer answers the user again, not its predecessor)."""
    history = []
    earlier = [x for x in messages if x.id < upto.id and not (x.role == upto.role and x.parent_id == upto.parent_id)]
    for m, _ in visible_thread(earlier):
        if m.finish_reason != STREAMING and m.content:
            history.append({"role": m.role.value, "content": m.content})
    return history


def add_user_message(
    session: Session, *, user: User, conversation_id: int, content: str, sampling: dict | None = None
) -> tuple[Message, Message]:
    """Store the user's message and an empty assistant answer to be streamed into; one transaction with the caller.
    `sampling`: how the answer is to be sampled (the page's answer settings), kept on the answer until it is."""
    conversation = get_conversation(session, user=user, conversation_id=conversation_id)
    content = clean(content).strip()
    if not content:
        raise Invalid("the message is empty")
    if len(content) > MAX_MESSAGE_CHARS:
        raise PayloadTooLargeError(f"a message may have at most {MAX_MESSAGE_CHARS} characters")
    last = session.scalar(
        select(Message).where(Message.conversation_id == conversation.id).order_by(Message.id.desc()).limit(1)
    )
    message = Message(
        conversation_id=conversation.id, parent_id=last.id if last else None, role=MessageRole.user, content=content
    )
    session.add(message)
    session.flush()
    answer = Message(
        conversation_id=conversation.id,
        parent_id=message.id,
        role=MessageRole.assistant,
        content="",
        finish_reason=STREAMING,
        sampling_params=sampling,
    )
    session.add(answer)
    if conversation.title == DEFAULT_TITLE:
        conversation.title = title_from(content)
    conversation.updated_at = utcnow()
    session.flush()
    return message, answer


def regenerate(session: Session, *, user: User, message_id: int) -> Message:
    """A new answer to the same user turn; the earlier answer stays as a sibling (a preference signal)."""
    old = get_message(session, user=user, message_id=message_id)
    if old.role != MessageRole.assistant or old.finish_reason == STREAMING:
        raise Conflict("only a finished answer can be regenerated")
    newest = session.scalar(select(func.max(Message.id)).where(Message.conversation_id == old.conversation_id))
    latest_answer = session.scalar(
        select(func.max(Message.id)).where(Message.parent_id == old.parent_id, Message.role == MessageRole.assistant)
    )
    if newest != latest_answer:
        raise Conflict("only the last answer of a conversation can be regenerated")
    answer = Message(
        conversation_id=old.conversation_id,
        parent_id=old.parent_id,
        role=MessageRole.assistant,
        content="",
        finish_reason=STREAMING,
        sampling_params=old.sampling_params,  # asked again as it was asked before
    )
    session.add(answer)
    session.flush()
    return answer


_messages, _conversations = Message.__table__, Conversation.__table__
# Built once (every thumb runs it): the message's few columns with its conversation's owner.
_OWNED_MESSAGE = (
    select(_messages.c.role, _messages.c.finish_reason, _messages.c.conversation_id, _conversations.c.user_id)
    .join_from(_messages, _conversations, _conversations.c.id == _messages.c.conversation_id)
    .where(_messages.c.id == bindparam("message_id"))
)


def owned_message(session: Session, *, user: User, message_id: int) -> Row:
    """The message's role, finish_reason and conversation_id if it is in one of `user`'s conversations, else a 404
    (another user's message looks like it does not exist): one query, no objects loaded."""
    row = session.execute(_OWNED_MESSAGE, {"message_id": message_id}).one_or_none()
    if row is None:
        raise NotFound(f"message {message_id} not found")
    if row.user_id != user.id:
        raise NotFound(f"conversation {row.conversation_id} not found")
    return row


def get_message(session: Session, *, user: User, message_id: int) -> Message:
    owned_message(session, user=user, message_id=message_id)
    return session.get(Message, message_id)


def finish_answer(
    session: Session,
    *,
    message_id: int,
    content: str,
    finish_reason: str,
    model_version_id: int | None,
    sampling: dict,
) -> None:
    message = session.get(Message, message_id)
    if message is None:  # the conversation was deleted while the answer streamed
        return
    message.content = clean(content)
    message.finish_reason = finish_reason
    message.model_version_id = model_version_id
    message.sampling_params = sampling


def request_stop(session: Session, *, user: User, message_id: int) -> bool:
    """Record a Stop on the user's answer if it is still streaming (whichever web process streams it reads it from
    here: `stop_requests`); False when it is already answered. Someone else's message is a 404."""
    message = get_message(session, user=user, message_id=message_id)
    if message.finish_reason != STREAMING:
        return False
    message.stop_requested_at = utcnow()
    session.flush()
    return True


def stop_requests(session: Session, *, message_ids: list[int]) -> dict[int, datetime]:
    """When Stop was last asked for each of these messages that has one: one query for all of a process's streams."""
    query = select(Message.id, Message.stop_requested_at).where(
        Message.id.in_(message_ids), Message.stop_requested_at.is_not(None)
    )
    return {row.id: row.stop_requested_at for row in session.execute(query)}


class PayloadTooLargeError(Invalid):
    status_code = 413
