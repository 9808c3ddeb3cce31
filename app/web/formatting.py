"""Numbers for people: metrics rounded and named in words, internals of the run (which DDP rank reported, the output
directory) left out, durations as minutes and seconds. Used by the admin's model and job pages."""

from dataclasses import dataclass
from typing import Any

# Recorded by trainers for their own bookkeeping: true, but nothing an admin judges a model by.
INTERNAL = frozenset(
    {"rank", "world_size", "out", "losses", "max_steps", "lr", "grad_norm", "tokens", "gate", "promoted", "load_error"}
)
NAMES = {
    "loss": "final training loss",
    "val_loss": "held-out loss",
    "val_ppl": "held-out perplexity",
    "val_acc": "held-out accuracy",
    "unigram_entropy": "unigram entropy (nats)",
    "params": "parameters",
    "step": "steps trained",
    "tokens_per_s": "tokens per second",
    "elapsed_s": "training time",
    "eta_s": "time left",
    "win_rate": "win rate against the active policy",
    "kl": "KL to the reference",
    "reward_mean": "mean reward",
    "reward_candidate": "reward of the candidate",
    "reward_active": "reward of the active policy",
    "ppl_candidate": "perplexity of the candidate",
    "ppl_active": "perplexity of the active policy",
    "heldout_acc": "held-out human-label accuracy",
    "active_heldout_acc": "the active reward model's held-out accuracy",
    "gold": "gold score",
    "heldout_gold_greedy": "held-out gold score (greedy answers)",
    "heldout_correct_greedy": "held-out questions answered right (greedy)",
    "ensemble_sets": "sets in the active-learning ensemble",
}
FRACTIONS = ("acc", "win_rate", "fraction", "agreement", "correct")  # shown as percentages


@dataclass
class Metric:
    key: str
    label: str
    text: str


def duration(seconds: float) -> str:
    """`1h 02m`, `3m 20s`, `12s`."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def value_text(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and key.endswith("_s"):
        return duration(value)
    if isinstance(value, float) and any(part in key for part in FRACTIONS) and 0 <= value <= 1:
        return f"{value * 100:.1f}%"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"
    return str(value)


def label(key: str) -> str:
    return NAMES.get(key, key.replace("_", " "))


def format_metrics(metrics: dict[str, Any] | None, *, skip: frozenset[str] = frozenset()) -> list[Metric]:
    """The metrics worth reading, named and rounded, in a stable order: named ones first, then the rest."""
    shown = {k: v for k, v in (metrics or {}).items() if k not in INTERNAL | skip and not isinstance(v, dict | list)}
    order = [k for k in NAMES if k in shown] + sorted(k for k in shown if k not in NAMES)
    return [Metric(k, label(k), value_text(k, shown[k])) for k in order]


# What a version is judged by, most telling first: human labels and the gate before the trainer's own numbers.
HEADLINE = (
    "heldout_acc",
    "win_rate",
    "gold",
    "heldout_gold_greedy",
    "val_acc",
    "kl",
    "reward_candidate",
    "val_ppl",
    "val_loss",
    "loss",
)


def headline(metrics: dict[str, Any] | None, limit: int = 3) -> list[Metric]:
    """The few numbers a table row has room for."""
    metrics = metrics or {}
    keys = [k for k in HEADLINE if isinstance(metrics.get(k), int | float) and not isinstance(metrics.get(k), bool)]
    return [Metric(k, label(k), value_text(k, metrics[k])) for k in keys[:limit]]
