"""The served model: loaded once per process, generation on a background thread, requests batched on the fly.

`InferenceService.stream(...)` is an async iterator of text deltas for one chat; any number of them run at once and
share one continuous batch (ml.batcher): a new chat joins the running batch at the next decoding step. Swapping in
a new model (hot swap) sends new requests to it while requests in flight finish on the weights they started with.
"""

import asyncio
import itertools
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from app.errors import Invalid, ServiceError, TooManyRequests
from app.services.text import clean
from ml import textstream
from ml.batcher import BatchDecoder, Request
from ml.checkpoint import load_checkpoint
from ml.slots import kv_bytes_per_token
from ml.textstream import TextStream
from ml.tokenizer import Tokenizer

log = logging.getLogger("flywheel.inference")


class PayloadTooLarge(ServiceError):
    status_code = 413


class ModelUnavailable(ServiceError):
    status_code = 503


@dataclass
class Limits:
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 512
    max_streams_per_user: int = 4
    max_batch: int = 16
    kv_cache_mb: float = 2048  # KV memory the live answers may come to hold; past it new answers wait their turn
    prefill_chunk: int = 512  # prompt tokens prefilled per decoding step, so long prompts never stall the others


@dataclass(frozen=True)
class PromptLimit:
    """The longest conversation the served model is asked about: its context less room for an answer (the answer
    budget, at most a quarter of the context, so a small model still takes a prompt), and never over
    max_prompt_tokens. Checked before a chat message is stored, so nothing is kept that the model cannot answer."""

    tokens: int
    context: int
    answer_room: int

    @classmethod
    def of(cls, context: int, limits: Limits) -> "PromptLimit":
        room = max(1, min(limits.max_new_tokens, context // 4))
        return cls(max(1, min(limits.max_prompt_tokens, context - room)), context, room)

    @property
    def why(self) -> str:
        if self.tokens < self.context - self.answer_room:
            return "the server's max_prompt_tokens"
        return f"the model's context of {self.context} tokens less {self.answer_room} for the answer"


@dataclass
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.8
    top_p: float | None = 0.95
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # benchmarks: exactly max_tokens, whatever the model would end on


@dataclass
class Delta:
    text: str
    finish_reason: str | None = None  # "stop", "length", "cancelled" on the last delta
    tokens: int = 0


@dataclass
class LoadedModel:
    version_id: int | None
    name: str
    tokenizer: Tokenizer
    decoder: BatchDecoder
    max_len: int  # the longest prompt + answer: the model's context, or less if the KV budget is smaller


class _Stream:
    """One request's state on both sides: the thread appends tokens, the event loop reads deltas."""

    def __init__(self, loop: asyncio.AbstractEventLoop, model: LoadedModel, params: SamplingParams) -> None:
        self.loop, self.model, self.params = loop, model, params
        self.queue: asyncio.Queue[tuple[int, str | None] | None] = asyncio.Queue()
        self.tokens: list[int] = []
        self.sent = ""  # the text yielded so far
        self.text = TextStream(model.tokenizer)  # whole characters only: an incomplete one waits for its bytes


def _deliver(deliveries: list[tuple[_Stream, int, str | None]]) -> None:
    """On the event loop: hand one step's tokens to their streams."""
    for stream, token, finish in deliveries:
        stream.queue.put_nowait((token, finish))


class InferenceService:
    def __init__(self, limits: Limits | None = None, device: str = "cpu", threads: int = 0) -> None:
        self.limits = limits or Limits()
        self.device = device
        self.threads = threads
        self.current: LoadedModel | None = None
        self._models: list[LoadedModel] = []  # the current one and older ones still finishing requests
        self._pending: list[tuple[LoadedModel, Request]] = []
        self._streams: dict[int, _Stream] = {}
        self._per_user: Counter[int] = Counter()
        self._ids = itertools.count(1)
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False

    # ---- model management -------------------------------------------------------------------------------------
    def load(self, directory: str | Path, *, version_id: int | None = None, name: str | None = None) -> LoadedModel:
        """Load a model directory and make it the one new requests use (the old one drains, then is dropped)."""
        model, _ = load_checkpoint(directory, device=self.device)
        tokenizer = Tokenizer.load(directory)
        textstream.warm(tokenizer)
        c = model.config
        per_token = kv_bytes_per_token(c.n_layer, c.n_kv_head, c.head_dim, next(model.parameters()).dtype)
        kv_tokens = max(1, int(self.limits.kv_cache_mb * 2**20) // per_token)
        decoder = BatchDecoder(model, self.limits.max_batch, kv_tokens, self.limits.prefill_chunk, pack=True)
        max_len = min(c.max_seq_len, kv_tokens)
        loaded = LoadedModel(version_id, name or Path(directory).name, tokenizer, decoder, max_len)
        with self._lock:
            self.current = loaded
            self._models.append(loaded)
            self._lock.notify_all()
        self._ensure_thread()
        log.info("serving %s", loaded.name)
        return loaded

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    # ---- requests ---------------------------------------------------------------------------------------------
    def prompt_limit(self) -> PromptLimit | None:
        """How long a conversation (history + new message, with the chat template) the served model takes, or None
        when none is served."""
        model = self.current
        return None if model is None else PromptLimit.of(model.max_len, self.limits)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt's token ids; a conversation over `prompt_limit` is a 413 saying the limit and how far over."""
        model = self._require_model()
        try:
            ids = model.tokenizer.render_prompt(messages)
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        limit = PromptLimit.of(model.max_len, self.limits)
        if len(ids) > limit.tokens:
            raise PayloadTooLarge(
                f"the conversation is {len(ids)} tokens; the limit is {limit.tokens} ({limit.why}): "
                f"{len(ids) - limit.tokens} tokens over. Shorten the message or start a new chat"
            )
        return ids

    async def stream(
        self, messages: list[dict[str, str]], params: SamplingParams, *, user_id: int | None = None
    ) -> AsyncIterator[Delta]:
        """Text deltas of one answer. Leaving the iteration early (client gone, Stop) cancels the generation."""
        prompt = self.encode_chat(messages)
        model = self._require_model()
        max_new = min(params.max_tokens, self.limits.max_new_tokens, model.max_len - len(prompt))
        if max_new < 1:
            raise PayloadTooLarge("the conversation leaves no room for an answer; start a new chat")
        if not 0 <= params.temperature <= 2 or (params.top_p is not None and not 0 < params.top_p <= 1):
            raise Invalid("temperature must be within 0..2 and top_p within (0, 1]")
        key = next(self._ids)
        stream = _Stream(asyncio.get_running_loop(), model, params)
        stop_ids = frozenset() if params.ignore_eos else frozenset(model.tokenizer.stop_token_ids)
        request = Request(prompt, max_new, params.temperature, params.top_k, params.top_p, stop_ids, params.seed, key)
        with self._lock:
            if user_id is not None and self._per_user[user_id] >= self.limits.max_streams_per_user:
                raise TooManyRequests(f"at most {self.limits.max_streams_per_user} answers at a time", retry_after=1)
            self._per_user[user_id] += 1
            self._streams[key] = stream
            self._pending.append((model, request))
            self._lock.notify_all()
        finished = False
        try:
            while True:
                token, finish = await stream.queue.get()
                delta = self._delta(stream, token, finish)
                if delta.finish_reason:
                    finished = True
                if delta.text or delta.finish_reason:
                    yield delta
                if delta.finish_reason:
                    return
        finally:
            with self._lock:
                self._per_user[user_id] -= 1
                self._streams.pop(key, None)
                if not finished:
                    for loaded in self._models:
                        loaded.decoder.cancel(key)

    def _delta(self, stream: _Stream, token: int, finish: str | None) -> Delta:
        """The new text after one token: the whole characters it completes (ml/textstream.py)."""
        if token < 0:  # the generation thread gave up on this request
            return Delta("", finish or "error", len(stream.tokens))
        new = ""
        if not (finish == "stop" and token in stream.model.tokenizer.stop_token_ids):
            stream.tokens.append(token)
            new = stream.text.push(token)
        if finish:
            new += stream.text.flush()  # a character still incomplete at the end is dropped, never shown as "�"
        if not new and not finish:
            return Delta("", None, len(stream.tokens))
        text = stream.sent + clean(new)  # what is shown is exactly what gets stored
        stop_hit = next((s for s in stream.params.stop if s and s in text), None)
        if stop_hit is not None:
            text, finish = text[: text.index(stop_hit)], "stop"
        delta = text[len(stream.sent) :]
        stream.sent = text
        return Delta(delta, finish, len(stream.tokens))

    def _require_model(self) -> LoadedModel:
        if self.current is None:
            raise ModelUnavailable("no model is being served yet; an admin must train or import one")
        return self.current

    # ---- the generation thread --------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flywheel-generation", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        if self.threads:  # a small model decodes faster on one core than on two contending with the web server
            torch.set_num_threads(self.threads)
        while True:
            with self._lock:
                while not self._closing and not self._pending and not any(len(m.decoder) for m in self._models):
                    self._lock.wait()
                if self._closing:
                    return
                pending, self._pending = self._pending, []
                live = set(self._streams)
            waiting = self._admit([(m, r) for m, r in pending if r.key in live])  # prefill outside the lock
            with self._lock:
                self._pending = waiting + self._pending
                self._models = [m for m in self._models if m is self.current or len(m.decoder)]  # drained: drop
                active = [m for m in self._models if len(m.decoder)]
            for model in active:
                self._step(model)

    def _admit(self, pending: list[tuple[LoadedModel, Request]]) -> list[tuple[LoadedModel, Request]]:
        """Prefill what fits into its model's batch; return the rest to wait for the next step."""
        waiting = []
        for model, request in pending:
            if not model.decoder.has_room(request):
                waiting.append((model, request))
                continue
            try:
                model.decoder.add(request)
            except (ValueError, RuntimeError) as exc:
                self._fail(request.key, str(exc))
        return waiting

    def _step(self, model: LoadedModel) -> None:
        try:
            events = model.decoder.step()
        except Exception:  # never let one bad step kill the thread: fail the requests of that batch
            log.exception("generation step failed")
            for row in list(model.decoder.rows):
                model.decoder.cancel(row.request.key)
                self._fail(row.request.key, "generation failed")
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, int, str | None]]] = {}
        for event in events:
            stream = self._streams.get(event.key)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, event.token_id, event.finish_reason))
        for loop, deliveries in by_loop.items():  # one wake-up of the event loop a step, not one per stream
            loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail(self, key: Any, message: str) -> None:
        stream = self._streams.get(key)
        if stream is not None:
            log.warning("request %s failed: %s", key, message)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, (-1, "error"))
