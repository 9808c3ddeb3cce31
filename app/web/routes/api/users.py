"""Accounts under /api/v1: who am I, deleting one's account, and (admins) people, their roles, tokens issued for
them, and deleting them."""

from typing import Annotated

from fastapi import APIRouter, Query, Response, status

from app.services import tokens, users
from app.web.deps import AdminUser, CurrentUser, SessionDep
from app.web.schemas import TokenCreate, TokenCreated, TokenPublic, UserCreate, UserPublic, UserUpdate

router = APIRouter(tags=["users"])


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)


# The username typed again: deleting an account cannot be undone, so a client says whom it means.
Confirm = Annotated[str, Query(max_length=64, description="the account's username, to confirm")]


@router.delete("/me", status_code=status.HTTP_204_NO_CONTENT)
def delete_me(session: SessionDep, user: CurrentUser, confirm: Confirm = "") -> Response:
    """Delete one's own account and everything it owns, with what was made of it for training (one transaction)."""
    users.delete_user(session, user_id=user.id, confirm=confirm)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/users", response_model=list[UserPublic])
def list_users(session: SessionDep, admin: AdminUser) -> list[UserPublic]:
    return [UserPublic.model_validate(u) for u in users.list_users(session)]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, session: SessionDep, admin: AdminUser) -> UserPublic:
    user = users.create_user(session, username=body.username, password=body.password, role=body.role)
    session.commit()
    return UserPublic.model_validate(user)


@router.patch("/users/{user_id}", response_model=UserPublic)
def update_user(user_id: int, body: UserUpdate, session: SessionDep, admin: AdminUser) -> UserPublic:
    user = users.update_user(session, user_id=user_id, role=body.role, disabled=body.disabled)
    session.commit()
    return UserPublic.model_validate(user)


@router.delete("/users/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
def delete_user(user_id: int, session: SessionDep, admin: AdminUser, confirm: Confirm = "") -> Response:
    """Delete someone's account as `DELETE /me` would; the last enabled admin cannot be deleted (409)."""
    users.delete_user(session, user_id=user_id, confirm=confirm)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/users/{user_id}/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token_for(user_id: int, body: TokenCreate, session: SessionDep, admin: AdminUser) -> TokenCreated:
    """An admin issues a token for someone (a bot, a simulated annotator); shown once, like any token."""
    owner = users.get_user(session, user_id=user_id)
    token, secret = tokens.create_token(session, user=owner, name=body.name, expires_in_days=body.expires_in_days)
    session.commit()
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=secret)
