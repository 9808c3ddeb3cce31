"""Save and load a model directory: model.safetensors + config.json + tokenizer.json + generation_config.json.

    config.json             ModelConfig fields, "scalar_head", "format": "flywheel", and "extra" (caller metadata)
    model.safetensors       the weights; a tied lm_head is stored once (as the embedding) and re-tied on load
    tokenizer.json          written by the tokenizer's own .save(directory) when a tokenizer is given
    generation_config.json  default sampling settings for this model
    adapter/                a model trained with LoRA (ml.lora): its adapters alone, in the layout PEFT loads; the
                            weights above have them folded in, so every reader serves it as a plain model

Saving is atomic: everything is written and fsynced in a temporary sibling directory which then takes the
directory's place, so a reader (the server hot-swapping models, a crashed trainer resuming) sees the old complete
checkpoint or the new complete one, never half of one; a failed write (a full disk) raises CheckpointWriteError
and removes the temporary directory. Files already in the directory that a checkpoint does not write (a trainer's
train_state.pt) are carried over into the new one.

Try it on CPU:
    python -c "from ml.model import *; from ml.checkpoint import *; \
save_checkpoint('/tmp/m', Transformer(ModelConfig.tiny())); print(load_checkpoint('/tmp/m')[1])"
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ml import lora
from ml.model import ModelConfig, RotaryEmbedding, Transformer

FORMAT = "flywheel"
WEIGHTS, CONFIG, GENERATION = "model.safetensors", "config.json", "generation_config.json"
ADAPTER_DIR = "adapter"
GENERATION_DEFAULTS: dict[str, Any] = {
    "temperature": 1.0,
    "top_k": None,
    "top_p": None,
    "max_new_tokens": 256,
    "stop_token_ids": [],
}
RESERVED = {"config", "scalar_head", "generation"}


class CheckpointError(ValueError):
    """A model directory is missing, incomplete or corrupt."""


class CheckpointWriteError(OSError):
    """A model directory could not be written (disk full, file size limit, I/O error); nothing was replaced."""


def save_checkpoint(
    directory: str | Path,
    model: Transformer,
    tokenizer: Any = None,
    generation: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model` (and the tokenizer, if given) to `directory`, atomically replacing what was there."""
    directory, model = Path(directory), unwrap(model)
    extra = dict(extra or {})
    if clash := RESERVED & extra.keys():
        raise ValueError(f"extra metadata may not use the reserved keys {sorted(clash)}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        save_file(_weights_to_store(model), str(tmp / WEIGHTS), metadata={"format": "pt"})
        if (spec := lora.spec_of(model)) is not None:  # served merged; the adapter alone beside it, for export
            base = extra.get("adapter_base") or extra.get("parent") or ""
            lora.save_adapter(model, tmp / ADAPTER_DIR, base=str(Path(base).resolve()) if base else "")
            extra["lora"] = spec.to_dict()
        config = {**model.config.to_dict(), "scalar_head": model.scalar_head, "format": FORMAT, "extra": extra}
        _write_json(tmp / CONFIG, config)
        _write_json(tmp / GENERATION, {**GENERATION_DEFAULTS, **_stop_ids(tokenizer), **(generation or {})})
        if tokenizer is not None and hasattr(tokenizer, "save"):
            tokenizer.save(tmp)
        for path in tmp.rglob("*"):
            _fsync(path)
        _swap_into_place(tmp, directory)
    except (OSError, SafetensorError) as exc:  # safetensors reports a full disk as its own error, without errno
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"cannot save the model to {directory}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Transformer, dict[str, Any]]:
    """Load a model directory: (model in eval mode, metadata). Metadata holds the caller's `extra` keys plus
    "config" (the ModelConfig dict), "scalar_head" and "generation" (the sampling defaults)."""
    directory = Path(directory)
    raw = _read_json(directory / CONFIG)
    try:
        config = ModelConfig.from_dict(raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG}: not a valid model config: {exc}") from exc
    scalar_head = bool(raw.get("scalar_head", False))
    gen_path = directory / GENERATION
    generation = {**GENERATION_DEFAULTS, **(_read_json(gen_path) if gen_path.exists() else {})}
    with torch.device("meta"):
        model = Transformer(config, scalar_head=scalar_head)
    model.to_empty(device=device)
    _load_weights(model, directory / WEIGHTS, device)
    if dtype is not None:
        model.to(dtype=dtype)
    # rotary tables are not stored (and stay fp32 whatever dtype): rebuild them on the device
    model.rotary = RotaryEmbedding.from_config(config).to(device)
    model.eval()
    meta = {**raw.get("extra", {}), "config": config.to_dict(), "scalar_head": scalar_head, "generation": generation}
    return model, meta


def load_checkpoint_metadata(directory: str | Path) -> dict[str, Any]:
    """The caller metadata (`extra`) of a model directory, without reading its weights."""
    return dict(_read_json(Path(directory) / CONFIG).get("extra", {}))


def unwrap(model: Any) -> Transformer:
    """The Transformer inside a torch.compile and/or DistributedDataParallel wrapper."""
    while not isinstance(model, Transformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected an ml.model.Transformer, got {type(model).__name__}")
        model = inner
    return model


def _weights_to_store(model: Transformer) -> dict[str, torch.Tensor]:
    """The state dict with LoRA adapters folded in and a tied lm_head dropped (safetensors refuses shared storage),
    contiguous, on CPU."""
    state = lora.merged_state_dict(model)
    if not model.scalar_head and model.lm_head.weight is model.embed_tokens.weight:
        state.pop("lm_head.weight")
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _load_weights(model: Transformer, path: Path, device: str | torch.device) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing weights file")
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: unreadable weights: {exc}") from exc
    tied = not model.scalar_head and model.config.tie_embeddings
    if tied:  # to_empty() does not keep parameters shared
        model.lm_head.weight = model.embed_tokens.weight
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    if missing := expected - state.keys():
        raise CheckpointError(f"{path}: missing tensors {sorted(missing)[:5]}")
    if unexpected := state.keys() - expected:
        raise CheckpointError(f"{path}: unexpected tensors {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch with config.json
        raise CheckpointError(f"{path}: weights do not fit config.json: {exc}") from exc


def _swap_into_place(tmp: Path, directory: Path) -> None:
    """Move tmp to directory; keep files of the old directory that the new checkpoint does not write."""
    if not directory.exists():
        os.replace(tmp, directory)
    else:
        for entry in directory.iterdir():
            if not (tmp / entry.name).exists():
                os.replace(entry, tmp / entry.name)
        old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, old / "ckpt")
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(directory.parent)


def _stop_ids(tokenizer: Any) -> dict[str, Any]:
    """Default stop tokens from a duck-typed tokenizer's end-of-turn / end-of-text ids, if it has them."""
    ids = {getattr(tokenizer, name, None) for name in ("end_id", "eos_id")} - {None}
    return {"stop_token_ids": sorted(ids)} if ids else {}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing (not a model directory?)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def _fsync(path: Path) -> None:
    """Flush a file (or a directory entry) to disk so a crash after the rename cannot leave it empty."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
