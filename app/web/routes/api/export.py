"""Dataset export under /api/v1 (admins): JSONL in TRL's formats."""

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.services import datasets
from app.web.deps import AdminUser, SessionDep

router = APIRouter(tags=["export"])


@router.get(
    "/export/{kind}", response_class=StreamingResponse, responses={200: {"content": {"application/x-ndjson": {}}}}
)
def export_dataset(kind: str, session: SessionDep, admin: AdminUser) -> StreamingResponse:
    """JSONL in TRL's formats: dialogues, rankings, pairs, thumbs; raw-rankings per annotator; prompts."""
    return StreamingResponse(datasets.jsonl_lines(session, kind), media_type="application/x-ndjson")
