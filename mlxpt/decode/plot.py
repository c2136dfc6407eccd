"""Accuracy charts: a text chart for the terminal and a PNG drawn with matplotlib.

`series` maps a label to [(x, accuracy), ...]. For accuracy vs samples x is N, possibly fractional
(adaptive stopping's mean samples), with ticks at whole N; for accuracy vs generated tokens
(`TOKENS`) x is the mean generated tokens per prompt, with ticks at powers of two (`token_ticks`).
The x axis is log2(x). matplotlib is imported only when a PNG is drawn, so `mlxpt --help` stays light.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

Series = dict[str, list[tuple[int, float]]]
MARKERS = "o*x+#@%&"
_PNG_MARKERS = "os^Dv*PX"
SAMPLES_AXIS = "N (samples, log scale)"
TOKENS_AXIS = "generated tokens per prompt (log scale)"


def token_ticks(series: Series) -> list[float]:
    """Ticks for a tokens axis: the powers of two within the data's range (its ends where none)."""
    xs = [x for pts in series.values() for x, _ in pts if x > 0]
    if not xs:
        return []
    lo, hi = min(xs), max(xs)
    ticks = [2.0**e for e in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)]
    return ticks if len(ticks) >= 2 else sorted({float(round(lo)), float(round(hi))})


def _ticks(series: Series, xs: list, ticks: list | None) -> list:
    if ticks is not None:
        return ticks
    return [n for n in xs if float(n).is_integer()]


def _xpos(n: int, ns: list[int]) -> float:
    """Position of n in [0, 1] on a log2 axis over `ns`."""
    lo, hi = math.log2(min(ns)), math.log2(max(ns))
    return 0.5 if hi == lo else (math.log2(n) - lo) / (hi - lo)


def _ymax(series: Series) -> float:
    top = max((a for pts in series.values() for _, a in pts), default=0.0)
    return min(1.0, max(0.1, math.ceil(top * 10 + 0.5) / 10))


def terminal_chart(
    series: Series, width: int = 56, height: int = 13, title: str = "accuracy vs samples",
    x_label: str = SAMPLES_AXIS, ticks: list | None = None,
) -> str:  # fmt: skip
    """A text chart: one marker per series, dots between points, accuracy in % on the y axis;
    x ticks at `ticks` (default: the whole x values)."""
    series = {k: [(x, a) for x, a in pts if x > 0] for k, pts in series.items()}
    ns = sorted({n for pts in series.values() for n, _ in pts})
    if not ns:
        return ""
    ymax = _ymax(series)
    grid = [[" "] * width for _ in range(height)]

    def cell(pos: float, a: float) -> tuple[int, int]:
        x = round(pos * (width - 1))
        y = height - 1 - round(min(a, ymax) / ymax * (height - 1))
        return x, y

    for k, pts in enumerate(series.values()):
        pts = sorted(pts)
        for (n0, a0), (n1, a1) in zip(pts, pts[1:], strict=False):
            x0, x1 = _xpos(n0, ns), _xpos(n1, ns)
            for s in range(1, 20):
                f = s / 20
                x, y = cell(x0 + f * (x1 - x0), a0 + f * (a1 - a0))
                if grid[y][x] == " ":
                    grid[y][x] = "."
        for n, a in pts:
            x, y = cell(_xpos(n, ns), a)
            grid[y][x] = MARKERS[k % len(MARKERS)]
    lines = [title]
    for r, row in enumerate(grid):
        label = f"{ymax * (height - 1 - r) / (height - 1) * 100:5.1f}%" if r % 3 == 0 else " " * 6
        lines.append(f"{label} |" + "".join(row))
    lines.append(" " * 7 + "+" + "-" * width)
    axis = [" "] * (width + 12)
    for n in _ticks(series, ns, ticks):
        x = 8 + round(_xpos(n, ns) * (width - 1))
        if not 0 <= x < len(axis):
            continue
        for j, ch in enumerate(str(int(n)) if float(n).is_integer() else f"{n:g}"):
            if x + j < len(axis):
                axis[x + j] = ch
    lines.append("".join(axis).rstrip() + "   " + x_label)
    lines += [f"  {MARKERS[k % len(MARKERS)]} {label}" for k, label in enumerate(series)]
    return "\n".join(lines)


def png_chart(
    series: Series, title: str = "accuracy vs samples", x_label: str = "N samples (log scale)", ticks=None
) -> bytes:
    """PNG bytes of an accuracy chart (log2 x axis, accuracy in % on y, a legend); x ticks at
    `ticks` (default: the whole x values)."""
    series = {k: [(x, a) for x, a in pts if x > 0] for k, pts in series.items()}
    # a bare Figure renders with Agg: no pyplot, no display, no global backend switched
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator, PercentFormatter

    ns = sorted({n for pts in series.values() for n, _ in pts}) or [1]
    fig = Figure(figsize=(9, 4.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    for k, (label, pts) in enumerate(series.items()):
        pts = sorted(pts)
        xs, ys = [n for n, _ in pts], [a * 100 for _, a in pts]
        marker = _PNG_MARKERS[k % len(_PNG_MARKERS)]
        (line,) = ax.plot(xs, ys, marker=marker, linewidth=2, markersize=7, label=label)
        if len(pts) == 1 and pts[0][0] == min(ns) and len(ns) > 1:  # a one-sample baseline: dashed level
            ax.hlines(ys[0], min(ns), max(ns), colors=line.get_color(), linestyles="dashed", linewidth=1.5)
    ax.set_xscale("log", base=2)
    whole = _ticks(series, ns, ticks) or ns
    ax.xaxis.set_major_locator(FixedLocator(whole))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(int(n)) if float(n).is_integer() else f"{n:g}" for n in whole])
    if len(ns) > 1:
        ax.set_xlim(min(ns) / 1.15, max(ns) * 1.15)
    ax.set_ylim(0, _ymax(series) * 100)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))
    ax.set_xlabel(x_label)
    ax.set_ylabel("accuracy")
    ax.set_title(title, loc="left")
    ax.grid(True, color="#dddddd")
    if series:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_png(
    path: str | Path, series: Series, title: str = "accuracy vs samples", x_label: str = "N samples (log scale)",
    ticks=None,
) -> None:  # fmt: skip
    from mlxpt.runs.atomic import atomic_write_bytes

    atomic_write_bytes(path, png_chart(series, title, x_label, ticks))
