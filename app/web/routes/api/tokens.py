"""The caller's own API tokens under /api/v1: list, create (the secret is shown once), revoke."""

from fastapi import APIRouter, status

from app.services import tokens
from app.web.deps import CurrentUser, SessionDep
from app.web.schemas import TokenCreate, TokenCreated, TokenPublic

router = APIRouter(tags=["tokens"])


@router.get("/tokens", response_model=list[TokenPublic])
def list_tokens(session: SessionDep, user: CurrentUser) -> list[TokenPublic]:
    return [TokenPublic.model_validate(t) for t in tokens.list_tokens(session, user=user)]


@router.post("/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token(body: TokenCreate, session: SessionDep, user: CurrentUser) -> TokenCreated:
    token, secret = tokens.create_token(session, user=user, name=body.name, expires_in_days=body.expires_in_days)
    session.commit()
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=secret)


@router.delete("/tokens/{token_id}", response_model=TokenPublic)
def revoke_token(token_id: int, session: SessionDep, user: CurrentUser) -> TokenPublic:
    token = tokens.revoke_token(session, token_id=token_id, user=user)
    session.commit()
    return TokenPublic.model_validate(token)
