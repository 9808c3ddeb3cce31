"""Sign-up, login and logout pages (HTML forms that also work without JavaScript)."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.auth import SESSION_COOKIE
from app.errors import Forbidden, ServiceError, TooManyRequests
from app.services import sessions, users
from app.serving.process_state import process_state
from app.settings import SignupMode
from app.web.deps import OptionalUser, SessionDep, SettingsDep
from app.web.templating import render

router = APIRouter()


def safe_next(target: str | None) -> str:
    """Only same-site paths: `next=//evil.example` or `next=https://…` would make login an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def login_response(request: Request, token: str, target: str, max_age_s: int) -> Response:
    response = RedirectResponse(safe_next(target), status_code=303)
    settings = request.app.state.settings
    secure = settings.cookie_secure if settings.cookie_secure is not None else request.url.scheme == "https"
    response.set_cookie(
        SESSION_COOKIE,
        request.app.state.signer.sign(token),
        max_age=max_age_s,
        httponly=True,
        samesite="lax",
        secure=secure,
        path="/",
    )
    return response


@router.get("/login", response_class=HTMLResponse, name="login_page")
def login_page(request: Request, user: OptionalUser, next: str = "/") -> Response:
    if user is not None:
        return RedirectResponse(safe_next(next), status_code=303)
    return render(request, "login.html", {"next": safe_next(next)})


@router.post("/login", name="login")
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    next: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    limiter = process_state(request.app).login_limiter
    address = client_address(request)
    wait = limiter.retry_after(username, address)
    if wait:
        raise TooManyRequests(f"too many failed logins; try again in {wait} s", retry_after=wait)
    user = users.authenticate(session, username=username, password=password)
    if user is None:
        limiter.record_failure(username, address)
        context = {"error": "wrong username or password", "username": username, "next": safe_next(next)}
        return render(request, "login.html", context, status_code=401)
    limiter.reset(username)
    created = sessions.start_session(session, user=user, max_age_s=settings.session_max_age_s)
    users.touch_login(session, user=user)
    session.commit()
    return login_response(request, created.token, next, settings.session_max_age_s)


@router.get("/signup", response_class=HTMLResponse, name="signup_page")
def signup_page(request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    closed = settings.signup_mode == SignupMode.invite_only and users.count_users(session) > 0
    return render(request, "signup.html", {"closed": closed}, status_code=403 if closed else 200)


@router.post("/signup", name="signup")
def signup(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    username: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    password_confirm: Annotated[str, Form(max_length=256)],
) -> Response:
    if settings.signup_mode == SignupMode.invite_only and users.count_users(session) > 0:
        raise Forbidden("sign-up is by invitation on this server: ask an admin for an account")
    try:
        if password != password_confirm:
            raise ServiceError("the two passwords differ")
        user = users.create_user(session, username=username, password=password)
    except ServiceError as exc:
        session.rollback()
        context = {"error": exc.message, "username": username, "closed": False}
        return render(request, "signup.html", context, status_code=exc.status_code)
    created = sessions.start_session(session, user=user, max_age_s=settings.session_max_age_s)
    users.touch_login(session, user=user)
    session.commit()
    return login_response(request, created.token, "/", settings.session_max_age_s)


@router.post("/logout", name="logout")
def logout(request: Request, session: SessionDep) -> Response:
    token = request.app.state.signer.unsign(request.cookies.get(SESSION_COOKIE))
    if token:
        sessions.end_session(session, token=token)
        session.commit()
    response = RedirectResponse("/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
