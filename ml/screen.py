"""Which training records a stage can use, and why it leaves out the others: one pure pass before training.

Rows come from people: a chat message longer than the model's context, an empty answer, a ranking that is one big
tie, a line that is not JSON. One of them must not stop a job that has hundreds of good ones, and none may vanish
silently either (a silently shrunken data set trains a worse model with no sign of why). So `screen` keeps the
records a stage can use and counts the others by reason; the trainer trains on what is kept, puts the counts in its
metrics (`skipped_too_long=3`) with one summary line naming a few rows, and fails only when nothing usable is left,
saying why by reason.

    screened = screen(["rankings.jsonl", {"prompt": "Hi", ...}], "ranking", fits=answers_fit(tokenizer, 256))
    screened.kept            # [Ranking, ...]
    skip_metrics(screened)   # {"skipped_tie": 1, "skipped": "skipped 1 of 3 rankings: tie 1 (ranking #2)"}

Run (CPU, seconds): python -m ml.screen
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ml.examples import (
    Dialogue,
    PromptExample,
    Ranking,
    RecordError,
    Thumb,
    answer_start,
    parse_dialogue,
    parse_prompt,
    parse_ranking,
    parse_thumb,
    records,
)
from ml.tokenizer import Tokenizer

REASONS = {
    "malformed": "not a record of its kind (not JSON, a missing field, a wrong type)",
    "wrong_roles": "a role other than system/user/assistant, or a prompt that does not end with the user",
    "non_text": "a message or answer that is not text",
    "empty": "no messages, or an empty answer",
    "no_answer": "a dialogue with no assistant turn to learn from",
    "tie": "a ranking with fewer than 2 distinct ranks (no comparison in it)",
    "too_long": "too long for the model's context, or leaves no room to answer",
}
# The least answer a prompt must leave room for (tokens), when the stage's own answer length is longer.
MIN_ANSWER_TOKENS = 16
EXAMPLES = 3  # rows named per reason in the summary line

_PARSERS: dict[str, tuple[Callable[[Any, str], Any], type]] = {
    "dialogue": (parse_dialogue, Dialogue),
    "ranking": (parse_ranking, Ranking),
    "thumb": (parse_thumb, Thumb),
    "prompt": (parse_prompt, PromptExample),
}


@dataclass
class Screened:
    """The records kept and, per reason, where each skipped one came from ("file.jsonl:3", "prompt #460")."""

    kind: str
    kept: list = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)  # reason -> the first such row's whole error message
    kept_at: list[int] = field(default_factory=list)  # each kept record's position among those read

    def skip(self, reason: str, where: str, message: str) -> None:
        self.skipped.setdefault(reason, []).append(where)
        self.first.setdefault(reason, message)

    def counts(self) -> dict[str, int]:
        return {reason: len(wheres) for reason, wheres in sorted(self.skipped.items())}

    def summary(self) -> str:
        """'skipped 2 of 5 prompts: too_long 1 (prompt #4: ...), empty 1 (p.jsonl:2: ...)', '' when none skipped."""
        if not self.skipped:
            return ""
        total = len(self.kept) + sum(self.counts().values())
        return f"skipped {sum(self.counts().values())} of {total} {self.kind}s: {self.reasons()}"

    def reasons(self) -> str:
        """Per reason: the count, the first row's error and where a few more are."""
        parts = []
        for reason, wheres in sorted(self.skipped.items()):
            also = f"; also {', '.join(wheres[1:EXAMPLES])}{', …' if len(wheres) > EXAMPLES else ''}"
            parts.append(f"{reason} {len(wheres)} ({self.first[reason]}{also if len(wheres) > 1 else ''})")
        return ", ".join(parts) or "none given"

    def require(self, minimum: int = 1) -> list:
        """The kept records; fewer than `minimum`: a ValueError that says why the others were left out."""
        if len(self.kept) < minimum:
            have = f"{len(self.kept)} usable {self.kind}s, need at least {minimum}" if self.kept else ""
            raise ValueError(f"{have or f'no usable {self.kind}s'}: {self.reasons()}")
        return self.kept


