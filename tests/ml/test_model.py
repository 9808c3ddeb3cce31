"""ml.model: shapes, causality, padding and packing masks, the KV cache against a full forward pass."""

import pytest
import torch
import torch.nn.functional as F

from ml.model import KVCache, ModelConfig, Transformer, document_positions, scalar_model_from


def make_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.tiny(vocab_size=97, **overrides))
    model.init_weights(std=0.3)  # large weights: sharp, token-dependent logits, so equalities are meaningful
    return model.eval()


def test_shapes_and_loss_ignores_minus_100() -> None:
    model = make_model()
    x = torch.randint(0, 97, (3, 11))
    y = x.clone()
    y[:, :4] = -100
    logits, loss = model(x, targets=y)
    assert logits.shape == (3, 11, 97)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, 97), y[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    assert model(x)[1] is None
    none, only = model(x, targets=y, loss_only=True)  # the head at the targeted positions alone: the same loss
    assert none is None
    torch.testing.assert_close(only, expected)


def test_scalar_head_gives_one_value_per_position() -> None:
    lm = make_model()
    rm = scalar_model_from(lm)
    values, loss = rm(torch.randint(0, 97, (2, 7)))
    assert values.shape == (2, 7) and loss is None
    assert not hasattr(rm, "lm_head") and rm.score_head.weight.shape == (64, 1)
    torch.testing.assert_close(rm.layers[0].mlp.down_proj.weight, lm.layers[0].mlp.down_proj.weight)


def test_future_tokens_never_change_earlier_logits() -> None:
    model = make_model()
    x = torch.randint(0, 97, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 1) % 97
    a, b = model(x)[0], model(x2)[0]
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_head,qkv_bias", [(2, False), (4, True), (1, False)])
def test_left_padded_row_equals_unpadded_row(n_kv_head: int, qkv_bias: bool) -> None:
    model = make_model(n_kv_head=n_kv_head, qkv_bias=qkv_bias)
    short, long = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    logits = model(batch, attention_mask=mask)[0]
    torch.testing.assert_close(logits[0, 3:], model(short)[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], model(long)[0][0], atol=1e-4, rtol=1e-4)
    assert torch.isfinite(logits).all()  # padding rows attend to themselves: no NaN


def test_packed_documents_equal_separate_runs() -> None:
    model = make_model()
    a, b, c = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 3))
    packed = torch.cat([a, b, c], 1)
    doc_ids = torch.tensor([[0] * 5 + [1] * 4 + [2] * 3])
    logits = model(packed, doc_ids=doc_ids)[0][0]
    separate = torch.cat([model(d)[0][0] for d in (a, b, c)])
    torch.testing.assert_close(logits, separate, atol=1e-4, rtol=1e-4)


def test_document_positions_restart_per_document() -> None:
    doc_ids = torch.tensor([[7, 7, 7, 2, 2, 9], [1, 1, 1, 1, 1, 1]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_kv_cache_matches_full_forward() -> None:
    model = make_model()
    x = torch.randint(0, 97, (2, 14))
    full = model(x)[0]
    cache = KVCache.for_model(model, batch_size=2, max_len=20)
    parts = [model(x[:, :6], kv_cache=cache)[0]]  # prefill
    parts.append(model(x[:, 6:9], kv_cache=cache)[0])  # a chunk after a non-empty cache
    parts += [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 14)]  # one token at a time
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)


def test_kv_cache_with_left_padding_matches_unpadded_rows() -> None:
    model = make_model()
    short, long = torch.randint(0, 97, (1, 4)), torch.randint(0, 97, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    cache = KVCache.for_model(model, batch_size=2, max_len=12)
    model(batch, kv_cache=cache, attention_mask=mask)
    nxt = torch.randint(0, 97, (2, 1))
    step = model(nxt, kv_cache=cache)[0]
    torch.testing.assert_close(step[0, 0], model(torch.cat([short, nxt[:1]], 1))[0][0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[1, 0], model(torch.cat([long, nxt[1:]], 1))[0][0, -1], atol=1e-4, rtol=1e-4)


def test_kv_cache_expand_decodes_rows_independently() -> None:
    model = make_model()
    prompt = torch.randint(0, 97, (1, 5))
    cache = KVCache.for_model(model, batch_size=1, max_len=8)
    model(prompt, kv_cache=cache)
    cache.expand(3)
    nxt = torch.tensor([[1], [2], [3]])
    step = model(nxt, kv_cache=cache)[0][:, 0]
    for i in range(3):
        ref = model(torch.cat([prompt, nxt[i : i + 1]], 1))[0][0, -1]
        torch.testing.assert_close(step[i], ref, atol=1e-4, rtol=1e-4)


def test_kv_cache_overflow_raises() -> None:
    model = make_model()
    cache = KVCache.for_model(model, batch_size=1, max_len=4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


def test_untied_embeddings_and_config_round_trip(tmp_path) -> None:
    model = make_model(tie_embeddings=False)
    assert model.lm_head.weight is not model.embed_tokens.weight
    tied = make_model()
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert model.num_params() == tied.num_params() + 97 * 64
    model.config.save(tmp_path / "config.json", scalar_head=False)
    assert ModelConfig.load(tmp_path / "config.json") == model.config
    assert ModelConfig.from_dict(model.config.to_dict()) == model.config


def test_invalid_config_is_rejected() -> None:
    with pytest.raises(ValueError):
        ModelConfig.tiny(n_head=3)


def test_optimizer_decays_only_matrices() -> None:
    model = make_model(qkv_bias=True)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    n = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n == model.num_params()  # the tied embedding appears once
    x = torch.randint(0, 97, (2, 8))
    model.train()
    model(x, targets=x)[1].backward()
    opt.step()


def test_flops_estimate_counts_matmuls_and_attention() -> None:
    model = make_model()
    c = model.config
    matmul = c.n_layer * (c.n_embd * (c.n_head + 2 * c.n_kv_head) * c.head_dim + c.n_embd * c.n_embd)
    matmul += c.n_layer * 3 * c.n_embd * c.intermediate_size + c.n_embd * c.vocab_size
    assert model.estimate_flops_per_token(10) == 6 * matmul + 12 * c.n_layer * c.n_embd * 10


def test_bf16_autocast_needs_no_code_change() -> None:
    model = make_model()
    x = torch.randint(0, 97, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, targets=x)
        loss.backward()
        cache = KVCache.for_model(model, batch_size=2, max_len=12)
        model(x, kv_cache=cache)
        step = model(x[:, :1], kv_cache=cache)[0]
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and cache.k.dtype == torch.bfloat16
    assert torch.isfinite(step).all() and model.embed_tokens.weight.grad is not None


def test_kv_cache_grows_with_what_is_written_not_with_max_len() -> None:
    model = make_model()
    cache = KVCache.for_model(model, batch_size=2, max_len=4096)
    x = torch.randint(0, 97, (2, 10))
    full = model(x)[0]
    parts = [model(x[:, :4], kv_cache=cache)[0]]
    assert cache.allocated_positions == 2 * 16  # 4 written, x1.5 rounded up to 16
    parts += [model(x[:, t : t + 1], kv_cache=cache)[0] for t in range(4, 10)]  # 10 positions still fit
    assert cache.allocated_positions == 2 * 16
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-4, rtol=1e-4)
    more = torch.randint(0, 97, (2, 8))
    grown = model(more, kv_cache=cache)[0]  # 18 > 16: reallocated, keeping the 10 written positions
    assert cache.allocated_positions == 2 * 32
    torch.testing.assert_close(grown, model(torch.cat([x, more], 1))[0][:, 10:], atol=1e-4, rtol=1e-4)
