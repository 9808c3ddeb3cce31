"""Thumbs up/down on an assistant message: one per (message, user), changeable, idempotent."""

from sqlalchemy import Row, bindparam, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound
from app.models import Conversation, Feedback, Message, MessageRole, User, utcnow
from app.services.chat import STREAMING
from app.text import clean

REASONS = ("correct", "helpful", "concise", "wrong", "unhelpful", "rambling", "rude", "unsafe", "other")
MAX_COMMENT_CHARS = 2000


_messages, _conversations = Message.__table__, Conversation.__table__
# Built once (every thumb runs them): the message with its conversation's owner, and the person's vote on it.
_MESSAGE = (
    select(_messages.c.role, _messages.c.finish_reason, _messages.c.conversation_id, _conversations.c.user_id)
    .join_from(_messages, _conversations, _conversations.c.id == _messages.c.conversation_id)
    .where(_messages.c.id == bindparam("message_id"))
)  # fmt: skip
_VOTE = select(Feedback).where(Feedback.message_id == bindparam("message_id"), Feedback.user_id == bindparam("user_id"))


def _owned_message(session: Session, *, user: User, message_id: int) -> Row:
    """chat.get_message's checks and errors (404 for a message that is not there or not the caller's), in one query
    that loads no objects."""
    row = session.execute(_MESSAGE, {"message_id": message_id}).one_or_none()
    if row is None:
        raise NotFound(f"message {message_id} not found")
    if row.user_id != user.id:
        raise NotFound(f"conversation {row.conversation_id} not found")
    return row


def get_feedback(session: Session, *, user: User, message_id: int) -> Feedback | None:
    return session.scalar(_VOTE, {"message_id": message_id, "user_id": user.id})


def set_feedback(
    session: Session, *, user: User, message_id: int, value: int, reason: str | None = None, comment: str | None = None
) -> Feedback:
    """Record or change the vote; sending the same vote twice is one vote."""
    if value not in (-1, 1):
        raise Invalid("value must be 1 (thumbs up) or -1 (thumbs down)")
    reason = reason or None
    if reason is not None and reason not in REASONS:
        raise Invalid(f"reason must be one of: {', '.join(REASONS)}")
    comment = clean(comment or "").strip() or None
    if comment is not None and len(comment) > MAX_COMMENT_CHARS:
        raise Invalid(f"a comment may have at most {MAX_COMMENT_CHARS} characters")
    message = _owned_message(session, user=user, message_id=message_id)
    if message.role != MessageRole.assistant or message.finish_reason == STREAMING:
        raise Conflict("only a finished answer can be rated")
    feedback = get_feedback(session, user=user, message_id=message_id)
    if feedback is None:
        try:
            with session.begin_nested():  # a double click races two inserts: the loser updates instead
                feedback = Feedback(message_id=message_id, user_id=user.id, value=value, reason=reason, comment=comment)
                session.add(feedback)
            return feedback
        except IntegrityError:
            feedback = get_feedback(session, user=user, message_id=message_id)
    if (feedback.value, feedback.reason, feedback.comment) != (value, reason, comment):
        feedback.value, feedback.reason, feedback.comment = value, reason, comment
        feedback.updated_at = utcnow()
    session.flush()
    return feedback


def clear_feedback(session: Session, *, user: User, message_id: int) -> None:
    _owned_message(session, user=user, message_id=message_id)
    session.execute(delete(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user.id))
