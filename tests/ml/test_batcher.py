"""Continuous batching gives each request exactly what it would get alone, whenever it joins or leaves."""

import copy

import pytest
import torch

from ml import decode_layout
from ml.batcher import BatchDecoder, Request, transform_rows
from ml.decode_layout import pack_for_decoding
from ml.engine import Engine, transform_logits
from ml.model import Linear, ModelConfig, Transformer


def tiny_model(max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64, max_seq_len=max_seq_len
    )
    return Transformer(config).eval()


def alone(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return Engine(model).generate(prompt, n=1, max_new_tokens=n, temperature=0.0)[0].token_ids


def run(decoder: BatchDecoder, arrivals: dict[int, list[Request]], steps: int) -> dict[object, list[int]]:
    out: dict[object, list[int]] = {}
    for step in range(steps):
        for request in arrivals.get(step, []):
            decoder.add(request)
            out[request.key] = []
        for event in decoder.step():
            out[event.key].append(event.token_id)
    return out


def test_staggered_greedy_requests_match_each_alone() -> None:
    model = tiny_model()
    prompts = {"a": [1, 2, 3], "b": [5, 6, 7, 8, 9, 10, 11], "c": [4], "d": [9, 8, 7, 6]}
    lengths = {"a": 12, "b": 5, "c": 9, "d": 14}
    arrivals = {
        0: [Request(prompts["a"], lengths["a"], temperature=0.0, key="a")],
        2: [Request(prompts["b"], lengths["b"], temperature=0.0, key="b")],  # longer than the batch so far
        3: [
            Request(prompts["c"], lengths["c"], temperature=0.0, key="c"),
            Request(prompts["d"], lengths["d"], temperature=0.0, key="d"),
        ],
    }
    got = run(BatchDecoder(model), arrivals, steps=30)
    for key, prompt in prompts.items():
        assert got[key] == alone(model, prompt, lengths[key]), key


def test_a_full_cache_is_compacted_without_changing_results() -> None:
    model = tiny_model(max_seq_len=24)
    arrivals = {step: [Request([1 + step, 2, 3], 10, temperature=0.0, key=step)] for step in range(0, 30, 4)}
    got = run(BatchDecoder(model), arrivals, steps=40)
    for step, tokens in got.items():
        assert tokens == alone(model, [1 + step, 2, 3], 10), step


def test_seeded_requests_reproduce_whatever_else_runs() -> None:
    model = tiny_model()
    seeded = dict(prompt_ids=[3, 1, 4], max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7, key="s")
    first = run(BatchDecoder(model), {0: [Request(**seeded)]}, steps=10)["s"]
    crowd = {0: [Request([2, 7], 10, key="x")], 1: [Request(**seeded)], 2: [Request([1, 8, 2, 8], 10, key="y")]}
    assert run(BatchDecoder(model), crowd, steps=12)["s"] == first


def test_stop_tokens_cancel_and_lengths() -> None:
    model = tiny_model()
    greedy = alone(model, [1, 2, 3], 6)
    stop_at = next((j for j in range(1, 3) if greedy[j] not in greedy[:j]), 0)  # the first step a stop can end
    decoder = BatchDecoder(model)
    decoder.add(Request([1, 2, 3], 6, temperature=0.0, stop_token_ids=frozenset({greedy[stop_at]}), key="stop"))
    decoder.add(Request([4, 5], 6, temperature=0.0, key="cancel"))
    events = decoder.step() + decoder.step()
    decoder.cancel("cancel")
    events += decoder.step()
    assert [e.token_id for e in events if e.key == "stop"] == greedy[: stop_at + 1]
    assert [e.finish_reason for e in events if e.key == "stop"] == [None] * stop_at + ["stop"]
    assert len([e for e in events if e.key == "cancel"]) == 2 and len(decoder) == 0


def test_per_row_transform_matches_the_engine() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    settings = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.5, 10, 0.5)]
    temps = torch.tensor([s[0] for s in settings])
    top_ks = torch.tensor([s[1] or 50 for s in settings])
    top_ps = torch.tensor([s[2] or 1.0 for s in settings])
    rows = transform_rows(logits, temps, top_ks, top_ps).log_softmax(-1)
    for i, (t, k, p) in enumerate(settings):
        assert torch.allclose(rows[i], transform_logits(logits[i : i + 1], t, k, p).log_softmax(-1)[0], atol=1e-6)


def test_sampling_follows_the_distribution() -> None:
    model = tiny_model()
    decoder = BatchDecoder(model, max_batch=512)
    for i in range(200):
        decoder.add(Request([1, 2], 1, temperature=1.0, top_k=3, key=i))
    counts = torch.bincount(torch.tensor([e.token_id for e in decoder.step()]), minlength=61).float()
    logits, _ = model(torch.tensor([[1, 2]]))
    expected = transform_logits(logits[0, -1:], 1.0, 3, None).softmax(-1)[0]
    assert set(counts.nonzero().flatten().tolist()) <= set(expected.nonzero().flatten().tolist())  # only the top 3
    assert (counts / 200 - expected).abs().max() < 0.12


