"""`flywheel model import-hf / export-hf / list / promote` on a tiny Llama that the test builds with transformers."""

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


def tiny_llama(path: Path) -> Path:
    torch.manual_seed(0)
    tokenizer = Tokenizer.train(TINY_TEXTS, vocab_size=300)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)  # fmt: skip
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


@pytest.mark.parametrize(("args", "message"), [
    (("model", "import-hf", "/nonexistent"), "not a Hugging Face checkpoint directory"),
    (("model", "export-hf", "/nonexistent", "/tmp/x"), "cannot export"),
    (("model", "promote", "99"), "model version 99 not found"),
])  # fmt: skip
def test_model_command_errors(tmp_path: Path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.setenv("FLYWHEEL_DATA_DIR", str(tmp_path / "data"))
    run(monkeypatch, capsys, "db", "upgrade")
    code, _, err = run(monkeypatch, capsys, *args)
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
