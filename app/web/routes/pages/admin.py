"""Admin pages: the dashboard (counts, models, jobs with live progress and charts, data import/export), people."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from app.errors import Invalid, ServiceError
from app.models import ModelKind, Role
from app.services import (
    annotation,
    app_settings,
    datasets,
    imports,
    jobs,
    lineage,
    model_versions,
    stats,
    tokens,
    users,
)
from app.services.training_data import TrainingData
from app.web.charts import job_charts, watch_charts, watch_flag
from app.web.deps import AdminUser, SessionDep
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/admin")


def notice_url(request: Request, text: str) -> str:
    """The dashboard showing `text` as a notice, signed: a link made elsewhere cannot put words in an admin's page."""
    notice = request.app.state.notice_signer.sign(text)
    return str(request.url_for("admin_dashboard").include_query_params(message=notice))


def _dashboard_context(request: Request, session: Session, message: str | None = None) -> dict[str, Any]:
    settings = request.app.state.settings
    current = request.app.state.inference.current
    versions = model_versions.list_versions(session)
    return {
        "counts": stats.dashboard_counts(session, per_set=settings.annotations_per_set),
        "agreement": annotation.agreement(session),
        "versions": versions,
        "version_names": lineage.version_names(versions),
        "describe": lineage.describe_training_data,
        "gate_verdict": lineage.gate_verdict,
        "kinds": list(ModelKind),
        "jobs": jobs.list_jobs(session, limit=20),
        "job_types": sorted(jobs.JOB_TYPES),
        "export_kinds": datasets.KINDS,
        "import_kinds": imports.IMPORT_KINDS,
        "served": current.name if current else None,
        "message": request.app.state.notice_signer.unsign(message),  # only what this server signed: see notice_url
        **_retrain_context(request, session),
    }


def _retrain_context(
    request: Request, session: Session, value: str | None = None, error: str | None = None, saved: bool = False
) -> dict[str, Any]:
    rule = app_settings.retrain_rule(session, default=request.app.state.settings.auto_retrain_after)
    value = str(rule.auto_retrain_after) if value is None else value
    return {"rule": rule, "retrain_value": value, "retrain_error": error, "retrain_saved": saved}


@router.get("", response_class=HTMLResponse, name="admin_dashboard")
def dashboard(request: Request, session: SessionDep, admin: AdminUser, message: str | None = None) -> HTMLResponse:
    return render(request, "admin.html", _dashboard_context(request, session, message))


@router.post("/settings", name="admin_settings_update")
def update_settings(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    auto_retrain_after: Annotated[str, Form(max_length=20)],
) -> Response:
    """Set the automatic retraining rule. A bad value is shown beside the field (the section alone for htmx, the
    whole page without JavaScript), with the text the admin typed kept in the field."""
    try:
        value = app_settings.parse_threshold(auto_retrain_after)
        app_settings.set_auto_retrain_after(session, value=value, user=admin)
    except ServiceError as exc:
        session.rollback()
        retrain = _retrain_context(request, session, value=auto_retrain_after, error=exc.message)
        if is_htmx(request):
            return render(request, "partials/retrain.html", retrain, status_code=exc.status_code)
        context = {**_dashboard_context(request, session), **retrain}
        return render(request, "admin.html", context, status_code=exc.status_code)
    session.commit()
    if is_htmx(request):
        return render(request, "partials/retrain.html", _retrain_context(request, session, saved=True))
    state = f"after {value} new labels" if value else "off"
    return RedirectResponse(notice_url(request, f"Automatic retraining: {state}"), status_code=303)


@router.get("/models/{version_id}", response_class=HTMLResponse, name="admin_model")
def model_detail(request: Request, session: SessionDep, admin: AdminUser, version_id: int) -> HTMLResponse:
    """One model version's lineage: its ancestors, the data it was trained on, the gate's verdict, its metrics."""
    version = model_versions.get_version(session, version_id=version_id)
    chain = lineage.ancestors(session, version)
    offspring = lineage.children(session, version)
    record = TrainingData.from_json(version.training_data)
    names = lineage.version_names([version, *chain, *offspring]) | lineage.referenced_names(session, record)
    context = {
        "version": version,
        "ancestors": chain,
        "children": offspring,
        "trained_on": lineage.describe_training_data(record, names),
        "withdrawn": lineage.withdrawn_data(session, version),
        "gate": lineage.gate_verdict(version.metrics or {}),
        "metrics": {k: v for k, v in (version.metrics or {}).items() if k not in ("gate", "promoted")},
    }
    return render(request, "admin_model.html", context)


