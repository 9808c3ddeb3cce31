"""Send a route's response model without FastAPI validating it again: for the busiest API routes."""

from fastapi import Response, status
from pydantic import BaseModel


def model_response(body: BaseModel, status_code: int = status.HTTP_200_OK) -> Response:
    """The body as FastAPI sends it for a route whose response_model is the body's class (pydantic's JSON of that same
    model: FastAPI would validate the model just built once more, then dump it the same way)."""
    return Response(body.model_dump_json(), status_code=status_code, media_type="application/json")
