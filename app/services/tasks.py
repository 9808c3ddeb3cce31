"""The annotator's next task: an existing candidate set that needs them, or a new one sampled from the served model."""

import asyncio
import secrets

from fastapi import FastAPI

from app.db import transaction
from app.models import User
from app.services import annotation, prompts
from app.services.inference import InferenceService, ModelUnavailable, SamplingParams

CANDIDATE_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "max_tokens": 96}


def _pick(app: FastAPI, annotator: User) -> tuple[str, int, list | None] | None:
    settings = app.state.settings
    with transaction(app.state.session_factory) as session:
        prompts.sync_chat_prompts(session)
        cset = annotation.next_set(session, annotator=annotator, per_set=settings.annotations_per_set)
        if cset is not None:
            return "set", cset.id, None
        prompt = annotation.prompt_needing_candidates(session, annotator=annotator)
        return ("prompt", prompt.id, prompt.messages) if prompt is not None else None


async def _sample(service: InferenceService, messages: list, k: int) -> list[tuple[str, int]]:
    async def one(seed: int) -> tuple[str, int]:
        parts, tokens = [], 0
        params = SamplingParams(CANDIDATE_SAMPLING["max_tokens"], CANDIDATE_SAMPLING["temperature"],
                                CANDIDATE_SAMPLING["top_p"], None, seed)  # fmt: skip
        async for delta in service.stream(messages, params):
            parts.append(delta.text)
            tokens = delta.tokens
        return "".join(parts).strip(), tokens

    base = secrets.randbelow(2**31)
    return list(await asyncio.gather(*(one(base + i) for i in range(k))))


async def next_task(app: FastAPI, annotator: User) -> int | None:
    """The id of the set this annotator should rank next, sampling a new one if needed; None when all is done."""
    picked = await asyncio.to_thread(_pick, app, annotator)
    if picked is None:
        return None
    kind, ident, messages = picked
    if kind == "set":
        return ident
    service: InferenceService = app.state.inference
    if service.current is None:
        raise ModelUnavailable("no model is being served to sample candidate answers from")
    version_id = service.current.version_id
    answers = await _sample(service, messages, app.state.settings.candidates_per_set)

    def store() -> int:
        with transaction(app.state.session_factory) as session:
            cset = annotation.create_set(session, prompt_id=ident, answers=answers, model_version_id=version_id,
                                         params=CANDIDATE_SAMPLING)  # fmt: skip
            return cset.id

    return await asyncio.to_thread(store)