def screen(
    items: Any,
    kind: str,
    fits: Callable[[Any], bool] | None = None,
    *,
    names: list[str] | None = None,
    limit: int | None = None,
) -> Screened:
    """Parse `items` (JSONL paths and/or objects, as ml.examples reads them) as `kind` records; keep those that parse,
    carry a comparison (rankings) and pass `fits` (the stage's length check); count the rest by reason. `names`: what
    to call in-memory records (e.g. "prompt 12", its row id) instead of "prompt #i"; `limit`: stop once that many are
    kept."""
    parse, record_type = _PARSERS[kind]
    out = Screened(kind)
    for i, (obj, where) in enumerate(records(items, kind, lenient=True)):
        if limit is not None and len(out.kept) >= limit:
            break
        where = names[i] if names is not None else where
        try:
            record = obj if isinstance(obj, record_type) else parse(obj, where)
        except RecordError as e:
            out.skip(e.reason, where, str(e))
            continue
        if isinstance(record, Ranking) and len(set(record.ranks)) < 2:
            out.skip("tie", where, f"{where}: every answer is ranked the same, so there is nothing to compare")
        elif fits is not None and not fits(record):
            out.skip("too_long", where, f"{where}: {getattr(fits, 'why', REASONS['too_long'])}")
        else:
            out.kept.append(record)
            out.kept_at.append(i)
    return out


def skip_metrics(*screens: Screened) -> dict[str, Any]:
    """`skipped_<reason>` counts summed over the screens, and `skipped`: their summary lines; {} when none skipped."""
    counts: dict[str, int] = {}
    for s in screens:
        for reason, n in s.counts().items():
            counts[f"skipped_{reason}"] = counts.get(f"skipped_{reason}", 0) + n
    lines = [s.summary() for s in screens if s.skipped]
    return {**counts, "skipped": "; ".join(lines)} if lines else {}


def require_any(*screens: Screened, nothing: str = "") -> None:
    """A stage that trains on several kinds (rankings and thumbs) fails only when all of them are empty; `nothing`
    is how the stage says so (default: no usable rankings or thumbs), the reasons follow."""
    if not any(s.kept for s in screens):
        why = "; ".join(f"{s.kind}s: {s.reasons()}" for s in screens if s.skipped) or "none given"
        raise ValueError(f"{nothing or 'no usable ' + ' or '.join(s.kind + 's' for s in screens)}: {why}")


# ----------------------------------------------------------------------------- length checks, one per record shape


def prompt_fits(tokenizer: Tokenizer, max_seq_len: int, answer_tokens: int) -> Callable[[PromptExample], bool]:
    """A prompt fits when it leaves room for `answer_tokens` of answer (at most MIN_ANSWER_TOKENS asked for, so a
    long answer budget does not turn away prompts the engine would answer more briefly)."""
    room = max(1, min(answer_tokens, MIN_ANSWER_TOKENS))

    def fits(p: PromptExample) -> bool:
        return len(tokenizer.render_prompt(p.messages)) + room <= max_seq_len

    fits.why = f"the prompt leaves no room to answer ({room} tokens) within the model's {max_seq_len}"
    return fits


def dialogue_fits(tokenizer: Tokenizer, max_len: int) -> Callable[[Dialogue], bool]:
    """A dialogue fits when some assistant token falls within its first `max_len` (+1) tokens: SFT cuts the rest, as
    before, but a dialogue whose answers all lie past the cut has nothing to learn from."""

    def fits(d: Dialogue) -> bool:
        _, mask = tokenizer.render_conversation(d.messages)
        return any(mask[1 : max_len + 1])

    fits.why = f"no assistant token within the first {max_len} tokens (the model's context)"
    return fits


def answers_fit(tokenizer: Tokenizer, max_len: int) -> Callable[[Ranking | Thumb], bool]:
    """A ranking or thumb fits when each answer leaves some of its prompt within `max_len`: a longer conversation
    loses its oldest tokens (the answer's end is where it is scored), but an answer with no question is unusable."""

    def answer_tokens(prompt: list, answer: str) -> int:
        ids, mask = tokenizer.render_conversation([*prompt, {"role": "assistant", "content": answer}])
        return len(ids) - answer_start(mask)

    def fits(r: Ranking | Thumb) -> bool:
        answers = r.answers if isinstance(r, Ranking) else [r.completion]
        return all(answer_tokens(r.prompt, a) < max_len for a in answers)

    fits.why = f"an answer fills the whole context of {max_len} tokens, leaving none of its prompt"
    return fits


if __name__ == "__main__":
    from ml.demo.world import World

    world = World(0)
    tok = Tokenizer.train([p.messages[-1]["content"] for p in world.prompts(200)], vocab_size=300)
    rows = [p.messages for p in world.prompts(3)] + [[{"role": "user", "content": "word " * 400}], [], {"prompt": 3}]
    screened = screen(rows, "prompt", fits=prompt_fits(tok, 128, 48))
    print(len(screened.kept), "kept;", skip_metrics(screened))
