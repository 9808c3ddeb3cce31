"""Model versions: which one is served, promotion (one active per kind) and roll-back."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import ModelKind, ModelStatus, ModelVersion, utcnow
from app.services.training_data import TrainingData

SERVED_KINDS = (ModelKind.policy, ModelKind.sft)  # chat is served by the active policy, else the active SFT model


def register(
    session: Session,
    *,
    name: str,
    kind: ModelKind,
    path: str,
    training_data: TrainingData,
    parent_id: int | None = None,
    metrics: dict[str, Any] | None = None,
    job_id: int | None = None,
    activate: bool = False,
) -> ModelVersion:
    """The one way a model version comes to be: trained by a job, bootstrapped, imported or given to the demo. A
    candidate until promoted (`activate=True`: at once, retiring the active one of its kind in the same transaction)."""
    version = ModelVersion(
        name=name,
        kind=kind,
        path=path,
        parent_id=parent_id,
        metrics=metrics or {},
        training_data=training_data.to_json(),
        job_id=job_id,
    )
    session.add(version)
    session.flush()
    return promote(session, version_id=version.id) if activate else version


def get_version(session: Session, *, version_id: int) -> ModelVersion:
    version = session.get(ModelVersion, version_id)
    if version is None:
        raise NotFound(f"model version {version_id} not found")
    return version


def list_versions(session: Session, *, kind: ModelKind | None = None) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.id.desc())
    if kind is not None:
        query = query.where(ModelVersion.kind == kind)
    return list(session.scalars(query))


def active(session: Session, *, kind: ModelKind) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.kind == kind, ModelVersion.status == ModelStatus.active)
    )


def judge_for(session: Session, *, trainer_id: int | None) -> ModelVersion | None:
    """The reward model that judges a new policy: the one most recently made active other than `trainer_id`, the
    reward model the policy was trained against (an RL policy learns that model's blind spots, so it would judge its
    own student kindly). Only versions that were once active qualify: a candidate the reward gate held back is not
    trusted to judge. None when no other reward model was ever active."""
    query = select(ModelVersion).where(
        ModelVersion.kind == ModelKind.reward,
        ModelVersion.activated_at.isnot(None),
        ModelVersion.status != ModelStatus.failed,
    )
    if trainer_id is not None:
        query = query.where(ModelVersion.id != trainer_id)
    return session.scalar(query.order_by(ModelVersion.activated_at.desc(), ModelVersion.id.desc()).limit(1))


def served_version(session: Session) -> ModelVersion | None:
    for kind in SERVED_KINDS:
        version = active(session, kind=kind)
        if version is not None:
            return version
    return None


def record_load_error(session: Session, *, version_id: int, error: str | None) -> None:
    """Note on a version why a server could not load it (None: it loaded), so that admins see it in the models
    table and the API; the servers keep serving what they had."""
    version = session.get(ModelVersion, version_id)
    if version is None:
        return
    metrics = {k: v for k, v in (version.metrics or {}).items() if k != "load_error"}
    if error is not None:
        metrics["load_error"] = error[:1000]
    if metrics != (version.metrics or {}):
        version.metrics = metrics  # a new dict: the JSON column sees the change


def promote(session: Session, *, version_id: int) -> ModelVersion:
    """Make a version the active one of its kind; the previous active one is retired in the same transaction."""
    version = get_version(session, version_id=version_id)
    if version.status == ModelStatus.failed:
        raise Conflict(f"model version {version_id} failed and cannot be served")
    if version.status == ModelStatus.active:
        return version
    current = active(session, kind=version.kind)
    if current is not None:
        current.status = ModelStatus.retired
        session.flush()  # the one-active-per-kind index must see the retirement first
    version.status = ModelStatus.active
    version.activated_at = utcnow()
    session.flush()
    return version


def roll_back(session: Session, *, kind: ModelKind) -> ModelVersion:
    """Re-activate the version that was active before the current one. The first policy ever promoted has none: rolling
    it back retires it, and chat is served by the active SFT model again (which is returned)."""
    current = active(session, kind=kind)
    previous = session.scalar(
        select(ModelVersion)
        .where(
            ModelVersion.kind == kind, ModelVersion.status == ModelStatus.retired, ModelVersion.activated_at.isnot(None)
        )
        .order_by(ModelVersion.activated_at.desc())
        .limit(1)
    )
    if previous is None:
        fallback = active(session, kind=ModelKind.sft) if kind == ModelKind.policy and current is not None else None
        if fallback is None:
            raise Conflict(f"there is no earlier {kind.value} model to roll back to")
        current.status = ModelStatus.retired
        session.flush()
        return fallback
    if current is not None:
        current.status = ModelStatus.retired
        session.flush()
    previous.status = ModelStatus.active
    previous.activated_at = utcnow()
    session.flush()
    return previous
