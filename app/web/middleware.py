"""Pure ASGI middleware (safe for streaming responses): security headers and the anonymous CSRF cookie.

The headers go on every response, whatever produced it (pages, JSON, static files, 413s, the last-resort 500):
`app.web.main.FlywheelApp` puts `BrowserSecurityMiddleware` outside all of Starlette's own layers.
"""

import contextlib
import json
import secrets
from http.cookies import SimpleCookie

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth import CSRF_COOKIE, CookieSigner

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'",
    ),
    (b"cross-origin-opener-policy", b"same-origin"),
]
# Chats, tokens shown once and admin data must not linger in a browser's or a proxy's cache (nor come back with the
# Back button after logging out); only the static files are worth caching.
NO_STORE = (b"cache-control", b"no-store")
STATIC_PREFIX = "/static/"


def _cookies(scope: Scope) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header is the client's problem; treat it as absent
                return {}
    return {key: morsel.value for key, morsel in jar.items()}


_CSRF_COOKIE_BYTES = CSRF_COOKIE.encode()
_CSRF_CACHE_SIZE = 4096
_csrf_by_header: dict[tuple[bytes, ...], str | None] = {}


def _csrf_cookie(scope: Scope) -> str | None:
    """The CSRF cookie's value, as `_cookies` reads it. SimpleCookie's parser cost more than the rest of this
    middleware, and a client sends the same Cookie header request after request: a header without the name is not
    parsed, and the value found in one is remembered (emptied when full, so junk headers cannot grow it)."""
    headers = tuple(value for name, value in scope.get("headers", []) if name == b"cookie")
    if not any(_CSRF_COOKIE_BYTES in value for value in headers):
        return None
    try:
        return _csrf_by_header[headers]
    except KeyError:
        pass
    value = _cookies(scope).get(CSRF_COOKIE)
    if len(_csrf_by_header) >= _CSRF_CACHE_SIZE:
        _csrf_by_header.clear()
    _csrf_by_header[headers] = value
    return value


class BrowserSecurityMiddleware:
    """Adds security headers and gives every browser a signed CSRF nonce (double-submit) before it logs in."""

    def __init__(self, app: ASGIApp, signer: CookieSigner, secure_cookie: bool | None = None) -> None:
        self.app = app
        self.signer = signer
        self.secure_cookie = secure_cookie

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        nonce = self.signer.unsign(_csrf_cookie(scope))
        set_cookie = nonce is None
        if nonce is None:
            nonce = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_nonce"] = nonce
        secure = self.secure_cookie if self.secure_cookie is not None else scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                if NO_STORE[0] not in present and not scope.get("path", "").startswith(STATIC_PREFIX):
                    headers.append(NO_STORE)
                if set_cookie:
                    cookie = f"{CSRF_COOKIE}={self.signer.sign(nonce)}; Path=/; HttpOnly; SameSite=Lax"
                    headers.append((b"set-cookie", (cookie + ("; Secure" if secure else "")).encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Refuse request bodies over a limit with 413 before the app reads them all (uploads get a larger limit)."""

    def __init__(self, app: ASGIApp, limit: int, upload_limit: int, upload_paths: tuple[str, ...]) -> None:
        self.app, self.limit, self.upload_limit, self.upload_paths = app, limit, upload_limit, upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.upload_limit if scope["path"].startswith(self.upload_paths) else self.limit
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(send, limit)
            return
        received = 0
        started = refused = False

        async def counting_receive() -> Message:
            nonlocal received, refused
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit and not refused:
                    refused = True
                    if not started:  # answer now: the app may turn the error below into a 400 of its own
                        await self._refuse(send, limit)
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 has been sent; whatever the app says after it is dropped
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(BodyTooLarge):  # already answered with 413
            await self.app(scope, counting_receive, tracking_send)

    @staticmethod
    async def _refuse(send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"the request body is larger than {limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
