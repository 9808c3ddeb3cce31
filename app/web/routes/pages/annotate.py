"""The annotator's workspace (role `annotator`): rank K candidate answers, skip, or flag; guidelines."""

import time
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.errors import Invalid
from app.models import Prompt, RankingStatus
from app.services import annotation, guidelines
from app.serving import tasks
from app.threads import run_db
from app.web.deps import AdminUser, AnnotatorUser, SessionDep
from app.web.templating import render

router = APIRouter(prefix="/annotate")
LABELS = "ABCDEFGHI"


def workspace_context(session, cset_id: int) -> dict:
    cset = annotation.get_set(session, set_id=cset_id)
    prompt = session.get(Prompt, cset.prompt_id)
    candidates = [(LABELS[c.position], c) for c in cset.candidates]
    return {"cset": cset, "prompt": prompt, "candidates": candidates, "started_ms": int(time.time() * 1000)}


@router.get("", response_class=HTMLResponse, name="annotate")
async def workspace(request: Request, session: SessionDep, annotator: AnnotatorUser) -> HTMLResponse:
    task = await tasks.next_task(request.app, annotator)
    if task is None:
        return render(request, "annotate.html", {"cset": None})
    context = await run_db(workspace_context, session, task.set_id)  # the database, off the event loop
    return render(request, "annotate.html", context)


def form_entries(form, cset_candidates) -> list[tuple[int, int]]:
    entries = []
    for candidate in cset_candidates:
        value = form.get(f"rank-{candidate.id}")
        if value in (None, ""):
            continue
        try:
            entries.append((candidate.id, int(value)))
        except ValueError as exc:
            raise Invalid(f"the rank of candidate {candidate.id} must be a number") from exc
    return entries


@router.post("/sets/{set_id}", name="annotate_submit")
async def submit(
    request: Request,
    session: SessionDep,
    annotator: AnnotatorUser,
    set_id: int,
    action: Annotated[str, Form(pattern="^(rank|skip|flag)$")],
    started_ms: Annotated[int | None, Form()] = None,
    time_spent_ms: Annotated[int | None, Form(ge=0)] = None,
    flag_reason: Annotated[str | None, Form(max_length=200)] = None,
) -> Response:
    """Form fields `rank-<candidate id>` carry the ranks; the keyboard and drag-and-drop fill them in."""
    cset = annotation.get_set(session, set_id=set_id)
    status = {"rank": RankingStatus.ranked, "skip": RankingStatus.skipped, "flag": RankingStatus.flagged}[action]
    entries = form_entries(await request.form(), cset.candidates) if status == RankingStatus.ranked else []
    if time_spent_ms is None and started_ms is not None:  # no JavaScript: measure from when the page was made
        elapsed = int(time.time() * 1000) - started_ms
        time_spent_ms = elapsed if 0 <= elapsed <= annotation.MAX_TIME_SPENT_MS else None
    annotation.submit_ranking(
        session,
        annotator=annotator,
        set_id=set_id,
        status=status,
        entries=entries,
        flag_reason=flag_reason or None,
        time_spent_ms=time_spent_ms,
    )
    session.commit()
    return RedirectResponse(request.url_for("annotate"), status_code=303)


@router.get("/guidelines", response_class=HTMLResponse, name="guidelines")
def show_guidelines(request: Request, annotator: AnnotatorUser) -> HTMLResponse:
    return render(request, "guidelines.html", {"text": guidelines.read(request.app.state.settings)})


@router.post("/guidelines", name="guidelines_update")
def update_guidelines(request: Request, admin: AdminUser, text: Annotated[str, Form(max_length=50_000)]) -> Response:
    guidelines.write(request.app.state.settings, text)
    return RedirectResponse(request.url_for("guidelines"), status_code=303)
