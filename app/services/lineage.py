"""A model version's lineage in words, for the admin page: its ancestors, the data it saw, and the gate's verdict.

Training jobs record lineage as raw watermarks (`ranking_id: 57` = every ranking up to row 57 that the export kept),
counts and file names (app/jobs/handlers.py); an admin wants to read "6 rankings (ids up to 57)" and click through to
the parent and to the reward model that judged it, so this module turns those records into labelled lines.
"""

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ModelVersion

# watermark key → (count key, what the rows are)
WATERMARKS = {
    "ranking_id": ("rankings", "rankings"),
    "feedback_id": ("thumbs", "thumbs up/down"),
    "conversation_id": ("dialogues", "chats that allow training"),
    "prompt_id": ("prompts", "train-split prompts"),
}
VERSION_REFERENCES = {"reward_version_id": "judged by reward model", "reference_version_id": "KL reference"}
GATE_NUMBERS = (
    "win_rate",
    "reward_candidate",
    "reward_active",
    "kl",
    "ppl_candidate",
    "ppl_active",
    "gate_prompts",
    "gate_pairs",
    "gate_dialogues",
)


@dataclass
class LineageItem:
    label: str
    text: str
    version_id: int | None = None  # a model version this line names: the page links it


@dataclass
class GateVerdict:
    promoted: bool
    reason: str
    numbers: dict[str, float]


def describe_training_data(training_data: dict[str, Any], names: dict[int, str] | None = None) -> list[LineageItem]:
    """Readable lines for a version's `training_data`; `names` maps version ids to names for the linked lines."""
    names = names or {}
    items: list[LineageItem] = []
    seen: set[str] = set()
    for key, (count_key, what) in WATERMARKS.items():
        if key not in training_data:
            continue
        seen |= {key, count_key}
        last, count = training_data[key], training_data.get(count_key)
        if not last:
            items.append(LineageItem(what, "none"))
            continue
        amount = f"{count} " if isinstance(count, int) else "all "
        items.append(LineageItem(what, f"{amount}{what} (row ids up to {last})"))
    if "files" in training_data:
        seen.add("files")
        files = [PurePath(str(f)).name for f in training_data["files"] or []]
        items.append(LineageItem("imported dialogue files", ", ".join(files) if files else "none"))
    if "demo" in training_data:
        seen.add("demo")
        items.append(LineageItem("demo dialogues", "included" if training_data["demo"] else "left out"))
    if "data" in training_data:
        seen.add("data")
        sources = ["the demo world's corpus" if d == "demo" else PurePath(str(d)).name for d in training_data["data"]]
        items.append(LineageItem("corpus", ", ".join(sources) if sources else "none"))
    for key, label in VERSION_REFERENCES.items():
        if training_data.get(key) is not None:
            seen.add(key)
            version_id = int(training_data[key])
            items.append(LineageItem(label, names.get(version_id, f"version {version_id}"), version_id))
    items += [LineageItem(key.replace("_", " "), str(value)) for key, value in training_data.items() if key not in seen]
    return items


def gate_verdict(metrics: dict[str, Any]) -> GateVerdict | None:
    """The promotion gate's decision stored with an RL/DPO/KTO candidate, or None for versions that had no gate."""
    if "gate" not in metrics:
        return None
    numbers = {k: metrics[k] for k in GATE_NUMBERS if isinstance(metrics.get(k), int | float)}
    return GateVerdict(bool(metrics.get("promoted")), str(metrics["gate"]), numbers)


def ancestors(session: Session, version: ModelVersion, limit: int = 50) -> list[ModelVersion]:
    """Parent, grandparent, … up to the first version trained from nothing (a cycle or a deleted parent stops it)."""
    chain: list[ModelVersion] = []
    seen = {version.id}
    parent_id = version.parent_id
    while parent_id is not None and parent_id not in seen and len(chain) < limit:
        parent = session.get(ModelVersion, parent_id)
        if parent is None:
            break
        chain.append(parent)
        seen.add(parent.id)
        parent_id = parent.parent_id
    return chain


def children(session: Session, version: ModelVersion) -> list[ModelVersion]:
    return list(
        session.scalars(select(ModelVersion).where(ModelVersion.parent_id == version.id).order_by(ModelVersion.id))
    )


def version_names(versions: list[ModelVersion]) -> dict[int, str]:
    return {v.id: v.name for v in versions}
