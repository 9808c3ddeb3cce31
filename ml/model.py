"""The decoder-only transformer: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, and a KV cache.

The maths is Llama's (and Qwen2's with `qkv_bias=True`), so Hugging Face checkpoints map onto it (ml/hf.py),
with two layout differences that are about speed: q/k/v and gate/up are each one fused matrix (one GEMM instead
of three or two), and projection weights are stored (in, out) (see Linear), which makes decoding's few-row
GEMMs faster on CPU. The tied lm_head shares the embedding's (vocab, n_embd) matrix.

A reward model or a value function is the same network with `scalar_head=True`: `score_head` maps each position
to one number instead of vocabulary logits.

Try it on CPU:
    python -c "import torch; from ml.model import ModelConfig, Transformer; \
m = Transformer(ModelConfig.tiny()); print(m(torch.randint(0, 256, (2, 16)))[0].shape)"
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from ml.slots import SlotCache


@dataclass
class ModelConfig:
    """The shape of a model; saved as config.json beside its weights.

    The fields after tie_embeddings carry the Hugging Face families' variations (ml/hf.py); their defaults are plain
    Llama, so config.json files written before they existed load unchanged.
    """

    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    intermediate_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    family: str | None = None  # the HF model_type imported from, exported back as; None: inferred (ml/hf.py)
    attn_head_dim: int | None = None  # a head size apart from n_embd // n_head (Qwen3, Mistral Nemo)
    qk_norm: bool = False  # RMSNorm of each q and k head before rotary (Qwen3)
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" or "linear", ...}: see rope_inv_freq
    nope_layers: list[int] | None = None  # indices of layers without rotary (SmolLM3's NoPE layers)

    def __post_init__(self) -> None:
        if self.n_head % self.n_kv_head or (self.attn_head_dim is None and self.n_embd % self.n_head):
            raise ValueError(f"n_embd={self.n_embd}, n_head={self.n_head}, n_kv_head={self.n_kv_head} do not divide")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_SCALINGS:
            raise ValueError(f"rope scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.n_embd // self.n_head

    @classmethod
    def tiny(cls, vocab_size: int = 256, **overrides: Any) -> ModelConfig:
        """A 2-layer model for tests and CPU smoke runs."""
        shape = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=128, max_seq_len=256)
        return cls(vocab_size=vocab_size, **{**shape, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a dict, ignoring keys that are not fields (config.json also holds metadata)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path, **extra: Any) -> None:
        Path(path).write_text(json.dumps({**self.to_dict(), **extra}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


class KVCache:
    """Per-layer keys and values of rows that advance together (one prompt batch), for incremental decoding.

    Storage holds what has been written, grown x1.5 when it fills (never past `max_len`), so memory follows the
    tokens in flight rather than the longest answer allowed. It is allocated on the first write with the dtype of
    the keys written, so bf16 autocast needs no flag. `key_mask` remembers which cached positions are real tokens
    when a batch was left-padded (None: all are). A continuous batch, whose rows differ in length, uses
    ml.slots.SlotCache instead.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, head_dim: int, max_len: int) -> None:
        self.n_layer, self.batch_size, self.n_kv_head = n_layer, batch_size, n_kv_head
        self.head_dim, self.max_len = head_dim, max_len
        self.k: Tensor | None = None  # (n_layer, B, n_kv_head, max_len, head_dim)
        self.v: Tensor | None = None
        self.key_mask: Tensor | None = None  # (B, max_len) bool, True = real token
        self.pos = 0  # positions filled so far (the same for every row)

    @classmethod
    def for_model(cls, model: Transformer, batch_size: int, max_len: int | None = None) -> KVCache:
        c = model.config
        return cls(c.n_layer, batch_size, c.n_kv_head, c.head_dim, max_len or c.max_seq_len)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, T, n_kv_head, head_dim) at the current position; return all keys/values so far."""
        end = self.pos + k.size(1)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} > max_len {self.max_len}")
        if self.k is None or end > self.k.size(3):
            self._grow(end, k)
        self.k[layer, :, :, self.pos : end] = k.transpose(1, 2)
        self.v[layer, :, :, self.pos : end] = v.transpose(1, 2)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv_head, end, head_dim)

    def _grow(self, end: int, like: Tensor) -> None:
        """Reallocate to hold `end` positions and half as many again (capped at max_len), keeping what is filled."""
        capacity = min(self.max_len, max(end, 16 * math.ceil(end * 1.5 / 16)))
        shape = (self.n_layer, self.batch_size, self.n_kv_head, capacity, self.head_dim)
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        if self.k is not None:
            k[:, :, :, : self.pos], v[:, :, :, : self.pos] = self.k[:, :, :, : self.pos], self.v[:, :, :, : self.pos]
        self.k, self.v = k, v

    @property
    def allocated_positions(self) -> int:
        return 0 if self.k is None else self.k.size(1) * self.k.size(3)

    def attention_inputs(
        self, T: int, attention_mask: Tensor | None, position_ids: Tensor | None
    ) -> tuple[Tensor | None, bool, Tensor | None]:
        """(mask, is_causal, position_ids) for T new tokens after `pos` cached ones (see Transformer.forward)."""
        self.record_mask(attention_mask.bool() if attention_mask is not None else None, T)
        key_valid = self.key_mask[:, : self.pos + T] if self.key_mask is not None else None  # (B, pos+T)
        if position_ids is None and key_valid is not None:
            position_ids = (key_valid.cumsum(-1)[:, self.pos :] - 1).clamp(min=0)  # left padding does not shift
        if key_valid is not None or (self.pos > 0 and T > 1):
            device = key_valid.device if key_valid is not None else self.k.device
            return build_attention_mask(T, self.pos, key_valid, None, device), False, position_ids
        return None, self.pos == 0 and T > 1, position_ids  # one new token after a cache sees every cached key

    def record_mask(self, attention_mask: Tensor | None, T: int) -> None:
        """Remember which of the next T positions are real tokens (called once per forward, before layers)."""
        if attention_mask is None and self.key_mask is None:
            return
        if self.key_mask is None:
            self.key_mask = torch.ones(self.batch_size, self.max_len, dtype=torch.bool, device=attention_mask.device)
        new = attention_mask if attention_mask is not None else True
        self.key_mask[:, self.pos : self.pos + T] = new

    def advance(self, T: int) -> None:
        self.pos += T

    def expand(self, n: int) -> KVCache:
        """Repeat each row n times in place (prefill a prompt once, then decode n candidates of it)."""
        if n == 1:
            return self
        if self.k is not None:  # copy only the filled positions, once
            self.k, self.v = (self._repeat_filled(t, n) for t in (self.k, self.v))
        if self.key_mask is not None:
            self.key_mask = self.key_mask.repeat_interleave(n, dim=0)
        self.batch_size *= n
        return self

    def _repeat_filled(self, t: Tensor, n: int) -> Tensor:
        out = t.new_empty((t.size(0), t.size(1) * n, *t.shape[2:]))  # (n_layer, B*n, n_kv_head, max_len, hd)
        out[:, :, :, : self.pos] = t[:, :, :, : self.pos].repeat_interleave(n, dim=1)
        return out

    def reset(self) -> None:
        self.pos = 0
        self.key_mask = None


ROPE_SCALINGS = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """Rotary inverse frequencies theta^(-2i/head_dim), (head_dim/2,), stretched for a longer context by `scaling`.

    Why scale: a model pretrained on L tokens has never seen its slowest rotations turn further than L positions
    take them. "linear" divides every frequency by `factor` (positions read as pos/factor). "llama3" (Llama 3.1+)
    keeps the fast frequencies (wavelength under original_max_position_embeddings / high_freq_factor: seen through
    many whole turns in pretraining), divides the slow ones (wavelength over orig / low_freq_factor) by `factor`, and
    blends linearly in between. Same maths as transformers' `_compute_llama3_parameters`.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        # 1 for fast (kept), 0 for slow (divided by factor), linear in orig/wavelen between
        keep = ((scaling["original_max_position_embeddings"] / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        return (1 - keep) * inv_freq / factor + keep * inv_freq
    raise ValueError(f"rope scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_SCALINGS)})")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, in Llama's rotate-half layout (HF parity).

    The sin table carries rotate-half's sign (-sin on the first half), so rotating is one swap and two multiplies.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)  # (T, head_dim/2)
        self.register_buffer("cos", torch.cat([freqs.cos(), freqs.cos()], dim=-1), persistent=False)  # (T, hd)
        self.register_buffer("sin", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    @classmethod
    def from_config(cls, config: ModelConfig) -> RotaryEmbedding:
        """The tables a model of this config uses (rebuilt after loading: they are not stored with the weights)."""
        return cls(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)

    def forward(self, start: int, T: int, position_ids: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin in `dtype`, broadcastable to (B, T, n_head, head_dim)."""
        if position_ids is None:
            cos, sin = self.cos[start : start + T, None], self.sin[start : start + T, None]  # (T, 1, hd)
        else:
            cos, sin = self.cos[position_ids].unsqueeze(2), self.sin[position_ids].unsqueeze(2)  # (B, T, 1, hd)
        return cos.to(dtype), sin.to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by position-dependent angles; x is (B, T, heads, head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos, torch.cat([x2, x1], dim=-1), sin)  # sin is signed: -x2*sin, x1*sin


class Linear(nn.Module):
    """y = x @ weight + bias with weight stored (in_features, out_features), the transpose of nn.Linear's.

    Same maths; the layout makes the few-row GEMMs of decoding plain row-major products, which CPU BLAS runs
    ~1.4x faster than nn.Linear's transposed one (training-size GEMMs run at the same speed either way).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_module("adapter", None)  # a LoRA update (ml.lora), given by ml.lora.attach

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight
        y = y + self.bias if self.bias is not None else y
        return self.adapter(x, y) if self.adapter is not None else y

    @torch.no_grad()
    def effective_weight(self) -> Tensor:
        """The (in, out) weight this layer applies now: with an enabled adapter, the weight with it folded in."""
        if self.adapter is None or not self.adapter.enabled:
            return self.weight.detach()
        return self.weight.detach() + self.adapter.weight_delta(self.weight.size(1)).to(self.weight.dtype)


class Attention(nn.Module):
    """Grouped-query causal self-attention with one fused q/k/v projection.

    Optionally each q and k head is RMS-normalised before rotary (Qwen3's q_norm/k_norm), and a NoPE layer
    (config.nope_layers, SmolLM3) skips rotary altogether.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_out = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.qkv_proj = Linear(config.n_embd, qkv_out, bias=config.qkv_bias)
        self.o_proj = Linear(config.n_head * config.head_dim, config.n_embd)
        self.q_norm = RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.use_rope = layer_idx not in (config.nope_layers or ())

    def position_qk(self, heads: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Fused heads (B, T, H + 2*Hkv, head_dim) -> q and k (B, T, H + Hkv, head_dim), normed and rotated.

        One place for what this layer does to q and k, so decoding paths that re-implement attention stay in step.
        """
        return self.rotate_qk(heads[:, :, : self.n_head + self.n_kv_head], cos, sin)

    def rotate_qk(self, qk: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """`position_qk` of the q and k heads alone (B, T, H + Hkv, head_dim)."""
        H = self.n_head
        if self.q_norm is not None and self.k_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :, :H]), self.k_norm(qk[:, :, H:])], dim=2)
        return apply_rotary(qk, cos, sin) if self.use_rope else qk  # q and k rotated together

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, is_causal: bool, kv_cache: KVCache | None
    ) -> Tensor:
        B, T, _ = x.shape
        H, Hkv = self.n_head, self.n_kv_head
        heads = self.qkv_proj(x).view(B, T, H + 2 * Hkv, self.head_dim)
        # split, not slices: in training, one backward that concatenates the parts' gradients instead of one that
        # zero-fills a full-size gradient per slice and then sums them (~5% of a SmolLM2 LoRA step)
        qk, v = heads.split([H + Hkv, Hkv], dim=2)
        q, k = self.rotate_qk(qk, *rope).split([H, Hkv], dim=2)  # (B, T, H or Hkv, head_dim)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, S, head_dim)
        else:  # (B, Hkv, T, head_dim) views: the kernel takes strided inputs, no copies
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = q.transpose(1, 2)  # (B, H, T, head_dim)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.head_dim))  # (B, T, n_embd)


