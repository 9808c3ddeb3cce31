"""HTML pages, one module per audience: home and probes, sign-in, account, admin, chat, annotate."""

from app.web.routes.pages import account, admin, annotate, auth, chat, home

ROUTERS = tuple(m.router for m in (home, auth, account, admin, chat, annotate))
