"""ml.engine: the batched KV-cache sampler against naive decoding, its log-probs, sampling filters and streaming."""

import pytest
import torch

from ml.engine import (
    Engine,
    Sample,
    Sampling,
    naive_generate,
    sample_next,
    sequence_logprobs,
    transform_logits,
    visible_text,
)
from ml.model import Linear, ModelConfig, Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig.tiny(vocab_size=256, n_embd=48, n_head=4, n_kv_head=2, max_seq_len=128))
    m.init_weights(std=0.3)  # sharp, varied logits: greedy paths do not collapse into one repeated token
    return m.eval()


def test_greedy_equals_naive_generate(model: Transformer) -> None:
    prompt = [5, 17, 200, 3]
    expected = naive_generate(model, prompt, 20)
    assert len(set(expected)) > 3  # a meaningful path
    samples = Engine(model).generate(prompt, n=3, max_new_tokens=20, temperature=0)
    assert [s.token_ids for s in samples] == [expected] * 3
    assert all(s.finish_reason == "length" and len(s.logprobs) == 20 for s in samples)


def test_greedy_batch_of_prompts_with_different_lengths(model: Transformer) -> None:
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41, 42]]
    samples = Engine(model).generate(prompts, n=2, max_new_tokens=12, temperature=0)
    expected = [naive_generate(model, p, 12) for p in prompts for _ in range(2)]
    assert [s.token_ids for s in samples] == expected


def test_stop_tokens_end_rows_early_and_are_kept(model: Transformer) -> None:
    prompt = [5, 17, 200, 3]
    path = naive_generate(model, prompt, 10)
    stop = path[4]
    first = path.index(stop)
    [sample] = Engine(model).generate(prompt, max_new_tokens=10, temperature=0, stop_token_ids={stop})
    assert sample.token_ids == path[: first + 1] and sample.finish_reason == "stop"
    assert len(sample.logprobs) == first + 1


def test_seed_makes_sampling_reproducible(model: Transformer) -> None:
    engine = Engine(model)
    a = engine.generate([1, 2, 3], n=4, max_new_tokens=16, seed=123)
    b = engine.generate([1, 2, 3], n=4, max_new_tokens=16, seed=123)
    c = engine.generate([1, 2, 3], n=4, max_new_tokens=16, seed=124)
    assert a == b and a != c
    assert len({tuple(s.token_ids) for s in a}) == 4  # candidates differ from each other


def test_transform_logits_top_k_and_top_p_by_hand() -> None:
    logits = torch.log(torch.tensor([0.5, 0.05, 0.3, 0.15]))
    assert torch.isfinite(transform_logits(logits, 1.0, 2, None)).tolist() == [True, False, True, False]
    # top-p 0.75: 0.5 + 0.3 reaches it, so 0.15 and 0.05 go
    assert torch.isfinite(transform_logits(logits, 1.0, None, 0.75)).tolist() == [True, False, True, False]
    assert torch.isfinite(transform_logits(logits, 1.0, None, 0.85)).tolist() == [True, False, True, True]
    assert torch.isfinite(transform_logits(logits, 1.0, None, 0.1)).tolist() == [True, False, False, False]
    torch.testing.assert_close(transform_logits(logits, 0.5, None, None), logits * 2)


@pytest.mark.parametrize("top_k,top_p", [(3, None), (None, 0.5), (10, 0.8)])
def test_sampled_tokens_respect_top_k_and_top_p(model: Transformer, top_k, top_p) -> None:
    prompt = [7, 8, 9]
    samples = Engine(model).generate(prompt, n=4, max_new_tokens=12, temperature=1.3, top_k=top_k, top_p=top_p, seed=1)
    for s in samples:
        ids = torch.tensor([prompt + s.token_ids])
        logits = model(ids)[0][0, len(prompt) - 1 : -1]  # (12, V) the distributions each token came from
        allowed = torch.isfinite(transform_logits(logits / 1.3, 1.0, top_k, top_p))
        assert allowed.gather(1, torch.tensor(s.token_ids)[:, None]).all()
        if top_k is not None:
            assert (allowed.sum(-1) <= top_k).all()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 20, 0.9), (0, None, None)])
