"""The benchmark's plot: time per client for each fleet size, median with the range.

matplotlib's Agg canvas directly, as ``scheduler/budget.py`` draws its timelines (no
pyplot, no display, no global backend change).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

SIZE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def plot_times(
    labels: Sequence[str],
    sizes: Sequence[int],
    values: dict[tuple[str, int], tuple[float, float, float] | None],
    path: Path,
    *,
    title: str,
) -> Path:
    """Horizontal bars, one group per client (``labels``, top to bottom), one bar per
    fleet size: ``values[(label, size)]`` is (median, min, max) seconds or None (not run).
    Logarithmic time axis: the clients span three orders of magnitude. Returns ``path``.

    Raises ``ImportError`` when matplotlib is missing, ``OSError`` when the file cannot be
    written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 1.2 + 0.62 * len(labels) * max(1, len(sizes)) ** 0.5), dpi=110,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    height = 0.8 / max(1, len(sizes))
    shown = [v for v in values.values() if v is not None and math.isfinite(v[0]) and v[0] > 0]
    lowest = min((v[1] for v in shown), default=0.1)
    for s_index, size in enumerate(sizes):
        ys, widths, lows, highs = [], [], [], []
        for l_index, label in enumerate(labels):
            value = values.get((label, size))
            if value is None or not math.isfinite(value[0]) or value[0] <= 0:
                continue
            median, low, high = value
            ys.append(l_index + (s_index - (len(sizes) - 1) / 2) * height)
            widths.append(median)
            lows.append(max(0.0, median - low))
            highs.append(max(0.0, high - median))
        colour = SIZE_COLOURS[s_index % len(SIZE_COLOURS)]
        axes.barh(ys, widths, height=height * 0.92, color=colour, label=f"{size:,} BMCs",
                  xerr=[lows, highs], error_kw={"ecolor": "#333333", "capsize": 2, "linewidth": 0.8})
        for y, width in zip(ys, widths, strict=True):
            axes.text(width * 1.06, y, f"{width:.3g} s", va="center", fontsize=7)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xscale("log")
    highest = max((v[2] for v in shown), default=1.0)
    axes.set_xlim(max(lowest / 2, 1e-3), highest * 4)
    axes.set_xlabel("seconds (log scale): median of the repetitions, bar = min to max")
    axes.set_title(title, fontsize=10)
    axes.grid(True, axis="x", which="both", alpha=0.25)
    axes.legend(fontsize=8, loc="lower right")
    figure.savefig(path, format="png")
    return path
