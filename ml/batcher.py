"""Continuous batching: independent requests decode together, one token per step, and a new request joins the
running batch at the next step instead of waiting for the batch to finish (what a chat server needs).

A request's prompt is prefilled alone into its own cache, in chunks of at most `prefill_chunk` tokens per step, so
a long prompt never stalls the streams already decoding for more than one chunk; when its prefill completes, its
cache is copied into a free slot of the shared ml.slots.SlotCache, whose memory follows the tokens in flight.
Admission is bounded by a KV memory budget: a request joins only when the tokens it may come to hold (prompt plus
its answer budget) fit beside those the live requests may come to hold, so decoding can never run out of memory;
others wait (`has_room`). Requests may differ in temperature, top-k, top-p, stop tokens, seed.

Try it (a random tiny model, so the tokens are noise):
    python -c "from ml.model import *; from ml.batcher import *; b = BatchDecoder(Transformer(ModelConfig.tiny())); \
b.add(Request([1, 2, 3], max_new_tokens=5)); print([e for _ in range(5) for e in b.step()])"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ml.decode_layout import DecodeHead, pack_for_decoding
from ml.engine import left_padded
from ml.model import KVCache, Transformer
from ml.slots import SlotCache


@dataclass
class Request:
    prompt_ids: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop_token_ids: frozenset[int] = frozenset()
    seed: int | None = None
    key: Any = None  # the caller's handle, returned in events


@dataclass
class Event:
    """One step's outcome for one request: the sampled token; `finish_reason` set on its last event."""

    key: Any
    token_id: int
    logprob: float
    finish_reason: str | None = None  # "stop", "length" or None


@dataclass
class _Row:
    request: Request
    generator: torch.Generator | None
    generated: int = 0
    last_token: int = 0
    cancelled: bool = field(default=False)

    @property
    def reserved(self) -> int:
        """The most positions this row can come to hold in the cache."""
        return len(self.request.prompt_ids) + self.request.max_new_tokens


@dataclass
class _Prefill:
    """A request whose prompt is being prefilled into its own cache, a chunk per step."""

    row: _Row
    cache: KVCache
    done: int = 0  # prompt tokens prefilled so far


PREFILTER = 1024  # top-p looks among this many likeliest tokens before it sorts the whole vocabulary


def transform_rows(logits: Tensor, temps: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """Per-row temperature, then top-k, then top-p, as `ml.engine.transform_logits` does for one setting.

    logits (B, V); temps (B,) with 0 = greedy (left unscaled); top_ks (B,) long with V = off; top_ps (B,) with 1 = off.
    The nucleus is looked for among the likeliest PREFILTER tokens first (exact whenever they hold the top-p mass,
    as they nearly always do) and the whole vocabulary is sorted only when they do not: a full sort of a
    49,152-token vocabulary costs as much as a tenth of a 135M model's decoding step.
    """
    scale = torch.where(temps > 0, temps, torch.ones_like(temps))
    logits = logits / scale[:, None]
    V = logits.size(-1)
    cut_k, cut_p = top_ks < V, top_ps < 1.0
    if not (bool(cut_k.any()) or bool(cut_p.any())):
        return logits
    K = min(V, max(PREFILTER, int(top_ks.max()) if bool(cut_k.any()) else 0))
    values, order = logits.topk(K, dim=-1)  # (B, K), descending
    kth = values.gather(-1, (top_ks.clamp(max=K) - 1)[:, None])  # (B, 1)
    kth = torch.where(cut_k[:, None], kth, torch.full_like(kth, float("-inf")))
    logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th survive, as in the engine
    if not bool(cut_p.any()):
        return logits
    values = values.masked_fill(values < kth, float("-inf"))
    probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()  # (B, K) of the whole distribution
    if bool((probs.sum(dim=-1) < top_ps)[cut_p].any()):
        return _top_p_by_full_sort(logits, top_ps)  # the nucleus reaches past the prefilter
    cut = (probs.cumsum(dim=-1) - probs >= top_ps[:, None]) & cut_p[:, None]
    nucleus = torch.full_like(logits, float("-inf")).scatter_(-1, order, values.masked_fill(cut, float("-inf")))
    return torch.where(cut_p[:, None], nucleus, logits)


def _top_p_by_full_sort(logits: Tensor, top_ps: Tensor) -> Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cut = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(cut, float("-inf")))


