"""`flywheel model …`: import a Hugging Face or GGUF checkpoint, export one, list and promote versions."""

import argparse
import json
import shutil
from pathlib import Path

from app.cli.common import CLIError, add, group, session_factory
from app.db import transaction
from app.models import ModelKind
from app.services import model_versions
from app.services.training_data import TrainingData
from app.settings import Settings


def cmd_model_import(args: argparse.Namespace, settings: Settings) -> None:
    """Convert a Hugging Face checkpoint directory, or a .gguf file, into a model directory and register it
    (optionally active)."""
    from pathlib import Path

    src = Path(args.src)
    is_gguf = src.suffix.lower() == ".gguf"
    if is_gguf and not src.is_file():
        raise CLIError(f"no such GGUF file: {src}")
    if not is_gguf and not (src / "config.json").is_file():
        raise CLIError(f"{src} is neither a Hugging Face checkpoint directory (no config.json) nor a .gguf file")
    name = args.name or (src.stem if is_gguf else src.resolve().name)
    out = Path(args.out) if args.out else settings.data_dir / "models" / f"{'gguf' if is_gguf else 'hf'}-{name}"
    try:
        if is_gguf:
            from ml.gguf import convert_gguf_to_checkpoint

            convert_gguf_to_checkpoint(src, out)
        else:
            from ml.hf import convert_hf_to_checkpoint

            convert_hf_to_checkpoint(src, out)
    except ImportError as exc:  # the optional GGUF packages; the message says what to install
        raise CLIError(str(exc)) from exc
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:  # NotImplemented: a GGUF quantization type
        raise CLIError(f"cannot import {src}: {exc}") from exc
    with transaction(session_factory(settings)) as session:
        version = model_versions.register(
            session,
            name=name,
            kind=ModelKind(args.kind),
            path=str(out.resolve()),
            training_data=TrainingData(imported_from=str(src.resolve())),
            activate=args.activate,
        )
        print(f"imported {src} as model version {version.id} ({version.kind.value}, {version.status.value}) at {out}")


def cmd_model_export(args: argparse.Namespace, settings: Settings) -> None:
    from ml.checkpoint import CheckpointError, load_checkpoint
    from ml.hf import export_hf

    try:
        if args.adapter:
            print(f"exported the LoRA adapter to {_export_adapter(Path(args.src), Path(args.dst), args.base)}")
            return
        model, _ = load_checkpoint(args.src)
        print(f"exported to {export_hf(model, args.dst, tokenizer_dir=args.src)}")
    except (CheckpointError, ValueError, OSError) as exc:
        raise CLIError(f"cannot export {args.src}: {exc}") from exc


def _export_adapter(src: Path, dst: Path, base: str | None) -> Path:
    """Copy a LoRA-trained model's adapter (PEFT layout) to `dst`, naming `base` (an HF directory or hub id of the
    frozen base, e.g. that base exported with export-hf) as the model PEFT should load it onto."""
    from ml.checkpoint import ADAPTER_DIR
    from ml.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    adapter = src / ADAPTER_DIR
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ValueError("it was not trained with LoRA (no adapter/ inside): export the whole model without --adapter")
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(adapter / ADAPTER_WEIGHTS, dst / ADAPTER_WEIGHTS)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    if base:
        config["base_model_name_or_path"] = base
    (dst / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return dst


def cmd_model_list(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        for v in model_versions.list_versions(session):
            print(f"{v.id}\t{v.name}\t{v.kind.value}\t{v.status.value}\t{v.path}")


def cmd_model_promote(args: argparse.Namespace, settings: Settings) -> None:
    with transaction(session_factory(settings)) as session:
        version = model_versions.promote(session, version_id=args.id)
        print(f"{version.name} is the active {version.kind.value} model")


def register(groups) -> None:
    model_cmds = group(groups, "model", "model versions")
    imp = add(model_cmds, "import-hf", cmd_model_import, "import a Hugging Face checkpoint directory or a .gguf file")
    imp.add_argument(
        "src",
        help="a directory with config.json, safetensors (or .bin) weights and tokenizer files of a Llama (incl. 3.x "
        "rope scaling; SmolLM2), Mistral, Qwen2/2.5, Qwen3 or SmolLM3 checkpoint, "
        "or a Llama/Qwen2 .gguf file (dequantized to fp32; needs pip install 'flywheel[gguf]')",
    )
    imp.add_argument("--out", help="where to write the model directory (default: under the data directory)")
    imp.add_argument("--name", help="the model version's name (default: the directory's or file's name)")
    imp.add_argument("--kind", choices=[k.value for k in ModelKind], default=ModelKind.sft.value)
    imp.add_argument("--activate", action="store_true", help="make it the active model of its kind (served if sft)")
    exp = add(model_cmds, "export-hf", cmd_model_export, "export a model directory in its family's HF layout")
    exp.add_argument("src", help="a Flywheel model directory")
    exp.add_argument("dst", help="the Hugging Face directory to write (transformers and vLLM load it)")
    exp.add_argument(
        "--adapter",
        action="store_true",
        help="export only the LoRA adapter of a model trained with lora (PEFT's layout: adapter_config.json + "
        "adapter_model.safetensors); without it the whole model is exported with the adapter merged in",
    )
    exp.add_argument("--base", help="with --adapter: the HF directory or hub id of the base to record in it")
    add(model_cmds, "list", cmd_model_list, "list model versions")
    add(model_cmds, "promote", cmd_model_promote, "make a version the active one of its kind").add_argument(
        "id", type=int
    )
