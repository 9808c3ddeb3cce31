"""Asking for the annotator role: a user without it asks (with an optional note), an admin approves (which grants the
role) or rejects on the people page. One request per user, reopened when they ask again after a rejection."""

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, Invalid, NotFound
from app.models import Role, RoleRequest, RoleRequestStatus, User, utcnow
from app.services.text import clean_optional

MAX_MESSAGE = 500


def request_for(session: Session, *, user: User) -> RoleRequest | None:
    return session.scalar(select(RoleRequest).where(RoleRequest.user_id == user.id))


def ask(session: Session, *, user: User, message: str | None = None) -> RoleRequest:
    """Ask for the annotator role. Asking while a request is pending changes nothing (the page says so); a rejected
    request is reopened with the new note."""
    if user.role != Role.user:
        raise Conflict(f"you already have the {user.role.value} role")
    message = clean_optional(message.strip() if message else None) or None
    if message is not None and len(message) > MAX_MESSAGE:
        raise Invalid(f"the note may have at most {MAX_MESSAGE} characters")
    existing = request_for(session, user=user)
    if existing is not None:
        if existing.status != RoleRequestStatus.pending:
            existing.status, existing.message, existing.created_at = RoleRequestStatus.pending, message, utcnow()
            existing.decided_at = existing.decided_by_id = None
            session.flush()
        return existing
    request = RoleRequest(user_id=user.id, message=message)
    session.add(request)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:  # the same user asked twice at once: the other request stands
        existing = request_for(session, user=user)
        if existing is None:
            raise
        return existing
    return request


def pending(session: Session) -> list[RoleRequest]:
    query = select(RoleRequest).where(RoleRequest.status == RoleRequestStatus.pending).order_by(RoleRequest.id)
    return list(session.scalars(query))


def decide(session: Session, *, request_id: int, approve: bool, admin: User) -> RoleRequest:
    """Approve (the user becomes an annotator) or reject a pending request, in the caller's transaction."""
    request = session.get(RoleRequest, request_id)
    if request is None:
        raise NotFound(f"role request {request_id} not found")
    if request.status != RoleRequestStatus.pending:
        raise Conflict(f"role request {request_id} was already {request.status.value}")
    request.status = RoleRequestStatus.approved if approve else RoleRequestStatus.rejected
    request.decided_at, request.decided_by_id = utcnow(), admin.id
    if approve and request.user.role == Role.user:  # an admin may have raised them meanwhile: never lower a role
        request.user.role = Role.annotator
    session.flush()
    return request
