"""One error shape: JSON `{"detail": "..."}` for the API, an HTML page (or an htmx toast) for browsers."""

import logging
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ServiceError, TooManyRequests, Unauthorized
from app.web.deps import Principal
from app.web.templating import is_htmx, render

API_PREFIXES = ("/api/", "/v1/")
DATABASE_DOWN = "the database is unavailable; try again shortly"
VALUE_OUT_OF_RANGE = "a value in the request is out of range (an id or number too large to exist)"

log = logging.getLogger("flywheel.handlers")


def wants_json(request: Request) -> bool:
    return request.url.path.startswith(API_PREFIXES) or "application/json" in request.headers.get("accept", "")


def error_response(request: Request, status_code: int, message: str, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if wants_json(request):
        return JSONResponse({"detail": message}, status_code=status_code, headers=headers)
    # A browser without a login goes to the login page; a client that sent its own Authorization header (a bad
    # token) would only be refused there again, a redirect loop, so it gets the 401 page instead.
    sent_credentials = "authorization" in request.headers
    if status_code == 401 and request.method == "GET" and not is_htmx(request) and not sent_credentials:
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)
    if is_htmx(request):  # keep the page as it is and show the message as an out-of-band toast
        headers["HX-Reswap"] = "none"
        response = render(
            request, "partials/toast.html", {"message": message, "level": "error"}, status_code=status_code
        )
    else:
        response = render(
            request, "error.html", {"status_code": status_code, "message": message}, status_code=status_code
        )
    response.headers.update(headers)
    return response


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form"))
        parts.append(f"{where}: {error.get('msg', 'invalid')}" if where else error.get("msg", "invalid"))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, TooManyRequests) else None
        if isinstance(exc, Unauthorized) and wants_json(request):
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(request, exc.status_code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request, 422, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def database_unavailable(request: Request, exc: Exception) -> Response:
        """The database is down, restarting, unreachable or busy: a 503 the client may retry, not a 500. The engine
        recovers by itself (pool_pre_ping on PostgreSQL), so the next request after it is back succeeds."""
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, str(exc).splitlines()[0])
        if getattr(request.state, "principal", None) is None:  # the error page must not ask the database who this is
            request.state.principal = Principal(None, "anonymous", request.scope.get("state", {}).get("csrf_nonce", ""))
        return error_response(request, 503, DATABASE_DOWN, {"Retry-After": "1"})

    @app.exception_handler(DataError)
    @app.exception_handler(OverflowError)
    async def value_out_of_range(request: Request, exc: Exception) -> Response:
        """A value no row can hold is the request's fault: an id past the integer range of the database (PostgreSQL:
        DataError "integer out of range"; SQLite's driver: OverflowError before the query runs) names nothing, so
        it is a 422 rather than a 500. Catching these here covers every route's path, query and body at once."""
        log.info("%s %s: value out of range: %s", request.method, request.url.path, str(exc).splitlines()[0])
        return error_response(request, 422, VALUE_OUT_OF_RANGE)
