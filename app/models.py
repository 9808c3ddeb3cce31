"""The schema (SQLAlchemy 2.0 typed ORM). Change it only together with an Alembic revision under migrations/."""

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Stable constraint names so that migrations can refer to them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in, timezone-aware UTC out, also on SQLite (which forgets the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store timezone-aware UTC values")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def checked_enum(cls: type[enum.Enum], name: str) -> Enum:
    """An enum stored as its value in a VARCHAR with a CHECK constraint: portable, and readable in SQL."""
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=32,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Role(enum.StrEnum):
    user = "user"
    annotator = "annotator"
    admin = "admin"


class MessageRole(enum.StrEnum):
    system = "system"
    user = "user"
    assistant = "assistant"


class PromptSource(enum.StrEnum):
    chat = "chat"
    imported = "import"
    demo = "demo"


class Split(enum.StrEnum):
    train = "train"
    heldout = "heldout"


class RankingStatus(enum.StrEnum):
    ranked = "ranked"
    skipped = "skipped"
    flagged = "flagged"


class ModelKind(enum.StrEnum):
    base = "base"
    sft = "sft"
    reward = "reward"
    policy = "policy"


class ModelStatus(enum.StrEnum):
    candidate = "candidate"
    active = "active"
    retired = "retired"
    failed = "failed"


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


def created_at_column() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, nullable=False)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(checked_enum(Role, "role"), default=Role.user)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = created_at_column()
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class RoleRequestStatus(enum.StrEnum):
    pending = "pending"
    approved = "approved"
    rejected = "rejected"


class RoleRequest(Base):
    """A user's request for the annotator role, decided by an admin on the people page. One row per user: asking
    again after a rejection reopens it, so the unique user id keeps two requests from racing in."""

    __tablename__ = "role_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), unique=True)
    status: Mapped[RoleRequestStatus] = mapped_column(
        checked_enum(RoleRequestStatus, "role_request_status"), default=RoleRequestStatus.pending, index=True
    )
    message: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[datetime] = created_at_column()
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    decided_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    user: Mapped[User] = relationship(foreign_keys=[user_id])
    decided_by: Mapped[User | None] = relationship(foreign_keys=[decided_by_id])


class UserSession(Base):
    """A login: the cookie carries a random id whose hash is looked up here, so logout and disabling take effect."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = created_at_column()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship()


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = created_at_column()
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    user: Mapped[User] = relationship()


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200), default="New chat")
    allow_training: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Message(Base):
    """A chat turn. A regenerated answer is a sibling (same parent): the earlier one stays as a preference signal."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    role: Mapped[MessageRole] = mapped_column(checked_enum(MessageRole, "message_role"))
    content: Mapped[str] = mapped_column(Text)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    sampling_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    # When Stop was last asked while the answer streamed: the process streaming it may not be the one asked.
    stop_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = created_at_column()


