"""Model versions under /api/v1 (admins): list, promote, roll back."""

from fastapi import APIRouter

from app.models import ModelKind
from app.services import model_versions
from app.web.deps import AdminUser, SessionDep
from app.web.schemas import ModelVersionPublic, RollBack

router = APIRouter(tags=["models"])


@router.get("/models", response_model=list[ModelVersionPublic])
def list_models(session: SessionDep, admin: AdminUser, kind: ModelKind | None = None) -> list[ModelVersionPublic]:
    return [ModelVersionPublic.model_validate(v) for v in model_versions.list_versions(session, kind=kind)]


@router.post("/models/{version_id}/promote", response_model=ModelVersionPublic)
def promote_model(version_id: int, session: SessionDep, admin: AdminUser) -> ModelVersionPublic:
    """Make this version the active one of its kind (servers pick it up within seconds)."""
    version = model_versions.promote(session, version_id=version_id)
    session.commit()
    return ModelVersionPublic.model_validate(version)


@router.post("/models/rollback", response_model=ModelVersionPublic)
def roll_back_model(body: RollBack, session: SessionDep, admin: AdminUser) -> ModelVersionPublic:
    """Re-activate the version of this kind that was active before the current one."""
    version = model_versions.roll_back(session, kind=body.kind)
    session.commit()
    return ModelVersionPublic.model_validate(version)
