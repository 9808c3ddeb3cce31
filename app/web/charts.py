"""Server-side line charts as SVG, with axes, tick numbers and a smoothed line: no JavaScript chart library needed.

A Chart carries everything the template (templates/partials/chart.html) draws: the plot area, the raw line, the
smoothed line (a centred moving average) once there are enough points to be
noisy, and the ticks of both axes with their numbers. Job pages chart every metric against the step, an RL job's
reward against its KL, and the over-optimisation watch; the admin overview charts trends over days and versions.
"""

import math
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 360, 200
LEFT, RIGHT, TOP, BOTTOM = 48, 10, 10, 34  # margins: room for the y numbers at the left, the x numbers below
CHARTED = ("loss", "val_loss", "reward", "reward_mean", "kl", "val_acc", "gold")
SMOOTH_FROM = 10  # points before a smoothed line is drawn over the raw one
LABELS = {
    "loss": "training loss",
    "val_loss": "held-out loss",
    "reward": "reward",
    "reward_mean": "mean reward",
    "kl": "KL to the reference",
    "val_acc": "held-out accuracy",
    "gold": "gold score",
}


@dataclass
class Tick:
    at: float  # SVG coordinate along its axis
    label: str


@dataclass
class Chart:
    name: str
    points: str  # the raw line, "x,y x,y …" in SVG coordinates
    first: float
    last: float
    low: float
    high: float
    n: int
    x_label: str = "step"
    y_label: str = ""
    smooth: str = ""  # the smoothed line, or "" when there are too few points to need one
    x_ticks: list[Tick] = field(default_factory=list)
    y_ticks: list[Tick] = field(default_factory=list)
    dots: bool = False  # few points, or x not ordered (reward against KL): mark each point
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def coordinates(self) -> list[tuple[str, str]]:
        return [tuple(p.split(",")) for p in self.points.split()]  # type: ignore[misc]


def number(value: float) -> str:
    """A tick or caption number: short, no trailing zeros, no exponent for everyday sizes."""
    if value == 0:
        return "0"
    if abs(value) >= 10_000:
        return f"{value / 1000:.0f}k"
    return f"{value:.3g}" if abs(value) >= 0.001 else f"{value:.1e}"


def nice_ticks(low: float, high: float, count: int = 4) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart, the spacing nearest to an even split) within
    [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda candidate: abs(candidate - raw))
    start = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = start
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def smoothed(ys: list[float], half: int | None = None) -> list[float]:
    """A centred moving average (each point with `half` neighbours each side, fewer at the ends): unlike an
    exponential average it does not lag behind a trend, so the smoothed line lies on the raw one's middle."""
    half = half if half is not None else max(1, len(ys) // 20)
    out = []
    for i in range(len(ys)):
        window = ys[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


def line_chart(
    name: str,
    values: list[tuple[float, float]],
    x_label: str = "step",
    y_label: str = "",
    ordered: bool = True,
    counts: bool = False,
) -> Chart | None:
    """A chart of (x, y) points, or None when there are fewer than two to draw a line through. `counts` (whole
    numbers per whole x: labels per day, a score per version): the y axis starts at 0 (a count of nothing is the
    floor, not the middle of the chart), x ticks fall on whole numbers, and no smoothing blurs the days together."""
    if len(values) < 2:
        return None
    xs, ys = [x for x, _ in values], [y for _, y in values]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if counts:
        y0, y1 = min(0.0, y0), max(y1, 1.0)
    if y1 == y0:  # a flat line: centre it in a band around its value
        y0, y1 = y0 - (abs(y0) or 1) * 0.1, y1 + (abs(y1) or 1) * 0.1
    span_x = (x1 - x0) or 1.0
    chart = Chart(name, "", ys[0], ys[-1], min(ys), max(ys), len(values), x_label, y_label or name)

    def sx(x: float) -> float:
        return chart.left + (x - x0) / span_x * (chart.right - chart.left)

    def sy(y: float) -> float:
        return chart.bottom - (y - y0) / (y1 - y0) * (chart.bottom - chart.top)

    chart.points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
    if ordered and not counts and len(values) >= SMOOTH_FROM:
        chart.smooth = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, smoothed(ys), strict=True))
    x_ticks = [t for t in nice_ticks(x0, x1) if x0 <= t <= x1 and (not counts or float(t).is_integer())]
    chart.x_ticks = [Tick(round(sx(t), 1), number(t)) for t in x_ticks]
    chart.y_ticks = [Tick(round(sy(t), 1), number(t)) for t in nice_ticks(y0, y1) if y0 <= t <= y1]
    chart.dots = not ordered or len(values) <= 12
    return chart


def series(metrics: list[dict[str, Any]], name: str, x: str = "step") -> list[tuple[float, float]]:
    """(x, value) of every point that reported `name` (x defaults to the point's position when it has no step)."""
    numeric = lambda v: isinstance(v, int | float) and not isinstance(v, bool)  # noqa: E731
    return [
        (float(m.get(x, i) if x == "step" else m[x]), float(m[name]))
        for i, m in enumerate(metrics)
        if numeric(m.get(name)) and (x == "step" or numeric(m.get(x)))
    ]


def job_charts(metrics: list[dict[str, Any]]) -> list[Chart]:
    """One chart per charted metric that the job reported at least twice, against its step."""
    charts = [line_chart(LABELS[name], series(metrics, name), y_label=LABELS[name]) for name in CHARTED]
    return [c for c in charts if c is not None]


def reward_against_kl(metrics: list[dict[str, Any]]) -> Chart | None:
    """An RL job's reward against its KL to the reference, in step order: how much reward each nat of drift bought."""
    for name in ("reward", "reward_mean"):
        chart = line_chart(LABELS[name], series(metrics, name, x="kl"), "KL", LABELS[name], ordered=False)
        if chart is not None:
            return chart
    return None


# The over-optimisation watch of an RL job (ml/train/watch.py): each against the KL of that step, as Gao et al. plot.
WATCHED = {
    "watch_proxy": "held-out proxy reward",
    "watch_judge": "held-out judge score",
    "watch_agreement": "agreement",
}


def watch_charts(metrics: list[dict[str, Any]]) -> list[Chart]:
    """The watch's measurements against KL: a proxy that keeps rising while the judge falls is over-optimisation."""
    charts = [line_chart(label, series(metrics, name, x="kl"), "KL", label) for name, label in WATCHED.items()]
    return [c for c in charts if c is not None]


def watch_flag(metrics: list[dict[str, Any]]) -> str | None:
    """The watch's verdict on the points so far (the same rule the job logs by)."""
    from ml.train.watch import overoptimisation

    points = [m for m in metrics if isinstance(m.get("watch_proxy"), int | float)]
    flags = [overoptimisation(points[: i + 1]) for i in range(len(points))]
    return next((f for f in flags if f is not None), None)