@router.get("/jobs", response_class=HTMLResponse, name="admin_jobs")
def jobs_table(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    """The jobs table alone (htmx polls it every few seconds for live status and progress)."""
    return render(request, "partials/jobs.html", {"jobs": jobs.list_jobs(session, limit=20)})


@router.post("/jobs", name="admin_jobs_create")
def create_job(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    type: Annotated[str, Form(max_length=32)],
    params: Annotated[str, Form(max_length=20_000)] = "",
) -> Response:
    try:
        parsed = json.loads(params) if params.strip() else {}
    except json.JSONDecodeError as exc:
        raise Invalid(f"params must be a JSON object ({exc.msg})") from exc
    if not isinstance(parsed, dict):
        raise Invalid("params must be a JSON object")
    job = jobs.enqueue(session, type=type, params=parsed, created_by_id=admin.id)
    session.commit()
    return RedirectResponse(request.url_for("admin_job", job_id=job.id), status_code=303)


@router.get("/jobs/{job_id}", response_class=HTMLResponse, name="admin_job")
def job_detail(request: Request, session: SessionDep, admin: AdminUser, job_id: int) -> HTMLResponse:
    job = jobs.get_job(session, job_id=job_id)
    points = job.metrics or []
    context = {
        "job": job,
        "charts": job_charts(points),
        "watch_charts": watch_charts(points),
        "watch_flag": watch_flag(points),
        "params": json.dumps(job.params, indent=2),
    }
    return render(request, "admin_job.html", context, block="job")


@router.post("/jobs/{job_id}/cancel", name="admin_jobs_cancel")
def cancel_job(request: Request, session: SessionDep, admin: AdminUser, job_id: int) -> Response:
    jobs.cancel(session, job_id=job_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_job", job_id=job_id), status_code=303)


@router.post("/models/{version_id}/promote", name="admin_models_promote")
def promote(request: Request, session: SessionDep, admin: AdminUser, version_id: int) -> Response:
    model_versions.promote(session, version_id=version_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_dashboard"), status_code=303)


@router.post("/models/rollback", name="admin_models_rollback")
def roll_back(request: Request, session: SessionDep, admin: AdminUser, kind: Annotated[ModelKind, Form()]) -> Response:
    model_versions.roll_back(session, kind=kind)
    session.commit()
    return RedirectResponse(request.url_for("admin_dashboard"), status_code=303)


@router.get("/export/{kind}", name="admin_export")
def export(request: Request, session: SessionDep, admin: AdminUser, kind: str) -> StreamingResponse:
    """Download a dataset as JSONL (TRL's formats; `raw-rankings` keeps every annotator's record)."""
    lines = datasets.jsonl_lines(session, kind)
    headers = {"Content-Disposition": f'attachment; filename="flywheel-{kind}.jsonl"'}
    return StreamingResponse(lines, media_type="application/x-ndjson", headers=headers)


@router.post("/import", name="admin_import")
async def import_data(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    kind: Annotated[str, Form(max_length=20)],
    file: Annotated[UploadFile, File()],
) -> Response:
    data = await file.read(imports.MAX_IMPORT_BYTES + 1)
    summary = imports.import_file(
        session, request.app.state.settings, kind=kind, filename=file.filename or "", data=data
    )
    session.commit()
    return RedirectResponse(notice_url(request, f"Imported {kind}: {summary}"), status_code=303)


def _people_context(session: Session, **extra: Any) -> dict[str, Any]:
    return {"people": users.list_users(session), "roles": list(Role), "tokens": tokens.active_counts(session), **extra}


@router.get("/users", response_class=HTMLResponse, name="admin_users")
def list_users(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    return render(request, "admin_users.html", _people_context(session))


@router.post("/users", name="admin_users_create")
def create_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    role: Annotated[Role, Form()] = Role.user,
) -> Response:
    try:
        users.create_user(session, username=username, password=password, role=role)
    except ServiceError as exc:
        session.rollback()
        context = _people_context(session, error=exc.message)
        return render(request, "admin_users.html", context, status_code=exc.status_code)
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/users/{user_id}", name="admin_users_update")
def update_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    user_id: int,
    role: Annotated[Role, Form()],
    disabled: Annotated[bool, Form()] = False,
) -> Response:
    person = users.update_user(session, user_id=user_id, role=role, disabled=disabled)
    session.commit()
    if is_htmx(request):
        context = {"person": person, "roles": list(Role), "saved": True, "tokens": tokens.active_counts(session)}
        return render(request, "partials/user_row.html", context)
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/users/{user_id}/delete", name="admin_users_delete")
def delete_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    user_id: int,
    confirm: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Delete someone's account (the username typed again confirms it): one transaction, as app/services/users.py."""
    users.delete_user(session, user_id=user_id, confirm=confirm.strip())
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/users/{user_id}/revoke-tokens", name="admin_users_revoke_tokens")
def revoke_tokens(request: Request, session: SessionDep, admin: AdminUser, user_id: int) -> Response:
    users.get_user(session, user_id=user_id)
    tokens.revoke_all(session, user_id=user_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)
