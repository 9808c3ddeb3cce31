"""Tiny server-side line charts (SVG polylines) for job metrics: no JavaScript chart library needed."""

from dataclasses import dataclass
from typing import Any

WIDTH, HEIGHT, PAD = 320, 120, 6
CHARTED = ("loss", "val_loss", "reward", "reward_mean", "kl", "val_acc", "gold")


@dataclass
class Chart:
    name: str
    points: str  # "x,y x,y …" in SVG coordinates
    first: float
    last: float
    low: float
    high: float
    n: int
    x_label: str = "step"


def line_chart(name: str, values: list[tuple[float, float]], x_label: str = "step") -> Chart | None:
    if len(values) < 2:
        return None
    xs, ys = [x for x, _ in values], [y for _, y in values]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0

    def sx(x: float) -> float:
        return PAD + (x - x0) / span_x * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD - (y - y0) / span_y * (HEIGHT - 2 * PAD)

    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
    return Chart(name, points, ys[0], ys[-1], y0, y1, len(values), x_label)


def job_charts(metrics: list[dict[str, Any]]) -> list[Chart]:
    """One chart per charted metric that the job reported at least twice, against its step."""
    charts = []
    for name in CHARTED:
        series = [
            (float(m.get("step", i)), float(m[name]))
            for i, m in enumerate(metrics)
            if isinstance(m.get(name), int | float)
        ]
        chart = line_chart(name, series)
        if chart is not None:
            charts.append(chart)
    return charts


# The over-optimisation watch of an RL job (ml/train/watch.py): each against the KL of that step, as Gao et al. plot.
WATCHED = {
    "watch_proxy": "held-out proxy reward",
    "watch_judge": "held-out judge score",
    "watch_agreement": "agreement",
}


def watch_charts(metrics: list[dict[str, Any]]) -> list[Chart]:
    """The watch's measurements against KL: a proxy that keeps rising while the judge falls is over-optimisation."""
    charts = []
    for name, label in WATCHED.items():
        series = [
            (float(m["kl"]), float(m[name])) for m in metrics if isinstance(m.get(name), int | float) and "kl" in m
        ]
        chart = line_chart(label, series, x_label="KL")
        if chart is not None:
            charts.append(chart)
    return charts


def watch_flag(metrics: list[dict[str, Any]]) -> str | None:
    """The watch's verdict on the points so far (the same rule the job logs by)."""
    from ml.train.watch import overoptimisation

    points = [m for m in metrics if isinstance(m.get("watch_proxy"), int | float)]
    flags = [overoptimisation(points[: i + 1]) for i in range(len(points))]
    return next((f for f in flags if f is not None), None)
