"""Training jobs under /api/v1 (admins): enqueue, list, watch, cancel."""

from fastapi import APIRouter, Query, status

from app.models import JobStatus
from app.services import jobs
from app.web.deps import AdminUser, SessionDep
from app.web.schemas import JobCreate, JobPublic

router = APIRouter(tags=["jobs"])


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
