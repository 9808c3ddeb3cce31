"""Keeps each server process's served model in step with the database: load at start, hot-swap when it changes."""

import asyncio
import logging

from fastapi import FastAPI

from app.db import transaction
from app.services.model_versions import record_load_error, served_version
from app.serving.inference import InferenceService, Limits
from app.serving.process_state import process_state
from app.settings import Settings
from app.threads import run_db

log = logging.getLogger("flywheel.serving")


def make_inference(settings: Settings) -> InferenceService:
    limits = Limits(
        settings.max_prompt_tokens,
        settings.max_new_tokens,
        settings.max_streams_per_user,
        settings.max_batch,
        settings.kv_cache_mb,
        settings.prefill_chunk,
    )
    return InferenceService(limits, device=settings.device, threads=settings.torch_threads)


def _served(app: FastAPI) -> tuple[int, str, str] | None:
    with app.state.session_factory() as session:
        version = served_version(session)
        return (version.id, version.path, version.name) if version else None


def _note_load(app: FastAPI, version_id: int, error: str | None) -> None:
    try:
        with transaction(app.state.session_factory) as session:
            record_load_error(session, version_id=version_id, error=error)
    except Exception as exc:  # only a note for the admin: never let it stop serving
        log.warning("cannot record the load outcome of model version %s: %s", version_id, exc)


async def sync_served_model(app: FastAPI) -> None:
    """Load the active model if it is not the one being served. A broken one (a corrupt checkpoint) is skipped: this
    process keeps serving the model it had, and the reason is written on the version for the admin to see."""
    service: InferenceService = app.state.inference
    try:
        served = await run_db(_served, app)
    except Exception as exc:  # the database is down: keep serving what we have
        log.warning("cannot read the active model: %s", exc)
        return
    current = service.current.version_id if service.current else None
    unloadable = process_state(app).unloadable_versions
    if served is None or served[0] == current or served[0] in unloadable:
        return
    version_id, path, name = served
    try:
        await run_db(service.load, path, version_id=version_id, name=name)
    except Exception as exc:
        unloadable.add(version_id)
        log.error("model version %s (%s) cannot be loaded, keeping %s: %s", version_id, path, current, exc)
        kept = f"; still serving {service.current.name}" if service.current else ""
        await run_db(_note_load, app, version_id, f"cannot be loaded: {exc}{kept}")
        return
    await run_db(_note_load, app, version_id, None)  # loads now (repaired files): clear an old error


async def watch_served_model(app: FastAPI, interval_s: float) -> None:
    while True:
        await sync_served_model(app)
        await asyncio.sleep(interval_s)
