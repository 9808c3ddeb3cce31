"""Import and export Hugging Face checkpoint directories (config.json + safetensors or .bin weights) of the families
people fine-tune today: Llama (incl. Llama 3.x rope scaling; SmolLM2 is a Llama), Mistral, Qwen2/2.5, Qwen3 and
SmolLM3.

Import reads the weights directly (no transformers needed): q/k/v are concatenated into our fused qkv_proj and
gate/up into gate_up_proj (and transposed: ours are stored (in, out)); rope_theta, rms_norm_eps and tied embeddings
carry over, and each family's variation becomes a ModelConfig field:
- Llama 3.x `llama3` (and `linear`) rope scaling -> `rope_scaling` (the scaled frequencies: ml.model.rope_inv_freq);
- Qwen2's q/k/v biases -> `qkv_bias`;
- Qwen3's per-head q/k RMSNorm -> `qk_norm`, and its head_dim apart from hidden/heads -> `attn_head_dim`;
- SmolLM3's NoPE layers (HF `no_rope_layers`: a 0/1 flag per layer, 0 = no rotary) -> `nope_layers` (indices);
- a sliding-window attention (Mistral v0.1's 4096; Qwen/SmolLM3 with use_sliding_window) is not implemented:
  max_seq_len is capped at the window instead, within which attention sees every earlier token, so results are
  identical to transformers' for sequences of up to max_seq_len tokens.
Anything else (yarn or dynamic rope, biases on o_proj or the MLP, another activation, another model_type) is
refused by name.
Export writes the reverse in the family the model came from (`family`; for our own models the plainest family
that has their features), a directory that `transformers.AutoModelForCausalLM.from_pretrained` (and so vLLM)
loads with the same logits.

Run (CPU): convert a downloaded checkpoint into a Flywheel model directory
    python -m ml.hf import path/to/hf_checkpoint path/to/flywheel_model
and back
    python -m ml.hf export path/to/flywheel_model path/to/hf_out
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ml.model import ModelConfig, RotaryEmbedding, Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# each family's architecture class, and the features its layout always has (SmolLM3 may also have no NoPE layer)
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
LAYOUTS = {
    "llama": frozenset(),
    "mistral": frozenset(),
    "qwen2": frozenset({"qkv_bias"}),
    "qwen3": frozenset({"qk_norm"}),
    "smollm3": frozenset({"nope_layers"}),
}
SUPPORTED = tuple(sorted(ARCHITECTURES))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig from a config.json dict of a supported family (transformers 4.x or 5.x spelling)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED)})")
    _refuse_unsupported(hf, model_type)
    n_head, n_layer, head_dim = hf["num_attention_heads"], hf["num_hidden_layers"], hf.get("head_dim")
    max_pos = hf.get("max_position_embeddings") or 2048
    rope, window = _rope_parameters(hf), _sliding_window(hf, model_type)
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head,
        n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        max_seq_len=min(max_pos, window) if window else max_pos,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 2e6 if model_type == "smollm3" else 1e4))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        family=model_type,
        attn_head_dim=head_dim if head_dim not in (None, hf["hidden_size"] // n_head) else None,
        qk_norm=model_type == "qwen3",
        rope_scaling=_rope_scaling(rope, hf.get("original_max_position_embeddings") or max_pos),
        nope_layers=_nope_layers(hf, n_layer) if model_type == "smollm3" else None,
    )


def _refuse_unsupported(hf: dict[str, Any], model_type: str) -> None:
    """Raise, naming it, on a feature of the config that our Transformer does not have."""
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise ValueError("only SwiGLU MLPs without bias are supported")
    if model_type != "qwen2" and hf.get("attention_bias"):
        raise ValueError(f"{model_type} attention_bias (a bias on o_proj too) is not supported")
    rope = _rope_parameters(hf)
    if float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ValueError("partial_rotary_factor (rotary on part of each head) is not supported")


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The flat rope dict: transformers 5.x's rope_parameters, overridden (as 5.x does) by 4.x's rope_scaling."""
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    return {**rope, "rope_type": rope.get("rope_type", rope.get("type", "default"))}


def _rope_scaling(rope: dict[str, Any], original_max_pos: int) -> dict[str, Any] | None:
    """Our rope_scaling (only the keys its maths reads), None for plain rotary; other kinds are refused."""
    kind = rope["rope_type"]
    if kind == "default":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(rope["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        orig = int(rope.get("original_max_position_embeddings") or original_max_pos)
        return {"rope_type": "llama3", **{k: float(rope[k]) for k in keys}, "original_max_position_embeddings": orig}
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear, llama3)")


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """The attention window some layer uses, or None. Mistral windows every layer when sliding_window is set;
    Qwen2/3 and SmolLM3 only with use_sliding_window, and only the layers layer_types marks (all, if it is absent)."""
    window = hf.get("sliding_window")
    if window is None or model_type == "llama":
        return None
    if model_type == "mistral":
        return int(window)
    layer_types = hf.get("layer_types")
    if not hf.get("use_sliding_window") or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window)


