"""Training records for the alignment stages, checked on the way in, and their tokenisation into tensors.

Four kinds of record, each read from JSONL files (one JSON object a line) or given as Python objects:

    dialogue  {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    ranking   {"prompt": [...messages] or "text", "answers": ["A", "B", "C"], "ranking": [2, 1, 2]}
              ranking[i] is answer i's rank, 1 = best, equal ranks = a tie; or instead "order": [1, [0, 2]],
              the answers' indices best to worst, a nested list being a tie. Every answer must be placed once.
    thumb     {"prompt": [...] or "text", "completion": "Hello!", "label": true}  (true/false, 1/-1, "up"/"down");
              the completion may also be one assistant message, [{"role": "assistant", "content": "Hello!"}]
              (TRL's conversational format, which `flywheel export thumbs` writes)
    prompt    {"prompt": [...] or "text"} or {"messages": [...]}: a conversation ending with a user turn, for RL

A bad record is an error naming it (`file.jsonl:12: ...` or `ranking #3: ...`), a `RecordError` that carries its
reason (`malformed`, `empty`, ...): `load_*` stop at the first; `ml.screen` skips them and counts them by reason, which
is what the trainers use. Nothing is skipped silently, since a silently shrunken data set trains a worse model with no
sign of why.

Tokenised, a dialogue is (ids, assistant mask) through the tokenizer's chat format; `SFTData` batches them padded or
packed (packed rows carry `doc_ids`, so the model never lets one example attend to another). A prompt + answer is
one conversation whose final assistant turn is the answer: rewards are read at its last token, DPO sums the
log-probs of its answer tokens.

Run (CPU, seconds): python -m ml.examples
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ml.tokenizer import Tokenizer

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
IGNORE = -100  # target id that cross-entropy skips


class RecordError(ValueError):
    """A record a stage cannot use, with why (a key of ml.screen.REASONS), so a screen can count it by reason."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Dialogue:
    messages: list[Message]
    where: str


@dataclass(frozen=True)
class Ranking:
    prompt: list[Message]
    answers: list[str]
    ranks: list[int]  # ranks[i] is answers[i]'s rank; 1 = best; equal = tie
    where: str


@dataclass(frozen=True)
class Thumb:
    prompt: list[Message]
    completion: str
    label: bool  # True = thumbs up
    where: str


@dataclass(frozen=True)
class PromptExample:
    messages: list[Message]
    where: str


# ------------------------------------------------------------------------------------------------------- reading


class InvalidJSON(str):
    """What a lenient read yields for a line that is not JSON: the parse error, for the record's parser to reject."""


def records(items: Any, kind: str, lenient: bool = False) -> Iterator[tuple[Any, str]]:
    """(object, where) pairs: a str or Path is a JSONL file ("file:line"); anything else is a record ("kind #i").
    `lenient`: a line that is not JSON comes as an InvalidJSON and an empty file as nothing, instead of an error."""
    if isinstance(items, (str, Path)):
        items = [items]
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            yield from _read_jsonl(Path(item), lenient)
        else:
            yield item, f"{kind} #{i}"


