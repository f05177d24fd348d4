"""The report's plots as inline SVG written directly (the difficulty histogram and the
per-epoch convergence diagnostics): a few hundred elements each, no plotting library
(matplotlib cost the report about 1.6 s of import and layout per page).

Text is SVG text in the page's font; coordinates are points of a 10.5 inch wide figure
scaled to the width of the page (``.plot svg { width: 100% }``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from .formatting import FLAGS, _finite_or_none, format_number

__all__ = ["HISTORY_PANELS"]

FLAG_COLORS = {"ok": "#9aa5b1", "hard": "#d97706", "mislabeled": "#dc2626", "outlier": "#7c3aed"}
OK_FILL = "#cbd2da"
OTHER_COLOR = "#64748b"
INK = "#0f172a"
TEXT = "#334155"
SPINE = "#9aa5b1"
GRID = "#e2e8f0"
LINE = "#2563eb"
MINUS = "\u2212"


# --------------------------------------------------------------------------- scales and ticks


class _Scale:
    """Data -> figure coordinate along one axis: ``linear``, ``log`` (base 10) or
    ``symlog`` (linear up to ``linthresh``, logarithmic above; one decade wide below it)."""

    def __init__(self, kind: str, low: float, high: float, start: float, stop: float, linthresh: float = 1.0) -> None:
        self.kind, self.linthresh = kind, linthresh
        self.low, self.high = low, high
        self._low, self._high = self.transform(low), self.transform(high)
        if self._high == self._low:
            self._high = self._low + 1.0
        self.start, self.stop = start, stop

    def transform(self, value: float) -> float:
        if self.kind == "log":
            return math.log10(value) if value > 0 else -math.inf
        if self.kind == "symlog":
            size = abs(value) / self.linthresh
            scaled = size if size <= 1 else 1.0 + math.log10(size)
            return math.copysign(scaled, value)
        return value

    def __call__(self, value: float) -> float:
        position = (self.transform(value) - self._low) / (self._high - self._low)
        return self.start + position * (self.stop - self.start)


def _nice_ticks(low: float, high: float, most: int = 7) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        return [low] if math.isfinite(low) else []
    raw = (high - low) / max(most - 1, 1)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(power * factor for factor in (1.0, 2.0, 2.5, 5.0, 10.0) if power * factor >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(0.0 if abs(value) < step * 1e-9 else value)
        value = first + len(ticks) * step
    return ticks


def _log_ticks(low: float, high: float) -> tuple[list[float], list[float]]:
    """``(labelled, unlabelled)`` tick values of a log axis over [low, high]: the decades,
    and the 2..9 multiples between them; the multiples are labelled too when the axis
    spans less than a decade (it may hold no decade at all)."""
    decades = [10.0 ** power for power in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    multiples = [decade * factor for decade in decades for factor in range(2, 10)]
    inside = [value for value in decades if low <= value * (1 + 1e-9) and value <= high * (1 + 1e-9)]
    minor = [value for value in multiples if low <= value <= high]
    if high / low < 10:
        return sorted(inside + minor), []
    return inside, minor


def _plain(value: float) -> str:
    """A tick label: integers with thousands separators, else 2 significant digits."""
    if value == int(value) and abs(value) < 1e15:
        text = f"{int(value):,}"
    else:
        text = f"{value:.2g}"
    return text.replace("-", MINUS)


def _tick_labels(values: Sequence[float]) -> list[str]:
    """Labels for a row of ticks: :func:`_plain` (2 significant digits) when that tells
    every tick apart, else as many significant digits as it takes (a narrow range such
    as 1.00-1.06 would otherwise read "1 1 1 1")."""
    labels = [_plain(value) for value in values]
    digits = 3
    while len(set(labels)) < len(labels) and digits <= 12:
        labels = [_plain(value) if value == int(value) and abs(value) < 1e15 else f"{value:.{digits}g}".replace("-", MINUS)
                  for value in values]
        digits += 1
    return labels


# --------------------------------------------------------------------------- drawing


class _Canvas:
    """An SVG in points, built from a list of elements."""

    def __init__(self, width: float, height: float) -> None:
        self.width, self.height = width, height
        self.parts: list[str] = []

    def add(self, element: str) -> None:
        self.parts.append(element)

    def line(self, x1: float, y1: float, x2: float, y2: float, color: str, width: float = 0.8,
             dash: str | None = None) -> None:
        dashes = f' stroke-dasharray="{dash}"' if dash else ""
        self.add(f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" stroke="{color}" '
                 f'stroke-width="{width}"{dashes}/>')

    def text(self, x: float, y: float, content: str, *, size: float = 8, anchor: str = "start",
             color: str = TEXT, baseline: str = "auto", rotate: bool = False, weight: str | None = None) -> None:
        transform = f' transform="rotate(-90 {x:.2f} {y:.2f})"' if rotate else ""
        bold = f' font-weight="{weight}"' if weight else ""
        self.add(f'<text x="{x:.2f}" y="{y:.2f}" font-size="{size}" text-anchor="{anchor}" '
                 f'dominant-baseline="{baseline}" fill="{color}"{bold}{transform}>{escape(content)}</text>')

    def svg(self, label: str) -> str:
        return (
            f'<svg role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{self.width:g}pt" height="{self.height:g}pt" viewBox="0 0 {self.width:g} {self.height:g}">'
            f'<g font-family="inherit">' + "".join(self.parts) + "</g></svg>"
        )


def _frame(canvas: _Canvas, x: _Scale, y: _Scale, *, y_ticks: Sequence[float], y_minor: Sequence[float] = (),
           x_ticks: Sequence[float], x_labels: Sequence[str] | None = None, y_labels: Sequence[str] | None = None,
           label_size: float = 8, grid: bool = True) -> None:
    """Grid lines (behind the data: call first), left and bottom spines, ticks and tick labels."""
    left, right, bottom, top = x.start, x.stop, y.start, y.stop
    if grid:
        for value in y_ticks:
            canvas.line(left, y(value), right, y(value), GRID, 0.6)
    canvas.line(left, bottom, left, top, SPINE)
    canvas.line(left, bottom, right, bottom, SPINE)
    for index, value in enumerate(y_ticks):
        position = y(value)
        canvas.line(left - 3.5, position, left, position, TEXT, 0.8)
        canvas.text(left - 5.5, position, (y_labels or _tick_labels(y_ticks))[index], size=label_size,
                    anchor="end", baseline="central")
    for value in y_minor:
        canvas.line(left - 2, y(value), left, y(value), TEXT, 0.6)
    for index, value in enumerate(x_ticks):
        position = x(value)
        canvas.line(position, bottom, position, bottom + 3.5, TEXT, 0.8)
        canvas.text(position, bottom + 5.5, (x_labels or _tick_labels(x_ticks))[index], size=label_size,
                    anchor="middle", baseline="hanging")


def _step_path(edges_px: Sequence[float], heights_px: Sequence[float], base: float, *, close: bool) -> str:
    """The outline of a histogram: for each run of non-empty bins, up at its first edge,
    along the bins' tops and down at its last edge (empty bins draw nothing)."""
    points: list[str] = []
    previous: float | None = None
    for left, right, height in zip(edges_px[:-1], edges_px[1:], heights_px):
        if height >= base:  # an empty bin ends the run
            if previous is not None:
                points.append(f"L{left:.2f},{base:.2f}" + ("Z" if close else ""))
            previous = None
            continue
        if previous is None:
            points.append(f"M{left:.2f},{base:.2f}")
        if height != previous:
            points.append(f"L{left:.2f},{height:.2f}")
        points.append(f"L{right:.2f},{height:.2f}")
        previous = height
    if previous is not None:
        points.append(f"L{edges_px[-1]:.2f},{base:.2f}" + ("Z" if close else ""))
    return "".join(points)


