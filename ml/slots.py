"""The KV cache of a continuous batch: one slot per live request, sized by the tokens in flight.

Each slot holds one request's keys and values left-aligned (its token t at column t), so a request never moves
while others join and leave, and its rotary positions are simply its column numbers. Storage is one tensor per
keys and values, (n_layer, slots, n_kv_head, columns, head_dim). Columns grow x1.25 (in blocks of 8) when the
longest live row needs more and shrink when it uses less than a third; slots grow and shrink in blocks of 4. So the
memory held is proportional to the tokens in flight, not to the model's context times the batch.

A decoding step attends over columns 0..longest live row only, each row masked to its own length. A request joins
by copying its own prefilled cache into a free slot (never copying the batch's); a finished request's slot is
filled by moving the last slot into it (one row's copy), so the live slots are always 0..n-1 and a step works on a
plain view.

Try it (random tiny model):
    python -c "import torch; from ml.model import *; from ml.slots import SlotCache; \
m = Transformer(ModelConfig.tiny()); c = KVCache.for_model(m, 1, 4); m(torch.tensor([[1, 2, 3, 4]]), kv_cache=c); \
s = SlotCache.for_model(m); s.admit(c); print(m(torch.tensor([[5]]), kv_cache=s)[0].shape, s.lengths)"
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ml.model import KVCache, Transformer

COLUMN_BLOCK = 8  # columns are allocated in multiples of this
SLOT_BLOCK = 4  # and slots in multiples of this


def grown_columns(capacity: int, need: int, limit: int) -> int:
    """Columns to allocate for `need`: unchanged if they fit and are not three times too many, else need x1.25
    rounded up to the block (geometric, so a row growing token by token is copied O(1) times per token), capped."""
    if need <= capacity <= 3 * max(need, COLUMN_BLOCK):
        return capacity
    return min(limit, max(need, COLUMN_BLOCK * math.ceil(need * 1.25 / COLUMN_BLOCK)))


def grown_slots(capacity: int, need: int, limit: int) -> int:
    """Slots to allocate for `need` rows: the next multiple of the block (rows join one at a time and the batch is
    bounded, so linear steps keep spare slots few), shrinking once two blocks stand empty."""
    if need <= capacity < need + 2 * SLOT_BLOCK:
        return capacity
    return min(max(limit, need), SLOT_BLOCK * math.ceil(need / SLOT_BLOCK))


def kv_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, dtype: torch.dtype) -> int:
    """Cache memory one token takes: keys and values of every layer."""
    return 2 * n_layer * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()


class SlotCache:
    """Keys/values of the live rows of a continuous batch; `model(tokens (n, 1), kv_cache=cache)` decodes them."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, max_len: int, max_slots: int) -> None:
        self.n_layer, self.n_kv_head, self.head_dim = n_layer, n_kv_head, head_dim
        self.max_len, self.max_slots = max_len, max_slots
        self.k: Tensor | None = None  # (n_layer, slot capacity, n_kv_head, column capacity, head_dim)
        self.v: Tensor | None = None
        self.lengths: list[int] = []  # real tokens of each live slot
        self._lengths_t: Tensor | None = None  # the same as a tensor on the cache's device, for the step

    @classmethod
    def for_model(cls, model: Transformer, max_slots: int = 64) -> SlotCache:
        c = model.config
        return cls(c.n_layer, c.n_kv_head, c.head_dim, c.max_seq_len, max_slots)

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def allocated_positions(self) -> int:
        """Token positions the storage can hold (slot capacity x column capacity): what the memory is."""
        return 0 if self.k is None else self.k.size(1) * self.k.size(3)

    @property
    def live_positions(self) -> int:
        return sum(self.lengths)

    def admit(self, prefilled: KVCache, row: int = 0) -> int:
        """Copy one row of a prefilled cache (left padding stripped) into the next free slot; returns the slot."""
        assert prefilled.k is not None and prefilled.v is not None
        start = 0 if prefilled.key_mask is None else int((~prefilled.key_mask[row, : prefilled.pos]).sum())
        L = prefilled.pos - start  # left padding is masked columns before the first real token
        self._fit(len(self.lengths) + 1, max([L, *self.lengths]), like=prefilled.k)
        slot = len(self.lengths)
        self.k[:, slot, :, :L] = prefilled.k[:, row, :, start : prefilled.pos]
        self.v[:, slot, :, :L] = prefilled.v[:, row, :, start : prefilled.pos]
        self.lengths.append(L)
        self._lengths_t = None
        return slot

    def remove(self, slots: list[int]) -> list[int]:
        """Free these slots. The last live slot moves into each freed one; returns the new order of the old slots
        (old slot of each new slot), for the caller to permute its per-row state the same way."""
        order = list(range(len(self.lengths)))
        for slot in sorted(set(slots), reverse=True):  # descending: a slot still to free has not moved yet
            last = len(order) - 1
            if slot != last:
                L = self.lengths[last]
                self.k[:, slot, :, :L] = self.k[:, last, :, :L]
                self.v[:, slot, :, :L] = self.v[:, last, :, :L]
                self.lengths[slot], order[slot] = L, order[last]
            self.lengths.pop()
            order.pop()
        self._lengths_t = None
        if not self.lengths:
            self.k = self.v = None
        else:
            self._fit(len(self.lengths), max(self.lengths), like=self.k)  # shrink when far too big
        return order

    # ---- the model's side: Transformer.forward calls these ------------------------------------------------------
    def attention_inputs(self, T: int, attention_mask: Tensor | None, position_ids: Tensor | None):
        """(mask, is_causal, position_ids) for one new token per live row: row i sees its own columns 0..len_i."""
        if T != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            raise ValueError("a SlotCache decodes one real token per row; prefill with a KVCache and admit it")
        self._fit(len(self.lengths), max(self.lengths) + 1, like=self.k)
        lengths = self._lengths()
        S = max(self.lengths) + 1
        mask = torch.arange(S, device=lengths.device)[None, :] <= lengths[:, None]  # (n, S)
        return mask[:, None, None, :], False, lengths[:, None]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write each row's new k, v (n, 1, n_kv_head, head_dim) at its own column; return (n, n_kv_head, S, hd)
        views of every live row's columns up to the longest."""
        n, lengths = len(self.lengths), self._lengths()
        rows = torch.arange(n, device=lengths.device)
        self.k[layer, rows, :, lengths] = k[:, 0]
        self.v[layer, rows, :, lengths] = v[:, 0]
        S = max(self.lengths) + 1
        return self.k[layer, :n, :, :S], self.v[layer, :n, :, :S]

    def advance(self, T: int) -> None:
        self.lengths = [L + T for L in self.lengths]
        self._lengths_t = None

    # ---- storage ------------------------------------------------------------------------------------------------
    def _lengths(self) -> Tensor:
        if self._lengths_t is None:
            self._lengths_t = torch.tensor(self.lengths, device=self.k.device)
        return self._lengths_t

    def _fit(self, slots: int, columns: int, like: Tensor) -> None:
        """Make the storage hold `slots` rows of `columns` columns, reallocating (and copying the live part) only
        when it is too small or more than three times too big."""
        if columns > self.max_len:
            raise ValueError(f"KV cache overflow: {columns} > max_len {self.max_len}")
        have_slots, have_cols = (0, 0) if self.k is None else (self.k.size(1), self.k.size(3))
        new_slots = grown_slots(have_slots, slots, self.max_slots)
        new_cols = grown_columns(have_cols, columns, self.max_len)
        if (new_slots, new_cols) == (have_slots, have_cols):
            return
        shape = (self.n_layer, new_slots, self.n_kv_head, new_cols, self.head_dim)
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        if self.k is not None and self.lengths:
            n, S = len(self.lengths), min(max(self.lengths), new_cols)
            k[:, :n, :, :S], v[:, :n, :, :S] = self.k[:, :n, :, :S], self.v[:, :n, :, :S]
        self.k, self.v = k, v
