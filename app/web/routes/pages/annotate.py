"""The annotator's workspace (role `annotator`): rank K candidate answers, skip, or flag; guidelines. A user without
the role is shown how to ask for it (app/services/role_requests.py) instead of a bare refusal."""

import time
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.errors import Invalid
from app.models import Prompt, RankingStatus, Role, User
from app.services import annotation, guidelines, role_requests
from app.serving import tasks
from app.threads import run_db
from app.web.deps import AdminUser, AnnotatorUser, CurrentUser, SessionDep
from app.web.templating import render

router = APIRouter(prefix="/annotate")
LABELS = "ABCDEFGHI"


LONG_ANSWER = 400  # characters: past this, answers are compared side by side on a wide screen
SAVED = {"rank": "Ranking saved", "skip": "Skipped", "flag": "Flagged"}


def workspace_context(session, cset_id: int | None, annotator: User, per_set: int) -> dict:
    progress = annotation.annotator_progress(session, annotator_id=annotator.id, per_set=per_set)
    if cset_id is None:
        return {"cset": None, "progress": progress}
    cset = annotation.get_set(session, set_id=cset_id)
    prompt = session.get(Prompt, cset.prompt_id)
    candidates = [(LABELS[c.position], c) for c in cset.candidates]
    long = any(len(c.content or "") > LONG_ANSWER for c in cset.candidates)
    return {
        "cset": cset,
        "prompt": prompt,
        "candidates": candidates,
        "side_by_side": long,
        "started_ms": int(time.time() * 1000),
        "progress": progress,
    }


@router.get("", response_class=HTMLResponse, name="annotate")
async def workspace(request: Request, session: SessionDep, user: CurrentUser, saved: str | None = None) -> Response:
    """The next task with the annotator's counters; `saved` (after a submit) shows what was just stored."""
    if user.role == Role.user:
        return await run_db(ask_page, request, session, user)
    task = await tasks.next_task(request.app, user)
    per_set = request.app.state.settings.annotations_per_set
    context = await run_db(workspace_context, session, task.set_id if task else None, user, per_set)  # off the loop
    context["saved"] = SAVED.get(saved or "")
    return render(request, "annotate.html", context)


def ask_page(request: Request, session, user: User) -> HTMLResponse:
    """Annotating needs the annotator role: a user gets the way to ask for it (or the state of their request), not a
    bare 403. Nothing of the workspace is on it, and every annotation route still refuses them."""
    context = {"request_row": role_requests.request_for(session, user=user)}
    return render(request, "annotate_ask.html", context)


@router.post("/request-role", name="annotate_request_role")
def request_role(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    message: Annotated[str | None, Form(max_length=role_requests.MAX_MESSAGE)] = None,
) -> Response:
    """Ask an admin for the annotator role; the people page lists the request with Approve and Reject."""
    role_requests.ask(session, user=user, message=message)
    session.commit()
    return RedirectResponse(request.url_for("annotate"), status_code=303)


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
    return RedirectResponse(request.url_for("annotate").include_query_params(saved=action), status_code=303)


@router.get("/guidelines", response_class=HTMLResponse, name="guidelines")
def show_guidelines(request: Request, annotator: AnnotatorUser) -> HTMLResponse:
    return render(request, "guidelines.html", {"text": guidelines.read(request.app.state.settings)})


@router.post("/guidelines", name="guidelines_update")
def update_guidelines(request: Request, admin: AdminUser, text: Annotated[str, Form(max_length=50_000)]) -> Response:
    guidelines.write(request.app.state.settings, text)
    return RedirectResponse(request.url_for("guidelines"), status_code=303)