def _difficulty_plot_svg(difficulty: np.ndarray, flags: np.ndarray, threshold: float | None) -> str:
    """Histogram of difficulty per flag (log counts) with the flag threshold marked.

    Bins are linear, or logarithmic above a small linear range when the scores span
    several orders of magnitude (the usual case: most examples near zero, a long tail).
    """
    canvas = _Canvas(756, 237.6)
    left, right, bottom, top = 64.3, 748.4, 199.6, 7.1  # the axes box, in points
    finite = np.isfinite(difficulty)
    values, flags = difficulty[finite], np.asarray(flags)[finite]
    if values.size == 0:
        canvas.line(left, bottom, left, top, SPINE)
        canvas.line(left, bottom, right, bottom, SPINE)
        canvas.text((left + right) / 2, (top + bottom) / 2, "no scores", size=10, anchor="middle", baseline="central")
        return canvas.svg("difficulty histogram (empty)")
    low, high = float(values.min()), float(values.max())
    positive = values[values > 0]
    log_bins = False
    if positive.size and low >= 0:
        small = float(np.quantile(positive, 0.05))
        log_bins = small > 0 and high / small > 1000
    if log_bins:
        linear_limit = small
        edges = np.concatenate([np.linspace(0.0, linear_limit, 5)[:-1], np.geomspace(linear_limit, high, 57)])
    else:
        if high == low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, 61)
    groups: list[tuple[str, np.ndarray]] = []
    # Largest group first, so the smaller flagged groups are drawn on top of it.
    for flag in sorted(FLAGS, key=lambda name: -int((flags == name).sum())):
        selected = values[flags == flag]
        if selected.size:
            groups.append((flag, np.histogram(selected, bins=edges)[0]))
    other = ~np.isin(flags, FLAGS)
    if other.any():
        groups.append(("other", np.histogram(values[other], bins=edges)[0]))

    span = edges[-1] - edges[0]
    margin = 0.05 * span if not log_bins else 0.0
    if log_bins:
        x_high = float(edges[-1]) * 1.25  # room after the last bin, as on a linear axis
        x = _Scale("symlog", 0.0, x_high, left, right, linthresh=linear_limit)
        decades = range(math.floor(math.log10(linear_limit)), math.ceil(math.log10(x_high)) + 1)
        x_ticks = [0.0] + [10.0**power for power in decades if linear_limit <= 10.0**power <= x_high]
        x_labels = [f"{value:g}" for value in x_ticks]
    else:
        x = _Scale("linear", float(edges[0] - margin), float(edges[-1] + margin), left, right)
        x_ticks = _nice_ticks(float(edges[0]), float(edges[-1]))
        x_labels = None
    largest = max(int(counts.max()) for _, counts in groups)
    y = _Scale("log", 0.7, max(largest, 1) * 1.6, bottom, top)
    y_ticks, y_minor = _log_ticks(1.0, max(largest, 1) * 1.6)
    y_ticks = [value for value in y_ticks if value == int(value)]  # counts: 1, 10, 100, ...
    _frame(canvas, x, y, y_ticks=y_ticks if y_ticks else [1.0], y_minor=y_minor, x_ticks=x_ticks,
           x_labels=x_labels, y_labels=[f"{value:,.0f}" for value in (y_ticks or [1.0])])

    edges_px = [x(float(edge)) for edge in edges]
    legend: list[tuple[str, str, str | None]] = []  # label, fill, outline
    for flag, counts in groups:
        heights = [y(float(count)) if count > 0 else bottom for count in counts]
        label = "other" if flag == "other" else f"{flag} ({int(counts.sum()):,})"
        if flag == "ok":
            canvas.add(f'<path d="{_step_path(edges_px, heights, bottom, close=True)}" fill="{OK_FILL}" stroke="none"/>')
            legend.append((label, OK_FILL, None))
            continue
        color = FLAG_COLORS.get(flag, OTHER_COLOR)
        if flag != "other":  # outlines with a light fill: overlapping flagged groups stay readable
            canvas.add(f'<path d="{_step_path(edges_px, heights, bottom, close=True)}" fill="{color}" '
                       f'fill-opacity="0.18" stroke="none"/>')
        canvas.add(f'<path d="{_step_path(edges_px, heights, bottom, close=False)}" fill="none" stroke="{color}" '
                   f'stroke-width="{1.0 if flag == "other" else 1.6}" stroke-linejoin="miter"/>')
        legend.append((label, color if flag != "other" else "none", color))

    # Top right, frameless; its width from the longest label (about 4.6 pt a character).
    legend_left = right - 24 - 4.6 * max((len(label) for label, _, _ in legend), default=0)
    if threshold is not None and math.isfinite(threshold):
        position = x(float(threshold))
        if left <= position <= right:
            canvas.line(position, bottom, position, top, INK, 1.1, dash="4.1,1.8")
            text = f"threshold {format_number(threshold)}"
            # Right of the line; left of it where the legend would cover the text, and
            # below the legend where it would on both sides.
            text_width = 4.6 * len(text)
            on_left = position + 8 + text_width > legend_left
            row = top + 2
            if on_left and position - 4 > legend_left:
                row = top + 13 * len(legend) + 6
            canvas.text(position - 4 if on_left else position + 4, row, text, size=8, color=INK,
                        baseline="hanging", anchor="end" if on_left else "start")
    for index, (label, fill, outline) in enumerate(legend):
        row = top + 8 + 13 * index
        stroke = f' stroke="{outline}" stroke-width="1.2"' if outline else ""
        opacity = ' fill-opacity="0.18"' if outline and fill != "none" else ""
        canvas.add(f'<rect x="{legend_left:.2f}" y="{row - 3.5:.2f}" width="14" height="7" fill="{fill}"{opacity}{stroke}/>')
        canvas.text(legend_left + 19, row, label, size=8, baseline="central")
    canvas.text((left + right) / 2, bottom + 22, "difficulty", size=9, anchor="middle", baseline="hanging")
    canvas.text(left - 38, (top + bottom) / 2, "examples (log scale)", size=9, anchor="middle", rotate=True)
    return canvas.svg("histogram of difficulty scores with the flag threshold")