def test_eight_short_chats_on_a_long_context_hold_kv_memory_for_their_tokens_only() -> None:
    model = tiny_model(max_seq_len=8192)
    decoder = BatchDecoder(model)
    for i in range(8):
        decoder.add(Request([1 + i, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12][: 6 + i % 4], 40, temperature=1.0, key=i))
    peak_ratio = 0.0
    for _ in range(40):
        decoder.step()
        if decoder.rows:
            live = decoder.cache.live_positions
            assert live == sum(len(r.request.prompt_ids) + r.generated for r in decoder.rows)
            peak_ratio = max(peak_ratio, decoder.cache.allocated_positions / live)
    assert 1.0 <= peak_ratio <= 2.0, peak_ratio  # not 8 x 8,192 positions
    assert len(decoder) == 0 and decoder.cache.k is None  # everything finished: nothing held


def test_a_long_prompt_is_prefilled_in_chunks_while_other_streams_keep_decoding() -> None:
    model = tiny_model(max_seq_len=256)
    long_prompt = [(7 * i) % 60 + 1 for i in range(100)]
    decoder = BatchDecoder(model, prefill_chunk=16)
    decoder.add(Request([1, 2, 3], 30, temperature=0.0, key="short"))
    got: dict[str, list[int]] = {"short": [], "long": []}
    for step in range(40):
        if step == 2:
            decoder.add(Request(long_prompt, 5, temperature=0.0, key="long"))
        events = decoder.step()
        if 2 <= step < 8:  # 100 prompt tokens, 16 a step: the first 96 over steps 2..7
            assert [p.done for p in decoder.prefilling] == [16 * (step - 1)]
        if step < 30:
            assert [e.key for e in events].count("short") == 1  # one token every step, prefill or not
        for e in events:
            got[e.key].append(e.token_id)
    assert [len(got["long"]), got["long"] and not decoder.prefilling] == [5, True]
    assert got["short"] == alone(model, [1, 2, 3], 30)
    assert got["long"] == alone(model, long_prompt, 5)


def test_the_kv_budget_makes_requests_wait_instead_of_overflowing() -> None:
    model = tiny_model()
    decoder = BatchDecoder(model, max_kv_tokens=30)
    first = Request([1, 2, 3, 4, 5], 10, temperature=0.0, key="a")  # reserves 15 positions
    second = Request([6, 7, 8, 9, 10, 11], 10, temperature=0.0, key="b")  # 16: 31 > 30 together
    assert decoder.has_room(first)
    decoder.add(first)
    assert not decoder.has_room(second)
    while len(decoder):
        decoder.step()
    assert decoder.has_room(second)
    with pytest.raises(ValueError, match="KV budget"):
        decoder.add(Request(list(range(1, 21)), 20, key="too big"))


@pytest.mark.parametrize("spread", [8.0, 0.01])  # peaked: the nucleus is in the prefilter; flat: a full sort
def test_per_row_transform_on_a_large_vocabulary_matches_the_engine(spread: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, 5000) * spread
    settings = [(1.0, None, 0.9), (0.7, 5, None), (1.3, 2000, 0.95), (1.0, None, None)]
    temps = torch.tensor([s[0] for s in settings])
    top_ks = torch.tensor([s[1] or 5000 for s in settings])
    top_ps = torch.tensor([s[2] or 1.0 for s in settings])
    rows = transform_rows(logits, temps, top_ks, top_ps)
    for i, (t, k, p) in enumerate(settings):
        expected = transform_logits(logits[i : i + 1], t, k, p)[0]
        assert torch.equal(rows[i].isinf(), expected.isinf()), i  # the same tokens kept
        kept = ~expected.isinf()
        assert torch.allclose(rows[i][kept], expected[kept], atol=1e-5), i


def test_weights_packed_for_decoding_give_the_same_tokens(monkeypatch) -> None:
    monkeypatch.setattr(decode_layout, "MIN_PACK_SIZE", 1)
    model = tiny_model()
    prompts = {"a": [1, 2, 3], "b": [5, 6, 7, 8, 9, 10, 11], "c": [4]}
    expected = {key: alone(model, prompt, 10) for key, prompt in prompts.items()}
    packed = pack_for_decoding(copy.deepcopy(model), block=48)  # uneven blocks and padding: 128 = 3 x 48 - 16
    assert not any(isinstance(m, Linear) for m in packed.modules())
    got = run(BatchDecoder(packed), {0: [Request(p, 10, temperature=0.0, key=k) for k, p in prompts.items()]}, 12)
    assert got == expected