def _read_jsonl(path: Path, lenient: bool = False) -> Iterator[tuple[Any, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    found = False
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if not lenient:
                    raise ValueError(f"{path}:{number}: invalid JSON ({e})") from None
                obj = InvalidJSON(f"invalid JSON ({e})")
            found = True
            yield obj, f"{path}:{number}"
    if not found and not lenient:
        raise ValueError(f"{path}: no records")


def _load(items: Any, kind: str, parse: Any, record_type: type) -> list:
    out = [obj if isinstance(obj, record_type) else parse(obj, where) for obj, where in records(items, kind)]
    if not out:
        raise ValueError(f"no {kind} records given")
    return out


def load_dialogues(items: Any) -> list[Dialogue]:
    """Dialogues from JSONL paths and/or objects ({"messages": [...]} or a bare list of messages)."""
    return _load(items, "dialogue", parse_dialogue, Dialogue)


def load_rankings(items: Any) -> list[Ranking]:
    return _load(items, "ranking", parse_ranking, Ranking)


def load_thumbs(items: Any) -> list[Thumb]:
    return _load(items, "thumb", parse_thumb, Thumb)


def load_prompts(items: Any) -> list[PromptExample]:
    """RL prompts from JSONL paths and/or objects (dicts, lists of messages, or anything with `.messages`)."""
    return _load(items, "prompt", parse_prompt, PromptExample)


# ------------------------------------------------------------------------------------------------------ parsing


def parse_messages(value: Any, where: str, field: str = "messages") -> list[Message]:
    """A non-empty list of {"role", "content"}; a plain string is one user message."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        reason = "empty" if value in ([], "") else "malformed"
        raise RecordError(f"{where}: {field!r} must be a non-empty list of messages", reason)
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            reason = "malformed" if not isinstance(m, dict) else "wrong_roles" if m.get("role") not in ROLES else ""
            raise RecordError(
                f"{where}: {field}[{i}] needs role in {list(ROLES)} and string content, got {m!r}",
                reason or "non_text",
            )
        messages.append({"role": m["role"], "content": m["content"]})
    return messages


def _prompt(obj: dict, where: str, key: str = "prompt") -> list[Message]:
    if key not in obj:
        raise RecordError(f"{where}: missing {key!r}")
    prompt = parse_messages(obj[key], where, key)
    if prompt[-1]["role"] != "user":
        raise RecordError(f"{where}: the {key} must end with a user message, not {prompt[-1]['role']!r}", "wrong_roles")
    return prompt


def _object(obj: Any, where: str, kind: str) -> dict:
    if isinstance(obj, InvalidJSON):
        raise RecordError(f"{where}: {obj}")
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: a {kind} must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_dialogue(obj: Any, where: str) -> Dialogue:
    messages = parse_messages(obj if isinstance(obj, list) else _object(obj, where, "dialogue").get("messages"), where)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise RecordError(
            f"{where}: the dialogue has no assistant turn, so there is nothing to learn from", "no_answer"
        )
    for i in turns:
        if not messages[i]["content"].strip():
            raise RecordError(f"{where}: messages[{i}] is an empty assistant answer", "empty")
    return Dialogue(messages, where)


def parse_ranking(obj: Any, where: str) -> Ranking:
    obj = _object(obj, where, "ranking")
    prompt = _prompt(obj, where)
    answers = obj.get("answers", obj.get("candidates"))
    if not isinstance(answers, list) or len(answers) < 2:
        raise RecordError(f"{where}: 'answers' must be a list of at least 2 answers")
    for i, a in enumerate(answers):
        if not isinstance(a, str) or not a.strip():
            raise RecordError(f"{where}: answer {i} is empty or not a string", "empty" if a == "" else "non_text")
    if ("ranking" in obj) == ("order" in obj):
        raise RecordError(
            f"{where}: give exactly one of 'ranking' (a rank per answer) or 'order' (indices, best first)"
        )
    ranks = (
        _ranks(obj["ranking"], len(answers), where) if "ranking" in obj else _order(obj["order"], len(answers), where)
    )
    return Ranking(prompt, [str(a) for a in answers], ranks, where)


def _ranks(ranking: Any, k: int, where: str) -> list[int]:
    if not isinstance(ranking, list) or any(type(r) is not int or r < 1 for r in ranking):
        raise RecordError(f"{where}: 'ranking' must be a list of integer ranks >= 1 (1 = best)")
    if len(ranking) != k:
        raise RecordError(f"{where}: missing or extra candidates: {k} answers but {len(ranking)} ranks")
    return list(ranking)


def _order(order: Any, k: int, where: str) -> list[int]:
    """Indices best to worst (a nested list is a tie) -> rank per answer. Each answer exactly once."""
    if not isinstance(order, list):
        raise RecordError(f"{where}: 'order' must be a list of answer indices, best first")
    ranks = [0] * k
    for rank, group in enumerate(order, 1):
        for i in group if isinstance(group, list) else [group]:
            if type(i) is not int or not 0 <= i < k:
                raise RecordError(f"{where}: 'order' holds {i!r}, not an answer index in 0..{k - 1}")
            if ranks[i]:
                raise RecordError(f"{where}: duplicate candidate: answer {i} is placed twice")
            ranks[i] = rank
    if missing := [i for i, r in enumerate(ranks) if not r]:
        raise RecordError(f"{where}: missing candidates: answers {missing} are not placed")
    return ranks


def parse_thumb(obj: Any, where: str) -> Thumb:
    obj = _object(obj, where, "thumb")
    prompt = _prompt(obj, where)
    completion = _answer_text(obj.get("completion", obj.get("answer")))
    if not isinstance(completion, str) or not completion.strip():
        reason = "empty" if isinstance(completion, str) or completion is None else "non_text"
        raise RecordError(f"{where}: 'completion' is empty or not a string (or one assistant message)", reason)
    label = obj.get("label")
    if isinstance(label, bool):
        up = label
    elif (type(label) is int and label in (1, -1)) or label in ("up", "down"):
        up = label in (1, "up")
    else:
        raise RecordError(f"{where}: 'label' must be true/false, 1/-1 or 'up'/'down', got {label!r}")
    return Thumb(prompt, completion, up, where)


def _answer_text(value: Any) -> Any:
    """A completion given as one assistant message -> its content; anything else as it is (checked by the caller)."""
    one_message = isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict)
    return value[0].get("content") if one_message and value[0].get("role") == "assistant" else value


def parse_prompt(obj: Any, where: str) -> PromptExample:
    if hasattr(obj, "messages") and not isinstance(obj, dict):  # e.g. ml.demo.world.Prompt
        obj = {"messages": obj.messages}
    if isinstance(obj, list):
        obj = {"messages": obj}
    obj = _object(obj, where, "prompt")
    return PromptExample(_prompt(obj, where, "prompt" if "prompt" in obj else "messages"), where)


def thumb_rankings(thumbs: Iterable[Thumb]) -> list[Ranking]:
    """A prompt with both up and down answers gives a ranking: every up beats every down. An answer thumbed both up
    and down (by different people) is left out of it."""
    groups: dict[str, list[Thumb]] = {}
    for t in thumbs:
        groups.setdefault(json.dumps(t.prompt, sort_keys=True), []).append(t)
    out = []
    for group in groups.values():
        ups = {t.completion for t in group if t.label}
        downs = {t.completion for t in group if not t.label}
        ups, downs = sorted(ups - downs), sorted(downs - ups)
        if ups and downs:
            out.append(Ranking(group[0].prompt, ups + downs, [1] * len(ups) + [2] * len(downs), group[0].where))
    return out


def preference_pairs(rankings: Iterable[Ranking]) -> list[tuple[list[Message], str, str]]:
    """Every ordered pair of every ranking as (prompt, chosen, rejected); ties give none."""
    return [
        (r.prompt, r.answers[i], r.answers[j])
        for r in rankings
        for i in range(len(r.answers))
        for j in range(len(r.answers))
        if r.ranks[i] < r.ranks[j]
    ]


def describe_sources(items: Any) -> list[str]:
    """Sources as JSON-safe strings for a checkpoint's metadata: paths as given, in-memory records as a count."""
    items = [items] if isinstance(items, (str, Path)) else list(items)
    paths = [str(i) for i in items if isinstance(i, (str, Path))]
    records = len(items) - len(paths)
    return paths + ([f"<{records} in-memory records>"] if records else [])


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, heldout): a seed-shuffled `fraction` held out (at least one when fraction > 0 and there are 2+)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = min(len(items) - 1, max(1, round(len(items) * fraction))) if fraction > 0 and len(items) > 1 else 0
    return [items[i] for i in order[n:]], [items[i] for i in order[:n]]


# ------------------------------------------------------------------------------------------------- SFT tensors


def tokenize_dialogue(tokenizer: Tokenizer, dialogue: Dialogue, max_len: int) -> tuple[Tensor, Tensor]:
    """(x, y) of one dialogue, each (L,) with L <= max_len: y is x shifted by one, IGNORE where not assistant."""
    ids, mask = tokenizer.render_conversation(dialogue.messages)
    ids, mask = ids[: max_len + 1], mask[: max_len + 1]
    if not any(mask[1:]):
        raise ValueError(f"{dialogue.where}: no assistant token within the first {max_len} tokens (raise max_len)")
    x = torch.tensor(ids[:-1], dtype=torch.long)
    y = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:], strict=True)], dtype=torch.long)
    return x, y


