"""FastAPI dependencies. A route's signature says who may call it: `CurrentUser`, `AnnotatorUser`, `AdminUser`."""

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from app.auth import CSRF_FIELD, CSRF_HEADER, SESSION_COOKIE, CookieSigner, tokens_equal
from app.errors import Forbidden, Unauthorized
from app.models import Role, User
from app.services.sessions import resolve_session
from app.services.tokens import resolve_token
from app.settings import Settings
from app.threads import run_db

ROLE_LEVEL = {Role.user: 0, Role.annotator: 1, Role.admin: 2}
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for the route. Opening one touches no database, and closing one whose transaction has ended only
    returns its connection to the pool: both stay on the event loop rather than costing two thread hops a request.
    A transaction left open (the route failed half-way) is rolled back on a thread."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    session = factory()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_db(session.close)
        else:
            session.close()


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass(frozen=True)
class Principal:
    """Who is calling and how: `via` is "token" (Bearer), "session" (cookie) or "anonymous"."""

    user: User | None
    via: str
    csrf_token: str


def _bearer_secret(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("Authorization header must be 'Bearer <token>'")
    return secret.strip()


def resolve_principal(request: Request) -> Principal:
    """Authenticate once per request (cached on request.state): a Bearer token wins over the cookie."""
    cached = getattr(request.state, "principal", None)
    if cached is not None:
        return cached
    factory: sessionmaker[Session] = request.app.state.session_factory
    secret = _bearer_secret(request)
    anon_csrf = request.scope.get("state", {}).get("csrf_nonce", "")
    if secret is not None:
        with request.app.state.engine.begin() as connection:  # a Core connection: no ORM session to set up
            user = resolve_token(connection, secret=secret)
        if user is None:
            raise Unauthorized("invalid, expired or revoked API token")
        principal = Principal(user, "token", "")
    else:
        signer: CookieSigner = request.app.state.signer
        token = signer.unsign(request.cookies.get(SESSION_COOKIE))
        principal = Principal(None, "anonymous", anon_csrf)
        if token:
            with factory() as session:
                login = resolve_session(session, token=token)
                if login is not None:
                    principal = Principal(login.user, "session", login.csrf_token)
    request.state.principal = principal
    return principal


async def csrf_protect(request: Request) -> None:
    """Every unsafe request that a browser could send on its own (cookie or form) must echo the CSRF token.

    Only a valid Bearer token exempts a request: a browser attaches some Authorization headers by itself (HTTP Basic
    credentials of a proxy in front), so the mere presence of the header must not switch the check off.
    """
    if request.method not in UNSAFE_METHODS:
        return
    principal = await principal_of(request)  # any Authorization header but a valid Bearer token is a 401 here
    if principal.via == "token":
        return
    expected = principal.csrf_token
    submitted = request.headers.get(CSRF_HEADER)
    if submitted is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        submitted = (await request.form()).get(CSRF_FIELD)
    if not expected or not isinstance(submitted, str) or not tokens_equal(expected, submitted):
        raise Forbidden("CSRF token missing or invalid; reload the page and try again")


async def principal_of(request: Request) -> Principal:
    """resolve_principal from async code: the lookup reads the database, so it runs on a thread, once a request."""
    cached = getattr(request.state, "principal", None)
    return cached if cached is not None else await run_db(resolve_principal, request)


async def get_optional_user(request: Request) -> User | None:
    return (await principal_of(request)).user


async def require_user(request: Request) -> User:
    user = (await principal_of(request)).user
    if user is None:
        raise Unauthorized("log in or send an API token")
    return user


def require_role(role: Role):
    async def check(request: Request) -> User:  # require_user called directly: one dependency less to solve
        user = await require_user(request)
        if ROLE_LEVEL[user.role] < ROLE_LEVEL[role]:
            raise Forbidden(f"this needs the {role.value} role")
        return user

    return check


OptionalUser = Annotated[User | None, Depends(get_optional_user)]
CurrentUser = Annotated[User, Depends(require_user)]
AnnotatorUser = Annotated[User, Depends(require_role(Role.annotator))]
AdminUser = Annotated[User, Depends(require_role(Role.admin))]
