"""The annotator's next task: an existing candidate set that needs them, or a new one sampled from the served model."""

import asyncio
import secrets
import time

from fastapi import FastAPI
from sqlalchemy.orm import Session

from app.db import transaction
from app.models import User
from app.services import annotation, prompts
from app.serving.inference import InferenceService, ModelUnavailable, SamplingParams
from app.serving.process_state import process_state
from app.settings import ActiveLearning, Settings
from app.threads import run_db, run_in_transaction

PROMPT_SYNC_INTERVAL_S = 10.0
FLOOR_REFRESH_S = 10.0


def _prompt_sync_due(app: FastAPI) -> bool:
    """Chats become prompts at most every few seconds per process while sets are waiting (the sync reads chats, and
    annotators ask for work many times a second), and always when a new set must be built."""
    now, state = time.monotonic(), process_state(app)
    if now - state.prompts_synced_at < PROMPT_SYNC_INTERVAL_S:
        return False
    state.prompts_synced_at = now
    return True


def _next_set_id(app: FastAPI, session: Session, annotator_id: int, per_set: int) -> int | None:
    """annotation.next_set_id with this process's floors, which are dropped every few seconds (a lower bound that a
    deleted ranking or a set committed late would make wrong is wrong for that long at most) and before a None. With
    active learning on, the most disputed set first (no floors: that order is not the ids')."""
    if app.state.settings.active_learning == ActiveLearning.disagreement:
        return annotation.next_set_id(session, annotator_id=annotator_id, per_set=per_set, by_priority=True)
    now, state = time.monotonic(), process_state(app)
    if now - state.next_set_floors_at >= FLOOR_REFRESH_S:
        state.next_set_floors, state.next_set_floors_at = {}, now
    set_id = annotation.next_set_id(session, annotator_id=annotator_id, per_set=per_set, floors=state.next_set_floors)
    if set_id is None and state.next_set_floors:
        state.next_set_floors = {}
        set_id = annotation.next_set_id(session, annotator_id=annotator_id, per_set=per_set)
    return set_id


def _pick(app: FastAPI, annotator: User) -> annotation.Task | tuple[int, list] | None:
    """A waiting set, loaded; else the prompt to sample a new set for (id, messages); else None."""
    settings = app.state.settings
    with transaction(app.state.session_factory) as session:
        set_id = _next_set_id(app, session, annotator.id, settings.annotations_per_set)
        if set_id is None or _prompt_sync_due(app):
            prompts.sync_chat_prompts(session)
        if set_id is not None:
            return annotation.load_task(session, set_id=set_id)
        prompt = annotation.prompt_needing_candidates(session, annotator=annotator)
        return (prompt.id, prompt.messages) if prompt is not None else None


def candidate_sampling(settings: Settings) -> dict[str, float | int]:
    """How candidate answers are sampled (FLYWHEEL_CANDIDATE_*), as stored with each set."""
    return {
        "temperature": settings.candidate_temperature,
        "top_p": settings.candidate_top_p,
        "max_tokens": settings.candidate_max_tokens,
    }


async def _sample(service: InferenceService, messages: list, k: int, sampling: dict) -> list[tuple[str, int]]:
    async def one(seed: int) -> tuple[str, int]:
        parts, tokens = [], 0
        params = SamplingParams(sampling["max_tokens"], sampling["temperature"], sampling["top_p"], None, seed)
        async for delta in service.stream(messages, params):
            parts.append(delta.text)
            tokens = delta.tokens
        return "".join(parts).strip(), tokens

    base = secrets.randbelow(2**31)
    return list(await asyncio.gather(*(one(base + i) for i in range(k))))


async def next_task(app: FastAPI, annotator: User) -> annotation.Task | None:
    """The set this annotator should rank next, sampling a new one if needed; None when all is done. Picking and
    loading a waiting set is one trip to a thread and one transaction."""
    picked = await run_db(_pick, app, annotator)
    if picked is None or isinstance(picked, annotation.Task):
        return picked
    prompt_id, messages = picked
    service: InferenceService = app.state.inference
    if service.current is None:
        raise ModelUnavailable("no model is being served to sample candidate answers from")
    version_id = service.current.version_id
    sampling = candidate_sampling(app.state.settings)
    answers = await _sample(service, messages, app.state.settings.candidates_per_set, sampling)

    def store(session: Session) -> annotation.Task:
        cset = annotation.create_set(
            session, prompt_id=prompt_id, answers=answers, model_version_id=version_id, params=sampling
        )
        return annotation.load_task(session, set_id=cset.id)

    return await run_in_transaction(app.state.session_factory, store)
