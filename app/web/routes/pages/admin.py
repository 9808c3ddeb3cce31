"""Admin dashboard pages: the overview with trends, data (counts, agreement, import and export) and settings. Jobs,
models and people have modules of their own (admin_jobs, admin_models, admin_people); all share the nav."""

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from sqlalchemy.orm import Session

from app.errors import ServiceError
from app.models import JobStatus
from app.services import annotation, app_settings, datasets, imports, jobs, role_requests, stats
from app.web.charts import line_chart
from app.web.deps import AdminUser, SessionDep
from app.web.formatting import label
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/admin")


def notice_url(request: Request, text: str, page: str = "admin_dashboard") -> str:
    """An admin page showing `text` as a notice, signed: a link made elsewhere cannot put words in an admin's page."""
    notice = request.app.state.notice_signer.sign(text)
    return str(request.url_for(page).include_query_params(message=notice))


def notice(request: Request, message: str | None) -> str | None:
    return request.app.state.notice_signer.unsign(message)  # only what this server signed: see notice_url


def trends(session: Session) -> dict[str, Any]:
    """Labels per day over two weeks and the served policies' scores over versions, as charts (None: too little)."""
    days = stats.labels_per_day(session)
    per_day = [(i - len(days) + 1, d.total) for i, d in enumerate(days)]
    labels = line_chart("labels per day", per_day, "day (0 = today)", "labels", counts=True)
    scores = stats.policy_scores(session)
    metric = label(scores[0].metric) if scores else ""
    by_version = [(i + 1, s.value) for i, s in enumerate(scores)]
    quality = line_chart(f"{metric} by served version", by_version, "served version (oldest = 1)", metric)
    if quality is not None:  # a score is no count: the axis keeps its range, only the versions are whole
        quality.x_ticks = [t for t in quality.x_ticks if t.label.isdigit()]
    return {"days": days, "labels_chart": labels, "scores": scores, "score_label": metric, "quality_chart": quality}


@router.get("", response_class=HTMLResponse, name="admin_dashboard")
def dashboard(request: Request, session: SessionDep, admin: AdminUser, message: str | None = None) -> HTMLResponse:
    """The overview: what is served, what runs, what came in, and the trends."""
    current = request.app.state.inference.current
    counts = stats.dashboard_counts(session, per_set=request.app.state.settings.annotations_per_set)
    context = {
        "section": "overview",
        "served": current.name if current else None,
        "counts": counts,
        "running": jobs.list_jobs(session, status=JobStatus.running, limit=5),
        "recent": jobs.list_jobs(session, limit=5),
        "pending_requests": len(role_requests.pending(session)),
        "labels_since": jobs.labels_since_last_reward_model(session),
        "message": notice(request, message),
        **trends(session),
    }
    return render(request, "admin.html", context)


@router.get("/data", response_class=HTMLResponse, name="admin_data")
def data(request: Request, session: SessionDep, admin: AdminUser, message: str | None = None) -> HTMLResponse:
    """Counts, agreement between annotators, import and export."""
    context = {
        "section": "data",
        "counts": stats.dashboard_counts(session, per_set=request.app.state.settings.annotations_per_set),
        "agreement": annotation.agreement(session),
        "export_kinds": datasets.KINDS,
        "import_kinds": imports.IMPORT_KINDS,
        "message": notice(request, message),
    }
    return render(request, "admin_data.html", context)


def _retrain_context(
    request: Request, session: Session, value: str | None = None, error: str | None = None, saved: bool = False
) -> dict[str, Any]:
    rule = app_settings.retrain_rule(session, default=request.app.state.settings.auto_retrain_after)
    value = str(rule.auto_retrain_after) if value is None else value
    return {"rule": rule, "retrain_value": value, "retrain_error": error, "retrain_saved": saved}


def _settings_page(request: Request, session: Session, message: str | None = None, **retrain: Any) -> dict[str, Any]:
    settings = request.app.state.settings
    return {
        "section": "settings",
        "message": notice(request, message),
        "per_set": settings.annotations_per_set,
        "active_learning": settings.active_learning.value,
        "reward_min_labels": settings.reward_min_labels,
        **_retrain_context(request, session, **retrain),
    }


@router.get("/settings", response_class=HTMLResponse, name="admin_settings")
def settings_page(request: Request, session: SessionDep, admin: AdminUser, message: str | None = None) -> HTMLResponse:
    """The automatic retraining rule (editable), the guidelines link, and the settings fixed at start-up."""
    return render(request, "admin_settings.html", _settings_page(request, session, message))


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
        if is_htmx(request):
            retrain = _retrain_context(request, session, value=auto_retrain_after, error=exc.message)
            return render(request, "partials/retrain.html", retrain, status_code=exc.status_code)
        context = _settings_page(request, session, value=auto_retrain_after, error=exc.message)
        return render(request, "admin_settings.html", context, status_code=exc.status_code)
    session.commit()
    if is_htmx(request):
        return render(request, "partials/retrain.html", _retrain_context(request, session, saved=True))
    state = f"after {value} new labels" if value else "off"
    return RedirectResponse(notice_url(request, f"Automatic retraining: {state}", "admin_settings"), status_code=303)


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
    return RedirectResponse(notice_url(request, f"Imported {kind}: {summary}", "admin_data"), status_code=303)
