"""Admin pages: people and their roles (later issues add models, jobs and data)."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.deps import AdminUser, SessionDep
from app.errors import ServiceError
from app.models import Role
from app.services import users
from app.templating import is_htmx, render

router = APIRouter(prefix="/admin")


@router.get("/users", response_class=HTMLResponse, name="admin_users")
def list_users(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    return render(request, "admin_users.html", {"people": users.list_users(session), "roles": list(Role)})


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
        context = {"people": users.list_users(session), "roles": list(Role), "error": exc.message}
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
        context = {"person": person, "roles": list(Role), "saved": True}
        return render(request, "partials/user_row.html", context)
    return RedirectResponse(request.url_for("admin_users"), status_code=303)
