"""Request and response bodies of the REST API, in families: <Thing>Create, <Thing>Update, <Thing>Public."""

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from app.models import JobStatus, Role


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
