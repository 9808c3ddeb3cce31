"""Counts for the admin dashboard."""

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import CandidateSet, Conversation, Feedback, Message, MessageRole, Prompt, Ranking, User


def _count(session: Session, query) -> int:
    return session.scalar(select(func.count()).select_from(query.subquery())) or 0


def dashboard_counts(session: Session, *, per_set: int) -> dict[str, int]:
    rankings_per_set = select(Ranking.candidate_set_id, func.count().label("n")).group_by(Ranking.candidate_set_id)
    ranked = rankings_per_set.subquery()
    open_sets = (
        select(CandidateSet.id)
        .outerjoin(ranked, ranked.c.candidate_set_id == CandidateSet.id)
        .where(func.coalesce(ranked.c.n, 0) < per_set)
    )
    return {
        "users": _count(session, select(User.id)),
        "conversations": _count(session, select(Conversation.id)),
        "answers": _count(session, select(Message.id).where(Message.role == MessageRole.assistant)),
        "thumbs_up": _count(session, select(Feedback.id).where(Feedback.value == 1)),
        "thumbs_down": _count(session, select(Feedback.id).where(Feedback.value == -1)),
        "prompts": _count(session, select(Prompt.id)),
        "candidate_sets": _count(session, select(CandidateSet.id)),
        "rankings": _count(session, select(Ranking.id)),
        "open_tasks": _count(session, open_sets),
    }
