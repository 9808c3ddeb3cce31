"""OpenAI-compatible API under /v1 (`chat/completions`, `models`), so OpenAI clients and tools work unchanged.

Authenticate with a Flywheel API token as the client's api_key. Completions here are stateless: nothing is stored.
"""

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from app.errors import Invalid
from app.serving.inference import InferenceService, ModelUnavailable, SamplingParams
from app.web.deps import CurrentUser

router = APIRouter(tags=["openai"])


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logit_bias, …)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    n: int = Field(1, ge=1, le=8)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    stop: str | list[str] | None = None
    seed: int | None = None
    top_k: int | None = Field(None, ge=1, description="vLLM's extension: sample among the k likeliest tokens")
    ignore_eos: bool = Field(False, description="vLLM's extension: generate max_tokens, past the end-of-turn token")
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true}: a last chunk with the token counts


def _params(body: ChatCompletionRequest, index: int, default_max: int) -> SamplingParams:
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = None if body.seed is None else body.seed + index
    max_tokens = body.max_completion_tokens or body.max_tokens or default_max
    return SamplingParams(max_tokens, body.temperature, body.top_p, body.top_k, seed, stops, body.ignore_eos)


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


@router.get("/models")
def list_models(request: Request, user: CurrentUser) -> dict:
    current = request.app.state.inference.current
    data = [] if current is None else [{"id": current.name, "object": "model", "created": 0, "owned_by": "flywheel"}]
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, user: CurrentUser
) -> dict | StreamingResponse:
    service: InferenceService = request.app.state.inference
    if service.current is None:
        raise ModelUnavailable("no model is being served yet")
    if body.n > service.limits.max_streams_per_user:
        raise Invalid(f"n may be at most {service.limits.max_streams_per_user}")
    messages = [m.model_dump() for m in body.messages]
    service.encode_chat(messages)  # bad or oversized input fails here, before any stream starts
    default_max = request.app.state.settings.max_new_tokens
    streams = [service.stream(messages, _params(body, i, default_max), user_id=user.id) for i in range(body.n)]
    meta = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": service.current.name}
    if body.stream:
        usage = bool((body.stream_options or {}).get("include_usage"))
        prompt_tokens = len(service.encode_chat(messages)) if usage else 0
        return StreamingResponse(
            _chunks(streams, meta, prompt_tokens if usage else None), media_type="text/event-stream"
        )
    results = await asyncio.gather(*(_collect(s) for s in streams))
    choices = [
        {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(reason)}
        for i, (text, reason, _) in enumerate(results)
    ]
    completion_tokens = sum(tokens for _, _, tokens in results)
    usage = {"prompt_tokens": len(service.encode_chat(messages)), "completion_tokens": completion_tokens}
    usage["total_tokens"] = usage["prompt_tokens"] + completion_tokens
    return {**meta, "object": "chat.completion", "choices": choices, "usage": usage}


async def _collect(stream) -> tuple[str, str | None, int]:
    parts, reason, tokens = [], None, 0
    async for delta in stream:
        parts.append(delta.text)
        reason, tokens = delta.finish_reason or reason, delta.tokens
    return "".join(parts), reason, tokens


async def _chunks(streams, meta: dict, prompt_tokens: int | None = None) -> AsyncIterator[str]:
    """Interleave the n answers as `chat.completion.chunk` events, then `[DONE]`."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta))
        finally:
            await queue.put((index, None))

    def chunk(index: int, delta: dict, finish: str | None = None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish}
        return f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [choice]})}\n\n"

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for i in range(len(streams)):
            yield chunk(i, {"role": "assistant", "content": ""})
        open_streams, completion_tokens = len(streams), 0
        while open_streams:
            index, delta = await queue.get()
            if delta is None:
                open_streams -= 1
                continue
            if delta.text:
                yield chunk(index, {"content": delta.text})
            if delta.finish_reason:
                completion_tokens += delta.tokens
                yield chunk(index, {}, _finish(delta.finish_reason))
        if prompt_tokens is not None:
            usage = {
                "prompt_tokens": prompt_tokens * len(streams),
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens * len(streams) + completion_tokens,
            }
            yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