def pad_examples(examples: list[tuple[Tensor, Tensor]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest: x (B, T) with pad_id, y (B, T) with IGNORE. Causal attention never looks right,
    so real tokens cannot see the padding and no attention mask is needed."""
    T = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, (xi, yi) in enumerate(examples):
        x[i, : len(xi)], y[i, : len(yi)] = xi, yi
    return {"x": x, "y": y}


def pack_examples(examples: list[tuple[Tensor, Tensor]], block_size: int, pad_id: int) -> dict[str, Tensor]:
    """Pack examples in order into rows of block_size tokens (a new row when the next does not fit).
    Returns x, y, doc_ids, each (rows, block_size); doc_ids number the examples of a row (padding gets its own)."""
    rows: list[list[tuple[Tensor, Tensor]]] = [[]]
    used = 0
    for x, y in examples:
        if len(x) > block_size:
            raise ValueError(f"an example of {len(x)} tokens does not fit a packed row of {block_size}")
        if used + len(x) > block_size:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    X = torch.full((len(rows), block_size), pad_id, dtype=torch.long)
    Y = torch.full((len(rows), block_size), IGNORE, dtype=torch.long)
    D = torch.zeros((len(rows), block_size), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for doc, (x, y) in enumerate(row):
            X[r, at : at + len(x)], Y[r, at : at + len(x)], D[r, at : at + len(x)] = x, y, doc
            at += len(x)
        D[r, at:] = len(row)
    return {"x": X, "y": Y, "doc_ids": D}


class SFTData:
    """Dialogues -> tokenised train / held-out examples -> random batches (padded, or rows of packed examples)."""

    def __init__(
        self,
        dialogues: list[Dialogue],
        tokenizer: Tokenizer,
        max_len: int,
        heldout_fraction: float = 0.05,
        seed: int = 0,
        packing: bool = False,
    ) -> None:
        if len(dialogues) < 2:
            raise ValueError(f"need at least 2 dialogues to hold one out, got {len(dialogues)}")
        self.packing, self.pad_id, self.max_len = packing, int(tokenizer.pad_id or 0), max_len
        train, heldout = split_heldout(dialogues, heldout_fraction, seed)
        self.examples = {
            "train": [tokenize_dialogue(tokenizer, d, max_len) for d in train],
            "heldout": [tokenize_dialogue(tokenizer, d, max_len) for d in heldout],
        }
        if packing:
            self.packed = {k: pack_examples(v, max_len, self.pad_id) for k, v in self.examples.items()}

    def num_rows(self, split: str) -> int:
        return len(self.packed[split]["x"]) if self.packing else len(self.examples[split])

    def assistant_tokens(self, split: str) -> int:
        return sum(int((y != IGNORE).sum()) for _, y in self.examples[split])

    def get_batch(
        self, split: str, batch_size: int, generator: torch.Generator, rows: slice | None = None
    ) -> dict[str, Tensor]:
        """`batch_size` random rows (with replacement); `rows` keeps a DDP rank's share of the same global draw."""
        picks = torch.randint(0, self.num_rows(split), (batch_size,), generator=generator)
        if rows is not None:
            picks = picks[rows]
        if self.packing:
            return {k: v[picks] for k, v in self.packed[split].items()}
        return pad_examples([self.examples[split][i] for i in picks.tolist()], self.pad_id)


# ----------------------------------------------------------------------------------------- scored answers


def encode_answer(
    tokenizer: Tokenizer, prompt: list[Message], answer: str, max_len: int
) -> tuple[list[int], list[int]]:
    """Ids of prompt + answer as one conversation and a 0/1 mask of the answer's own tokens (its closing turn end
    included). Too long: the oldest tokens are cut, since the answer's end is where it is scored."""
    ids, mask = tokenizer.render_conversation([*prompt, {"role": "assistant", "content": answer}])
    start = answer_start(mask)
    mask = [0] * start + mask[start:]
    return ids[-max_len:], mask[-max_len:]


def answer_start(mask: list[int]) -> int:
    """Where the final assistant turn begins in a conversation's assistant mask (the last run of 1s)."""
    start = len(mask)
    while start > 0 and mask[start - 1] == 0:
        start -= 1
    while start > 0 and mask[start - 1] == 1:
        start -= 1
    return start


@dataclass
class SequenceBatch:
    """Right-padded prompt+answer sequences."""

    input_ids: Tensor  # (N, T)
    answer_mask: Tensor  # (N, T) bool, True on the answer's tokens
    last_index: Tensor  # (N,) position of each sequence's last real token (where a reward is read)

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(self.input_ids.to(device), self.answer_mask.to(device), self.last_index.to(device))


def sequence_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    T = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), T), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((len(encoded), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        answer_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
    last = torch.tensor([len(ids) - 1 for ids, _ in encoded])
    return SequenceBatch(input_ids, answer_mask, last)


@dataclass
class EncodedRanking:
    candidates: list[tuple[list[int], list[int]]]  # encode_answer of each answer
    ranks: list[int]


def encode_ranking(tokenizer: Tokenizer, ranking: Ranking, max_len: int) -> EncodedRanking:
    return EncodedRanking(
        [encode_answer(tokenizer, ranking.prompt, a, max_len) for a in ranking.answers], ranking.ranks
    )


@dataclass
class ComparisonBatch:
    """All candidates of B rankings (then any `extra` sequences, e.g. thumbs) in one sequence batch, scored in one
    forward; `slots` puts the candidates' scores back as (B, K)."""

    sequences: SequenceBatch  # N = total candidates + extras
    slots: Tensor  # (n_candidates,) index into the flattened (B * K) grid
    ranks: Tensor  # (B, K), 0 where a ranking has fewer than K candidates

    def grid(self, scores: Tensor) -> Tensor:
        """(N,) scores -> the candidates' (B, K) grid, 0 in absent slots (which have rank 0 and so no pair)."""
        B, K = self.ranks.shape
        return scores.new_zeros(B * K).scatter(0, self.slots, scores[: len(self.slots)]).view(B, K)

    def extra_scores(self, scores: Tensor) -> Tensor:
        return scores[len(self.slots) :]

    def to(self, device: torch.device | str) -> ComparisonBatch:
        return ComparisonBatch(self.sequences.to(device), self.slots.to(device), self.ranks.to(device))


def comparison_batch(
    rankings: list[EncodedRanking], pad_id: int, extra: list[tuple[list[int], list[int]]] = ()
) -> ComparisonBatch:
    K = max((len(r.ranks) for r in rankings), default=0)
    ranks = torch.zeros((len(rankings), K), dtype=torch.long)
    slots, encoded = [], []
    for b, r in enumerate(rankings):
        ranks[b, : len(r.ranks)] = torch.tensor(r.ranks)
        slots += [b * K + k for k in range(len(r.ranks))]
        encoded += r.candidates
    return ComparisonBatch(sequence_batch(encoded + list(extra), pad_id), torch.tensor(slots, dtype=torch.long), ranks)


if __name__ == "__main__":
    from ml.demo.world import World

    world = World(0)
    dialogues = load_dialogues(world.sft_dialogues(50))
    tok = Tokenizer.train([m["content"] for d in dialogues for m in d.messages] * 4, vocab_size=400)
    data = SFTData(dialogues, tok, max_len=64, packing=True)
    batch = data.get_batch("train", 2, torch.Generator().manual_seed(0))
    print({k: tuple(v.shape) for k, v in batch.items()}, "doc ids of row 0:", batch["doc_ids"][0].tolist())
    try:
        load_rankings([{"prompt": "Hi?", "answers": ["a", "b", "c"], "order": [0, [1, 0]]}])
    except ValueError as e:
        print("error:", e)
