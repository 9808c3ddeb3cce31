"""The home page (with the first start's setup panel) and the health probes."""

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from app import migrate
from app.jobs.bootstrap import SetupStatus, setup_status
from app.web.deps import OptionalUser, SessionDep
from app.web.templating import is_htmx, render

router = APIRouter()


def _setup(request: Request, session: Session) -> SetupStatus:
    """The first start's status as this process sees it: "ready" only once this process serves a model, so that the
    chat it enables answers; "loading" while a newly trained model is on its way in (FLYWHEEL_MODEL_POLL_S)."""
    status = setup_status(session)
    if status.state == "trained":
        status.state = "ready" if request.app.state.inference.current is not None else "loading"
    return status


@router.get("/", response_class=HTMLResponse, name="home")
def home(request: Request, session: SessionDep, user: OptionalUser) -> HTMLResponse:
    return render(request, "home.html", {"setup": _setup(request, session)})


@router.get("/setup", response_class=HTMLResponse, name="setup_status")
def setup(request: Request, session: SessionDep, user: OptionalUser) -> HTMLResponse:
    """The setup panel that the home page polls while the demo model trains (the home page itself without htmx)."""
    context = {"setup": _setup(request, session), "polled": True}
    return render(request, "partials/setup.html" if is_htmx(request) else "home.html", context)


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