def _nope_layers(hf: dict[str, Any], n_layer: int) -> list[int]:
    """SmolLM3's layers without rotary: HF's no_rope_layers flags (1 = uses rotary), or every interval-th layer."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(n_layer)]
    return [i for i in range(n_layer) if not flags[i]]


def export_family(config: ModelConfig) -> str:
    """The model_type to export as: the family imported from, else the plainest one whose layout fits the model."""
    used = {name for name in ("qkv_bias", "qk_norm", "nope_layers") if getattr(config, name)}
    family = config.family or next((f for f, has in LAYOUTS.items() if has == used), None)
    if family is None:
        raise ValueError(f"no supported family has all of {sorted(used)}")
    if family not in LAYOUTS:
        raise ValueError(f"model_type {family!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if used != LAYOUTS[family] and not (family == "smollm3" and not used):
        raise ValueError(f"the {family} layout has {sorted(LAYOUTS[family])}, this model {sorted(used)}")
    return family


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
    """A config.json for transformers in the model's family (export_family); the rope scaling is written as 5.x's
    rope_parameters and 4.x's rope_scaling, so either version loads it."""
    family = export_family(config)
    rope = {"rope_type": "default", "rope_theta": config.rope_theta, **(config.rope_scaling or {})}
    common = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if config.rope_scaling:
        common["rope_scaling"] = dict(config.rope_scaling)
    no_window = {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layer}
    nope = set(config.nope_layers or ())
    extra: dict[str, dict[str, Any]] = {
        "llama": {"attention_bias": False, "mlp_bias": False},
        "mistral": {"sliding_window": None},
        "qwen2": no_window,
        "qwen3": {**no_window, "attention_bias": False},
        "smollm3": {
            **no_window,
            "attention_bias": False,
            "mlp_bias": False,
            "no_rope_layers": [int(i not in nope) for i in range(config.n_layer)],
            # its default token ids (128000+) lie outside smaller vocabularies; ours come with the tokenizer
            "bos_token_id": None,
            "eos_token_id": None,
            "pad_token_id": None,
        },
    }
    return {**common, **extra[family]}


