"""Runtime settings under /api/v1 (admins): the automatic retraining rule."""

from fastapi import APIRouter, Request

from app.services import app_settings
from app.web.deps import AdminUser, SessionDep
from app.web.schemas import SettingsPublic, SettingsUpdate

router = APIRouter(tags=["settings"])


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
