"""The parameters a job actually ran with: its trainer's config with every default filled in, as JSON for the job row.

An admin who starts `{"steps": 200}` wants to see the learning rate, batch size and KL coefficient that went with it,
not `{}`. Records handed to a trainer in memory (rankings, dialogues, prompts) are shown as their count, the output
directory and progress flags are left out: they say nothing about the training.
"""

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

HIDDEN = frozenset({"out", "progress", "resume"})
LABEL_KEYS = ("rankings", "thumbs")  # the records a job's label count is read from (few labels: a warning)


def as_json_value(value: Any) -> Any:
    """A config value as JSON: paths as text, a list of records as {"records": n}, anything else unknown as text."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple):
        if all(isinstance(v, str | Path | int | float) for v in value):
            return [as_json_value(v) for v in value]
        return {"records": len(value)}
    if isinstance(value, dict):
        return {str(k): as_json_value(v) for k, v in value.items()}
    return str(value)


def effective_params(config: Any, **extra: Any) -> dict[str, Any]:
    """A trainer config (a dataclass) or a plain mapping, plus `extra` (the model versions a job chose), as JSON."""
    values = asdict(config) if is_dataclass(config) and not isinstance(config, type) else dict(config)
    return {k: as_json_value(v) for k, v in {**values, **extra}.items() if k not in HIDDEN}


def label_count(params: dict[str, Any] | None) -> int | None:
    """How many labels (rankings and thumbs) a job's effective parameters say it trained on; None if they don't."""
    counts = [params[k]["records"] for k in LABEL_KEYS if isinstance((params or {}).get(k), dict)]
    return sum(counts) if counts else None
