"""A model version's lineage in words, for the admin page: its ancestors, the data it saw, and the gate's verdict.

Training jobs record a TrainingData (app/services/training_data.py): rows up to a row id (every ranking up to row 57
that the export kept), counts and file names; an admin wants to read "6 rankings (ids up to 57)" and click through to
the parent and to the reward model that judged it, so this module turns those records into labelled lines.
"""

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ModelVersion
from app.services import withdrawal
from app.services.training_data import Rows, TrainingData, as_sources

# TrainingData's rows -> what they are, in words
ROWS_SHOWN = {
    "rankings": "rankings",
    "thumbs": "thumbs up/down",
    "dialogues": "chats that allow training",
    "prompts": "train-split prompts",
}
# "judged by reward model" is the one an RL policy was trained against (its name since before the gate had a judge of
# its own); the gate's judge and a reward model's baseline have lines of their own.
VERSION_REFERENCES = {
    "reward_version_id": "judged by reward model",
    "reference_version_id": "KL reference",
    "judge_version_id": "gate's judge (a reward model that did not train it)",
    "baseline_version_id": "gate compared it with reward model",
    "adapter_base_version_id": "frozen base under the LoRA adapter",
}
GATE_NUMBERS = (
    "win_rate",
    "win_rate_low",
    "win_rate_high",
    "judge_version_id",
    "reward_candidate",
    "reward_active",
    "kl",
    "ppl_candidate",
    "ppl_active",
    "gate_prompts",
    "gate_pairs",
    "gate_dialogues",
    "gate_labels",
    "gate_min_labels",
    "heldout_acc",
    "heldout_acc_low",
    "heldout_acc_high",
    "heldout_pairs",
    "heldout_sets",
    "active_heldout_acc",
    "active_heldout_acc_low",
    "active_heldout_acc_high",
    "baseline_version_id",
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


def describe_training_data(
    training_data: TrainingData | dict[str, Any], names: dict[int, str] | None = None
) -> list[LineageItem]:
    """Readable lines for a version's training data (the record, or its stored JSON); `names` maps version ids to
    names for the linked lines."""
    record = training_data if isinstance(training_data, TrainingData) else TrainingData.from_json(training_data)
    names = names or {}
    items: list[LineageItem] = []
    for name, what in ROWS_SHOWN.items():
        rows: Rows | None = getattr(record, name)
        if rows is None:
            continue
        amount = f"{rows.count} " if rows.count is not None else "all "
        items.append(LineageItem(what, f"{amount}{what} (row ids up to {rows.last_id})" if rows.last_id else "none"))
    if record.files is not None:
        files = [PurePath(str(f)).name for f in record.files]
        items.append(LineageItem("imported dialogue files", ", ".join(files) if files else "none"))
    if record.demo is not None:
        items.append(LineageItem("demo dialogues", "included" if record.demo else "left out"))
    if record.corpus is not None:
        sources = ["the demo world's corpus" if d == "demo" else PurePath(d).name for d in record.corpus]
        items.append(LineageItem("corpus", ", ".join(sources) if sources else "none"))
    for key, label in VERSION_REFERENCES.items():
        version_id = getattr(record, key)
        if version_id is not None:
            items.append(LineageItem(label, names.get(int(version_id), f"version {version_id}"), int(version_id)))
    if record.adapter:
        a = record.adapter
        targets = ", ".join(as_sources(a.get("targets")) or [])
        text = f"rank {a.get('rank')}, alpha {a.get('alpha')} on {targets}; served with the adapter merged in"
        items.append(LineageItem("LoRA adapter", text))
    plain = {"demo seed": record.demo_seed, "imported from": record.imported_from}
    items += [LineageItem(label, str(value)) for label, value in plain.items() if value is not None]
    items += [LineageItem(key.replace("_", " "), _as_text(value)) for key, value in record.extra.items()]
    return items


def _as_text(value: Any) -> str:
    """A recorded value in words: a list as its items joined, a string as it is (never its letters)."""
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) if value else "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def withdrawn_data(session: Session, version: ModelVersion) -> LineageItem | None:
    """A line when people have since withdrawn data this version was trained on: its weights still hold what it
    learned from them, which an admin weighs before promoting it or training from it."""
    found = withdrawal.trained_on_withdrawn(session, version=version)
    if found is None:
        return None
    parts = [_count(found.conversations, "conversation")]
    if found.rankings:
        parts.append(_count(found.rankings, "of its rankings", "of its rankings"))
    return LineageItem(
        "withdrawn since",
        f"trained on data since withdrawn ({', '.join(parts)}; {_count(found.withdrawals, 'withdrawal')}): "
        "retrain to leave it out",
    )


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def gate_verdict(metrics: dict[str, Any]) -> GateVerdict | None:
    """The promotion gate's decision stored with an RL/DPO/KTO candidate or a reward model, or None for versions that
    had no gate."""
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


def referenced_names(session: Session, record: TrainingData) -> dict[int, str]:
    """Names of the versions a record names (reward model, KL reference, the gate's judge or baseline), for their
    links (missing ones are left out)."""
    ids = [getattr(record, key) for key in VERSION_REFERENCES if getattr(record, key) is not None]
    if not ids:
        return {}
    return {v.id: v.name for v in session.scalars(select(ModelVersion).where(ModelVersion.id.in_(ids)))}


@dataclass
class GraphNode:
    version_id: int
    name: str
    kind: str
    status: str
    note: str = ""  # how it relates (e.g. "judged it", "frozen base + LoRA adapter rank 8")
    current: bool = False


@dataclass
class LineageGraph:
    """What the model page draws: the chain from the first version down to this one, the versions trained from it,
    and the versions it refers to beside the chain (its reward model, KL reference, judge, frozen base)."""

    chain: list[GraphNode]
    children: list[GraphNode]
    references: list[GraphNode]


def _node(version: ModelVersion, note: str = "", current: bool = False) -> GraphNode:
    return GraphNode(version.id, version.name, version.kind.value, version.status.value, note, current)


def graph(session: Session, version: ModelVersion) -> LineageGraph:
    """base -> SFT -> reward/policy down to `version`; a LoRA version names its frozen base and adapter."""
    record = TrainingData.from_json(version.training_data)
    note = ""
    if record.adapter:
        base = session.get(ModelVersion, record.adapter_base_version_id) if record.adapter_base_version_id else None
        under = base.name if base is not None else "its parent"
        note = f"{under} + LoRA adapter (rank {record.adapter.get('rank')}), served merged"
    chain = [_node(v) for v in reversed(ancestors(session, version))] + [_node(version, note, current=True)]
    on_chain = {n.version_id for n in chain}
    references = []
    for key, label in VERSION_REFERENCES.items():
        ref_id = getattr(record, key)
        ref = session.get(ModelVersion, ref_id) if ref_id is not None and ref_id not in on_chain else None
        if ref is not None:
            references.append(_node(ref, label))
    return LineageGraph(chain, [_node(c) for c in children(session, version)], references)
