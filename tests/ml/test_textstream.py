"""Incremental decoding gives only whole characters: multi-byte characters split across tokens wait for their last
byte, bytes that never make a character are dropped (never U+FFFD), and whole answers decode as `tokenizers` does."""

import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from ml.textstream import TextStream, byte_token_ids, decode_text
from ml.tokenizer import END, Tokenizer

TEXTS = ["Mira lives in Oslo.", "颜色 是 红色 🙂", "héllo wörld, 你好 😀", "What is 3 plus 4? It is 7."] * 20


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TEXTS, vocab_size=320)


def pushes(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.push(i) for i in ids]


def test_a_character_split_across_tokens_comes_out_whole_with_its_last_byte(tok: Tokenizer) -> None:
    text = "a颜🙂é!"
    ids = byte_token_ids(tok, text.encode())  # one token per byte: 1 + 3 + 4 + 2 + 1
    stream = TextStream(tok)
    assert pushes(stream, ids) == ["a", "", "", "颜", "", "", "", "🙂", "", "é", "!"]
    assert stream.flush() == ""


def test_bytes_that_never_make_a_character_are_dropped_not_replaced(tok: Tokenizer) -> None:
    broken = "🙂".encode()[:2] + b"!" + "色".encode()[1:] + b"ok" + "你".encode()[:2]
    ids = byte_token_ids(tok, broken)
    assert "\ufffd" in tok.decode(ids)  # what decoding the whole answer with `tokenizers` shows
    stream = TextStream(tok)
    shown = pushes(stream, ids)
    assert "".join(shown) == "!ok" and stream.flush() == ""  # the unfinished 你 at the end is dropped too
    assert decode_text(tok, ids) == "!ok"


def test_special_tokens_are_skipped_or_named(tok: Tokenizer) -> None:
    end = tok.token_to_id(END)
    ids = [*byte_token_ids(tok, "颜".encode()[:1]), end, *byte_token_ids(tok, "颜".encode()[1:])]
    assert decode_text(tok, ids) == "颜"  # a special token between a character's bytes takes nothing away
    assert decode_text(tok, [*tok.encode("hi"), end], skip_special=False) == "hi<|end|>"


def test_whole_answers_decode_as_tokenizers_does_less_its_replacement_characters(tok: Tokenizer) -> None:
    rng = random.Random(0)
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert decode_text(tok, ids) == tok.decode(ids) == text
    for _ in range(300):  # what a sampled model emits: any ids, often bytes of no character
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        for skip in (True, False):
            ours = decode_text(tok, ids, skip_special=skip)
            assert "\ufffd" not in ours
            assert ours == tok.decode(ids, skip_special=skip).replace("\ufffd", "")
            stream = TextStream(tok, skip)
            parts = [*pushes(stream, ids), stream.flush()]
            assert "".join(parts) == ours and all("\ufffd" not in p for p in parts)


def byte_fallback_tokenizer() -> Tokenizer:
    """A SentencePiece-style tokenizer (pieces plus <0xNN> byte tokens, decoded by ByteFallback): not byte-level, so
    it takes the window decoder."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({piece: 256 + i for i, piece in enumerate(["a", "b", "颜", "!"])})
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(hf)


def test_tokenizers_that_are_not_byte_level_are_decoded_by_windows() -> None:
    tok = byte_fallback_tokenizer()
    byte = [tok.token_to_id(f"<0x{b:02X}>") for b in "🙂".encode()]
    a, yan = tok.token_to_id("a"), tok.token_to_id("颜")
    stream = TextStream(tok)
    assert [stream.push(i) for i in [a, *byte, yan]] == ["a", "", "", "", "🙂", "颜"]
    assert stream.flush() == ""
    stream = TextStream(tok)
    assert [stream.push(i) for i in [a, *byte[:2]]] == ["a", "", ""]
    assert stream.flush() == ""  # an emoji cut off at the end: dropped
    assert decode_text(tok, [*byte[:2], a]) == "a"  # half an emoji, then a letter: no U+FFFD
