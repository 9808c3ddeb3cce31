"""Continuous batching gives each request exactly what it would get alone, whenever it joins or leaves."""

import torch

from ml.batcher import BatchDecoder, Request, transform_rows
from ml.engine import Engine, transform_logits
from ml.model import ModelConfig, Transformer


def tiny_model(max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=61, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=64,
                         max_seq_len=max_seq_len)  # fmt: skip
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
    arrivals = {0: [Request(prompts["a"], lengths["a"], temperature=0.0, key="a")],
                2: [Request(prompts["b"], lengths["b"], temperature=0.0, key="b")],  # longer than the batch so far
                3: [Request(prompts["c"], lengths["c"], temperature=0.0, key="c"),
                    Request(prompts["d"], lengths["d"], temperature=0.0, key="d")]}  # fmt: skip
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
