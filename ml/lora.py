"""LoRA: train a few low-rank matrices beside a frozen model instead of the model itself (Hu et al., 2021).

A target projection W (in, out) becomes x @ W + (alpha / r) * x @ A @ B, with A (in, r) random and B (r, out) zero,
so training starts from exactly the base model and only A and B (and a reward model's score head) learn. What that
buys on one machine: no gradients or AdamW moments for the frozen weights, and a second model on the same base --
the RL reference, a critic -- shares the frozen tensors instead of copying them (`share_trunk`).

Our attention fuses q/k/v into one `qkv_proj` and the MLP gate/up into `gate_up_proj`; an adapter on a fused
projection holds one (A, B) pair per target slice, so it is the same maths as separate q_proj/k_proj/v_proj adapters
and saves in the layout transformers + PEFT load (`save_adapter`: adapter_config.json + adapter_model.safetensors,
keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`, A stored (r, in) and B (out, r)).

- `LoraSpec`: rank, alpha, targets (HF names: q_proj k_proj v_proj o_proj gate_proj up_proj down_proj);
- `attach(model, spec)`: freeze the model, add adapters, return the trainable parameters;
- `adapters_off(model)`: the base model's exact outputs for a while (a reference without a second copy);
- `merged_state_dict(model)`: the weights with every adapter folded in (what a served checkpoint holds);
- `share_trunk(model, scalar_head)`: another model tree on the same frozen tensors, without adapters.

Try it (CPU, instant):  python -m ml.lora
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ml.model import Linear, Transformer

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_HF_BLOCK = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}


@dataclass
class LoraSpec:
    """Which projections get adapters and how large. The defaults (every projection, rank 16, alpha 32) are the
    common choice for a small chat model; attention-only (q k v o) trains faster and fits more in memory."""

    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = field(default_factory=lambda: TARGETS)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"LoRA rank must be >= 1 and alpha > 0, got rank={self.rank} alpha={self.alpha}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be among {', '.join(TARGETS)}; got {', '.join(unknown) or 'none'}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> LoraSpec | None:
        """None or {} -> None (full fine-tuning); unknown keys are refused by name."""
        if not d:
            return None
        if unknown := set(d) - {"rank", "alpha", "targets"}:
            raise ValueError(f"unknown LoRA settings: {', '.join(sorted(unknown))} (known: rank, alpha, targets)")
        return cls(**d)


class LoraAdapter(nn.Module):
    """The low-rank update of one (possibly fused) projection: one (A, B) pair per target slice of its output.

    The slices' A sit side by side in one (in, S*r) matrix and their B in one block-diagonal (S*r, out) matrix (a
    fixed mask keeps the off-diagonal blocks, and the columns of untargeted slices, at exactly zero), so the update
    is two GEMMs and the second one adds into the base output (addmm) whatever the number of slices: measured on
    SmolLM2, one product per slice and a concatenation cost about 10% of a training step more."""

    def __init__(self, n_in: int, slices: list[tuple[str, int, int]], spec: LoraSpec, like: Tensor) -> None:
        super().__init__()
        self.names = [name for name, _, _ in slices]
        self.spans = [(start, end) for _, start, end in slices]
        self.rank, self.scale, self.enabled = spec.rank, spec.scale, True
        r, n_out = spec.rank, like.size(1)
        bound = 1 / math.sqrt(n_in)  # what kaiming_uniform(a=sqrt(5)) gives nn.Linear-shaped A
        # fp32 whatever the trunk's dtype: a bf16 trunk (or bf16 autocast) computes in bf16, the adapters and
        # their AdamW moments keep full precision
        a = torch.empty(n_in, len(slices) * r, dtype=torch.float32, device=like.device).uniform_(-bound, bound)
        self.A = nn.Parameter(a)  # (in, S * r)
        self.B = nn.Parameter(torch.zeros(len(slices) * r, n_out, dtype=torch.float32, device=like.device))
        mask = torch.zeros_like(self.B, dtype=torch.bool)
        for i, (start, end) in enumerate(self.spans):
            mask[i * r : (i + 1) * r, start:end] = True
        self.register_buffer("mask", None if bool(mask.all()) else mask, persistent=False)

    def blocks(self) -> list[tuple[Tensor, Tensor]]:
        """(A_i (in, r), B_i (r, out_i)) of each slice, views of the parameters."""
        r = self.rank
        return [
            (self.A[:, i * r : (i + 1) * r], self.B[i * r : (i + 1) * r, s:e]) for i, (s, e) in enumerate(self.spans)
        ]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """y = x @ W (+ bias) -> y plus this adapter's update (y itself when disabled)."""
        if not self.enabled:
            return y
        b = self.B if self.mask is None else self.B * self.mask
        h = x.reshape(-1, x.size(-1)) @ self.A.to(x.dtype)  # (N, S * r)
        return torch.addmm(y.reshape(-1, y.size(-1)), h, b.to(x.dtype), alpha=self.scale).view_as(y)

    @torch.no_grad()
    def weight_delta(self, n_out: int) -> Tensor:
        """(in, out) update to fold into the weight."""
        b = self.B if self.mask is None else self.B * self.mask
        return self.scale * self.A @ b[:, :n_out]