class BatchDecoder:
    """Owns the shared KV cache; `add` queues a request, `step` prefills a chunk and advances every live request.

    max_kv_tokens bounds the positions reserved by admitted requests (None: max_batch x the model's context).
    """

    def __init__(
        self,
        model: Transformer,
        max_batch: int = 16,
        max_kv_tokens: int | None = None,
        prefill_chunk: int = 512,
        pack: bool = False,
    ) -> None:
        """pack: lay the model's large weights out for decoding, in place (ml.decode_layout): for a model that is
        only served from now on."""
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        if pack:
            pack_for_decoding(model)
        self.max_len = model.config.max_seq_len
        self.max_kv_tokens = max_kv_tokens or max_batch * self.max_len
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []  # decoding, row i in slot i of the cache
        self.prefilling: list[_Prefill] = []  # admitted, prompt not yet fully in a cache (first in, first done)
        self.cache = SlotCache.for_model(model, max_slots=max_batch)
        self.head = DecodeHead(model)  # the served weights never change: one blocked copy of the head
        self.logits: Tensor | None = None  # (B, V) next-token logits of each row
        self.shared_generator = torch.Generator(device=self.device)
        self.shared_generator.seed()

    def __len__(self) -> int:
        return len(self.rows) + len(self.prefilling)

    @property
    def reserved_tokens(self) -> int:
        return sum(r.reserved for r in self.rows) + sum(p.row.reserved for p in self.prefilling)

    def has_room(self, request: Request) -> bool:
        """Whether this request may join now: a free slot and room in the KV budget for all it may come to hold."""
        need = len(request.prompt_ids) + request.max_new_tokens
        return len(self) < self.max_batch and self.reserved_tokens + need <= self.max_kv_tokens

    def add(self, request: Request) -> None:
        """Admit a request; its prompt is prefilled by the coming steps, then it decodes with the batch."""
        L = len(request.prompt_ids)
        if L == 0 or L + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens must be within 1..{self.max_len}")
        if L + request.max_new_tokens > self.max_kv_tokens:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens exceed the KV budget of {self.max_kv_tokens}")
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
        self.prefilling.append(_Prefill(_Row(request, generator), KVCache.for_model(self.model, 1, L)))

    def cancel(self, key: Any) -> None:
        for row in [*self.rows, *(p.row for p in self.prefilling)]:
            if row.request.key == key:
                row.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Prefill up to one chunk of waiting prompts, sample one token for every live row, retire finished rows,
        and run the model once for the rest."""
        self.prefilling = [p for p in self.prefilling if not p.row.cancelled]
        self._drop([i for i, row in enumerate(self.rows) if row.cancelled])
        self._prefill_chunk()
        if not self.rows:
            return []
        tokens, logps = self._sample()
        events, finished = [], []
        for i, (row, token, logp) in enumerate(zip(self.rows, tokens.tolist(), logps.tolist(), strict=True)):
            row.generated += 1
            row.last_token = token
            reason = None
            if token in row.request.stop_token_ids:
                reason = "stop"
            elif row.generated >= row.request.max_new_tokens:
                reason = "length"
            events.append(Event(row.request.key, token, logp, reason))
            if reason:
                finished.append(i)
        self._drop(finished)
        if self.rows:
            self._forward()
        return events

    def _prefill_chunk(self) -> None:
        """Prefill at most `prefill_chunk` prompt tokens, oldest request first; completed prompts join the batch.

        Waiting prompts that fit the budget together are prefilled as one left-padded batch (one forward instead of
        one each: what keeps the first token quick when many chats arrive at once); a longer one goes alone, a
        chunk a step.
        """
        budget = self.prefill_chunk
        while self.prefilling and budget > 0:
            group = self._prefill_group(budget)
            if len(group) > 1:
                budget -= self._prefill_together(group)
                continue
            p = self.prefilling[0]
            prompt = p.row.request.prompt_ids
            end = min(len(prompt), p.done + budget)
            ids = torch.tensor([prompt[p.done : end]], dtype=torch.long, device=self.device)
            hidden = self.model.hidden_states(ids, kv_cache=p.cache, last_only=True)  # (1, 1, n_embd)
            budget -= end - p.done
            p.done = end
            if end < len(prompt):
                return
            self.prefilling.pop(0)
            self._join(p.row, p.cache, 0, hidden[:, -1])

    def _prefill_group(self, budget: int) -> list[_Prefill]:
        """The oldest waiting prompts, none started, whose padded batch fits the budget."""
        group: list[_Prefill] = []
        for p in self.prefilling:
            longest = max(len(q.row.request.prompt_ids) for q in [*group, p])
            if p.done or longest * (len(group) + 1) > budget:
                break
            group.append(p)
        return group

    def _prefill_together(self, group: list[_Prefill]) -> int:
        """Prefill whole prompts as one left-padded batch and admit each; returns the positions computed."""
        ids, mask = left_padded([p.row.request.prompt_ids for p in group])
        cache = KVCache.for_model(self.model, *ids.shape)
        hidden = self.model.hidden_states(ids.to(self.device), cache, mask.to(self.device), last_only=True)
        del self.prefilling[: len(group)]
        for i, p in enumerate(group):
            self._join(p.row, cache, i, hidden[i : i + 1, -1])
        return ids.numel()

    def _join(self, row: _Row, prefilled: KVCache, index: int, hidden: Tensor) -> None:
        """A prefilled request joins the decoding batch, with its first next-token logits."""
        self.cache.admit(prefilled, index)
        self.rows.append(row)
        last = self.head(hidden).float()  # (1, V)
        self.logits = last if self.logits is None else torch.cat([self.logits, last])

    def _sample(self) -> tuple[Tensor, Tensor]:
        B, V = self.logits.shape
        reqs = [row.request for row in self.rows]
        temps = torch.tensor([r.temperature for r in reqs], device=self.device)
        top_ks = torch.tensor([r.top_k if r.top_k and 0 < r.top_k < V else V for r in reqs], device=self.device)
        top_ps = torch.tensor([r.top_p if r.top_p is not None else 1.0 for r in reqs], device=self.device)
        logp = transform_rows(self.logits, temps, top_ks, top_ps).log_softmax(dim=-1)  # (B, V)
        noise = torch.rand(B, V, generator=self.shared_generator, device=self.device)
        for i, row in enumerate(self.rows):  # seeded requests draw from their own stream: reproducible
            if row.generator is not None:
                noise[i] = torch.rand(V, generator=row.generator, device=self.device)
        gumbel = -torch.log(-torch.log(noise.clamp(1e-20, 1.0 - 1e-7)))
        sampled = (logp + gumbel).argmax(dim=-1)  # Gumbel-max: an exact draw from softmax(logp)
        greedy = logp.argmax(dim=-1)
        tokens = torch.where(temps > 0, sampled, greedy)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)

    def _forward(self) -> None:
        last = torch.tensor([[row.last_token] for row in self.rows], dtype=torch.long, device=self.device)
        hidden = self.model.hidden_states(last, kv_cache=self.cache)  # (B, 1, n_embd)
        self.logits = self.head(hidden[:, -1]).float()  # (B, V)

    def _drop(self, indices: list[int]) -> None:
        """Retire rows; the cache moves its last slots into the freed ones, and rows and logits follow suit."""
        if not indices:
            return
        order = self.cache.remove(indices)
        self.rows = [self.rows[i] for i in order]
        self.logits = self.logits[order] if order else None
