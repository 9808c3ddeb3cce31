"""ml.gguf: a tiny random Llama (and Qwen2) written as GGUF imports with transformers' logits and chat prompts; bad
files and a missing `gguf` package are one-line errors."""

import sys
from pathlib import Path

import pytest
import torch

from ml.checkpoint import load_checkpoint
from ml.gguf import convert_gguf_to_checkpoint, gguf_to_hf
from ml.tokenizer import Tokenizer
from tests.gguf_factory import write_tiny_llama_gguf

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does Mira live?"},
    {"role": "assistant", "content": "In Oslo."},
    {"role": "user", "content": "And what is 3 plus 4?"},
]


def needs_gguf() -> None:
    pytest.importorskip("gguf", reason="the optional gguf package is not installed (pip install 'flywheel[gguf]')")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_a_gguf_model_imports_with_the_logits_and_chat_prompt_of_transformers(tmp_path: Path, architecture) -> None:
    needs_gguf()
    import transformers

    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf", architecture=architecture)
    out = convert_gguf_to_checkpoint(src, tmp_path / "model")
    ours, meta = load_checkpoint(out)
    assert meta["imported_from"] == str(src.resolve()) and meta["config"]["qkv_bias"] == (architecture == "qwen2")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=src.name)

    tokenizer = Tokenizer.load(out)
    prompt = tokenizer.render_prompt(CHAT)
    assert prompt == list(their_tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)["input_ids"])
    assert tokenizer.stop_token_ids == [their_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        assert (ours(ids)[0] - theirs(ids).logits).abs().max() <= 1e-4


def test_the_hf_directory_loads_in_plain_transformers(tmp_path: Path) -> None:
    needs_gguf()
    import transformers

    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    hf_dir = gguf_to_hf(src, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf_dir.iterdir()
    }
    plain = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name).eval()
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, theirs(ids).logits)


def test_an_unsupported_architecture_is_refused_before_the_weights_are_read(tmp_path: Path) -> None:
    needs_gguf()
    src = write_tiny_llama_gguf(tmp_path / "tiny.gguf", architecture="gpt2")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        convert_gguf_to_checkpoint(src, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_file_that_is_not_gguf_is_a_value_error(tmp_path: Path) -> None:
    needs_gguf()
    (tmp_path / "fake.gguf").write_text("not a model\n")
    with pytest.raises(ValueError, match="GGUF magic"):
        convert_gguf_to_checkpoint(tmp_path / "fake.gguf", tmp_path / "model")


def test_without_the_gguf_package_the_error_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ImportError) as info:
        convert_gguf_to_checkpoint(tmp_path / "any.gguf", tmp_path / "model")
    message = str(info.value)  # "needs gguf, accelerate: ..." where accelerate is missing too
    assert message.startswith("importing a GGUF file needs gguf") and message.endswith(": pip install 'flywheel[gguf]'")
    assert "\n" not in message
