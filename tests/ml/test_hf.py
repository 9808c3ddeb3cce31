"""ml.hf: tiny random transformers Llama/Qwen2 models imported into ours (and ours exported) give the same logits."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from ml.hf import config_from_hf, convert_hf_to_checkpoint, export_hf, import_hf
from ml.model import ModelConfig, Transformer

SHAPE = dict(
    vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
)  # fmt: skip


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
    ],
)
def test_import_and_export_match_transformers(tmp_path, cls, config_cls, extra) -> None:
    torch.manual_seed(0)
    hf = randomise(cls(config_cls(**SHAPE, **extra)))
    hf.save_pretrained(tmp_path / "hf")
    ours, config = import_hf(tmp_path / "hf")
    assert config.qkv_bias == (cls is Qwen2ForCausalLM) and config.tie_embeddings == extra["tie_word_embeddings"]
    ids = torch.randint(0, 101, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :5] = 0  # a left-padded row too
    expected = hf_logits(hf, ids)
    assert (ours_logits(ours, ids) - expected).abs().max() <= 1e-4
    padded = hf_logits(hf, ids, mask)
    assert (ours_logits(ours, ids, mask)[0, 5:] - padded[0, 5:]).abs().max() <= 1e-4

    export_hf(ours, tmp_path / "back")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    assert type(reloaded).__name__ == ("Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM")
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
    hf = randomise(LlamaForCausalLM(LlamaConfig(**SHAPE)))
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


def test_unsupported_configs_are_refused() -> None:
    base = {"model_type": "llama", "vocab_size": 10, "num_hidden_layers": 1, "num_attention_heads": 2,
            "hidden_size": 8, "intermediate_size": 16}  # fmt: skip
    assert config_from_hf(base).n_kv_head == 2
    with pytest.raises(ValueError, match="model_type"):
        config_from_hf({**base, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="rope scaling"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ValueError, match="head_dim"):
        config_from_hf({**base, "head_dim": 8})
