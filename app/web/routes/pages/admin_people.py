"""Admin people page: accounts, roles, API tokens, deletion, and the requests for the annotator role (approve grants
it, reject declines it; either way one transaction)."""

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.errors import ServiceError
from app.models import Role
from app.services import role_requests, tokens, users
from app.web.deps import AdminUser, SessionDep
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/admin")


def _people_context(session: Session, **extra: Any) -> dict[str, Any]:
    return {
        "section": "people",
        "people": users.list_users(session),
        "roles": list(Role),
        "tokens": tokens.active_counts(session),
        "requests": role_requests.pending(session),
        **extra,
    }


@router.get("/users", response_class=HTMLResponse, name="admin_users")
def list_users(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    return render(request, "admin_users.html", _people_context(session))


@router.post("/users", name="admin_users_create")
def create_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    role: Annotated[Role, Form()] = Role.user,
) -> Response:
    try:
        users.create_user(session, username=username, password=password, role=role)
    except ServiceError as exc:
        session.rollback()
        context = _people_context(session, error=exc.message)
        return render(request, "admin_users.html", context, status_code=exc.status_code)
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/users/{user_id}", name="admin_users_update")
def update_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    user_id: int,
    role: Annotated[Role, Form()],
    disabled: Annotated[bool, Form()] = False,
) -> Response:
    person = users.update_user(session, user_id=user_id, role=role, disabled=disabled)
    session.commit()
    if is_htmx(request):
        context = {"person": person, "roles": list(Role), "saved": True, "tokens": tokens.active_counts(session)}
        return render(request, "partials/user_row.html", context)
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/users/{user_id}/delete", name="admin_users_delete")
def delete_user(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    user_id: int,
    confirm: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """Delete someone's account (the username typed again confirms it): one transaction, as app/services/users.py."""
    users.delete_user(session, user_id=user_id, confirm=confirm.strip())
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/users/{user_id}/revoke-tokens", name="admin_users_revoke_tokens")
def revoke_tokens(request: Request, session: SessionDep, admin: AdminUser, user_id: int) -> Response:
    users.get_user(session, user_id=user_id)
    tokens.revoke_all(session, user_id=user_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)


@router.post("/role-requests/{request_id}", name="admin_role_request_decide")
def decide_role_request(
    request: Request,
    session: SessionDep,
    admin: AdminUser,
    request_id: int,
    decision: Annotated[str, Form(pattern="^(approve|reject)$")],
) -> Response:
    """Approve (the person becomes an annotator) or reject a request for the annotator role."""
    role_requests.decide(session, request_id=request_id, approve=decision == "approve", admin=admin)
    session.commit()
    return RedirectResponse(request.url_for("admin_users"), status_code=303)
