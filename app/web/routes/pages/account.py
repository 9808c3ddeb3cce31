"""The signed-in user's own account: API tokens (create, shown once; revoke), and deleting the account."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from app.auth import SESSION_COOKIE
from app.errors import ServiceError
from app.models import User
from app.services import tokens, users
from app.web.deps import CurrentUser, SessionDep
from app.web.templating import is_htmx, render

router = APIRouter(prefix="/account")


def tokens_page(request: Request, session: Session, user: User, *, status_code: int = 200, **context) -> HTMLResponse:
    """The tokens page, or only its `tokens` block for htmx."""
    rows = tokens.list_tokens(session, user=user)
    context = {"tokens": rows, "example": _example(request), **context}
    return render(request, "account_tokens.html", context, status_code=status_code, block="tokens")


def _example(request: Request) -> dict[str, str]:
    """What the usage examples need: this server's address as the browser reached it (behind a proxy, as the proxy
    forwards it), and the name of the model served now (the OpenAI route answers with it whatever `model` says)."""
    current = request.app.state.inference.current
    return {"base_url": str(request.base_url).rstrip("/"), "model": current.name if current else "flywheel"}


@router.get("/tokens", response_class=HTMLResponse, name="account_tokens")
def list_tokens(request: Request, session: SessionDep, user: CurrentUser) -> HTMLResponse:
    return tokens_page(request, session, user)


@router.post("/tokens", response_class=HTMLResponse, name="account_tokens_create")
def create_token(
    request: Request,
    session: SessionDep,
    user: CurrentUser,
    name: Annotated[str, Form(max_length=100)],
    expires_in_days: Annotated[int | None, Form(ge=1, le=3650)] = None,
) -> HTMLResponse:
    try:
        _, secret = tokens.create_token(session, user=user, name=name, expires_in_days=expires_in_days)
    except ServiceError as exc:
        session.rollback()
        return tokens_page(request, session, user, error=exc.message, status_code=exc.status_code)
    session.commit()
    return tokens_page(request, session, user, new_secret=secret, status_code=201)


@router.post("/tokens/{token_id}/revoke", name="account_tokens_revoke")
def revoke_token(request: Request, session: SessionDep, user: CurrentUser, token_id: int) -> Response:
    tokens.revoke_token(session, token_id=token_id, user=user)
    session.commit()
    if is_htmx(request):
        return tokens_page(request, session, user)
    return RedirectResponse(request.url_for("account_tokens"), status_code=303)


@router.post("/delete", name="account_delete")
def delete_account(
    request: Request, session: SessionDep, user: CurrentUser, confirm: Annotated[str, Form(max_length=64)] = ""
) -> Response:
    """Delete one's own account (the username typed again confirms it, no JavaScript needed): one transaction."""
    try:
        users.delete_user(session, user_id=user.id, confirm=confirm.strip())
    except ServiceError as exc:
        session.rollback()
        return tokens_page(request, session, user, delete_error=exc.message, status_code=exc.status_code)
    session.commit()
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
