"""Datasets: packed token windows for pretraining, and a reader for the user's own text files.

Pretraining text is a list of documents. Each is encoded as <|bos|> text <|eos|>, the documents are concatenated
into one stream per split, and a batch is `batch_size` random windows of block_size + 1 tokens: x = window[:-1],
y = window[1:]. Sampling uses only the torch.Generator it is given, so a run is reproducible from its seed and
resumable from the generator's state.

Held-out data is a fixed fraction of whole documents (chosen by seed), never the tail of a document seen in training.

(Issue 4 adds SFT examples with assistant masks and preference pairs here, beside PackedTokens.)

Run (CPU, seconds): python -m ml.data
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ml.tokenizer import Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


class PackedTokens:
    """Documents -> two token streams (train, heldout) -> random (x, y) windows."""

    def __init__(
        self,
        documents: Sequence[str],
        tokenizer: Tokenizer,
        block_size: int,
        heldout_fraction: float = 0.05,
        seed: int = 0,
    ) -> None:
        if len(documents) < 2:
            raise ValueError(f"need at least 2 documents to hold some out, got {len(documents)}")
        self.block_size = block_size
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        n_heldout = max(1, round(len(documents) * heldout_fraction))
        splits = {"heldout": order[:n_heldout], "train": order[n_heldout:]}
        self.tokens = {name: self._encode([documents[i] for i in idx], tokenizer) for name, idx in splits.items()}
        for name, stream in self.tokens.items():
            if len(stream) < block_size + 1:
                raise ValueError(
                    f"the {name} split has {len(stream)} tokens, fewer than block_size + 1 = {block_size + 1}; "
                    "give more text or a smaller --block-size"
                )

    @staticmethod
    def _encode(documents: list[str], tokenizer: Tokenizer) -> torch.Tensor:
        ids: list[int] = []
        for doc in tokenizer.encode_batch(documents):
            ids += (
                [tokenizer.bos_id, *doc, tokenizer.eos_id] if tokenizer.bos_id is not None else [*doc, tokenizer.eos_id]
            )
        return torch.tensor(ids, dtype=torch.int32)  # int32 halves the memory of a large corpus

    def num_tokens(self, split: str) -> int:
        return len(self.tokens[split])

    def get_batch(
        self, split: str, batch_size: int, generator: torch.Generator, rows: slice | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows -> x, y of shape (batch_size, block_size), int64.

        `rows` selects a slice of the batch (a DDP rank's share): every rank draws the same global batch from an
        identically seeded generator and keeps its own rows, so N ranks see exactly what one process would.
        """
        stream = self.tokens[split]
        starts = torch.randint(0, len(stream) - self.block_size, (batch_size,), generator=generator)
        if rows is not None:
            starts = starts[rows]
        offsets = torch.arange(self.block_size + 1)
        windows = stream[starts[:, None] + offsets].long()  # (B, block_size + 1)
        return windows[:, :-1], windows[:, 1:]

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy in nats of the split's token frequencies: the loss of a model that ignores context."""
        counts = torch.bincount(self.tokens[split].long()).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


OnBad = Callable[[str, str, str], None]  # (reason, where, message) of a line left out: ml.screen.Screened.skip


def read_documents(paths: Sequence[str | Path], on_bad: OnBad | None = None) -> list[str]:
    """Documents from the user's files: JSONL gives one per line (its "text" field); text files one per paragraph
    (blank-line separated). A directory is read recursively (*.jsonl and text files). A bad JSONL line is an error,
    or with `on_bad` skipped and told to it (as is an empty "text")."""
    documents: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such file or directory: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            if file.suffix == ".jsonl":
                documents += _read_jsonl(file, on_bad)
            elif file.suffix in TEXT_SUFFIXES or not path.is_dir():
                text = file.read_text(encoding="utf-8")
                documents += [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]
    if not documents and on_bad is None:  # with on_bad, the caller says why nothing is left (ml.screen)
        raise ValueError(f"no text found in {', '.join(map(str, paths))}")
    return documents


def _read_jsonl(file: Path, on_bad: OnBad | None = None) -> list[str]:
    documents = []
    with file.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where, problem = f"{file}:{number}", None
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                text, problem = None, ("malformed", f'expected a JSON object with a "text" string ({e})')
            if problem is None and not isinstance(text, str):
                problem = ("non_text", '"text" must be a string')
            if problem is not None:
                if on_bad is None:
                    raise ValueError(f"{where}: {problem[1]}")
                on_bad(problem[0], where, f"{where}: {problem[1]}")
            elif text.strip():
                documents.append(text)
            elif on_bad is not None:
                on_bad("empty", where, f'{where}: "text" is empty')
    return documents


if __name__ == "__main__":
    from ml.demo.world import World

    docs = World(seed=0).pretraining_corpus(500)
    tok = Tokenizer.train(docs, vocab_size=512)
    data = PackedTokens(docs, tok, block_size=32)
    x, y = data.get_batch("train", 2, torch.Generator().manual_seed(0))
    print("train tokens", data.num_tokens("train"), "heldout tokens", data.num_tokens("heldout"))
    print(
        "unigram entropy (nats)", round(data.unigram_entropy(), 3), "vs log(vocab)", round(math.log(tok.vocab_size), 3)
    )
    print(repr(tok.decode(x[0].tolist())))
