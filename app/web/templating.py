"""Jinja2 rendering with what every page needs: the user, the CSRF token, and one URL rendered two ways."""

from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates

from app.errors import ServiceError
from app.models import Role
from app.web.deps import ROLE_LEVEL, Principal, resolve_principal

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR))  # autoescape is on for .html
    templates.env.globals["role_at_least"] = lambda user, role: (
        user is not None and (ROLE_LEVEL[user.role] >= ROLE_LEVEL[Role(role)])
    )
    return templates


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def render(
    request: Request,
    name: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    block: str | None = None,
) -> HTMLResponse:
    """Render a page, or only `block` of it (or a partial) when htmx asks, with the common context."""
    try:
        principal = resolve_principal(request)
    except ServiceError:  # a bad Authorization header on a page: render it as for an anonymous visitor
        principal = Principal(None, "anonymous", request.scope.get("state", {}).get("csrf_nonce", ""))
    ctx = {
        "user": principal.user,
        "csrf_token": principal.csrf_token,
        "signup_mode": request.app.state.settings.signup_mode.value,
        **(context or {}),
    }
    templates: Jinja2Templates = request.app.state.templates
    if block and is_htmx(request):
        template = templates.get_template(name)
        html = "".join(template.blocks[block](template.new_context({"request": request, **ctx})))
        return HTMLResponse(html, status_code=status_code)
    return templates.TemplateResponse(request, name, ctx, status_code=status_code)