def test_logprobs_match_sequence_logprobs(model: Transformer, temperature, top_k, top_p) -> None:
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    samples = Engine(model).generate(
        prompts,
        n=2,
        max_new_tokens=10,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=7,
        stop_token_ids={11, 12, 13},
    )
    # one batch: prompts left-padded to a common start column, responses right-padded
    start, width = 5, 5 + 10
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for row, s in enumerate(samples):
        p = prompts[row // 2]
        ids[row, start - len(p) : start + len(s.token_ids)] = torch.tensor(p + s.token_ids)
        mask[row, start - len(p) : start + len(s.token_ids)] = True
    with torch.no_grad():
        logp = sequence_logprobs(model, ids, mask, start, temperature, top_k, top_p)
    for row, s in enumerate(samples):
        torch.testing.assert_close(logp[row, : len(s.logprobs)], torch.tensor(s.logprobs), atol=1e-4, rtol=1e-4)
        assert (logp[row, len(s.logprobs) :] == 0).all()


def test_sequence_logprobs_is_differentiable(model: Transformer) -> None:
    ids = torch.randint(0, 256, (2, 9))
    logp = sequence_logprobs(model, ids, response_start=4, temperature=0.9, top_k=50)
    logp.sum().backward()
    assert model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_max_new_tokens_is_capped_by_context(model: Transformer) -> None:
    [s] = Engine(model).generate(list(range(120)), max_new_tokens=50, seed=0)
    assert len(s.token_ids) == 8 and s.finish_reason == "length"


TEXT = "héllo wörld, 你好 😀 STOP tail".encode()


def by_position(ids: list[int]) -> str:
    """A fake byte-level tokenizer: token i is byte i of TEXT (whatever its id), so characters split across tokens."""
    return TEXT[: len(ids)].decode("utf-8", errors="replace")


def by_id(ids: list[int]) -> str:
    """A fake byte-level tokenizer: token id = one byte, so random samples are arbitrary (often invalid) UTF-8."""
    return bytes(ids).decode("utf-8", errors="replace")


def collect(stream) -> tuple[list[str], Sample]:
    deltas = []
    while True:
        try:
            deltas.append(next(stream))
        except StopIteration as stop:
            return deltas, stop.value


@pytest.mark.parametrize("decode", [by_position, by_id])
def test_stream_never_splits_a_character(model: Transformer, decode) -> None:
    n = len(TEXT) if decode is by_position else 60
    for seed in range(3):
        deltas, sample = collect(Engine(model).stream([1, 2], max_new_tokens=n, seed=seed, decode=decode))
        final = decode(sample.token_ids)
        assert "".join(deltas) == final
        shown = ""
        for d in deltas:
            shown += d
            assert (final.startswith(shown) and not shown.endswith("\ufffd")) or shown == final
    assert "".join(collect(Engine(model).stream([1], max_new_tokens=len(TEXT), decode=by_position))[0]) == TEXT.decode()


def test_stream_stops_at_stop_string_without_showing_it(model: Transformer) -> None:
    deltas, sample = collect(
        Engine(model).stream([1, 2], max_new_tokens=len(TEXT), seed=0, decode=by_position, stop_strings=["STOP"])
    )
    assert "".join(deltas) == "héllo wörld, 你好 😀 " and sample.finish_reason == "stop"
    assert all("S" not in d for d in deltas)


def test_stream_stop_token_is_not_decoded(model: Transformer) -> None:
    path = naive_generate(model, [1, 2], 10)
    stop = path[3]
    deltas, sample = collect(
        Engine(model).stream([1, 2], max_new_tokens=10, temperature=0, stop_token_ids={stop}, decode=by_position)
    )
    assert sample.finish_reason == "stop" and sample.token_ids[-1] == stop
    assert "".join(deltas) == by_position(sample.token_ids[:-1])


def test_visible_text_holds_back_partial_characters_and_stop_prefixes() -> None:
    assert visible_text("abc\ufffd", [], final=False) == ("abc", False)
    assert visible_text("abc\ufffd", [], final=True) == ("abc\ufffd", False)
    assert visible_text("hello ST", ["STOP"], final=False) == ("hello ", False)
    assert visible_text("hello STOP now", ["STOP", "now"], final=False) == ("hello ", True)
    assert visible_text("hello STAR", ["STOP"], final=False) == ("hello STAR", False)


def test_sample_next_draws_from_the_transformed_distribution() -> None:
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    logits = probs.log().expand(40000, 5)
    gen = torch.Generator().manual_seed(0)
    token, logp = sample_next(logits, Sampling(temperature=1.0), gen)
    freq = torch.bincount(token, minlength=5).float() / len(token)
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    torch.testing.assert_close(logp, probs.log()[token])
    token, _ = sample_next(logits, Sampling(temperature=1.0, top_k=2), gen)
    freq = torch.bincount(token, minlength=5).float() / len(token)
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.0, 0.375, 0.0, 0.0]), atol=0.01, rtol=0)