def read_hf_weights(src: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, sharded safetensors, or pytorch_model.bin(s)."""
    indexes = (("model.safetensors.index.json", load_file), ("pytorch_model.bin.index.json", _load_bin))
    for index_name, loader in indexes:
        if (src / index_name).is_file():
            shards = sorted(set(json.loads((src / index_name).read_text())["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(loader(str(src / shard)))
            return state
    if (src / "model.safetensors").is_file():
        return load_file(str(src / "model.safetensors"))
    if (src / "pytorch_model.bin").is_file():
        return _load_bin(str(src / "pytorch_model.bin"))
    raise FileNotFoundError(f"no model.safetensors, pytorch_model.bin or shard index in {src}")


def _load_bin(path: str) -> dict[str, Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def state_from_hf(hf_state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename HF tensors to ours, fusing q/k/v and gate/up."""
    hf = {k.removeprefix("model."): v for k, v in hf_state.items()}
    out = {"embed_tokens.weight": hf["embed_tokens.weight"], "norm.weight": hf["norm.weight"]}
    for i in range(config.n_layer):
        src, dst = f"layers.{i}.", f"layers.{i}."
        attn, mlp = src + "self_attn.", src + "mlp."
        # HF weights are (out, in); ours are (in, out) with fused outputs side by side
        out[dst + "attn.qkv_proj.weight"] = torch.cat([hf[f"{attn}{p}_proj.weight"] for p in "qkv"]).t()
        if config.qkv_bias:
            out[dst + "attn.qkv_proj.bias"] = torch.cat([hf[f"{attn}{p}_proj.bias"] for p in "qkv"])
        if config.qk_norm:
            for p in "qk":
                out[f"{dst}attn.{p}_norm.weight"] = hf[f"{attn}{p}_norm.weight"]
        out[dst + "attn.o_proj.weight"] = hf[attn + "o_proj.weight"].t()
        gate_up = torch.cat([hf[mlp + "gate_proj.weight"], hf[mlp + "up_proj.weight"]])
        out[dst + "mlp.gate_up_proj.weight"] = gate_up.t()
        out[dst + "mlp.down_proj.weight"] = hf[mlp + "down_proj.weight"].t()
        out[dst + "attn_norm.weight"] = hf[src + "input_layernorm.weight"]
        out[dst + "mlp_norm.weight"] = hf[src + "post_attention_layernorm.weight"]
    if not config.tie_embeddings:
        if "lm_head.weight" not in hf_state:
            raise ValueError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
        out["lm_head.weight"] = hf_state["lm_head.weight"]
    return out


def state_to_hf(model: Transformer) -> dict[str, Tensor]:
    """Our tensors under HF names, q/k/v and gate/up split again; a tied lm_head is left to transformers to tie."""
    c = model.config
    ours = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    out = {"model.embed_tokens.weight": ours["embed_tokens.weight"], "model.norm.weight": ours["norm.weight"]}
    sizes = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
    for i in range(c.n_layer):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for p, w in zip("qkv", ours[src + "attn.qkv_proj.weight"].t().split(sizes), strict=True):
            out[f"{dst}self_attn.{p}_proj.weight"] = w
        if c.qkv_bias:
            for p, b in zip("qkv", ours[src + "attn.qkv_proj.bias"].split(sizes), strict=True):
                out[f"{dst}self_attn.{p}_proj.bias"] = b
        if c.qk_norm:
            for p in "qk":
                out[f"{dst}self_attn.{p}_norm.weight"] = ours[f"{src}attn.{p}_norm.weight"]
        out[dst + "self_attn.o_proj.weight"] = ours[src + "attn.o_proj.weight"].t()
        gate, up = ours[src + "mlp.gate_up_proj.weight"].t().chunk(2)
        out[dst + "mlp.gate_proj.weight"], out[dst + "mlp.up_proj.weight"] = gate, up
        out[dst + "mlp.down_proj.weight"] = ours[src + "mlp.down_proj.weight"].t()
        out[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = ours[src + "mlp_norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = ours["lm_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}  # own storage each: safetensors refuses sharing


def import_hf(src_dir: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, ModelConfig]:
    """Load a checkpoint directory of a supported family into our Transformer (eval mode, on CPU)."""
    src = Path(src_dir)
    config = config_from_hf(json.loads((src / "config.json").read_text()))
    state = {k: v.to(dtype) for k, v in state_from_hf(read_hf_weights(src), config).items()}
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.rotary = RotaryEmbedding.from_config(config)  # buffers are not weights: to_empty left them garbage
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"weights do not match the config: missing {missing}, unexpected {unexpected}")
    return model.eval(), config


def export_hf(model: Transformer, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> Path:
    """Write `model` as a transformers checkpoint directory (atomically), with tokenizer files if given."""
    from ml.checkpoint import unwrap

    model = unwrap(model)
    if model.scalar_head:
        raise ValueError("a scalar-head model has no causal-LM layout to export")
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf_config = config_to_hf(model.config)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), tmp, hf_config)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        save_file(state_to_hf(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_tokenizer(src: Path, dst: Path, hf_config: dict[str, Any]) -> None:
    """Copy the tokenizer files present; our generation defaults' stop ids become HF's eos_token_id."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    generation = src / "generation_config.json"
    if generation.is_file():
        stops = json.loads(generation.read_text()).get("stop_token_ids") or []
        if stops:
            hf_config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
            (dst / "generation_config.json").write_text(json.dumps({"eos_token_id": hf_config["eos_token_id"]}))


class _TokenizerFiles:
    """Duck-typed tokenizer for save_checkpoint: copies an HF directory's tokenizer files."""

    def __init__(self, src: Path) -> None:
        self.src = src

    def save(self, directory: str | Path) -> None:
        for name in TOKENIZER_FILES:
            if (self.src / name).is_file():
                shutil.copyfile(self.src / name, Path(directory) / name)


def convert_hf_to_checkpoint(src_dir: str | Path, out_dir: str | Path) -> Path:
    """An HF checkpoint directory -> a Flywheel model directory (weights, config, tokenizer files)."""
    from ml.checkpoint import save_checkpoint

    model, _ = import_hf(src_dir)
    tokenizer = _TokenizerFiles(Path(src_dir))
    return save_checkpoint(out_dir, model, tokenizer=tokenizer, extra={"imported_from": str(src_dir)})


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert between Hugging Face and Flywheel model directories")
    parser.add_argument("direction", choices=["import", "export"])
    parser.add_argument("src")
    parser.add_argument("dst")
    args = parser.parse_args()
    if args.direction == "import":
        print(convert_hf_to_checkpoint(args.src, args.dst))
    else:
        from ml.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.src)
        print(export_hf(model, args.dst, tokenizer_dir=args.src))


if __name__ == "__main__":
    main()
