"""Request and response bodies of the REST API, in families: <Thing>Create, <Thing>Update, <Thing>Public."""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from app.models import JobStatus, MessageRole, ModelKind, ModelStatus, RankingStatus, Role


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    role: Role
    disabled: bool
    created_at: datetime
    last_login_at: datetime | None


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=2, max_length=32)
    password: str = Field(min_length=8, max_length=256)
    role: Role = Role.user


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    disabled: bool | None = None


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    expires_in_days: int | None = Field(None, ge=1, le=3650)


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    expires_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="The secret. Shown once: store it now.")


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="pretrain, sft, reward, rl, dpo, kto, evaluate or candidates")
    params: dict[str, Any] = Field(default_factory=dict, description="the trainer's options for this job")
    priority: int = Field(0, ge=-100, le=100)
    max_attempts: int = Field(3, ge=1, le=10)


class JobPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    type: str
    params: dict[str, Any]
    effective_params: dict[str, Any] | None = None  # what the trainer ran with, defaults filled in (once started)
    status: JobStatus
    priority: int
    worker_id: str | None
    progress: float
    metrics: list[dict[str, Any]]
    log_tail: str
    error: str | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=200)


class ConversationUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str | None = Field(None, max_length=200)
    allow_training: bool | None = None


class ConversationPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    title: str
    allow_training: bool
    created_at: datetime
    updated_at: datetime


class MessagePublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    conversation_id: int
    parent_id: int | None
    role: MessageRole
    content: str
    model_version_id: int | None
    finish_reason: str | None
    created_at: datetime


class ConversationDetail(ConversationPublic):
    messages: list[MessagePublic]


class SamplingFields(BaseModel):
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.8, ge=0, le=2)
    top_p: float | None = Field(0.95, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None


class MessageCreate(SamplingFields):
    model_config = ConfigDict(extra="forbid")

    content: str = Field(min_length=1, description="the user's message (at most 8000 characters)")
    stream: bool = Field(False, description="answer as server-sent events instead of one JSON body")


class ExchangePublic(BaseModel):
    user_message: MessagePublic
    answer: MessagePublic


class FeedbackSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Literal[1, -1]
    reason: str | None = Field(None, max_length=64)
    comment: str | None = Field(None, max_length=2000)


class StopPublic(BaseModel):
    message_id: int
    stopping: bool  # True: the Stop is recorded and the answer ends as `stopped`; False: it had already finished


class FeedbackPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    message_id: int
    value: int
    reason: str | None
    comment: str | None
    updated_at: datetime


class ModelVersionPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    kind: ModelKind
    status: ModelStatus
    parent_id: int | None
    job_id: int | None
    metrics: dict[str, Any]
    training_data: dict[str, Any]
    created_at: datetime
    activated_at: datetime | None


class SettingsPublic(BaseModel):
    """The runtime settings admins change without a restart (stored in the database; the environment is the default)."""

    model_config = ConfigDict(from_attributes=True)

    auto_retrain_after: int = Field(description="new rankings + thumbs that trigger reward then RL; 0 = off")
    source: Literal["database", "environment"] = Field(description="where the value in force comes from")
    updated_at: datetime | None
    updated_by: str | None
    labels_since_last_reward_model: int


class SettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    auto_retrain_after: int | None = Field(None, ge=0, le=1_000_000, strict=True, description="0 turns the rule off")


class RollBack(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: ModelKind


class CandidatePublic(BaseModel):
    id: int
    label: str
    content: str


class TaskPublic(BaseModel):
    set_id: int
    prompt_id: int
    messages: list[dict[str, str]]
    candidates: list[CandidatePublic]


class RankEntry(BaseModel):
    candidate_id: int
    rank: int = Field(ge=1, description="1 is best; equal ranks are ties")


class RankingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: RankingStatus = RankingStatus.ranked
    ranking: list[RankEntry] = Field(default_factory=list, max_length=20)
    flag_reason: str | None = Field(None, max_length=200)
    time_spent_ms: int | None = Field(None, ge=0)


class RankingPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    candidate_set_id: int
    status: RankingStatus
    time_spent_ms: int | None
    created_at: datetime
    ranking: list[RankEntry]


class PromptImport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jsonl: str = Field(max_length=10_000_000, description='one {"messages": [...]} or {"prompt": "..."} per line')


class ImportResult(BaseModel):
    added: int
