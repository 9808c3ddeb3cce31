"""The application factory: `create_app(settings)` wires settings, database, middleware and routers.

Run with `flywheel serve` (or `uvicorn app.web.main:app`); tests build their own app with their own settings.
"""

import asyncio
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from app.auth import CookieSigner
from app.db import make_engine, make_session_factory
from app.serving.process_state import make_process_state
from app.serving.sync import make_inference, watch_served_model
from app.settings import Settings
from app.web.deps import csrf_protect
from app.web.errors import install_error_handlers
from app.web.middleware import BodySizeLimitMiddleware, BrowserSecurityMiddleware
from app.web.routes import api, openai, pages
from app.web.templating import TEMPLATES_DIR, make_templates

STATIC_DIR = TEMPLATES_DIR.parent / "static"
UPLOAD_LIMIT = 60 * 1024 * 1024


CSRF = Depends(csrf_protect)


class FlywheelApp(FastAPI):
    """FastAPI with the browser security layer outside everything, even the last-resort 500 that Starlette's
    ServerErrorMiddleware sends (it sits outside all user middleware, so an added middleware never sees that 500)."""

    def build_middleware_stack(self) -> ASGIApp:
        return BrowserSecurityMiddleware(
            super().build_middleware_stack(), signer=self.state.signer, secure_cookie=self.state.settings.cookie_secure
        )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The database is migrated by `flywheel serve` / `flywheel db upgrade`, not here: with several
    server processes, one migration must run before any of them starts; /readyz reports a database behind."""
    settings = settings or Settings()
    engine = make_engine(settings.resolved_database_url)
    secret_key = settings.resolved_secret_key()
    signer = CookieSigner(secret_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(watch_served_model(app, settings.model_poll_s))
        try:
            yield
        finally:
            watcher.cancel()
            app.state.inference.close()
            engine.dispose()

    app = FlywheelApp(title="Flywheel", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = make_session_factory(engine)
    app.state.signer = signer
    app.state.notice_signer = CookieSigner(secret_key, salt="flywheel-notice")
    app.state.templates = make_templates()
    app.state.inference = make_inference(settings)
    app.state.process = make_process_state(settings, app.state.session_factory)  # per process: see its docstring

    app.add_middleware(
        BodySizeLimitMiddleware,
        limit=settings.max_body_bytes,
        upload_limit=UPLOAD_LIMIT,
        upload_paths=("/admin/import", "/api/v1/prompts/import"),
    )
    install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=str(STATIC_DIR)), name="static")
    # The busiest routes first: a request is matched against the routes in order (this FastAPI scans every route of
    # every router before it, at ~3 µs a route, twice a request), and no two routers here share a path, so the order
    # changes nothing but that cost (and the order of paths in /openapi.json).
    for router in api.ROUTERS:
        app.include_router(router, prefix="/api/v1", dependencies=[CSRF])
    app.include_router(openai.router, prefix="/v1", dependencies=[CSRF])
    for router in pages.ROUTERS:
        app.include_router(router, dependencies=[CSRF])
    return app


def __getattr__(name: str) -> FastAPI:
    """`uvicorn app.web.main:app` builds the app on first access, not at import (no import-time side effects)."""
    if name == "app":
        return create_app()
    raise AttributeError(name)
