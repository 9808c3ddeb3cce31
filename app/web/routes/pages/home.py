"""The home page and the health probes."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text

from app import migrate
from app.web.deps import OptionalUser
from app.web.templating import render

router = APIRouter()


@router.get("/", response_class=HTMLResponse, name="home")
def home(request: Request, user: OptionalUser) -> HTMLResponse:
    return render(request, "home.html")


@router.get("/healthz", name="healthz")
def healthz() -> dict[str, str]:
    """The process is up and answering."""
    return {"status": "ok"}


@router.get("/readyz", name="readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready for traffic: the database answers and its schema is at the newest migration."""
    engine = request.app.state.engine
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = migrate.is_current(engine)
    except Exception as exc:  # any database failure means "not ready", with the reason
        return JSONResponse({"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"}, 503)
    if not current:
        return JSONResponse({"status": "unavailable", "database": "migrations pending: run `flywheel db upgrade`"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})
