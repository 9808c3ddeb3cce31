"""REST for annotators under /api/v1: the next task and rankings; prompt import for admins."""

from fastapi import APIRouter, Request, Response, status
from sqlalchemy.orm import Session

from app.services import annotation, prompts
from app.serving import tasks
from app.threads import run_in_transaction
from app.web.deps import AdminUser, AnnotatorUser, SessionDep
from app.web.routes.json_body import model_response
from app.web.routes.pages.annotate import LABELS
from app.web.schemas import (
    CandidatePublic,
    ImportResult,
    PromptImport,
    RankEntry,
    RankingCreate,
    RankingPublic,
    TaskPublic,
)

router = APIRouter(tags=["annotation"])


@router.get("/annotation/next", response_model=TaskPublic, responses={204: {"description": "nothing to annotate"}})
async def next_task(request: Request, annotator: AnnotatorUser) -> Response:
    """The next candidate set for this annotator (sampled from the served model when none is waiting)."""
    task = await tasks.next_task(request.app, annotator)
    if task is None:
        return Response(status_code=status.HTTP_204_NO_CONTENT)
    candidates = [CandidatePublic(id=i, label=LABELS[position], content=text) for i, position, text in task.candidates]
    return model_response(
        TaskPublic(set_id=task.set_id, prompt_id=task.prompt_id, messages=task.messages, candidates=candidates)
    )


@router.post("/annotation/sets/{set_id}/ranking", response_model=RankingPublic, status_code=status.HTTP_201_CREATED)
async def submit_ranking(set_id: int, body: RankingCreate, request: Request, annotator: AnnotatorUser) -> Response:
    """Store one ranking. Async with one hop to a thread that opens, uses and closes its own session (a sync route
    with a session dependency cost an anyio hop and the dependency's exit stack on top)."""

    def store(session: Session) -> annotation.StoredRanking:
        return annotation.submit_ranking(
            session,
            annotator=annotator,
            set_id=set_id,
            status=body.status,
            entries=[(e.candidate_id, e.rank) for e in body.ranking],
            flag_reason=body.flag_reason,
            time_spent_ms=body.time_spent_ms,
        )

    ranking = await run_in_transaction(request.app.state.session_factory, store)
    entries = [RankEntry(candidate_id=candidate_id, rank=rank) for candidate_id, rank in ranking.entries]
    public = RankingPublic(
        id=ranking.id,
        candidate_set_id=ranking.candidate_set_id,
        status=ranking.status,
        time_spent_ms=ranking.time_spent_ms,
        created_at=ranking.created_at,
        ranking=entries,
    )
    return model_response(public, status.HTTP_201_CREATED)


@router.post("/prompts/import", response_model=ImportResult, status_code=status.HTTP_201_CREATED)
def import_prompts(body: PromptImport, session: SessionDep, admin: AdminUser) -> ImportResult:
    """Add prompts from JSONL text; a bad line rejects the whole file with the line number."""
    added = prompts.import_jsonl(session, text=body.jsonl)
    session.commit()
    return ImportResult(added=added)
