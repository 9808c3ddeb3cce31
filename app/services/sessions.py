"""Login sessions: the cookie holds a random id; its hash, expiry and CSRF token live in `user_sessions`."""

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.auth import NewSession, new_session, sha256_hex
from app.models import User, UserSession, utcnow


def start_session(session: Session, *, user: User, max_age_s: int) -> NewSession:
    created = new_session(max_age_s)
    session.add(
        UserSession(
            user_id=user.id, token_hash=created.token_hash, csrf_token=created.csrf_token, expires_at=created.expires_at
        )
    )
    # Sweep this user's expired logins while we are here, so the table does not grow without bound.
    session.execute(delete(UserSession).where(UserSession.user_id == user.id, UserSession.expires_at < utcnow()))
    session.flush()
    return created


def resolve_session(session: Session, *, token: str) -> UserSession | None:
    """The live session of an enabled user for this cookie token, or None."""
    login = session.scalar(select(UserSession).where(UserSession.token_hash == sha256_hex(token)))
    if login is None or login.expires_at <= utcnow() or login.user.disabled:
        return None
    return login


def end_session(session: Session, *, token: str) -> None:
    session.execute(delete(UserSession).where(UserSession.token_hash == sha256_hex(token)))
