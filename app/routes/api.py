"""REST API under /api/v1 (Bearer tokens or the browser session). Later issues add rankings, feedback, models."""

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import StreamingResponse

from app.deps import AdminUser, CurrentUser, SessionDep
from app.models import JobStatus, ModelKind
from app.schemas import (
    JobCreate,
    JobPublic,
    ModelVersionPublic,
    RollBack,
    SettingsPublic,
    SettingsUpdate,
    TokenCreate,
    TokenCreated,
    TokenPublic,
    UserCreate,
    UserPublic,
    UserUpdate,
)
from app.services import app_settings, datasets, jobs, model_versions, tokens, users

router = APIRouter(tags=["api"])


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)


@router.get("/users", response_model=list[UserPublic])
def list_users(session: SessionDep, admin: AdminUser) -> list[UserPublic]:
    return [UserPublic.model_validate(u) for u in users.list_users(session)]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, session: SessionDep, admin: AdminUser) -> UserPublic:
    user = users.create_user(session, username=body.username, password=body.password, role=body.role)
    session.commit()
    return UserPublic.model_validate(user)


@router.patch("/users/{user_id}", response_model=UserPublic)
def update_user(user_id: int, body: UserUpdate, session: SessionDep, admin: AdminUser) -> UserPublic:
    user = users.update_user(session, user_id=user_id, role=body.role, disabled=body.disabled)
    session.commit()
    return UserPublic.model_validate(user)


@router.post("/users/{user_id}/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token_for(user_id: int, body: TokenCreate, session: SessionDep, admin: AdminUser) -> TokenCreated:
    """An admin issues a token for someone (a bot, a simulated annotator); shown once, like any token."""
    owner = users.get_user(session, user_id=user_id)
    token, secret = tokens.create_token(session, user=owner, name=body.name, expires_in_days=body.expires_in_days)
    session.commit()
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=secret)


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(session: SessionDep, user: CurrentUser) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t) for t in tokens.list_tokens(session, user=user)]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, session: SessionDep, user: CurrentUser) -> TokenCreated:
    token, secret = tokens.create_token(session, user=user, name=body.name, expires_in_days=body.expires_in_days)
    session.commit()
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: int, session: SessionDep, user: CurrentUser) -> TokenPublic:
    token = tokens.revoke_token(session, token_id=token_id, user=user)
    session.commit()
    return TokenPublic.model_validate(token)


@router.get("/jobs", response_model=list[JobPublic])
def list_jobs(
    session: SessionDep, admin: AdminUser, status: JobStatus | None = None, limit: int = Query(100, ge=1, le=1000)
) -> list[JobPublic]:
    return [JobPublic.model_validate(j) for j in jobs.list_jobs(session, status=status, limit=limit)]


@router.post("/jobs", response_model=JobPublic, status_code=status.HTTP_201_CREATED)
def create_job(body: JobCreate, session: SessionDep, admin: AdminUser) -> JobPublic:
    job = jobs.enqueue(
        session,
        type=body.type,
        params=body.params,
        created_by_id=admin.id,
        priority=body.priority,
        max_attempts=body.max_attempts,
    )
    session.commit()
    return JobPublic.model_validate(job)


@router.get("/jobs/{job_id}", response_model=JobPublic)
def get_job(job_id: int, session: SessionDep, admin: AdminUser) -> JobPublic:
    return JobPublic.model_validate(jobs.get_job(session, job_id=job_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: int, session: SessionDep, admin: AdminUser) -> JobPublic:
    job = jobs.cancel(session, job_id=job_id)
    session.commit()
    return JobPublic.model_validate(job)


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


@router.get("/settings", response_model=SettingsPublic)
def get_settings(request: Request, session: SessionDep, admin: AdminUser) -> SettingsPublic:
    """The runtime settings: the automatic retraining rule in force and the labels collected towards it."""
    default = request.app.state.settings.auto_retrain_after
    return SettingsPublic.model_validate(app_settings.retrain_rule(session, default=default))


@router.patch("/settings", response_model=SettingsPublic)
def update_settings(request: Request, body: SettingsUpdate, session: SessionDep, admin: AdminUser) -> SettingsPublic:
    """Change the automatic retraining rule (`auto_retrain_after`: N new labels, 0 = off); workers apply it at their
    next poll."""
    if body.auto_retrain_after is not None:
        app_settings.set_auto_retrain_after(session, value=body.auto_retrain_after, user=admin)
        session.commit()
    default = request.app.state.settings.auto_retrain_after
    return SettingsPublic.model_validate(app_settings.retrain_rule(session, default=default))


@router.get(
    "/export/{kind}", response_class=StreamingResponse, responses={200: {"content": {"application/x-ndjson": {}}}}
)
def export_dataset(kind: str, session: SessionDep, admin: AdminUser) -> StreamingResponse:
    """JSONL in TRL's formats: dialogues, rankings, pairs, thumbs; raw-rankings per annotator; prompts."""
    return StreamingResponse(datasets.jsonl_lines(session, kind), media_type="application/x-ndjson")
