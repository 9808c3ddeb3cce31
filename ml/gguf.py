"""Import a GGUF file (llama.cpp's format) of a Llama or Qwen2 model into a Flywheel model directory, in fp32.

Small instruct models are often shared only as one quantized .gguf file. transformers already reads GGUF: it
dequantizes the Q4/Q8 blocks to floats, undoes llama.cpp's permutation of the q/k rows and rebuilds the tokenizer
(with its chat template) from the file's metadata. So we let it load the file, write what it loaded as a plain
Hugging Face directory, and import that with ml.hf like any other checkpoint. The imported model is exactly the
quantized one, dequantized: as good as the file, no better.

gguf, transformers and accelerate (which transformers requires for GGUF) are optional: `pip install
'flywheel[gguf]'`. Without them this module still imports, and using it raises one ImportError that says so.

Run (CPU, about half a minute for a 135M model):
    python -m ml.gguf path/to/model.gguf path/to/flywheel_model
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path

import torch

from ml.checkpoint import save_checkpoint
from ml.hf import import_hf
from ml.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")  # GGUF's general.architecture values that ml.hf can import
REQUIRED_PACKAGES = ("gguf", "transformers", "accelerate")
# Set by transformers on a GGUF-loaded config; meaningless (or refused) for the plain fp32 copy we write.
GGUF_ONLY_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


def require_gguf_support() -> None:
    """Raise a one-line ImportError naming the missing optional packages, if any."""
    missing = []
    for name in REQUIRED_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"importing a GGUF file needs {', '.join(missing)}: pip install 'flywheel[gguf]'")


def gguf_architecture(path: str | Path) -> str:
    """general.architecture from the file's header (a ValueError if it is not GGUF), without reading the weights."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ValueError(f"{path} has no general.architecture")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a GGUF file into a Hugging Face directory: config.json, model.safetensors, tokenizer files."""
    require_gguf_support()
    import transformers

    path, out = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    architecture = gguf_architecture(path)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {architecture!r}: expected one of {SUPPORTED_ARCHITECTURES}")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers refuses save_pretrained on a GGUF-loaded model: copy the weights into a plain model of its class
    config = {k: v for k, v in loaded.config.to_dict().items() if k not in GGUF_ONLY_CONFIG_KEYS}
    config["architectures"] = [type(loaded).__name__]
    with torch.device("meta"):  # no random init: every persistent tensor is assigned from the loaded model
        plain = type(loaded)(type(loaded.config).from_dict(config))
    state = {k: v.float() for k, v in loaded.state_dict().items()}  # fp32, whatever dtype transformers loaded in
    plain.load_state_dict(state, assign=True)
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    return out


def convert_gguf_to_checkpoint(gguf_path: str | Path, out_dir: str | Path, hf_dir: str | Path | None = None) -> Path:
    """A GGUF file -> a Flywheel model directory (fp32 weights, config, tokenizer with its chat template).

    The Hugging Face directory it goes through is temporary unless `hf_dir` says where to keep it.
    """
    path = Path(gguf_path)
    with tempfile.TemporaryDirectory(prefix="flywheel-gguf-") as tmp:
        hf = gguf_to_hf(path, hf_dir if hf_dir is not None else Path(tmp) / "hf")
        model, _ = import_hf(hf)
        tokenizer = Tokenizer.load(hf)  # fails here, not when serving, if Flywheel cannot read the tokenizer
        return save_checkpoint(out_dir, model, tokenizer=tokenizer, extra={"imported_from": str(path.resolve())})


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a Llama/Qwen2 GGUF file into a Flywheel model directory")
    parser.add_argument("src", help="a .gguf file")
    parser.add_argument("dst", help="the model directory to write")
    args = parser.parse_args()
    print(convert_gguf_to_checkpoint(args.src, args.dst))


if __name__ == "__main__":
    main()