class MLP(nn.Module):
    """SwiGLU feed-forward with one fused gate/up projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.n_embd, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.n_embd)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, intermediate_size) each
        return self.down_proj(F.silu(gate) * up)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 like Llama's (for bf16 activations too)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)).to(x.dtype)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, is_causal: bool, kv_cache: KVCache | None
    ) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, is_causal, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


def document_positions(doc_ids: Tensor) -> Tensor:
    """Position of each token within its document, for packed rows: (B, T) doc ids -> (B, T) positions."""
    T = doc_ids.size(1)
    t = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start_index = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - start_index


def build_attention_mask(
    T: int, past: int, key_valid: Tensor | None, doc_ids: Tensor | None, device: torch.device
) -> Tensor:
    """Boolean (B or 1, 1, T, past+T) mask, True = may attend: causal, real keys only, same document only.

    Every query may always attend to itself so that padding rows never see an all-masked row (which gives NaN).
    """
    q_pos = torch.arange(past, past + T, device=device).view(T, 1)
    k_pos = torch.arange(past + T, device=device).view(1, past + T)
    mask = (k_pos <= q_pos).view(1, 1, T, past + T)
    if key_valid is not None:  # (B, past+T)
        mask = mask & key_valid[:, None, None, :]
    if doc_ids is not None:  # (B, T), no cache
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask | (k_pos == q_pos).view(1, 1, T, past + T)


class Transformer(nn.Module):
    """Token ids -> next-token logits (or one scalar per position with `scalar_head=True`)."""

    def __init__(self, config: ModelConfig, scalar_head: bool = False) -> None:
        super().__init__()
        self.config, self.scalar_head = config, scalar_head
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, eps=config.norm_eps)
        self.rotary = RotaryEmbedding.from_config(config)
        if scalar_head:
            self.score_head = Linear(config.n_embd, 1)
        else:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.lm_head.weight = self.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) everywhere; residual output projections get std/sqrt(2*n_layer) (GPT-2) so the
        residual stream's variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, (Linear, nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        for block in self.layers:
            nn.init.normal_(block.attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        kv_cache: KVCache | SlotCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        last_only: bool = False,
        loss_only: bool = False,
    ) -> tuple[Tensor | None, Tensor | None]:
        """idx (B, T) -> (logits (B, T, vocab) or values (B, T), mean cross-entropy over targets != -100 or None).

        attention_mask: (B, T) bool, True = real token, for left-padded rows; with a cache it covers the new
        tokens only (the cache remembers earlier ones). doc_ids: (B, T) document of each token in packed rows;
        tokens attend within their document only and positions restart at each document. last_only: compute
        the head for the last position only (sampling after a long prefill), giving (B, 1, vocab). loss_only (with
        targets): (None, loss), the head computed only where a target is set -- in chat SFT, where most positions
        are the prompt's, that skips most of a 49k-vocabulary head's work.
        """
        x = self.hidden_states(idx, kv_cache, attention_mask, position_ids, doc_ids, last_only)
        if self.scalar_head:
            return self.score_head(x).squeeze(-1), None  # (B, T)
        if loss_only and targets is not None:
            keep = targets != -100
            return None, F.cross_entropy(self.lm_head(x[keep]).float(), targets[keep])
        logits = self.lm_head(x)  # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def hidden_states(
        self,
        idx: Tensor,
        kv_cache: KVCache | SlotCache | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        doc_ids: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """The final normed hidden states (B, T or 1, n_embd): `forward` without its head (decoding brings its
        own, ml.decode_layout)."""
        T = idx.size(1)
        past = kv_cache.pos if isinstance(kv_cache, KVCache) else 0  # a SlotCache gives every row's positions
        mask, is_causal, position_ids = self._attention_inputs(T, kv_cache, attention_mask, position_ids, doc_ids)
        rope = self.rotary(past, T, position_ids, self._compute_dtype())
        x = self.embed_tokens(idx)  # (B, T, n_embd)
        for block in self.layers:
            x = block(x, rope, mask, is_causal, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm(x[:, -1:] if last_only else x)

    def _attention_inputs(
        self,
        T: int,
        kv_cache: KVCache | SlotCache | None,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        doc_ids: Tensor | None,
    ) -> tuple[Tensor | None, bool, Tensor | None]:
        """The attention mask (or is_causal for the fast unmasked kernel) and the position ids of this forward."""
        if kv_cache is not None:
            if doc_ids is not None:
                raise ValueError("doc_ids is for training on packed rows, not for cached decoding")
            return kv_cache.attention_inputs(T, attention_mask, position_ids)
        key_valid = attention_mask.bool() if attention_mask is not None else None  # (B, T)
        if position_ids is None and doc_ids is not None:
            position_ids = document_positions(doc_ids)
        elif position_ids is None and key_valid is not None:
            position_ids = (key_valid.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift
        if key_valid is not None or doc_ids is not None:
            return build_attention_mask(T, 0, key_valid, doc_ids, self.embed_tokens.weight.device), False, position_ids
        return None, T > 1, position_ids

    def _compute_dtype(self) -> torch.dtype:
        """The dtype activations have: the autocast dtype when autocast is on, else the weights'."""
        device_type = self.embed_tokens.weight.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.embed_tokens.weight.dtype

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (a tied lm_head is counted once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention's 12*L*d*T (PaLM)."""
        T = seq_len or self.config.max_seq_len
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, (Linear, nn.Linear)))
        return 6 * matmul + 12 * self.config.n_layer * self.config.n_embd * T

    def configure_optimizer(
        self, weight_decay: float = 0.1, lr: float = 3e-4, betas: tuple[float, float] = (0.9, 0.95)
    ) -> torch.optim.AdamW:
        """AdamW decaying only matrices (not norms, biases); fused kernel when the parameters allow it."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        kwargs: dict[str, Any] = {}
        if "fused" in inspect.signature(torch.optim.AdamW).parameters and all(p.is_floating_point() for p in params):
            kwargs["fused"] = True
        return torch.optim.AdamW(groups, lr=lr, betas=betas, **kwargs)


def scalar_model_from(lm: Transformer) -> Transformer:
    """A scalar-head copy of a language model's body (reward model or value function initialised from a policy)."""
    model = Transformer(lm.config, scalar_head=True).to(next(lm.parameters()).device)
    state = {k: v for k, v in lm.state_dict().items() if not k.startswith("lm_head.")}
    model.load_state_dict(state, strict=False)
    return model
