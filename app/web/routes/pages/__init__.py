"""HTML pages, one module per audience: home and probes, sign-in, account, chat, annotate, and the admin's (overview,
data and settings in admin; admin_jobs, admin_models, admin_people)."""

from app.web.routes.pages import (
    account,
    admin,
    admin_jobs,
    admin_models,
    admin_people,
    annotate,
    auth,
    chat,
    home,
)

ROUTERS = tuple(m.router for m in (home, auth, account, admin, admin_jobs, admin_models, admin_people, chat, annotate))
