"""Continuous batching: independent requests decode together, one token per step, and a new request joins the
running batch at the next step instead of waiting for the batch to finish (what a chat server needs).

Each request is prefilled alone, then its cache row is right-aligned into the shared cache: every row ends at the
same cache position and rows that are shorter carry masked padding on the left. Positions come from the mask
(`Transformer.forward` counts real keys), so padding never shifts a row's rotary positions and shifting storage
left or right never changes a row's result. Requests may differ in temperature, top-k, top-p, stop tokens, seed.

Try it (a random tiny model, so the tokens are noise):
    python -c "from ml.model import *; from ml.batcher import *; b = BatchDecoder(Transformer(ModelConfig.tiny())); \
b.add(Request([1, 2, 3], max_new_tokens=5)); print([e for _ in range(5) for e in b.step()])"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ml.model import KVCache, Transformer


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
    length: int  # real tokens in the cache for this row
    generated: int = 0
    last_token: int = 0
    cancelled: bool = field(default=False)


def transform_rows(logits: Tensor, temps: Tensor, top_ks: Tensor, top_ps: Tensor) -> Tensor:
    """Per-row temperature, then top-k, then top-p, as `ml.engine.transform_logits` does for one setting.

    logits (B, V); temps (B,) with 0 = greedy (left unscaled); top_ks (B,) long with V = off; top_ps (B,) with 1 = off.
    """
    scale = torch.where(temps > 0, temps, torch.ones_like(temps))
    logits = logits / scale[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    kth = sorted_logits.gather(-1, (top_ks - 1).clamp(min=0)[:, None])  # (B, 1)
    logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th survive, as in the engine
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    cut = (mass_before >= top_ps[:, None]) & (top_ps[:, None] < 1.0)
    if cut.any():
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(cut, float("-inf")))
    return logits


class BatchDecoder:
    """Owns one shared KV cache; `add` admits a request, `step` advances every admitted request by one token."""

    def __init__(self, model: Transformer, max_batch: int = 16) -> None:
        self.model, self.max_batch = model, max_batch
        self.max_len = model.config.max_seq_len
        self.device = next(model.parameters()).device
        self.rows: list[_Row] = []
        self.cache: KVCache | None = None
        self.logits: Tensor | None = None  # (B, V) next-token logits of each row
        self.shared_generator = torch.Generator(device=self.device)
        self.shared_generator.seed()

    def __len__(self) -> int:
        return len(self.rows)

    def has_room(self) -> bool:
        return len(self.rows) < self.max_batch

    @torch.inference_mode()
    def add(self, request: Request) -> None:
        """Prefill the prompt alone and merge its cache row into the running batch."""
        L = len(request.prompt_ids)
        if L == 0 or L + request.max_new_tokens > self.max_len:
            raise ValueError(f"prompt ({L} tokens) + max_new_tokens must be within 1..{self.max_len}")
        row_cache = KVCache.for_model(self.model, 1, self.max_len)
        ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        logits, _ = self.model(ids, kv_cache=row_cache, last_only=True)  # (1, 1, V)
        generator = None
        if request.seed is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed)
        self._merge(row_cache, L)
        self.logits = logits[:, -1].float() if self.logits is None else torch.cat([self.logits, logits[:, -1].float()])
        self.rows.append(_Row(request, generator, length=L))

    def cancel(self, key: Any) -> None:
        for row in self.rows:
            if row.request.key == key:
                row.cancelled = True

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Sample one token for every row, retire finished rows, and run the model once for the rest."""
        self._drop([i for i, row in enumerate(self.rows) if row.cancelled])
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
        if self.cache.pos >= self.max_len:
            self._compact()
        last = torch.tensor([[row.last_token] for row in self.rows], dtype=torch.long, device=self.device)
        mask = torch.ones_like(last, dtype=torch.bool)
        logits, _ = self.model(last, kv_cache=self.cache, attention_mask=mask)  # (B, 1, V)
        self.logits = logits[:, -1].float()
        for row in self.rows:
            row.length += 1

    def _merge(self, row_cache: KVCache, L: int) -> None:
        """Right-align a prefilled row (L positions) with the batch's rows (which all end at cache.pos)."""
        if self.cache is None or not self.rows:
            row_cache.key_mask = torch.zeros(1, self.max_len, dtype=torch.bool, device=self.device)
            row_cache.key_mask[:, :L] = True
            self.cache = row_cache
            return
        if self.cache.pos < L:
            self._shift(L - self.cache.pos)
        P = self.cache.pos
        k = row_cache.k.new_zeros((row_cache.k.size(0), 1, *row_cache.k.shape[2:]))
        v = torch.zeros_like(k)
        k[:, :, :, P - L : P], v[:, :, :, P - L : P] = row_cache.k[:, :, :, :L], row_cache.v[:, :, :, :L]
        mask = torch.zeros(1, self.max_len, dtype=torch.bool, device=self.device)
        mask[:, P - L : P] = True
        self.cache.k, self.cache.v = torch.cat([self.cache.k, k], dim=1), torch.cat([self.cache.v, v], dim=1)
        self.cache.key_mask = torch.cat([self.cache.key_mask, mask])
        self.cache.batch_size += 1

    def _shift(self, d: int) -> None:
        """Move every row's cached positions d slots (right if d > 0, left if d < 0); masks move with them."""
        c, P = self.cache, self.cache.pos
        src = slice(max(0, -d), P)
        dst = slice(max(0, d), P + d)
        for name in ("k", "v"):
            t = getattr(c, name)
            moved = torch.zeros_like(t)
            moved[:, :, :, dst] = t[:, :, :, src]
            setattr(c, name, moved)
        mask = torch.zeros_like(c.key_mask)
        mask[:, dst] = c.key_mask[:, src]
        c.key_mask, c.pos = mask, P + d

    def _compact(self) -> None:
        """The cache is full: drop the left padding that every row has (admission guarantees there is some)."""
        padding = min(self.cache.pos - row.length for row in self.rows)
        if padding <= 0:
            raise RuntimeError("KV cache full with no padding to reclaim")
        self._shift(-padding)

    def _drop(self, indices: list[int]) -> None:
        if not indices:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.logits = None, None
            return
        index = torch.tensor(keep, device=self.device)
        c = self.cache
        c.k, c.v = c.k.index_select(1, index), c.v.index_select(1, index)
        c.key_mask = c.key_mask.index_select(0, index)
        c.batch_size = len(keep)
        self.logits = self.logits.index_select(0, index)
        unused = min(c.pos - row.length for row in self.rows)  # padding all remaining rows share
        if unused >= max(32, c.pos // 2):  # reclaim it only when it is worth a copy of the cache
            self._shift(-unused)
