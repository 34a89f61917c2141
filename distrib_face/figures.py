"""Figure helpers every package may use (a leaf: imports nothing of distrib_face but :mod:`distrib_face.atomic`).

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they work on
headless workers and leave the caller's matplotlib state alone; PNGs are written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from distrib_face.atomic import atomic_path

PathLike = str | os.PathLike[str]


def new_figure(width: float, height: float) -> Any:
    """A matplotlib ``Figure`` (inches) attached to an Agg canvas, independent of pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: PathLike, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG at ``path`` atomically (folders are created); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if figure.canvas is None or not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return out


def plain_number(value: float) -> str:
    """A tick label a reader takes in at a glance: ``30``, ``0.05``, ``2000``; powers of ten beyond
    ``[1e-3, 1e5)`` as ``10^k`` (mathtext), other far values as ``2e+06``."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    magnitude = abs(value)
    if 1e-3 <= magnitude < 1e5:
        return f"{value:g}"
    exponent = math.log10(magnitude)
    if abs(exponent - round(exponent)) < 1e-9:
        sign = "-" if value < 0 else ""
        return f"${sign}10^{{{int(round(exponent))}}}$"
    return f"{value:.0e}"


def readable_log_axis(axis: Any) -> None:
    """Tick labels on a log-scaled axis that never pile up, whatever its range.

    matplotlib labels every minor tick of a log axis spanning less than about a decade, in scientific
    notation ("3x10^1 4x10^1 ..."), and the labels run into each other. Here: plain numbers
    (:func:`plain_number`); a range of more than two decades labels only the powers of ten, a shorter one
    (which may hold one power of ten or none) also labels the minor ticks at 2 and 5, and one under half a
    decade labels every minor tick. Call it after the data are drawn (it reads the axis' view limits).

    Args:
        axis: ``ax.xaxis`` or ``ax.yaxis`` of a log-scaled axes.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = sorted(abs(v) for v in axis.get_view_interval())
    low = max(low, 1e-300)
    decades = math.log10(high / low) if high > low else 0.0
    axis.set_major_locator(LogLocator(base=10.0, numticks=12))
    axis.set_major_formatter(FuncFormatter(lambda value, _pos: plain_number(value)))
    axis.set_minor_locator(LogLocator(base=10.0, subs=tuple(range(2, 10)), numticks=12))
    if decades > 2.0:
        axis.set_minor_formatter(NullFormatter())
        return
    labelled = set(range(2, 10)) if decades < 0.5 else {2, 5}

    def minor_label(value: float, _pos: int) -> str:
        if value <= 0:
            return ""
        leading = value / 10 ** math.floor(math.log10(value) + 1e-12)
        return plain_number(value) if round(leading) in labelled and abs(leading - round(leading)) < 1e-6 else ""

    axis.set_minor_formatter(FuncFormatter(minor_label))
