"""Accounts: create, authenticate, change role, disable, delete."""

import re

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from app.auth import hash_password, verify_password
from app.errors import Conflict, Invalid, NotFound
from app.models import Conversation, Ranking, Role, User, UserSession, utcnow
from app.services import tokens, withdrawal

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{1,31}$")
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 256


def validate_credentials(username: str, password: str) -> None:
    if not USERNAME_PATTERN.match(username):
        raise Invalid(
            "username must be 2–32 characters: letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise Invalid(f"password must be {MIN_PASSWORD_LENGTH}–{MAX_PASSWORD_LENGTH} characters")


def get_by_username(session: Session, *, username: str) -> User | None:
    return session.scalar(select(User).where(func.lower(User.username) == username.lower()))


def get_user(session: Session, *, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def count_users(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(User)) or 0


def create_user(session: Session, *, username: str, password: str, role: Role | None = None) -> User:
    """Create an account. With no role given, the very first account becomes admin so a fresh install is usable."""
    validate_credentials(username, password)
    if get_by_username(session, username=username) is not None:
        raise Conflict(f"username {username!r} is taken")
    if role is None:
        role = Role.admin if count_users(session) == 0 else Role.user
    user = User(username=username, password_hash=hash_password(password), role=role, disabled=False)
    session.add(user)
    session.flush()
    return user


def authenticate(session: Session, *, username: str, password: str) -> User | None:
    """The user if the password is right and the account enabled; None otherwise (same answer for every failure)."""
    user = get_by_username(session, username=username)
    ok = verify_password(user.password_hash if user else None, password)
    if not ok or user is None or user.disabled:
        return None
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))


def _ensure_an_admin_remains(session: Session, *, user: User) -> None:
    others = session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == Role.admin, User.id != user.id, User.disabled.is_(False))
    )
    if not others:
        raise Conflict("this is the last enabled admin; make another admin first")


def update_user(session: Session, *, user_id: int, role: Role | None = None, disabled: bool | None = None) -> User:
    user = get_user(session, user_id=user_id)
    demoting = role is not None and role != Role.admin and user.role == Role.admin
    disabling = disabled is True and not user.disabled and user.role == Role.admin
    if demoting or disabling:
        _ensure_an_admin_remains(session, user=user)
    if role is not None:
        user.role = role
    if disabled is not None:
        user.disabled = disabled
        if disabled:  # end every open login and API token at once, for good: enabling again revives neither
            for login in session.scalars(select(UserSession).where(UserSession.user_id == user.id)):
                session.delete(login)
            tokens.revoke_all(session, user_id=user.id)
    session.flush()
    return user


def touch_login(session: Session, *, user: User) -> None:
    user.last_login_at = utcnow()


def delete_user(session: Session, *, user_id: int, confirm: str) -> None:
    """Delete an account and everything it owns, in the caller's transaction; `confirm` must repeat the username.

    Their chats are withdrawn first (their prompts, the candidate sets and rankings built on them leave the pool
    and every export: app/services/withdrawal.py), then the database's ON DELETE CASCADE takes the chats, messages,
    thumbs, logins and API tokens. Rankings they made as an annotator stay, anonymised: the ranking orders someone
    else's answers and is the service's training data, while what is theirs (their name, the free text of a flag)
    goes. The jobs they queued and the settings they changed keep no name either (SET NULL).
    """
    user = get_user(session, user_id=user_id)
    if confirm != user.username:
        raise Invalid(f"type the username {user.username!r} to confirm the deletion")
    if user.role == Role.admin and not user.disabled:
        _ensure_an_admin_remains(session, user=user)
    chats = select(Conversation.id).where(Conversation.user_id == user.id)
    withdrawal.withdraw(session, reason="account deleted", conversations=chats)
    session.execute(
        update(Ranking).where(Ranking.annotator_id == user_id).values(annotator_id=None, flag_reason=None),
        execution_options={"synchronize_session": False},
    )
    session.execute(delete(User).where(User.id == user_id), execution_options={"synchronize_session": False})
    session.expunge(user)
