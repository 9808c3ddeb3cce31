"""Admin pages: the dashboard (counts, models, jobs with live progress and charts, data import/export), people."""

import json
from typing import Annotated

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse

from app.charts import job_charts
from app.deps import AdminUser, SessionDep
from app.errors import Invalid, ServiceError
from app.models import ModelKind, Role
from app.services import annotation, datasets, imports, jobs, model_versions, stats, tokens, users
from app.templating import is_htmx, render

router = APIRouter(prefix="/admin")


@router.get("", response_class=HTMLResponse, name="admin_dashboard")
def dashboard(request: Request, session: SessionDep, admin: AdminUser, message: str | None = None) -> HTMLResponse:
    settings = request.app.state.settings
    current = request.app.state.inference.current
    context = {
        "counts": stats.dashboard_counts(session, per_set=settings.annotations_per_set),
        "agreement": annotation.agreement(session),
        "versions": model_versions.list_versions(session),
        "kinds": list(ModelKind),
        "jobs": jobs.list_jobs(session, limit=20),
        "job_types": sorted(jobs.JOB_TYPES),
        "export_kinds": datasets.KINDS,
        "import_kinds": imports.IMPORT_KINDS,
        "served": current.name if current else None,
        "message": message,
    }
    return render(request, "admin.html", context)


@router.get("/jobs", response_class=HTMLResponse, name="admin_jobs")
def jobs_table(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    """The jobs table alone (htmx polls it every few seconds for live status and progress)."""
    return render(request, "partials/jobs.html", {"jobs": jobs.list_jobs(session, limit=20)})


@router.post("/jobs", name="admin_jobs_create")
def create_job(
    request: Request, session: SessionDep, admin: AdminUser,
    type: Annotated[str, Form(max_length=32)], params: Annotated[str, Form(max_length=20_000)] = "",
) -> Response:  # fmt: skip
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
    context = {"job": job, "charts": job_charts(job.metrics or []), "params": json.dumps(job.params, indent=2)}
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
    request: Request, session: SessionDep, admin: AdminUser,
    kind: Annotated[str, Form(max_length=20)], file: Annotated[UploadFile, File()],
) -> Response:  # fmt: skip
    data = await file.read(imports.MAX_IMPORT_BYTES + 1)
    summary = imports.import_file(session, request.app.state.settings, kind=kind, filename=file.filename or "",
                                  data=data)  # fmt: skip
    session.commit()
    url = request.url_for("admin_dashboard").include_query_params(message=f"Imported {kind}: {summary}")
    return RedirectResponse(url, status_code=303)


@router.get("/users", response_class=HTMLResponse, name="admin_users")
def list_users(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    context = {"people": users.list_users(session), "roles": list(Role), "tokens": tokens.active_counts(session)}
    return render(request, "admin_users.html", context)


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
        context = {"people": users.list_users(session), "roles": list(Role), "error": exc.message,
                   "tokens": tokens.active_counts(session)}  # fmt: skip
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


@router.post("/users/{user_id}/revoke-tokens", name="admin_users_revoke_tokens")
def revoke_tokens(request: Request, session: SessionDep, admin: AdminUser, user_id: int) -> Response:
    users.get_user(session, user_id=user_id)
    tokens.revoke_all(session, user_id=user_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)
