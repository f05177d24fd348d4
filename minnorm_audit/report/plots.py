"""The report's plots: matplotlib figures rendered to inline SVG (the difficulty
histogram and the per-epoch convergence diagnostics). matplotlib is imported lazily.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .formatting import FLAGS, _finite_or_none, format_number

__all__ = ["HISTORY_PANELS"]

FLAG_COLORS = {"ok": "#9aa5b1", "hard": "#d97706", "mislabeled": "#dc2626"}


def _svg(figure: Any, *, salt: str, label: str) -> str:
    """A matplotlib figure as inline SVG: text kept as text, no XML prolog, doctype or
    metadata, ids salted per figure so two plots on one page cannot collide."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    svg = re.sub(r"<\?xml[^>]*\?>\s*", "", svg)
    svg = re.sub(r"<!DOCTYPE[^>]*>\s*", "", svg)
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
    svg = re.sub(r"<svg ", f'<svg role="img" aria-label="{label}" ', svg, count=1)
    return svg.strip()


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    return figure


def _plain_log_axis(axis: Any, *, counts: bool, values: np.ndarray | None = None) -> None:
    """Log-scale tick labels as plain numbers ("1,000", "0.001"), not mathtext powers:
    easier to read, and far cheaper to lay out. Minor ticks get labels too when the
    values span less than a decade (there may be no major tick at all)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    if counts:
        axis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:,.0f}" if value >= 1 else ""))
        axis.set_minor_formatter(NullFormatter())
        return
    plain = FuncFormatter(lambda value, _position: f"{value:.2g}")
    axis.set_major_formatter(plain)
    finite = values[np.isfinite(values) & (values > 0)] if values is not None else np.array([])
    narrow = finite.size > 0 and finite.max() / finite.min() < 10
    axis.set_minor_formatter(plain if narrow else NullFormatter())


def _style_axes(axes: Any) -> None:
    axes.spines[["top", "right"]].set_visible(False)
    axes.spines[["left", "bottom"]].set_color("#9aa5b1")
    axes.tick_params(colors="#334155", labelsize=8)
    axes.grid(axis="y", color="#e2e8f0", linewidth=0.6)
    axes.set_axisbelow(True)


def _difficulty_plot_svg(difficulty: np.ndarray, flags: np.ndarray, threshold: float | None) -> str:
    """Histogram of difficulty per flag (log counts) with the flag threshold marked.

    Bins are linear, or logarithmic above a small linear range when the scores span
    several orders of magnitude (the usual case: most examples near zero, a long tail).
    """
    from matplotlib.ticker import FuncFormatter, NullFormatter

    finite = np.isfinite(difficulty)
    values, flags = difficulty[finite], np.asarray(flags)[finite]
    figure = _new_figure(10.5, 3.3)
    axes = figure.add_subplot()
    _style_axes(axes)
    if values.size == 0:
        axes.text(0.5, 0.5, "no scores", ha="center", va="center", transform=axes.transAxes)
        return _svg(figure, salt="difficulty", label="difficulty histogram (empty)")
    low, high = float(values.min()), float(values.max())
    positive = values[values > 0]
    log_bins = False
    if positive.size and low >= 0:
        small = float(np.quantile(positive, 0.05))
        log_bins = small > 0 and high / small > 1000
    if log_bins:
        linear_limit = small
        edges = np.concatenate([np.linspace(0.0, linear_limit, 5)[:-1], np.geomspace(linear_limit, high, 57)])
        axes.set_xscale("symlog", linthresh=linear_limit, linscale=1.0)
    else:
        if high == low:
            low, high = low - 0.5, high + 0.5
        edges = np.linspace(low, high, 61)
    # Largest group first, so the smaller flagged groups are drawn on top of it.
    for flag in sorted(FLAGS, key=lambda name: -int((flags == name).sum())):
        selected = values[flags == flag]
        if not selected.size:
            continue
        counts, _ = np.histogram(selected, bins=edges)
        label = f"{flag} ({selected.size:,})"
        if flag == "ok":
            axes.hist(edges[:-1], bins=edges, weights=counts, histtype="stepfilled", color="#cbd2da", log=True, label=label)
        else:  # outlines with a light fill: overlapping flagged groups stay readable
            axes.hist(edges[:-1], bins=edges, weights=counts, histtype="stepfilled", color=FLAG_COLORS[flag], alpha=0.18, log=True)
            axes.hist(
                edges[:-1], bins=edges, weights=counts, histtype="step", color=FLAG_COLORS[flag], linewidth=1.6, log=True, label=label
            )
    other = ~np.isin(flags, FLAGS)
    if other.any():
        counts, _ = np.histogram(values[other], bins=edges)
        axes.hist(edges[:-1], bins=edges, weights=counts, histtype="step", color="#64748b", label="other", log=True)
    if threshold is not None:
        axes.axvline(threshold, color="#0f172a", linestyle="--", linewidth=1.1)
        axes.annotate(
            f"threshold {format_number(threshold)}",
            xy=(threshold, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -2),
            textcoords="offset points",
            ha="left",
            va="top",
            fontsize=8,
            color="#0f172a",
        )
    _plain_log_axis(axes.yaxis, counts=True)
    if log_bins:
        axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: format_number(float(value))))
        axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("difficulty", fontsize=9, color="#334155")
    axes.set_ylabel("examples (log scale)", fontsize=9, color="#334155")
    axes.legend(frameon=False, fontsize=8, loc="upper right")
    figure.subplots_adjust(left=0.085, right=0.99, bottom=0.16, top=0.97)
    return _svg(figure, salt="difficulty", label="histogram of difficulty scores with the flag threshold")


HISTORY_PANELS = (
    ("max_violation", "largest violation", True),
    ("fraction_fitted", "fraction fitted", False),
    ("multiplier_change", "multiplier change", True),
    ("rank_stability", "rank stability", False),
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
    figure = _new_figure(10.5, 2.2)
    scored_epoch = _finite_or_none(diagnostics.get("scored_epoch"))
    for index, (key, label, log_scale) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), index + 1)
        _style_axes(axes)
        values = np.array([_finite_or_none(entry.get(key)) for entry in history], dtype=float)
        if log_scale and np.nanmin(np.where(values > 0, values, np.nan), initial=np.inf) < np.inf:
            values = np.where(values > 0, values, np.nan)
            axes.set_yscale("log")
            _plain_log_axis(axes.yaxis, counts=False, values=values)
        axes.plot(epochs, values, color="#2563eb", linewidth=1.3, marker="o", markersize=2.2)
        if scored_epoch is not None:
            axes.axvline(scored_epoch, color="#0f172a", linestyle=":", linewidth=0.9)
        axes.set_title(label, fontsize=8.5, color="#334155")
        axes.set_xlabel("epoch", fontsize=8, color="#334155")
        axes.tick_params(which="both", labelsize=7)
    figure.subplots_adjust(left=0.05, right=0.995, bottom=0.2, top=0.88, wspace=0.28)
    return _svg(figure, salt="history", label="convergence diagnostics per epoch")