HISTORY_PANELS = (
    ("max_violation", "largest violation", True),
    ("fraction_fitted", "fraction fitted", False),
    ("multiplier_change", "multiplier change", True),
    ("rank_stability", "rank stability", False),
    # Only where a cap was in force (NaN otherwise): near 1 from the second epoch on,
    # C is so small that the method is a plain hinge loss (ALGORITHM.md, "Soft margin").
    ("fraction_at_cap", "share at the cap", False),
)


def _history_plot_svg(history: Sequence[Mapping[str, Any]], diagnostics: Mapping[str, Any]) -> str:
    """Small multiples of the per-epoch convergence diagnostics; empty when fewer than
    two epochs were recorded."""
    if len(history) < 2:
        return ""
    epochs = np.array([_finite_or_none(entry.get("epoch")) or index for index, entry in enumerate(history)], float)
    panels = [panel for panel in HISTORY_PANELS if any(_finite_or_none(entry.get(panel[0])) is not None for entry in history)]
    if not panels:
        return ""
    canvas = _Canvas(756, 158.4)
    scored_epoch = _finite_or_none(diagnostics.get("scored_epoch"))
    # The axes row: 5% .. 99.5% of the width, gaps of 0.28 of a panel's width.
    row_left, row_right, bottom, top = 0.05 * 756, 0.995 * 756, 158.4 * 0.8, 158.4 * 0.12
    width = (row_right - row_left) / (len(panels) + 0.28 * (len(panels) - 1))
    epoch_low, epoch_high = float(np.min(epochs)), float(np.max(epochs))
    epoch_pad = 0.05 * (epoch_high - epoch_low or 1.0)
    epoch_ticks = [tick for tick in _nice_ticks(epoch_low, epoch_high, most=5) if tick == int(tick)] or [epoch_low]
    for index, (key, label, log_scale) in enumerate(panels):
        left = row_left + index * width * 1.28
        values = np.array([_finite_or_none(entry.get(key)) for entry in history], dtype=float)
        positive = values[np.isfinite(values) & (values > 0)]
        log_axis = log_scale and positive.size > 0
        if log_axis:
            values = np.where(values > 0, values, np.nan)
            low, high = float(positive.min()), float(positive.max())
            if high == low:
                low, high = low / 1.5, high * 1.5
            pad = (math.log10(high) - math.log10(low)) * 0.05
            y = _Scale("log", low / 10**pad, high * 10**pad, bottom, top)
            y_ticks, y_minor = _log_ticks(low / 10**pad, high * 10**pad)
        else:
            finite = values[np.isfinite(values)]
            low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            if high == low:
                low, high = low - (abs(low) * 0.1 or 0.5), high + (abs(high) * 0.1 or 0.5)
            pad = 0.05 * (high - low)
            y = _Scale("linear", low - pad, high + pad, bottom, top)
            y_ticks, y_minor = _nice_ticks(low - pad, high + pad, most=6), []
        x = _Scale("linear", epoch_low - epoch_pad, epoch_high + epoch_pad, left, left + width)
        _frame(canvas, x, y, y_ticks=y_ticks, y_minor=y_minor, x_ticks=epoch_ticks, label_size=7)
        # The line, broken where a value is missing, with a dot at every epoch.
        segments, current = [], []
        for epoch, value in zip(epochs, values):
            if np.isfinite(value):
                current.append(f"{x(float(epoch)):.2f},{y(float(value)):.2f}")
            elif current:
                segments.append(current)
                current = []
        if current:
            segments.append(current)
        for segment in segments:
            canvas.add(f'<polyline points="{" ".join(segment)}" fill="none" stroke="{LINE}" stroke-width="1.3" '
                       'stroke-linejoin="round"/>')
        dots = "".join(f'<circle cx="{point.split(",")[0]}" cy="{point.split(",")[1]}" r="1.6"/>'
                       for segment in segments for point in segment)
        canvas.add(f'<g fill="{LINE}">{dots}</g>')
        if scored_epoch is not None and x.low <= scored_epoch <= x.high:
            canvas.line(x(scored_epoch), bottom, x(scored_epoch), top, INK, 0.9, dash="0.9,1.5")
        canvas.text(left + width / 2, top - 5, label, size=8.5, anchor="middle")
        canvas.text(left + width / 2, bottom + 16, "epoch", size=8, anchor="middle", baseline="hanging")
    return canvas.svg("convergence diagnostics per epoch")