class Feedback(Base):
    __tablename__ = "feedback"
    __table_args__ = (
        UniqueConstraint("message_id", "user_id"),
        CheckConstraint("value IN (-1, 1)", name="value_is_thumb"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    value: Mapped[int] = mapped_column(SmallInteger)
    reason: Mapped[str | None] = mapped_column(String(64))
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Prompt(Base):
    """A conversation context (OpenAI `messages` list ending with a user turn) to be answered and ranked."""

    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    content_hash: Mapped[str] = mapped_column(String(64), unique=True)
    source: Mapped[PromptSource] = mapped_column(checked_enum(PromptSource, "prompt_source"))
    source_message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    split: Mapped[Split] = mapped_column(checked_enum(Split, "split"), default=Split.train)
    created_at: Mapped[datetime] = created_at_column()


class CandidateSet(Base):
    __tablename__ = "candidate_sets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = created_at_column()
    # The reward ensemble's disagreement on the order of the set's answers (ml/active.py), 0-1; NULL: not scored.
    # With FLYWHEEL_ACTIVE_LEARNING=disagreement annotators get the highest first.
    priority: Mapped[float | None] = mapped_column(Float, nullable=True)

    candidates: Mapped[list["Candidate"]] = relationship(order_by="Candidate.position")


class Candidate(Base):
    __tablename__ = "candidates"
    __table_args__ = (UniqueConstraint("candidate_set_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_set_id: Mapped[int] = mapped_column(ForeignKey("candidate_sets.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)
    content: Mapped[str] = mapped_column(Text)
    token_count: Mapped[int | None] = mapped_column(Integer)
    logprob: Mapped[float | None] = mapped_column(Float)


class Ranking(Base):
    """One annotator's verdict on one candidate set; its per-candidate ranks are RankingEntry rows."""

    __tablename__ = "rankings"
    __table_args__ = (UniqueConstraint("candidate_set_id", "annotator_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    candidate_set_id: Mapped[int] = mapped_column(ForeignKey("candidate_sets.id", ondelete="CASCADE"), index=True)
    # NULL once the annotator's account is deleted: the ranking stays, anonymised (app/services/users.py).
    annotator_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"), index=True)
    status: Mapped[RankingStatus] = mapped_column(checked_enum(RankingStatus, "ranking_status"))
    flag_reason: Mapped[str | None] = mapped_column(String(200))
    time_spent_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = created_at_column()

    entries: Mapped[list["RankingEntry"]] = relationship(order_by="RankingEntry.rank", cascade="all, delete-orphan")


class RankingEntry(Base):
    """A candidate's place in a ranking: 1 is best; equal ranks are ties (no preference between them)."""

    __tablename__ = "ranking_entries"
    __table_args__ = (
        UniqueConstraint("ranking_id", "candidate_id"),
        CheckConstraint("rank >= 1", name="rank_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ranking_id: Mapped[int] = mapped_column(ForeignKey("rankings.id", ondelete="CASCADE"), index=True)
    candidate_id: Mapped[int] = mapped_column(ForeignKey("candidates.id", ondelete="CASCADE"), index=True)
    rank: Mapped[int] = mapped_column(Integer)


class Withdrawal(Base):
    """Data taken back by its author (a chat or message deleted, training switched off, an account deleted).

    The rows themselves are gone; this keeps only their ids, no text, so that the lineage of a version trained
    before can say that it saw data since withdrawn (app/services/withdrawal.py).
    """

    __tablename__ = "withdrawals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    reason: Mapped[str] = mapped_column(String(32))
    conversation_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    prompt_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    ranking_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    feedback_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, nullable=False, index=True)


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        # At most one active model of each kind: promotion retires the old one in the same transaction.
        Index(
            "uq_model_versions_one_active_per_kind",
            "kind",
            unique=True,
            sqlite_where=text("status = 'active'"),
            postgresql_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[ModelKind] = mapped_column(checked_enum(ModelKind, "model_kind"))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(String(500))
    status: Mapped[ModelStatus] = mapped_column(
        checked_enum(ModelStatus, "model_status"), default=ModelStatus.candidate
    )
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    training_data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at_column()
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Job(Base):
    """The queue. A worker claims a queued job, holds a lease it renews by heartbeating, and records progress."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim_order", "status", "priority", "id"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_fraction"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # what the trainer ran with, defaults filled in (None until the job's handler built its config)
    effective_params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    status: Mapped[JobStatus] = mapped_column(checked_enum(JobStatus, "job_status"), default=JobStatus.queued)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    worker_id: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    log_tail: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = created_at_column()
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AppSetting(Base):
    """A runtime setting an admin changed while the app runs (admin page or REST); a key without a row falls back to
    its FLYWHEEL_* environment value, so every process sees a change at its next look without a restart."""

    __tablename__ = "app_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[Any] = mapped_column(JSON, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    updated_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))

    updated_by: Mapped[User | None] = relationship()
