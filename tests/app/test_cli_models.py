"""`flywheel model import-hf / export-hf / list / promote` on a tiny Llama that the test builds with transformers, and
`import-hf` of a tiny Llama GGUF file that it writes with the gguf package."""

import io
import sys
from pathlib import Path

import pytest
import torch
import transformers

from app.cli import main
from ml.checkpoint import load_checkpoint
from ml.tokenizer import Tokenizer
from tests.factories import TINY_TEXTS
from tests.gguf_factory import write_tiny_llama_gguf


def tiny_llama(path: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(TINY_TEXTS, vocab_size=300)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save(path)  # tokenizer.json + tokenizer_config.json with its Jinja chat template
    return path


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_import_serve_and_export(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    assert run(monkeypatch, capsys, "db", "upgrade")[0] == 0
    src = tiny_llama(tmp_path / "llama")
    code, out, err = run(monkeypatch, capsys, "model", "import-hf", str(src), "--name", "tiny-llama", "--activate")
    assert code == 0, err
    assert "imported" in out and "(sft, active)" in out
    code, out, _ = run(monkeypatch, capsys, "model", "list")
    assert "tiny-llama\tsft\tactive" in out
    path = Path(out.split("\t")[-1].strip())
    ours, _ = load_checkpoint(path)
    assert Tokenizer.load(path).render_prompt([{"role": "user", "content": "Hi"}])  # chat template carried over

    hf = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert (ours(ids)[0] - hf(ids).logits).abs().max() < 1e-4

    code, out, err = run(monkeypatch, capsys, "model", "export-hf", str(path), str(tmp_path / "back"))
    assert code == 0, err
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_export_of_a_lora_model_merged_and_as_an_adapter_peft_loads(tmp_path: Path, monkeypatch, capsys) -> None:
    peft = pytest.importorskip("peft")
    from ml import lora
    from ml.checkpoint import save_checkpoint

    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    assert run(monkeypatch, capsys, "db", "upgrade")[0] == 0
    src = tiny_llama(tmp_path / "llama")
    assert run(monkeypatch, capsys, "model", "import-hf", str(src), "--out", str(tmp_path / "base"))[0] == 0
    model, _ = load_checkpoint(tmp_path / "base")
    torch.manual_seed(0)
    with torch.no_grad():  # what a LoRA job leaves: adapters that changed, saved beside the merged weights
        for p in lora.attach(model, lora.LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))):
            p.add_(0.05 * torch.randn_like(p))
    tuned = save_checkpoint(tmp_path / "tuned", model, Tokenizer.load(tmp_path / "base"), extra={"parent": "x"})
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        expected, _ = model(ids)

    code, out, err = run(
        monkeypatch,
        capsys,
        "model",
        "export-hf",
        str(tuned),
        str(tmp_path / "adapter"),
        "--adapter",
        "--base",
        str(src),
    )  # fmt: skip -- one command line
    assert code == 0 and "exported the LoRA adapter" in out, err
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(src), tmp_path / "adapter"
    ).eval()
    assert run(monkeypatch, capsys, "model", "export-hf", str(tuned), str(tmp_path / "merged"))[0] == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (with_adapter(ids).logits - expected).abs().max() < 1e-4
        assert (merged(ids).logits - expected).abs().max() < 1e-4
    code, _, err = run(
        monkeypatch, capsys, "model", "export-hf", str(tmp_path / "base"), str(tmp_path / "x"), "--adapter"
    )
    assert code != 0 and "not trained with LoRA" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("model", "import-hf", "/nonexistent"), "is neither a Hugging Face checkpoint directory"),
        (("model", "export-hf", "/nonexistent", "/tmp/x"), "cannot export"),
        (("model", "promote", "99"), "model version 99 not found"),
    ],
)
def test_model_command_errors(tmp_path: Path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    run(monkeypatch, capsys, "db", "upgrade")
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err


def test_import_a_gguf_file_and_chat_with_its_template(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install 'flywheel[gguf]')")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    assert run(monkeypatch, capsys, "db", "upgrade")[0] == 0
    src = write_tiny_llama_gguf(tmp_path / "tiny-chat.Q8.gguf")
    code, out, err = run(monkeypatch, capsys, "model", "import-hf", str(src), "--activate")
    assert code == 0, err
    assert "(sft, active)" in out
    code, out, _ = run(monkeypatch, capsys, "model", "list")
    assert "tiny-chat.Q8\tsft\tactive" in out
    path = Path(out.split("\t")[-1].strip())
    assert path.name == "gguf-tiny-chat.Q8"
    tokenizer = Tokenizer.load(path)
    prompt = tokenizer.decode(tokenizer.render_prompt([{"role": "user", "content": "Hi"}]))
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert load_checkpoint(path)[1]["generation"]["stop_token_ids"] == [tokenizer.token_to_id("<|im_end|>")]


def bad_gguf(tmp_path: Path, kind: str) -> Path:
    if kind == "missing":
        return tmp_path / "missing.gguf"
    if kind == "not gguf":
        (tmp_path / "text.gguf").write_text("hello\n")
        return tmp_path / "text.gguf"
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    return write_tiny_llama_gguf(tmp_path / "other.gguf", architecture="gpt2")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "no such GGUF file: "),
        ("not gguf", "cannot import {src}: GGUF magic invalid"),
        ("gpt2", "cannot import {src}: unsupported GGUF architecture 'gpt2'"),
    ],
)
def test_a_bad_gguf_file_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys, kind, message) -> None:
    pytest.importorskip("gguf", reason="the optional gguf package is not installed")
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    run(monkeypatch, capsys, "db", "upgrade")
    src = bad_gguf(tmp_path, kind)
    code, _, err = run(monkeypatch, capsys, "model", "import-hf", str(src))
    assert code == 1 and message.format(src=src) in err and len(err.strip().splitlines()) == 1, err


def test_without_the_gguf_package_import_says_what_to_install(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    run(monkeypatch, capsys, "db", "upgrade")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    code, _, err = run(monkeypatch, capsys, "model", "import-hf", str(tmp_path / "model.gguf"))
    assert code == 1 and err.startswith("flywheel: error: importing a GGUF file needs gguf") and err.count("\n") == 1
    assert err.endswith(": pip install 'flywheel[gguf]'\n")
