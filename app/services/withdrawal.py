"""Withdrawal: what a person takes back leaves the flywheel in the same transaction as the action that took it.

Deleting a chat or a message, switching a chat's training off, and deleting an account all come here. The chat
prompts made from those messages are deleted, and with them (ON DELETE CASCADE) every candidate set built on them,
open or fully ranked, their candidates and their rankings: a ranking orders answers to the person's text, so keeping
it would keep the text, and without it there is nothing to train on. What is left of the chat no longer feeds the
dialogue and thumbs exports either (they read only live chats that allow training), so the prompt pool, the next
annotation task, every export and every job's input lose it at the same commit.

Models trained before keep their weights; a `withdrawals` row records the ids (no text) of what was taken back, so
that their lineage can say they saw data since withdrawn (`trained_on_withdrawn`): a version saw a row if the row's
id is within its TrainingData watermark for that table and its job started before the withdrawal.
"""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Select, delete, select
from sqlalchemy.orm import Session

from app.models import (
    CandidateSet,
    Conversation,
    Feedback,
    Job,
    Message,
    ModelVersion,
    Prompt,
    Ranking,
    Withdrawal,
)
from app.services.training_data import TrainingData

REASONS = ("conversation deleted", "message deleted", "training switched off", "account deleted")


def withdraw(
    session: Session, *, reason: str, conversations: Select[tuple[int]], messages: Select[tuple[int]] | None = None
) -> Withdrawal | None:
    """Take `messages` (ids; all messages of `conversations` when None) out of the prompt pool, the candidate sets,
    the rankings and every export; record their ids. Call it before the rows themselves are deleted or the chat's
    training is switched off. Returns the record, or None when nothing from them was in any training data."""
    if reason not in REASONS:
        raise ValueError(f"unknown withdrawal reason {reason!r}")
    # Row locks on the chats: a prompt sync reading them (under a share lock) finishes first, or waits for this.
    session.execute(select(Conversation.id).where(Conversation.id.in_(conversations)).with_for_update()).all()
    if messages is None:
        messages = select(Message.id).where(Message.conversation_id.in_(conversations))
    prompts = select(Prompt.id).where(Prompt.source_message_id.in_(messages))
    prompt_ids = list(session.scalars(prompts.order_by(Prompt.id)))
    ranking_ids = list(
        session.scalars(
            select(Ranking.id)
            .join(CandidateSet, CandidateSet.id == Ranking.candidate_set_id)
            .where(CandidateSet.prompt_id.in_(prompts))
            .order_by(Ranking.id)
        )
    )
    training = select(Conversation.id).where(Conversation.id.in_(conversations), Conversation.allow_training.is_(True))
    feedback_ids = list(
        session.scalars(
            select(Feedback.id)
            .join(Message, Message.id == Feedback.message_id)
            .where(Feedback.message_id.in_(messages), Message.conversation_id.in_(training))
            .order_by(Feedback.id)
        )
    )
    prompted = select(Message.conversation_id).join(Prompt, Prompt.source_message_id == Message.id)
    conversation_ids = sorted(
        set(session.scalars(training)) | set(session.scalars(prompted.where(Message.id.in_(messages))))
    )
    session.execute(delete(Prompt).where(Prompt.id.in_(prompts)), execution_options={"synchronize_session": False})
    session.expire_all()  # sets, candidates and rankings went by cascade inside the database
    if not (conversation_ids or prompt_ids or ranking_ids or feedback_ids):
        return None
    record = Withdrawal(
        reason=reason,
        conversation_ids=conversation_ids,
        prompt_ids=prompt_ids,
        ranking_ids=ranking_ids,
        feedback_ids=feedback_ids,
    )
    session.add(record)
    session.flush()
    return record


@dataclass(frozen=True)
class Withdrawn:
    """What a version was trained on that has since been withdrawn."""

    withdrawals: int
    conversations: int
    rankings: int


# TrainingData rows -> the withdrawal's ids of that table
_WATERMARKED = {
    "rankings": "ranking_ids",
    "thumbs": "feedback_ids",
    "dialogues": "conversation_ids",
    "prompts": "prompt_ids",
}


def _saw(record: TrainingData, withdrawal: Withdrawal) -> bool:
    for rows_name, ids_name in _WATERMARKED.items():
        rows = getattr(record, rows_name)
        ids = getattr(withdrawal, ids_name) or []
        if rows is not None and ids and min(ids) <= rows.last_id:
            return True
    return False


def trained_on_withdrawn(session: Session, *, version: ModelVersion) -> Withdrawn | None:
    """The withdrawals since `version` was trained that touched rows within its watermarks, or None."""
    record = TrainingData.from_json(version.training_data)
    since: datetime = version.created_at
    if version.job_id is not None:
        job = session.get(Job, version.job_id)
        if job is not None and job.started_at is not None:
            since = min(since, job.started_at)
    later = session.scalars(select(Withdrawal).where(Withdrawal.created_at >= since).order_by(Withdrawal.id))
    hits = [w for w in later if _saw(record, w)]
    if not hits:
        return None
    conversations = {c for w in hits for c in w.conversation_ids or []}
    rankings = {r for w in hits for r in w.ranking_ids or [] if record.rankings and r <= record.rankings.last_id}
    return Withdrawn(len(hits), len(conversations), len(rankings))
