"""What a model version was trained on, as one typed record: the rows of each table (up to a row id), the files, the
demo data, and the versions that judged or anchored it.

It is stored in `model_versions.training_data` (JSON) under the keys it has always had (`ranking_id`, `rankings`,
`feedback_id`, …), so versions registered before this record existed read the same. Everything that writes or reads
that column goes through `TrainingData`: the jobs that record it, the retraining rule that compares against it, the
gate that asks whether a reference learned from the demo world, and the admin's lineage.
"""

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Rows:
    """Rows of one table a version trained on: every row up to `last_id` that its export kept (0: none)."""

    last_id: int
    count: int | None = None  # how many rows those were; None when an older version did not say


# Rows field -> (watermark key, count key) in the stored JSON.
ROW_KEYS = {
    "rankings": ("ranking_id", "rankings"),
    "thumbs": ("feedback_id", "thumbs"),
    "dialogues": ("conversation_id", "dialogues"),
    "prompts": ("prompt_id", "prompts"),
}


@dataclass
class TrainingData:
    rankings: Rows | None = None
    thumbs: Rows | None = None
    dialogues: Rows | None = None  # chats that allow training
    prompts: Rows | None = None  # train-split prompts (RL)
    files: list[str] | None = None  # imported dialogue files
    demo: bool | None = None  # the demo world's dialogues were mixed in
    demo_seed: int | None = None
    corpus: list[str] | None = None  # pretraining text: "demo" or file paths (stored as `data`)
    reward_version_id: int | None = None  # the reward model an RL policy was trained against
    reference_version_id: int | None = None  # its KL reference
    judge_version_id: int | None = None  # the reward model that judged a policy at the gate (not its trainer)
    baseline_version_id: int | None = None  # the active reward model a new reward model was compared with
    imported_from: str | None = None  # `flywheel model import-hf`
    adapter: dict[str, Any] | None = None  # trained as LoRA adapters (rank, alpha, targets); served merged
    adapter_base_version_id: int | None = None  # the version whose frozen weights the adapters sit on
    extra: dict[str, Any] = field(default_factory=dict)  # anything else a job recorded, shown as it is

    def __post_init__(self) -> None:
        """A single source given as a string is one source: iterated, it would read as its letters."""
        self.corpus = as_sources(self.corpus)
        self.files = as_sources(self.files)

    def to_json(self) -> dict[str, Any]:
        stored: dict[str, Any] = {}
        for name, (id_key, count_key) in ROW_KEYS.items():
            rows: Rows | None = getattr(self, name)
            if rows is not None:
                stored[id_key] = rows.last_id
                if rows.count is not None:
                    stored[count_key] = rows.count
        for name in _PLAIN:
            value = getattr(self, name)
            if value is not None:
                stored["data" if name == "corpus" else name] = value
        return {**stored, **self.extra}

    @classmethod
    def from_json(cls, stored: dict[str, Any] | None) -> "TrainingData":
        stored = dict(stored or {})
        record = cls()
        for name, (id_key, count_key) in ROW_KEYS.items():
            if id_key in stored:
                count = stored.pop(count_key, None)
                setattr(record, name, Rows(int(stored.pop(id_key) or 0), count if isinstance(count, int) else None))
        if "data" in stored:  # a string in versions registered before this record: one source, not its letters
            record.corpus = as_sources(stored.pop("data"))
        for name in _PLAIN:
            if name != "corpus" and name in stored:
                setattr(record, name, stored.pop(name))
        record.files = as_sources(record.files)
        record.extra = stored
        return record

    @property
    def learned_from_demo(self) -> bool:
        """Whether the demo world's data went into it (then the gate may read the demo's held-out dialogues)."""
        return bool(self.demo) or any(source.startswith("demo") for source in self.corpus or [])


def as_sources(value: Any) -> list[str] | None:
    """Sources (corpus entries, file names) as a list of strings: a lone string or path is one source."""
    if value is None:
        return None
    if not isinstance(value, list | tuple):
        return [str(value)]
    return [str(v) for v in value]


_PLAIN = [f.name for f in fields(TrainingData) if f.name not in ROW_KEYS and f.name != "extra"]
