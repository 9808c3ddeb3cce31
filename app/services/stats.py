"""Counts and trends for the admin dashboard: what was collected, per day, and how the served policy fared."""

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.models import (
    CandidateSet,
    Conversation,
    Feedback,
    Message,
    MessageRole,
    ModelKind,
    ModelVersion,
    Prompt,
    Ranking,
    User,
    utcnow,
)

# The numbers a policy version is judged by, in order of preference: the demo world's gold scorer when it was
# measured, else the reward the gate measured, else the gate's win rate.
POLICY_SCORES = ("gold", "reward_candidate", "win_rate")


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


@dataclass
class DayLabels:
    day: datetime  # midnight UTC
    rankings: int
    thumbs: int

    @property
    def total(self) -> int:
        return self.rankings + self.thumbs


def labels_per_day(session: Session, *, days: int = 14, now: datetime | None = None) -> list[DayLabels]:
    """Rankings and thumbs collected on each of the last `days` days (UTC), oldest first, empty days included.
    Grouped here rather than in SQL: the date functions differ between SQLite and PostgreSQL."""
    today = (now or utcnow()).replace(hour=0, minute=0, second=0, microsecond=0)
    since = today - timedelta(days=days - 1)
    counts: dict[str, Counter] = {}
    for name, table in (("rankings", Ranking), ("thumbs", Feedback)):
        stamps = session.scalars(select(table.created_at).where(table.created_at >= since))
        counts[name] = Counter(stamp.date() for stamp in stamps)
    return [
        DayLabels(day, counts["rankings"][day.date()], counts["thumbs"][day.date()])
        for day in (since + timedelta(days=i) for i in range(days))
    ]


@dataclass
class VersionScore:
    version_id: int
    name: str
    metric: str
    value: float


def policy_scores(session: Session) -> list[VersionScore]:
    """Each policy (and SFT) version that was ever served, in the order they were made, with the best number it has
    (see POLICY_SCORES); all scored by the same metric, the first that the newest of them has."""
    versions = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.kind.in_((ModelKind.policy, ModelKind.sft)), ModelVersion.activated_at.is_not(None))
        .order_by(ModelVersion.id)
    ).all()
    numeric = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    for metric in POLICY_SCORES:
        scored = [v for v in versions if numeric((v.metrics or {}).get(metric))]
        if len(scored) >= 1:
            return [VersionScore(v.id, v.name, metric, float(v.metrics[metric])) for v in scored]
    return []
