"""Admin model pages: every version with its lineage in words, headline metrics and the gate's verdict (Promote,
Roll back), and a page per version with its lineage graph, training data, the gate's numbers and every metric."""

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from app.models import ModelKind
from app.services import lineage, model_versions
from app.services.training_data import TrainingData
from app.web.deps import AdminUser, SessionDep
from app.web.formatting import format_metrics, headline
from app.web.templating import render

router = APIRouter(prefix="/admin")


@router.get("/models", response_class=HTMLResponse, name="admin_models")
def models_page(request: Request, session: SessionDep, admin: AdminUser) -> HTMLResponse:
    versions = model_versions.list_versions(session)
    current = request.app.state.inference.current
    context = {
        "section": "models",
        "versions": versions,
        "version_names": lineage.version_names(versions),
        "describe": lineage.describe_training_data,
        "gate_verdict": lineage.gate_verdict,
        "headline": headline,
        "kinds": list(ModelKind),
        "served": current.name if current else None,
    }
    return render(request, "admin_models.html", context)


@router.get("/models/{version_id}", response_class=HTMLResponse, name="admin_model")
def model_detail(request: Request, session: SessionDep, admin: AdminUser, version_id: int) -> HTMLResponse:
    """One model version's lineage: its graph, the data it was trained on, the gate's verdict, its metrics."""
    version = model_versions.get_version(session, version_id=version_id)
    chain = lineage.ancestors(session, version)
    offspring = lineage.children(session, version)
    record = TrainingData.from_json(version.training_data)
    names = lineage.version_names([version, *chain, *offspring]) | lineage.referenced_names(session, record)
    context = {
        "section": "models",
        "version": version,
        "ancestors": chain,
        "children": offspring,
        "graph": lineage.graph(session, version),
        "trained_on": lineage.describe_training_data(record, names),
        "withdrawn": lineage.withdrawn_data(session, version),
        "gate": lineage.gate_verdict(version.metrics or {}),
        "metrics": format_metrics({k: v for k, v in (version.metrics or {}).items() if k not in lineage.GATE_NUMBERS}),
    }
    return render(request, "admin_model.html", context)


@router.post("/models/{version_id}/promote", name="admin_models_promote")
def promote(request: Request, session: SessionDep, admin: AdminUser, version_id: int) -> Response:
    model_versions.promote(session, version_id=version_id)
    session.commit()
    return RedirectResponse(request.url_for("admin_models"), status_code=303)


@router.post("/models/rollback", name="admin_models_rollback")
def roll_back(request: Request, session: SessionDep, admin: AdminUser, kind: Annotated[ModelKind, Form()]) -> Response:
    model_versions.roll_back(session, kind=kind)
    session.commit()
    return RedirectResponse(request.url_for("admin_models"), status_code=303)
