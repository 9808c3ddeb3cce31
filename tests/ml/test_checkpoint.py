"""ml.checkpoint: round trips, tied weights, atomic replacement, clear errors on damaged directories."""

import json
import re
from pathlib import Path

import pytest
import torch

from ml.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ml.model import ModelConfig, Transformer


def make_model(scalar_head: bool = False, **overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.tiny(vocab_size=61, n_embd=32, **overrides), scalar_head=scalar_head)
    model.init_weights(std=0.2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)  # norms and biases that are not their init values
    return model.eval()


class FakeTokenizer:
    """Duck-typed like ml.tokenizer.Tokenizer: save(directory) writes tokenizer.json; has end/eos ids."""

    end_id, eos_id = 5, 1

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save(self, directory: str | Path) -> None:
        if self.fail:
            raise OSError("disk full")
        (Path(directory) / "tokenizer.json").write_text('{"tok": 1}')


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(tie_embeddings=False), dict(qkv_bias=True), dict(scalar_head=True)], ids=str
)
def test_round_trip_gives_identical_outputs(tmp_path, kwargs) -> None:
    model = make_model(**kwargs)
    save_checkpoint(tmp_path / "m", model, tokenizer=FakeTokenizer(), extra={"kind": "sft", "step": 7})
    loaded, meta = load_checkpoint(tmp_path / "m")
    x = torch.randint(0, 61, (2, 9))
    assert torch.equal(model(x)[0], loaded(x)[0])
    assert not loaded.training
    assert meta["kind"] == "sft" and meta["step"] == 7 and meta["scalar_head"] == kwargs.get("scalar_head", False)
    assert meta["config"] == model.config.to_dict()
    assert meta["generation"]["stop_token_ids"] == [1, 5]
    assert (tmp_path / "m" / "tokenizer.json").read_text() == '{"tok": 1}'
    if not kwargs.get("scalar_head") and model.config.tie_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_generation_defaults_can_be_overridden_and_dtype_chosen(tmp_path) -> None:
    save_checkpoint(tmp_path / "m", make_model(), generation={"temperature": 0.7, "stop_token_ids": [3]})
    model, meta = load_checkpoint(tmp_path / "m", dtype=torch.bfloat16)
    assert meta["generation"]["temperature"] == 0.7 and meta["generation"]["stop_token_ids"] == [3]
    assert model.embed_tokens.weight.dtype == torch.bfloat16 and model.rotary.cos.dtype == torch.float32
    assert model(torch.tensor([[1, 2, 3]]))[0].dtype == torch.bfloat16


def test_overwrite_replaces_weights_and_keeps_other_files(tmp_path) -> None:
    save_checkpoint(tmp_path / "m", make_model())
    (tmp_path / "m" / "train_state.pt").write_bytes(b"optimizer")
    newer = make_model()
    with torch.no_grad():
        newer.norm.weight.fill_(2.0)
    save_checkpoint(tmp_path / "m", newer)
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert torch.equal(loaded.norm.weight, newer.norm.weight)
    assert (tmp_path / "m" / "train_state.pt").read_bytes() == b"optimizer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left behind


def test_failed_save_leaves_no_half_directory(tmp_path) -> None:
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "m", make_model(), tokenizer=FakeTokenizer(fail=True))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path) -> None:
    old = make_model()
    save_checkpoint(tmp_path / "m", old, extra={"v": 1})
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "m", make_model(tie_embeddings=False), tokenizer=FakeTokenizer(fail=True))
    loaded, meta = load_checkpoint(tmp_path / "m")
    assert meta["v"] == 1 and loaded.config.tie_embeddings
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_reserved_extra_keys_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path / "m", make_model(), extra={"config": 1})


def damage_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\x00garbage")


def truncate_weights(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def damage_config(d: Path) -> None:
    (d / "config.json").write_text("{not json")


def wrong_shape(d: Path) -> None:
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "n_embd": 64}))


def drop_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


@pytest.mark.parametrize(
    "damage,culprit",
    [
        (damage_weights, "model.safetensors"),
        (truncate_weights, "model.safetensors"),
        (damage_config, "config.json"),
        (wrong_shape, "model.safetensors"),
        (drop_weights, "model.safetensors"),
    ],
)
def test_damaged_directory_raises_checkpoint_error_naming_the_file(tmp_path, damage, culprit) -> None:
    save_checkpoint(tmp_path / "m", make_model())
    damage(tmp_path / "m")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "m" / culprit))):
        load_checkpoint(tmp_path / "m")


def test_missing_directory_raises_checkpoint_error(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_checkpoint(tmp_path / "nothing")
    assert issubclass(CheckpointError, ValueError)


def test_compiled_or_wrapped_models_are_unwrapped(tmp_path) -> None:
    model = make_model()
    wrapper = torch.nn.Module()
    wrapper.module = model  # what DistributedDataParallel looks like
    save_checkpoint(tmp_path / "m", wrapper)
    loaded, _ = load_checkpoint(tmp_path / "m")
    assert torch.equal(loaded.norm.weight, model.norm.weight)
