"""ml.hf: tiny random transformers models of each supported family imported into ours (and ours exported) give the
same logits and the same greedy tokens."""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

from ml.batcher import BatchDecoder, Request
from ml.engine import Engine
from ml.hf import config_from_hf, config_to_hf, convert_hf_to_checkpoint, export_hf, import_hf
from ml.model import ModelConfig, Transformer, rope_inv_freq

SHAPE = dict(
    vocab_size=101,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
# rope scalings whose thresholds the 44-token test sequences pass: head_dim 12 has wavelengths 2pi, 29, 135, ...,
# so with these the fastest frequency is kept, the next blended, the rest divided by the factor
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=4.0,
    low_freq_factor=0.5,
    high_freq_factor=2.0,
    original_max_position_embeddings=16,
)
LINEAR_ROPE = dict(rope_type="linear", rope_theta=10000.0, factor=2.0)


def hf_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def ours_logits(model: Transformer, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask)[0]


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial norms and biases too, so that a mix-up of any tensor shows in the logits."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.5) + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


@pytest.mark.parametrize(
    "cls,config_cls,extra",
    [
        (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False, rope_theta=5000.0)),
        (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True)),
        (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True, rope_theta=20000.0)),
        (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=False)),
        (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
        (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=True, rope_parameters=LINEAR_ROPE)),
        (Qwen3ForCausalLM, Qwen3Config, dict(tie_word_embeddings=False, head_dim=16)),
        (MistralForCausalLM, MistralConfig, dict(tie_word_embeddings=False, sliding_window=48, head_dim=16)),
        (
            SmolLM3ForCausalLM,
            SmolLM3Config,
            dict(tie_word_embeddings=True, no_rope_layers=[1, 0], pad_token_id=0, bos_token_id=None, eos_token_id=None),
        ),
    ],
)
def test_import_and_export_match_transformers(tmp_path, cls, config_cls, extra) -> None:
    torch.manual_seed(0)
    hf = randomise(cls(config_cls(**SHAPE, **extra)))
    hf.save_pretrained(tmp_path / "hf")
    ours, config = import_hf(tmp_path / "hf")
    assert config.family == hf.config.model_type and config.tie_embeddings == extra["tie_word_embeddings"]
    assert config.head_dim == extra.get("head_dim", 12)
    assert config.max_seq_len == extra.get("sliding_window", 64)  # capped at Mistral's window
    ids = torch.randint(0, 101, (2, 44))  # longer than the rope scalings' original 16 positions
    mask = torch.ones(2, 44, dtype=torch.long)
    mask[0, :5] = 0  # a left-padded row too
    expected = hf_logits(hf, ids)
    assert (ours_logits(ours, ids) - expected).abs().max() <= 1e-4
    padded = hf_logits(hf, ids, mask)
    assert (ours_logits(ours, ids, mask)[0, 5:] - padded[0, 5:]).abs().max() <= 1e-4

    # greedy decoding through our KV cache, past the scaling threshold, picks transformers' tokens
    [sample] = Engine(ours).generate(ids[1, :30].tolist(), n=1, max_new_tokens=8, temperature=0)
    with torch.no_grad():
        hf_out = hf.generate(
            ids[1:, :30],
            attention_mask=mask[1:, :30],
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert sample.token_ids == hf_out[0, 30:].tolist()
    # and so does the server's continuous batch (slots, chunked prefill), beside another request
    decoder = BatchDecoder(ours, prefill_chunk=7)
    decoder.add(Request(ids[0, 10:20].tolist(), 8, temperature=0.0, key="other"))
    decoder.add(Request(ids[1, :30].tolist(), 8, temperature=0.0, key="served"))
    served = [e.token_id for _ in range(20) for e in decoder.step() if e.key == "served"]
    assert served == hf_out[0, 30:].tolist()

    export_hf(ours, tmp_path / "back")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    assert type(reloaded) is cls
    assert (hf_logits(reloaded, ids) - expected).abs().max() <= 1e-4


def test_export_of_our_model_loads_in_transformers(tmp_path) -> None:
    torch.manual_seed(0)
    ours = Transformer(ModelConfig.tiny(vocab_size=97, n_kv_head=1, max_seq_len=32))
    ours.init_weights(std=0.2)
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    (tmp_path / "tok" / "generation_config.json").write_text(json.dumps({"stop_token_ids": [6]}))
    export_hf(ours.eval(), tmp_path / "out", tokenizer_dir=tmp_path / "tok")
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    assert hf.config.eos_token_id == 6
    ids = torch.randint(0, 97, (3, 17))
    assert (hf_logits(hf, ids) - ours_logits(ours, ids)).abs().max() <= 1e-4
    with torch.no_grad():  # greedy generation agrees too
        hf_out = hf.generate(ids[:1], max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    from ml.engine import naive_generate

    assert hf_out[0, 17:].tolist() == naive_generate(ours, ids[0].tolist(), 8)


def test_sharded_checkpoint_and_conversion_to_model_directory(tmp_path) -> None:
    from ml.checkpoint import load_checkpoint

    torch.manual_seed(0)
    hf = randomise(LlamaForCausalLM(LlamaConfig(**SHAPE, rope_parameters=LLAMA3_ROPE)))  # rotary rebuilt on load
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    (tmp_path / "hf" / "tokenizer.json").write_text('{"fake": true}')
    convert_hf_to_checkpoint(tmp_path / "hf", tmp_path / "ours")
    model, meta = load_checkpoint(tmp_path / "ours")
    assert (tmp_path / "ours" / "tokenizer.json").read_text() == '{"fake": true}'
    assert meta["imported_from"] == str(tmp_path / "hf")
    ids = torch.randint(0, 101, (1, 12))
    assert (ours_logits(model, ids) - hf_logits(hf, ids)).abs().max() <= 1e-4


def test_pytorch_bin_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    hf = randomise(LlamaForCausalLM(LlamaConfig(**SHAPE)))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(hf.config.to_json_string())
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    ours, _ = import_hf(tmp_path / "hf")
    ids = torch.randint(0, 101, (1, 12))
    assert (ours_logits(ours, ids) - hf_logits(hf, ids)).abs().max() <= 1e-4


BASE = {
    "model_type": "llama",
    "vocab_size": 10,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "hidden_size": 8,
    "intermediate_size": 16,
    "max_position_embeddings": 8192,
}


def test_unsupported_families_and_features_are_refused_by_name() -> None:
    assert config_from_hf(BASE).n_kv_head == 2
    supported = r"\(supported: llama, mistral, qwen2, qwen3, smollm3\)"
    with pytest.raises(ValueError, match=f"model_type 'gemma2' is not supported {supported}"):
        config_from_hf({**BASE, "model_type": "gemma2"})
    with pytest.raises(ValueError, match=r"rope scaling 'yarn' is not supported \(supported: linear, llama3\)"):
        config_from_hf({**BASE, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope scaling 'dynamic'"):  # transformers 4.x spelling: "type"
        config_from_hf({**BASE, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        config_from_hf({**BASE, "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="qwen3 attention_bias"):
        config_from_hf({**BASE, "model_type": "qwen3", "attention_bias": True})
    with pytest.raises(ValueError, match="SwiGLU"):
        config_from_hf({**BASE, "hidden_act": "gelu"})
    both = ModelConfig.tiny(qkv_bias=True, qk_norm=True)
    with pytest.raises(ValueError, match=r"no supported family has all of \['qk_norm', 'qkv_bias'\]"):
        config_to_hf(both)
    with pytest.raises(ValueError, match="the llama layout has"):
        config_to_hf(ModelConfig.tiny(qk_norm=True, family="llama"))


def test_config_fields_of_each_family() -> None:
    """Window caps, NoPE layers, head_dim and rope scaling read from hand-written config.json dicts."""
    assert config_from_hf({**BASE, "head_dim": 8}).head_dim == 8
    assert config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 4096}).max_seq_len == 4096
    assert config_from_hf({**BASE, "model_type": "mistral", "sliding_window": None}).max_seq_len == 8192
    qwen25 = {**BASE, "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    assert config_from_hf(qwen25).max_seq_len == 8192  # Qwen2.5 ships a window it does not use
    assert config_from_hf({**qwen25, "use_sliding_window": True}).max_seq_len == 4096
    full = ["full_attention"] * 4
    assert config_from_hf({**qwen25, "use_sliding_window": True, "layer_types": full}).max_seq_len == 8192
    smollm3 = {**BASE, "model_type": "smollm3"}
    assert config_from_hf(smollm3).nope_layers == [3]  # every 4th layer by default
    assert config_from_hf({**smollm3, "no_rope_layers": [0, 1, 1, 0]}).nope_layers == [0, 3]
    assert config_to_hf(config_from_hf(smollm3))["no_rope_layers"] == [1, 1, 1, 0]
    legacy = {
        **BASE,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
    }
    config = config_from_hf(legacy)  # transformers 4.x: theta beside rope_scaling; original length defaults
    assert config.rope_theta == 500000.0 and config.rope_scaling["original_max_position_embeddings"] == 8192
    assert ModelConfig.from_dict(config.to_dict()) == config  # survives config.json


def test_a_config_saved_before_the_family_fields_exports_as_before() -> None:
    old = ModelConfig.tiny(qkv_bias=True).to_dict()
    for field in ("family", "attn_head_dim", "qk_norm", "rope_scaling", "nope_layers"):
        old.pop(field)
    assert config_to_hf(ModelConfig.from_dict(old))["model_type"] == "qwen2"
    assert config_to_hf(ModelConfig.from_dict({**old, "qkv_bias": False}))["model_type"] == "llama"


def test_rope_inv_freq_by_hand() -> None:
    """head_dim 6, theta 1000: frequencies 1, 0.1, 0.01, wavelengths 2pi*(1, 10, 100)."""
    assert torch.allclose(rope_inv_freq(6, 1000.0), torch.tensor([1.0, 0.1, 0.01]))
    assert torch.allclose(
        rope_inv_freq(6, 1000.0, {"rope_type": "linear", "factor": 2.0}), torch.tensor([0.5, 0.05, 0.005])
    )
    # llama3 with original length 64: wavelengths under 64/8 = 8 kept (2pi), over 64/0.5 = 128 divided by 4 (628),
    # and 62.8 blended: s = (64/62.83 - 0.5) / (8 - 0.5) = 0.0691456, 0.1 * ((1 - s) / 4 + s) = 0.0301859
    llama3 = {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 0.5,
        "high_freq_factor": 8.0,
        "original_max_position_embeddings": 64,
    }
    assert torch.allclose(rope_inv_freq(6, 1000.0, llama3), torch.tensor([1.0, 0.0301859, 0.0025]))
