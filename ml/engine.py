"""Batched sampling with a KV cache: n candidates per prompt, streaming text, stop tokens and strings, top-k/top-p.

A prompt is prefilled once, its cache rows are repeated for the n candidates, and all rows decode together, one
token per step. Every sampled token comes with its log-probability under the exact distribution it was drawn
from (after temperature, top-k and top-p): RL's importance ratios and KL penalties are computed against these, and
`sequence_logprobs` recomputes the same quantity for given responses in one forward pass.

Try it on CPU (a random tiny model, so the tokens are noise):
    python -c "from ml.model import *; from ml.engine import Engine; \
print(Engine(Transformer(ModelConfig.tiny())).generate([1, 2, 3], n=2, max_new_tokens=8, seed=0))"
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ml.decode_layout import DecodeHead, packed_view
from ml.model import KVCache, Transformer


@dataclass
class Sample:
    """One generated continuation. token_ids include the stop token when finish_reason is "stop"."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None


def transform_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """(..., V) logits -> logits of the distribution actually sampled: scaled, then top-k, then top-p cut to -inf.

    Temperature 0 (greedy) leaves the scale alone, so a greedy token's log-prob is under the unscaled distribution.
    """
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_next(logits: Tensor, params: Sampling, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(N, V) logits -> (token (N,), its log-prob (N,)) under the transformed distribution."""
    logp = transform_logits(logits.float(), params.temperature, params.top_k, params.top_p).log_softmax(dim=-1)
    if params.temperature <= 0:
        token = logp.argmax(dim=-1)
    else:  # inverse CDF: one uniform per row (torch.multinomial draws one exponential per vocabulary entry)
        cdf = logp.exp().cumsum(dim=-1)  # (N, V), non-decreasing
        u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)
        target = (1.0 - u) * cdf[:, -1:]  # in (0, total]: zero-probability tokens can never be chosen
        token = torch.searchsorted(cdf, target).squeeze(-1)
    return token, logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(
    model: Transformer,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    response_start: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Log-probs of input_ids[:, response_start:] under the model's transformed distribution, differentiably.

    input_ids (B, T) hold prompt + response, prompts left-padded so every response starts at column
    response_start, responses right-padded; attention_mask (B, T) marks real tokens. Returns (B, T - response_start),
    0 where the mask is False. Matches the `logprobs` the Engine reports when sampling with the same settings.
    """
    if response_start < 1:
        raise ValueError("response_start must be >= 1: the first token has no prediction")
    logits, _ = model(input_ids, attention_mask=attention_mask)
    logits = transform_logits(logits[:, response_start - 1 : -1].float(), temperature, top_k, top_p)
    targets = input_ids[:, response_start:]  # (B, R)
    logp = logits.log_softmax(dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if attention_mask is not None:
        logp = logp.masked_fill(~attention_mask[:, response_start:].bool(), 0.0)
    return logp


@torch.no_grad()
def naive_generate(model: Transformer, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by re-running the whole sequence each step: slow, obviously right; the engine's reference."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits, _ = model(x)
        token = int(logits[0, -1].argmax())
        out.append(token)
        x = torch.cat([x, x.new_tensor([[token]])], dim=1)
    return out


def decode_step(
    model: Transformer, token: Tensor, positions: Tensor, col: Tensor, ks: list[Tensor], vs: list[Tensor], valid: Tensor
) -> Tensor:
    """One decoding step over a fixed-size cache: token (N,) -> next-token logits (N, V); writes column `col`.

    The same maths as Transformer.forward with a KVCache, written for torch.compile: every shape is fixed (all S
    cache columns are attended, the causal bound `col` masks the future), the step is a tensor, and each layer's
    cache is its own buffer updated in place, so the compiled graph neither recompiles per step nor copies the
    cache. positions (N,) are the rotary positions of the new tokens (left padding does not count), valid (N, S)
    marks real cache columns. ks[i], vs[i]: (N, n_kv_head, S, head_dim).
    """
    c = model.config
    H, Hkv, hd = c.n_head, c.n_kv_head, c.head_dim
    N, S = token.size(0), valid.size(1)
    cos = model.rotary.cos[positions].view(N, 1, 1, hd).to(ks[0].dtype)
    sin = model.rotary.sin[positions].view(N, 1, 1, hd).to(ks[0].dtype)
    hidden = (valid & (torch.arange(S, device=token.device) <= col)).logical_not().view(N, 1, 1, S)
    x = model.embed_tokens(token).unsqueeze(1)  # (N, 1, n_embd)
    for i, block in enumerate(model.layers):
        heads = block.attn.qkv_proj(block.attn_norm(x)).view(N, 1, H + 2 * Hkv, hd)
        qk = block.attn.position_qk(heads, cos, sin)
        ks[i].index_copy_(2, col.view(1), qk[:, :, H:].transpose(1, 2))
        vs[i].index_copy_(2, col.view(1), heads[:, :, H + Hkv :].transpose(1, 2))
        q = qk[:, 0, :H].reshape(N, Hkv, H // Hkv, hd)  # query heads grouped by the kv head they share
        w = (q @ ks[i].transpose(-1, -2)) * hd**-0.5  # (N, Hkv, group, S)
        y = w.masked_fill(hidden, float("-inf")).softmax(dim=-1).to(vs[i].dtype) @ vs[i]  # (N, Hkv, group, hd)
        x = x + block.attn.o_proj(y.reshape(N, 1, H * hd))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.norm(x))[:, 0]


class _StaticCache:
    """A prefilled KVCache copied into per-layer buffers of fixed size, stepped by a compiled decode_step."""

    def __init__(self, cache: KVCache, step: Callable[..., Tensor], model: Transformer) -> None:
        assert cache.k is not None and cache.v is not None
        self.model, self.step = model, step
        # (N, n_kv_head, S, head_dim) each. Unwritten columns must be zeros, not the cache's uninitialised memory:
        # every column is multiplied in (by a weight of 0 when masked), and 0 * NaN is NaN.
        N, S, device = cache.batch_size, cache.max_len, cache.k.device
        self.ks, self.vs = [], []
        for i in range(cache.n_layer):
            for full, out in ((cache.k, self.ks), (cache.v, self.vs)):
                layer = full.new_zeros((N, cache.n_kv_head, S, cache.head_dim))
                layer[:, :, : cache.pos] = full[i, :, :, : cache.pos]
                out.append(layer)
        self.valid = torch.ones(N, S, dtype=torch.bool, device=device)
        if cache.key_mask is not None:
            self.valid[:, : cache.pos] = cache.key_mask[:, : cache.pos]
        self.positions = self.valid[:, : cache.pos].sum(dim=-1)  # (N,)
        self.col = torch.tensor(cache.pos, device=device)

    def __call__(self, token: Tensor) -> Tensor:
        logits = self.step(self.model, token, self.positions, self.col, self.ks, self.vs, self.valid)
        self.positions += 1
        self.col += 1
        return logits


class Engine:
    """Samples from a Transformer with a KV cache. `tokenizer` (optional) supplies `decode` for streaming.

    compile=True decodes with a torch.compile'd decode_step: the first call of each batch shape compiles (seconds
    to a minute on CPU), later ones run ~1.5-2x faster on small models, whose eager steps are dominated by per-op
    overhead. Worth it for repeated same-shape sampling (benchmarks, RL rollouts), not for one-off requests.
    """

    def __init__(self, model: Transformer, tokenizer: Any = None, compile: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        # cpp_wrapper: the compiled graph's kernel launches run from C++, not Python (a third of a small step)
        options = {"cpp_wrapper": True}
        self._compiled_step = torch.compile(decode_step, fullgraph=True, options=options) if compile else None

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int] | list[list[int]],
        n: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token_ids: set[int] | None = None,
        seed: int | None = None,
    ) -> list[Sample]:
        """n samples of each prompt, prompt-major: [p0 c0, p0 c1, ..., p1 c0, ...]."""
        prompts = _as_prompt_list(prompt_ids)
        stops = set(stop_token_ids or ())
        params = Sampling(temperature, top_k, top_p)
        tokens, logps = [], []
        for token, logp in self._steps(prompts, n, max_new_tokens, params, stops, seed):
            tokens.append(token)
            logps.append(logp)
        if not tokens:
            return [Sample([], [], "length") for _ in range(len(prompts) * n)]
        rows, row_logps = torch.stack(tokens, 1).tolist(), torch.stack(logps, 1).tolist()  # (N, steps)
        return [_cut_at_stop(r, lp, stops) for r, lp in zip(rows, row_logps, strict=True)]

    def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        stop_token_ids: set[int] | None = None,
        stop_strings: list[str] | None = None,
        seed: int | None = None,
        decode: Callable[[list[int]], str] | None = None,
    ) -> Generator[str, None, Sample]:
        """Yield text deltas of one sample as it is decoded; the generator's return value is the Sample.

        Text is never cut inside a UTF-8 character (trailing U+FFFD is held back until the character completes)
        nor shown past the start of a stop string (a possible stop-string prefix is held back until resolved).
        The stop token itself is not decoded into the text.
        """
        if decode is None and self.tokenizer is None:
            raise ValueError("stream needs a decode function or an Engine built with a tokenizer")
        decode = decode or self.tokenizer.decode
        stops, stop_strings = set(stop_token_ids or ()), [s for s in stop_strings or () if s]
        ids: list[int] = []
        logps: list[float] = []
        emitted, finish = "", "length"
        steps = self._steps([prompt_ids], 1, max_new_tokens, Sampling(temperature, top_k, top_p), stops, seed)
        while True:
            with torch.inference_mode():  # per step: the mode must not leak to the caller between yields
                step = next(steps, None)
            if step is None:
                break
            ids.append(int(step[0][0]))
            logps.append(float(step[1][0]))
            if ids[-1] in stops:
                finish = "stop"
                break
            shown, hit = visible_text(decode(ids), stop_strings, final=False)
            if len(shown) > len(emitted):
                yield shown[len(emitted) :]
                emitted = shown
            if hit:
                finish = "stop"
                break
        text_ids = ids[:-1] if finish == "stop" and ids[-1] in stops else ids
        shown, _ = visible_text(decode(text_ids), stop_strings, final=True)
        if len(shown) > len(emitted):
            yield shown[len(emitted) :]
        return Sample(ids, logps, finish)  # type: ignore[arg-type]

    def _steps(
        self, prompts: list[list[int]], n: int, max_new_tokens: int, params: Sampling, stops: set[int], seed: int | None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Prefill, then yield (tokens (N,), logprobs (N,)) per step until all rows stopped or the budget is spent."""
        longest, context = max(len(p) for p in prompts), self.model.config.max_seq_len
        if longest > context:
            raise ValueError(f"prompt of {longest} tokens exceeds the model's max_seq_len {context}")
        max_new_tokens = min(max_new_tokens, context - longest)
        if max_new_tokens <= 0:
            return
        cache_len = longest + max_new_tokens
        if self._compiled_step is not None:  # round up: fewer distinct shapes, fewer compilations
            cache_len = min(context, -(-cache_len // 64) * 64)
        logits, cache = self._prefill(prompts, n, cache_len)  # (N, V)
        if self._compiled_step is not None:
            decode = _StaticCache(cache, self._compiled_step, self.model)
        else:
            decode = self._eager_decoder(cache)
        device = logits.device
        generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        stop_t = torch.tensor(sorted(stops), device=device) if stops else None
        done = torch.zeros(logits.size(0), dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token, logp = sample_next(logits, params, generator)
            yield token, logp
            if stop_t is not None:
                done |= torch.isin(token, stop_t)
                if bool(done.all()):
                    return
            if step + 1 < max_new_tokens:
                logits = decode(token)  # (N, V)

    def _eager_decoder(self, cache: KVCache) -> Callable[[Tensor], Tensor]:
        """token (N,) -> next logits (N, V), through snapshots of this call's weights laid out for decoding (RL
        trains them between calls), taken at the first decoding step: a one-token call never pays for them."""
        snapshot: list[tuple[DecodeHead, Transformer]] = []

        def decode(token: Tensor) -> Tensor:
            if not snapshot:
                snapshot.append((DecodeHead(self.model), packed_view(self.model)))
            head, body = snapshot[0]
            return head(body.hidden_states(token.unsqueeze(1), kv_cache=cache)[:, -1])

        return decode

    def _prefill(self, prompts: list[list[int]], n: int, max_len: int) -> tuple[Tensor, KVCache]:
        """Run the prompts once (left-padded if their lengths differ); return last logits repeated n times."""
        device = next(self.model.parameters()).device
        idx, mask = left_padded(prompts)
        padded = not bool(mask.all())
        cache = KVCache.for_model(self.model, len(prompts), max_len)
        logits, _ = self.model(
            idx.to(device), kv_cache=cache, attention_mask=mask.to(device) if padded else None, last_only=True
        )
        cache.expand(n)
        return logits[:, -1].repeat_interleave(n, dim=0), cache  # (len(prompts) * n, V)


def left_padded(prompts: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths as one batch: ids (B, longest) padded on the left, mask (B, longest) of real
    tokens (positions count real tokens only, so padding never shifts a prompt)."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, longest - len(p) :] = True
    return ids, mask


def visible_text(text: str, stop_strings: list[str], final: bool) -> tuple[str, bool]:
    """The part of decoded text that is safe to show, and whether a stop string ended it.

    Before the end, trailing U+FFFD (an incomplete UTF-8 sequence) and any tail that could begin a stop string are
    held back.
    """
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if hits:
        return text[: min(hits)], True
    if final:
        return text, False
    text = text.rstrip("\ufffd")
    hold = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold], False


def _as_prompt_list(prompt_ids: list[int] | list[list[int]]) -> list[list[int]]:
    if not prompt_ids:
        raise ValueError("empty prompt")
    prompts = [list(prompt_ids)] if isinstance(prompt_ids[0], int) else [list(p) for p in prompt_ids]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    return prompts  # type: ignore[return-value]


def _cut_at_stop(tokens: list[int], logps: list[float], stops: set[int]) -> Sample:
    for i, t in enumerate(tokens):
        if t in stops:
            return Sample(tokens[: i + 1], logps[: i + 1], "stop")
    return Sample(tokens, logps, "length")