def _target_slices(model: Transformer, spec: LoraSpec) -> Iterator[tuple[int, str, Linear, list[tuple[str, int, int]]]]:
    """(layer, module path in the block, Linear, [(HF name, start, end)]) of every projection that gets an adapter."""
    c = model.config
    q, kv, inter = c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.intermediate_size
    qkv = [("q_proj", 0, q), ("k_proj", q, q + kv), ("v_proj", q + kv, q + 2 * kv)]
    gate_up = [("gate_proj", 0, inter), ("up_proj", inter, 2 * inter)]
    for i, block in enumerate(model.layers):
        layout = [
            ("attn.qkv_proj", block.attn.qkv_proj, qkv),
            ("attn.o_proj", block.attn.o_proj, [("o_proj", 0, c.n_embd)]),
            ("mlp.gate_up_proj", block.mlp.gate_up_proj, gate_up),
            ("mlp.down_proj", block.mlp.down_proj, [("down_proj", 0, c.n_embd)]),
        ]
        for path, linear, slices in layout:
            chosen = [s for s in slices if s[0] in spec.targets]
            if chosen:
                yield i, path, linear, chosen


def attach(model: Transformer, spec: LoraSpec) -> list[nn.Parameter]:
    """Freeze `model` and give its target projections adapters, in place; a scalar head (reward or value model)
    stays trainable. Returns the parameters that train."""
    if has_adapters(model):
        raise ValueError("this model already has LoRA adapters")
    model.requires_grad_(False)
    for _, _, linear, slices in _target_slices(model, spec):
        linear.adapter = LoraAdapter(linear.weight.size(0), slices, spec, linear.weight)
    if model.scalar_head:
        model.score_head.requires_grad_(True)
    model.lora_spec = spec
    return [p for p in model.parameters() if p.requires_grad]


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoraAdapter) for m in model.modules())


def spec_of(model: nn.Module) -> LoraSpec | None:
    return getattr(model, "lora_spec", None) if has_adapters(model) else None


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes exactly what its frozen base does (the adapters are skipped)."""
    adapters = [m for m in model.modules() if isinstance(m, LoraAdapter)]
    before = [a.enabled for a in adapters]
    for a in adapters:
        a.enabled = False
    try:
        yield model
    finally:
        for a, was in zip(adapters, before, strict=True):
            a.enabled = was


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the plain layout, every adapter folded into its weight (adapter keys dropped)."""
    state = {k: v for k, v in model.state_dict().items() if ".adapter." not in k}
    for name, module in model.named_modules():
        if isinstance(module, Linear) and isinstance(module.adapter, LoraAdapter):
            weight = module.weight
            state[f"{name}.weight"] = weight + module.adapter.weight_delta(weight.size(1)).to(weight.dtype)
    return state


def adapter_size(model: nn.Module) -> int:
    """The number of adapter weights that train (a block-diagonal B counted by its blocks, as PEFT counts them)."""
    adapters = [m for m in model.modules() if isinstance(m, LoraAdapter)]
    return sum(a.A.numel() + (a.B.numel() if a.mask is None else int(a.mask.sum())) for a in adapters)


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only what trains (adapters, a scalar head): what a LoRA run's resume state needs, not the frozen base."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model.state_dict().items() if k in names}