def test_prompt_longer_than_context_is_refused(model: Transformer) -> None:
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(model).generate(list(range(129)), max_new_tokens=1)
    with pytest.raises(ValueError, match="decode"):
        next(Engine(model).stream([1, 2], max_new_tokens=2))


def test_stream_does_not_leak_inference_mode_to_the_caller(model: Transformer) -> None:
    deltas = 0
    for _ in Engine(model).stream([1, 2], max_new_tokens=3, seed=0, decode=by_position):
        assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
        deltas += 1
    assert deltas > 0


def test_compiled_decoding_matches_eager(model: Transformer) -> None:
    """The compiled fixed-shape decode step: same greedy tokens as naive decoding (left-padded batch included)
    and the same sampled tokens and log-probs as the eager engine for one seed."""
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [40, 41, 42]]
    compiled = Engine(model, compile=True)
    greedy = compiled.generate(prompts, n=2, max_new_tokens=12, temperature=0)
    assert [s.token_ids for s in greedy] == [naive_generate(model, p, 12) for p in prompts for _ in range(2)]
    eager = Engine(model).generate(prompts, n=2, max_new_tokens=12, temperature=0.8, top_k=40, seed=3)
    sampled = compiled.generate(prompts, n=2, max_new_tokens=12, temperature=0.8, top_k=40, seed=3)
    assert [s.token_ids for s in sampled] == [s.token_ids for s in eager]
    for a, b in zip(sampled, eager, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4)


def test_static_cache_ignores_whatever_the_unwritten_cache_memory_holds(model: Transformer) -> None:
    """Unwritten cache columns are multiplied in under a zero weight; garbage there (NaN) must not reach the logits."""
    from ml.engine import _StaticCache, decode_step
    from ml.model import KVCache

    with torch.inference_mode():
        cache = KVCache.for_model(model, 1, 16)
        logits, _ = model(torch.tensor([[5, 17, 200]]), kv_cache=cache)
        cache.k[:, :, :, cache.pos :] = float("nan")
        cache.v[:, :, :, cache.pos :] = float("nan")
        token = logits[:, -1].argmax(dim=-1)
        step = _StaticCache(cache, decode_step, model)(token)
        expected = model(token.unsqueeze(1), kv_cache=cache)[0][:, -1]
    assert torch.allclose(step, expected, atol=1e-5)


def test_the_packed_decoding_twin_shares_parameters_and_gives_the_same_samples(model: Transformer, monkeypatch) -> None:
    from ml import decode_layout

    expected = Engine(model).generate([1, 2, 3], n=3, max_new_tokens=12, temperature=1.0, seed=5)
    monkeypatch.setattr(decode_layout, "MIN_PACK_SIZE", 1)  # pack even the tiny model's matrices
    twin = decode_layout.packed_view(model)
    assert not any(isinstance(m, Linear) for m in twin.modules())
    assert any(isinstance(m, Linear) for m in model.modules())  # the model itself is untouched
    assert twin.embed_tokens is model.embed_tokens and twin.layers[0].attn_norm is model.layers[0].attn_norm
    got = Engine(model).generate([1, 2, 3], n=3, max_new_tokens=12, temperature=1.0, seed=5)
    assert [s.token_ids for s in got] == [s.token_ids for s in expected]
    for a, b in zip(got, expected, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
