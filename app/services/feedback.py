"""Thumbs up/down on an assistant message: one per (message, user), changeable, idempotent."""

from sqlalchemy import bindparam, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid
from app.models import Feedback, MessageRole, User, utcnow
from app.services.chat import STREAMING, owned_message
from app.services.text import clean

REASONS = ("correct", "helpful", "concise", "wrong", "unhelpful", "rambling", "rude", "unsafe", "other")
MAX_COMMENT_CHARS = 2000


# Built once (every thumb runs it): the person's vote on a message.
_VOTE = select(Feedback).where(Feedback.message_id == bindparam("message_id"), Feedback.user_id == bindparam("user_id"))


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
    message = owned_message(session, user=user, message_id=message_id)
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


def set_reason(
    session: Session, *, user: User, message_id: int, reason: str | None = None, comment: str | None = None
) -> Feedback:
    """Change the reason and comment of the person's existing vote (the page saves them as soon as they are picked);
    without a vote there is nothing to attach them to: a 409 that says to pick a thumb."""
    vote = get_feedback(session, user=user, message_id=message_id)
    if vote is None:
        owned_message(session, user=user, message_id=message_id)  # someone else's message stays a 404
        raise Conflict("pick 👍 or 👎 first: a reason is saved with a vote")
    return set_feedback(session, user=user, message_id=message_id, value=vote.value, reason=reason, comment=comment)


def clear_feedback(session: Session, *, user: User, message_id: int) -> None:
    owned_message(session, user=user, message_id=message_id)
    session.execute(delete(Feedback).where(Feedback.message_id == message_id, Feedback.user_id == user.id))