def share_trunk(model: Transformer, scalar_head: bool | None = None) -> Transformer:
    """Another model on the same frozen tensors (no copy), without adapters: the RL reference, or the body of a
    critic that gets its own adapters and score head. `scalar_head` (default: the model's) gives a new zero-init
    score head when the source has none."""
    scalar = model.scalar_head if scalar_head is None else scalar_head

    def bare(module: nn.Module | None) -> nn.Module | None:
        if module is None or isinstance(module, LoraAdapter):
            return None
        clone = copy.copy(module)  # shares parameters and buffers; gets its own tables
        clone._parameters, clone._buffers = dict(module._parameters), dict(module._buffers)
        clone._modules = {n: bare(c) for n, c in module._modules.items()}
        return clone

    twin = bare(model)
    twin.__dict__.pop("lora_spec", None)
    if scalar and not model.scalar_head:
        twin._modules.pop("lm_head", None)
        head = Linear(model.config.n_embd, 1).to(model.embed_tokens.weight)
        nn.init.zeros_(head.weight)
        twin.score_head, twin.scalar_head = head, True
    elif not scalar and model.scalar_head:
        raise ValueError("a language model cannot be made from a reward model's trunk")
    return twin


# --------------------------------------------------------------------------------- the PEFT layout on disk


def hf_adapter_state(model: Transformer) -> dict[str, Tensor]:
    """Every adapter as PEFT names and shapes: lora_A (r, in), lora_B (out, r)."""
    state = {}
    for i, _, linear, _ in _target_slices(model, spec_of(model) or LoraSpec()):
        adapter = linear.adapter
        if not isinstance(adapter, LoraAdapter):
            continue
        for name, (a, b) in zip(adapter.names, adapter.blocks(), strict=True):
            prefix = f"base_model.model.model.layers.{i}.{_HF_BLOCK.get(name, 'mlp')}.{name}"
            state[f"{prefix}.lora_A.weight"] = a.detach().t().contiguous().cpu()
            state[f"{prefix}.lora_B.weight"] = b.detach().t().contiguous().cpu()
    if model.scalar_head:  # transformers' *ForSequenceClassification calls its head `score`
        state["base_model.model.score.weight"] = model.score_head.weight.detach().t().contiguous().cpu()
    return state


def save_adapter(model: Transformer, directory: str | Path, base: str = "") -> Path:
    """Write the adapters in the layout `peft.PeftModel.from_pretrained(base_model, directory)` loads."""
    spec = spec_of(model)
    if spec is None:
        raise ValueError("this model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(hf_adapter_state(model), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS" if model.scalar_head else "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": 0.0,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": ["score"] if model.scalar_head else None,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def adapter_base(directory: str | Path) -> Path | None:
    """The resolved base directory a saved adapter names (None: no adapter there, or it names none)."""
    try:
        base = json.loads((Path(directory) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None
    return Path(base).resolve() if base else None


def load_adapter(model: Transformer, directory: str | Path) -> LoraSpec:
    """Attach the adapters saved in `directory` (PEFT layout) to `model`, in place; returns their spec."""
    directory = Path(directory)
    try:
        config = json.loads((directory / ADAPTER_CONFIG).read_text())
        spec = LoraSpec(int(config["r"]), float(config["lora_alpha"]), tuple(config["target_modules"]))
        state = load_file(str(directory / ADAPTER_WEIGHTS))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{directory}: not a LoRA adapter directory: {exc}") from exc
    attach(model, spec)
    with torch.no_grad():
        for i, _, linear, _ in _target_slices(model, spec):
            adapter = linear.adapter
            for name, (a, b) in zip(adapter.names, adapter.blocks(), strict=True):
                prefix = f"base_model.model.model.layers.{i}.{_HF_BLOCK.get(name, 'mlp')}.{name}"
                a.copy_(state[f"{prefix}.lora_A.weight"].t())
                b.copy_(state[f"{prefix}.lora_B.weight"].t())
        if model.scalar_head and "base_model.model.score.weight" in state:
            model.score_head.weight.copy_(state["base_model.model.score.weight"].t())
    return spec


def main() -> None:
    from ml.model import ModelConfig

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    model = Transformer(ModelConfig.tiny())
    idx = torch.randint(0, 256, (2, 16))
    base, _ = model(idx)
    trainable = attach(model, LoraSpec(rank=4, alpha=8))
    for p in trainable:
        p.add_(0.02 * torch.randn_like(p))
    tuned, _ = model(idx)
    with adapters_off(model):
        off, _ = model(idx)
    merged = Transformer(model.config)
    merged.load_state_dict(merged_state_dict(model))
    print(f"trainable {sum(p.numel() for p in trainable)} of {model.num_params()} parameters")
    print(f"adapters off vs base, max |diff| {float((off - base).abs().max()):.2e}")
    print(f"merged vs adapters on, max |diff| {float((merged(idx)[0] - tuned).abs().max()):.2e}")


if __name__ == "__main__":
    main()
