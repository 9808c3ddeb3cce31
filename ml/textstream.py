"""Token ids to text that holds only whole characters, one token at a time: what streamed and stored answers go through.

A byte-level BPE token is a run of bytes, not of characters: "🙂" is four bytes that a model may emit as two or
four tokens, and a sampled model can emit bytes that never make a character at all (a lead byte followed by plain
text). Decoding each piece on its own, or the whole answer with the `tokenizers` library, turns such bytes into
U+FFFD "�". `TextStream` instead feeds each token's bytes to an incremental UTF-8 decoder that holds back the bytes of
a character until it is complete and drops bytes that cannot be part of one, so that what is streamed, and the
answer stored from it, never holds a broken character:

    stream = TextStream(tokenizer)
    text = "".join(stream.push(t) for t in ids) + stream.flush()   # == decode_text(tokenizer, ids)

Tokenizers whose decoder is not byte-level (SentencePiece-style imports) are decoded by windows of tokens instead:
the text of the tokens since the last whole character, held back while it ends in an incomplete character, with any
U+FFFD removed.

Run (CPU, instant): python -m ml.textstream
"""

from __future__ import annotations

import codecs
import functools
from collections.abc import Iterable

from ml.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character table (GPT-2's): printable Latin-1 bytes stand
    for themselves, the other bytes for the characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(decoder: dict | None) -> bool:
    if not decoder:
        return False
    if decoder.get("type") == "Sequence":
        return any(_is_byte_level(d) for d in decoder.get("decoders", []))
    return decoder.get("type") == "ByteLevel"


@functools.lru_cache(maxsize=8)
def _byte_tables(tokenizer: Tokenizer) -> tuple[list[bytes], list[bytes]] | None:
    """(bytes of each id with special tokens as their text, the same with special tokens as b""), or None when the
    tokenizer's decoder is not byte-level. A token whose characters all stand for bytes is those bytes; any other
    (an added token such as "<|end|>" written in other characters) is its own text, as the `tokenizers` decoder does."""
    spec = tokenizer.spec()
    if not _is_byte_level(spec.get("decoder")):
        return None
    to_byte = _unicode_to_byte()
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    plain, skipping = [], []
    for token_id in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(token_id) or ""
        bytewise = all(c in to_byte for c in token)
        data = bytes(to_byte[c] for c in token) if bytewise else token.encode("utf-8")
        plain.append(data)
        skipping.append(b"" if token_id in special else data)
    return plain, skipping


class TextStream:
    """Incremental decoding of one answer: `push` each generated token, then `flush` once at the end."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        tables = _byte_tables(tokenizer)
        self._bytes = None if tables is None else tables[1 if skip_special else 0]
        # errors="ignore": a byte that cannot belong to a character is dropped, never shown as U+FFFD
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self._tokens: list[int] = []  # the window decoder's tokens (tokenizers that are not byte-level)
        self._prefix = 0  # tokens[prefix:read] were decoded into the text already given out
        self._read = 0

    def push(self, token_id: int) -> str:
        """The whole characters that this token completes (often "", while a character is still incomplete)."""
        if self._bytes is not None:
            data = self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""
            return self._utf8.decode(data)
        self._tokens.append(token_id)
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if after.endswith(REPLACEMENT):
            return ""  # the newest bytes are the start of a character: wait for the rest of it
        new = after[len(before) :] if after.startswith(before) else after
        self._prefix, self._read = self._read, len(self._tokens)
        return new.replace(REPLACEMENT, "")

    def flush(self) -> str:
        """The end of the answer: bytes of a character that never completed are dropped."""
        if self._bytes is not None:
            return self._utf8.decode(b"", final=True)
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        self._prefix = self._read = len(self._tokens)
        return (after[len(before) :] if after.startswith(before) else "").replace(REPLACEMENT, "")

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=self.skip_special)


def warm(tokenizer: Tokenizer) -> None:
    """Build the tokenizer's byte tables now (while a model loads, off the event loop), not on its first answer."""
    _byte_tables(tokenizer)


def decode_text(tokenizer: Tokenizer, ids: Iterable[int], skip_special: bool = True) -> str:
    """The text of a whole answer with only whole characters, exactly as a TextStream gives it."""
    stream = TextStream(tokenizer, skip_special)
    return "".join(stream.push(i) for i in ids) + stream.flush()


def byte_token_ids(tokenizer: Tokenizer, data: bytes) -> list[int]:
    """The ids of single-byte tokens spelling `data` byte by byte (a byte-level tokenizer has one for every byte):
    how a model may emit a character in pieces."""
    to_char = {b: c for c, b in _unicode_to_byte().items()}
    return [tokenizer.token_to_id(to_char[b]) for b in data]


if __name__ == "__main__":
    tok = Tokenizer.train(["Mira lives in Oslo. 颜色 是 红色 🙂"] * 20, vocab_size=300)
    ids = byte_token_ids(tok, "🙂".encode()[:2] + b"!" + "色".encode())  # half an emoji, then whole characters
    stream = TextStream(tok)
    print("tokenizers:", repr(tok.decode(ids)), " textstream:", [stream.push(i) for i in ids], repr(stream.flush()))
