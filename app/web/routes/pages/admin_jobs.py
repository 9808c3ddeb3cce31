"""Admin job pages: the jobs list with the form that starts one, and a page per job with its charts, ETA, the
parameters it ran with, its log and error, and Cancel (asked twice)."""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.errors import Invalid
from app.jobs.params import label_count
from app.models import CandidateSet, Feedback, Job, JobStatus, Prompt, Ranking, RankingStatus, Split
from app.services import jobs
from app.web.charts import job_charts, reward_against_kl, watch_charts, watch_flag
from app.web.deps import AdminUser, SessionDep
from app.web.formatting import duration, format_metrics
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/admin")
FEW_LABELS = 50  # below this many rankings and thumbs a reward model (or DPO/KTO policy) learns mostly noise
LABELLED_JOBS = frozenset({"reward", "dpo", "kto"})


def train_labels(session: Session) -> int:
    """Rankings (ranked, on train-split prompts) and thumbs there are now: about what a reward job started now gets
    (thumbs of held-out prompts are counted too: a warning needs the size, not the exact row set)."""
    rankings = session.scalar(
        select(func.count())
        .select_from(Ranking)
        .join(CandidateSet, CandidateSet.id == Ranking.candidate_set_id)
        .join(Prompt, Prompt.id == CandidateSet.prompt_id)
        .where(Ranking.status == RankingStatus.ranked, Prompt.split == Split.train)
    )
    return (rankings or 0) + (session.scalar(select(func.count()).select_from(Feedback)) or 0)


def few_labels(session: Session, job: Job) -> str | None:
    """A warning when a job learns from preferences and has (or, queued, would have) fewer than FEW_LABELS."""
    if job.type not in LABELLED_JOBS:
        return None
    counted = label_count(job.effective_params)
    n = counted if counted is not None else train_labels(session) if job.status == JobStatus.queued else None
    if n is None or n >= FEW_LABELS:
        return None
    when = "trained on" if counted is not None else "would train on"
    return (
        f"This {job.type} job {when} only {n} labels (rankings and thumbs); below {FEW_LABELS} a model learns mostly "
        "noise, and the gate holds it back or judges it on very few held-out pairs. Collect more labels first."
    )


def _jobs_page(session: Session, **extra: Any) -> dict[str, Any]:
    labels = train_labels(session)
    return {
        "section": "jobs",
        "jobs": jobs.list_jobs(session, limit=50),
        "job_types": sorted(jobs.JOB_TYPES),
        "labels": labels,
        "few_labels": labels < FEW_LABELS,
        "few_threshold": FEW_LABELS,
        "eta": eta,
        **extra,
    }


@router.get("/jobs", response_class=HTMLResponse, name="admin_jobs")
def jobs_page(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    """The jobs page; htmx polls the same URL for the table alone (live status and progress)."""
    if is_htmx(request):
        return render(request, "partials/jobs.html", {"jobs": jobs.list_jobs(session, limit=50), "eta": eta})
    return render(request, "admin_jobs.html", _jobs_page(session))


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


def eta(job: Job) -> str | None:
    """Time left, from the newest progress point that reported one (`eta_s`), while the job runs."""
    if job.status != JobStatus.running:
        return None
    latest = next((m for m in reversed(job.metrics or []) if isinstance(m.get("eta_s"), int | float)), None)
    return duration(latest["eta_s"]) if latest else None


def latest_numbers(job: Job) -> list:
    """The newest value of each metric the job reported, named and rounded."""
    merged: dict[str, Any] = {}
    for point in job.metrics or []:
        merged.update(point)
    numbers = format_metrics({k: v for k, v in merged.items() if k not in ("eta_s", "max_steps")})
    for m in numbers:  # while it trains the loss is the latest, not the final one
        m.label = "training loss" if m.key == "loss" else "steps done" if m.key == "step" else m.label
    return numbers


@router.get("/jobs/{job_id}", response_class=HTMLResponse, name="admin_job")
def job_detail(request: Request, session: SessionDep, admin: AdminUser, job_id: int) -> HTMLResponse:
    job = jobs.get_job(session, job_id=job_id)
    points = job.metrics or []
    rl_chart = reward_against_kl(points)
    context = {
        "section": "jobs",
        "job": job,
        "charts": job_charts(points) + ([rl_chart] if rl_chart else []) + watch_charts(points),
        "watch_flag": watch_flag(points),
        "eta_text": eta(job),
        "latest": latest_numbers(job),
        "params": job.effective_params,
        "given": job.params or {},
        "few_labels": few_labels(session, job),
    }
    return render(request, "admin_job.html", context, block="job")


@router.post("/jobs/{job_id}/cancel", name="admin_jobs_cancel")
def cancel_job(request: Request, session: SessionDep, admin: AdminUser, job_id: int) -> Response:
    jobs.cancel(session, job_id=job_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_job", job_id=job_id), status_code=303)
