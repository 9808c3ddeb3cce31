"""Accounts under /api/v1: who am I, and (admins) people, their roles and tokens issued for them."""

from fastapi import APIRouter, status

from app.services import tokens, users
from app.web.deps import AdminUser, CurrentUser, SessionDep
from app.web.schemas import TokenCreate, TokenCreated, TokenPublic, UserCreate, UserPublic, UserUpdate

router = APIRouter(tags=["users"])


@router.get("/me", response_model=UserPublic)
def me(user: CurrentUser) -> UserPublic:
    return UserPublic.model_validate(user)


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


@router.post("/users/{user_id}/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
def create_token_for(user_id: int, body: TokenCreate, session: SessionDep, admin: AdminUser) -> TokenCreated:
    """An admin issues a token for someone (a bot, a simulated annotator); shown once, like any token."""
    owner = users.get_user(session, user_id=user_id)
    token, secret = tokens.create_token(session, user=owner, name=body.name, expires_in_days=body.expires_in_days)
    session.commit()
    return TokenCreated(**TokenPublic.model_validate(token).model_dump(), token=secret)
