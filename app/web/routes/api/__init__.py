"""REST under /api/v1, one module per resource (Bearer tokens or the browser session)."""

from app.web.routes.api import annotation, chat, export, jobs, models, settings, tokens, users

# The busiest first: a request is matched against the routes in order.
ROUTERS = tuple(m.router for m in (annotation, chat, users, tokens, jobs, models, settings, export))
