"""Packed pretraining windows (determinism, shift, held-out documents, DDP row slices) and reading user files."""

import json
import math
from collections import Counter

import pytest
import torch

from ml.data import PackedTokens, read_documents
from ml.demo.world import World
from ml.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return World(0).pretraining_corpus(300)


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    return Tokenizer.train(docs, vocab_size=500)


def test_windows_are_shifted_and_deterministic(docs, tok) -> None:
    data = PackedTokens(docs, tok, block_size=32, seed=3)
    x1, y1 = data.get_batch("train", 8, torch.Generator().manual_seed(5))
    x2, y2 = data.get_batch("train", 8, torch.Generator().manual_seed(5))
    assert x1.shape == y1.shape == (8, 32) and x1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    again = PackedTokens(docs, tok, block_size=32, seed=3)
    assert torch.equal(again.tokens["heldout"], data.tokens["heldout"])


def test_documents_are_framed_and_heldout_is_whole_documents(docs, tok) -> None:
    data = PackedTokens(docs, tok, block_size=16, heldout_fraction=0.1, seed=0)
    assert data.num_tokens("train") + data.num_tokens("heldout") == sum(len(tok.encode(d)) + 2 for d in docs)
    held = data.tokens["heldout"].tolist()
    assert held[0] == tok.bos_id and held[-1] == tok.eos_id
    assert held.count(tok.bos_id) == held.count(tok.eos_id) == 30  # 10% of 300 documents, none cut in two


def test_rank_rows_slice_the_global_batch(docs, tok) -> None:
    data = PackedTokens(docs, tok, block_size=16)
    full, _ = data.get_batch("train", 6, torch.Generator().manual_seed(1))
    half, _ = data.get_batch("train", 6, torch.Generator().manual_seed(1), rows=slice(3, 6))
    assert torch.equal(full[3:], half)


def test_unigram_entropy_matches_counts(docs, tok) -> None:
    data = PackedTokens(docs, tok, block_size=16)
    counts = Counter(data.tokens["train"].tolist())
    total = sum(counts.values())
    expected = -sum(c / total * math.log(c / total) for c in counts.values())
    assert data.unigram_entropy() == pytest.approx(expected, rel=1e-9)


def test_too_little_text_is_a_clear_error(tok) -> None:
    with pytest.raises(ValueError, match="block_size"):
        PackedTokens(["a b c", "d e f"], tok, block_size=64)
    with pytest.raises(ValueError, match="at least 2 documents"):
        PackedTokens(["one"], tok, block_size=4)


def test_read_documents_from_jsonl_text_and_folders(tmp_path) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "第二"}) + "\n")
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n\npara two\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert read_documents([tmp_path / "a.jsonl"]) == ["first", "第二"]
    assert read_documents([tmp_path / "b.txt"]) == ["para one\nstill one", "para two"]
    assert read_documents([tmp_path]) == ["first", "第二", "para one\nstill one", "para two"]


def test_read_documents_errors(tmp_path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_documents([bad])
    with pytest.raises(FileNotFoundError):
        read_documents([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        read_documents([tmp_path / "empty.txt"])
