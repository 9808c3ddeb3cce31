"""API tokens for REST: shown once at creation, stored as a SHA-256 hash, revocable, optionally expiring."""

from datetime import timedelta

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.orm import Session, make_transient_to_detached

from app.auth import new_api_token, sha256_hex
from app.errors import Invalid, NotFound
from app.models import ApiToken, User, utcnow
from app.services.text import clean

MAX_TOKEN_DAYS = 3650
LAST_USED_GRANULARITY = timedelta(minutes=1)  # fewer writes: last use is recorded to the minute


def create_token(
    session: Session, *, user: User, name: str, expires_in_days: int | None = None
) -> tuple[ApiToken, str]:
    """Create a token; returns the row and the only copy of the secret."""
    name = clean(name).strip()
    if not 1 <= len(name) <= 100:
        raise Invalid("token name must be 1–100 characters")
    if expires_in_days is not None and not 1 <= expires_in_days <= MAX_TOKEN_DAYS:
        raise Invalid(f"expires_in_days must be between 1 and {MAX_TOKEN_DAYS}")
    secret = new_api_token()
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days else None
    token = ApiToken(
        user_id=user.id, name=name, token_hash=sha256_hex(secret), prefix=secret[:10], expires_at=expires_at
    )
    session.add(token)
    session.flush()
    return token, secret


def list_tokens(session: Session, *, user: User) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id.desc())))


def revoke_token(session: Session, *, token_id: int, user: User | None = None) -> ApiToken:
    """Revoke a token; with `user`, only one of that user's own (others look like they do not exist)."""
    token = session.get(ApiToken, token_id)
    if token is None or (user is not None and token.user_id != user.id):
        raise NotFound(f"token {token_id} not found")
    if token.revoked_at is None:
        token.revoked_at = utcnow()
    session.flush()
    return token


_users, _tokens = User.__table__, ApiToken.__table__
# Built once: this runs on every API request, and building a statement (and its cache key) cost more than running it.
_TOKEN_OWNER = (
    select(
        *_users.c,
        _tokens.c.id.label("token_id"),
        _tokens.c.revoked_at,
        _tokens.c.expires_at,
        _tokens.c.last_used_at.label("token_last_used_at"),
    )
    .join_from(_users, _tokens, _tokens.c.user_id == _users.c.id)
    .where(_tokens.c.token_hash == bindparam("token_hash"))
)
_USER_KEYS = tuple(column.key for column in _users.c)
_TOUCH_TOKEN = _tokens.update().where(_tokens.c.id == bindparam("token_id")).values(last_used_at=bindparam("now"))


def resolve_token(db: Session | Connection, *, secret: str) -> User | None:
    """The enabled owner of a live token, or None. Records the last use (to the minute), in the caller's transaction.

    This runs on every API request: one prebuilt Core query reads the owner's row and the few token columns needed,
    and the owner comes back as a detached `User` built from that row (as if a session had loaded it and closed),
    without the ORM's loading machinery; the last use is written with a plain UPDATE only when it is due.
    """
    row = db.execute(_TOKEN_OWNER, {"token_hash": sha256_hex(secret)}).one_or_none()
    now = utcnow()
    if row is None or row.revoked_at is not None or (row.expires_at is not None and row.expires_at <= now):
        return None
    if row.disabled:
        return None
    if row.token_last_used_at is None or now - row.token_last_used_at > LAST_USED_GRANULARITY:
        db.execute(_TOUCH_TOKEN, {"token_id": row.token_id, "now": now})
    user = User(**dict(zip(_USER_KEYS, row, strict=False)))  # the owner's columns come first, in this order
    make_transient_to_detached(user)
    return user


def active_counts(session: Session) -> dict[int, int]:
    """Live tokens per user id (for the admin's People page)."""
    from sqlalchemy import func

    now = utcnow()
    rows = session.execute(
        select(ApiToken.user_id, func.count())
        .where(ApiToken.revoked_at.is_(None), (ApiToken.expires_at.is_(None)) | (ApiToken.expires_at > now))
        .group_by(ApiToken.user_id)
    ).all()
    return {user_id: count for user_id, count in rows}


def revoke_all(session: Session, *, user_id: int) -> int:
    """Revoke every live token of a user (an admin's response to a leaked token); returns how many."""
    revoked = 0
    for token in session.scalars(select(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None))):
        token.revoked_at = utcnow()
        revoked += 1
    session.flush()
    return revoked
