"""The HTML report: one self-contained page rendered from a run folder's files.

The page reads only what :func:`~minnorm_audit.report.parquet.load_run` returns (never
live training state), embeds only the gallery rows (never every example), inlines its
CSS, script, plots and thumbnails, and loads nothing from anywhere: a Content Security
Policy allows ``data:`` images, inline styles and exactly one inline script (by its
SHA-256 hash), so even a markup injection that slipped past autoescaping could not run
code or make a request.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import os
import shlex
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup

from .formatting import (
    FLAGS,
    _finite_or_none,
    format_count,
    format_number,
    format_percent,
)
from .gallery import DEFAULT_PAGE_SIZE, FLAGGED_LIST_MAX, GALLERY_MAX_ITEMS, _gallery_context, _int_or_none
from .parquet import REPORT_FILE, RunFiles, atomic_write_text, load_run
from .plots import _difficulty_plot_svg, _history_plot_svg

__all__ = [
    "FLAGGED_LIST_MAX",
    "GALLERY_MAX_ITEMS",
    "LABEL_PAIRS_MAX_ROWS",
    "SET_ASIDE_MAX_ROWS",
    "build_report_html",
    "content_security_policy",
    "make_environment",
    "render_report",
]

SET_ASIDE_MAX_ROWS = 200
LABEL_PAIRS_MAX_ROWS = 20
TEMPLATE_NAME = "report.html.j2"

# Columns of examples.parquet the page needs; the rest (per-class multipliers, ...)
# is never read, so a large run stays cheap to render.
REPORT_EXAMPLE_COLUMNS = (
    "example_id",
    "source",
    "competing_label",
    "difficulty_percentile",
    "margin",
    "difficulty",
    "flag",
    "given_label",
    "suggested_label",
    "given_target",
    "predicted_target",
)



# --------------------------------------------------------------------------- public API


def render_report(run_dir: str | os.PathLike[str], *, gallery_size: int | None = None) -> Path:
    """Render ``report.html`` into a run folder from the folder's own files.

    Parameters
    ----------
    run_dir : path-like
        A folder holding ``examples.parquet``, ``summary.json``, ``set_aside.parquet``
        and ``gallery.parquet``.
    gallery_size : int, optional
        Flagged examples per page of the gallery (every flagged example, up to
        :data:`FLAGGED_LIST_MAX`, can be paged to); default: the run's
        ``--gallery-size``, else 60. Only the examples in ``gallery.parquet`` have a
        thumbnail or feature row.

    Returns
    -------
    Path
        The written ``report.html`` (replaced atomically).
    """
    if gallery_size is not None and gallery_size < 1:
        raise ValueError(f"gallery_size must be at least 1, got {gallery_size}")
    run = load_run(run_dir, example_columns=REPORT_EXAMPLE_COLUMNS)
    page = build_report_html(run, gallery_size=gallery_size)
    return atomic_write_text(Path(run_dir) / REPORT_FILE, page)


def build_report_html(run: RunFiles, *, gallery_size: int | None = None) -> str:
    """The report page for ``run`` as one self-contained HTML string (``gallery_size``:
    see :func:`render_report`)."""
    environment = _shared_environment()
    script = _asset_text("report.js")
    context = _report_context(run, gallery_size)
    context.update(
        css=Markup(_asset_text("report.css")),
        script=Markup(script),
        content_security_policy=content_security_policy(script),
    )
    return environment.get_template(TEMPLATE_NAME).render(**context)


def make_environment() -> Environment:
    """The jinja2 environment for the report: autoescape on for our templates (and
    by default for anything else), undefined names are errors."""
    environment = Environment(
        loader=PackageLoader("minnorm_audit.report", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "htm", "xml", "j2"), default=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters.update(count=format_count, number=format_number, percent=format_percent,
                               sentence=lambda text: str(text)[:1].upper() + str(text)[1:])
    return environment


@functools.lru_cache(maxsize=1)
def _shared_environment() -> Environment:
    """:func:`make_environment`, made once per process: the template is compiled on
    its first use only (a tenth of a second each time otherwise)."""
    return make_environment()


def content_security_policy(script: str) -> str:
    """The page's policy: nothing loads from anywhere; ``data:`` images, inline styles
    and the one inline ``script`` (allowed by its SHA-256 hash) are all that run."""
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode("ascii")
    return (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )


# --------------------------------------------------------------------------- context


def _asset_text(name: str) -> str:
    return (resources.files("minnorm_audit.report") / "templates" / name).read_text(encoding="utf-8")


def _report_context(run: RunFiles, gallery_size: int | None = None) -> dict[str, Any]:
    summary = run.summary
    examples = run.examples
    regression = run.task == "regression"
    class_names = [str(name) for name in (summary.get("class_names") or run.metadata.get("class_names") or [])]

    flags = examples["flag"].astype(str) if "flag" in examples else pd.Series([], dtype=str)
    counts = {flag: int((flags == flag).sum()) for flag in FLAGS}
    num_examples = len(examples)
    num_set_aside = len(run.set_aside)

    flag_rule = dict(summary.get("flag_rule") or {})
    threshold = _finite_or_none(flag_rule.get("difficulty_threshold"))
    difficulty = examples["difficulty"].to_numpy(dtype=np.float64) if "difficulty" in examples else np.array([])
    config = summary.get("config") or {}
    diagnostics = summary.get("diagnostics") or {}
    # The run folder as a path that resolves from anywhere: the review command is run
    # from wherever the reviewer is, not from where `run` was called.
    run_path = str(Path(run.run_dir).resolve())
    inconclusive = _inconclusive(summary.get("inconclusive"))
    # (An inconclusive run is not judged as a whole: its verdict says so once, for every class.)
    not_learned = [] if inconclusive else [dict(finding) for finding in summary.get("not_learned") or []
                                           if isinstance(finding, Mapping)]
    expected = _finite_or_none(flag_rule.get("expected_errors_among_flagged"))

    context: dict[str, Any] = {
        "title": f"minnorm-audit report: {summary.get('data', run.run_dir.name)}",
        "summary": summary,
        "data_path": str(summary.get("data", "")),
        "tool_version": str(summary.get("version", "")),
        "run_name": run.run_dir.name,
        "run_path": run_path,
        "review_command": f"minnorm-audit clean {shlex.quote(run_path)} --decisions FILE --out cleaned.csv",
        "kind": str(summary.get("kind") or run.metadata.get("kind") or ""),
        "task": run.task,
        "regression": regression,
        "num_examples": num_examples,
        "num_set_aside": num_set_aside,
        "counts": counts,
        "num_flagged": num_examples - counts["ok"],
        "num_classes": len(class_names),
        "warnings": _consistency_warnings(summary, num_examples, num_set_aside, counts),
        "demo": _demo(summary.get("demo")),
        # A network that has not learned the data: the flags are not to be trusted.
        "inconclusive": inconclusive,
        # Classes a conclusive run did not learn: their examples are not judged.
        "not_learned": not_learned,
        # The lead's flag rule may estimate how many of the flagged are real label errors.
        "expected_errors": None if expected is None else max(0, int(round(expected))),
        "fit": _fit_figures(summary, regression),
        "flag_rule": flag_rule,
        "threshold": threshold,
        "num_zero_difficulty": int((difficulty == 0).sum()),
        "difficulty_plot": Markup(_difficulty_plot_svg(difficulty, flags.to_numpy(), threshold)),
        "history_plot": Markup(_history_plot_svg(summary.get("history") or [], diagnostics)),
        "diagnostics": _diagnostic_rows(diagnostics),
        "cap": _cap(diagnostics),
        # What the loader decided about the input (summary.json "notes"), shown under Set aside.
        "input_notes": [str(note) for note in summary.get("notes") or []],
        "timings": _rows(summary.get("timings") or {}),
        "config": _settings_rows(config, diagnostics, str(summary.get("kind") or "")),
        # The pretrained network the images went through (--backbone), flattened.
        "backbone": _backbone_rows(summary.get("backbone")),
        "provenance": _provenance_rows(run.metadata, skip=set(config)),
    }

    if regression or "given_label" not in examples:
        context.update(per_class=[], label_pairs=[], num_label_pairs=0)
    else:
        context.update(_label_tables(examples, class_names, summary.get("per_class") or []))

    page_size = gallery_size or _int_or_none(config.get("gallery_size")) or DEFAULT_PAGE_SIZE
    context.update(_gallery_context(run, regression, class_names, max(1, page_size)))
    # Review: every class can be a new label (none in regression, which has no classes).
    context["review_classes"] = [] if regression else class_names

    set_aside = run.set_aside
    context["set_aside"] = [
        {"source": str(row.get("source", "")), "reason": str(row.get("reason", ""))}
        for row in set_aside.head(SET_ASIDE_MAX_ROWS).to_dict("records")
    ]
    context["set_aside_hidden"] = max(0, len(set_aside) - SET_ASIDE_MAX_ROWS)
    context["set_aside_reasons"] = (
        [
            {"reason": str(reason), "count": int(count)}
            for reason, count in set_aside["reason"].astype(str).value_counts().items()
        ]
        if len(set_aside) and "reason" in set_aside
        else []
    )
    return context


def _fit_figures(summary: Mapping[str, Any], regression: bool) -> dict[str, Any]:
    """How well the network fits the given labels, with the lines the inconclusive
    verdict draws (summary.json ``fit``; older folders: the diagnostics)."""
    fit = dict(summary.get("fit") or {})
    diagnostics = summary.get("diagnostics") or {}
    for key in ("train_accuracy", "balanced_accuracy", "fraction_fitted", "train_r2"):
        if fit.get(key) is None and diagnostics.get(key) is not None:
            fit[key] = diagnostics[key]
    below = fit.get("inconclusive_below") if isinstance(fit.get("inconclusive_below"), Mapping) else {}
    return {
        "train_accuracy": _finite_or_none(fit.get("train_accuracy")),
        "balanced_accuracy": _finite_or_none(fit.get("balanced_accuracy")),
        "fraction_fitted": _finite_or_none(fit.get("fraction_fitted")),
        "train_r2": _finite_or_none(fit.get("train_r2")),
        "accuracy_below": _finite_or_none(below.get("train_accuracy")),
        "balanced_below": _finite_or_none(below.get("balanced_accuracy")),
        "not_learned_below": _finite_or_none(fit.get("not_learned_below")),
        "regression": regression,
    }


def _inconclusive(value: Any) -> dict[str, str] | None:
    """summary.json's ``inconclusive`` (``{"reason": ...}``) as the page shows it."""
    if not isinstance(value, Mapping):
        return None
    return {"reason": str(value.get("reason") or "the network has not learned the data")}


def _demo(demo: Any) -> dict[str, Any] | None:
    if not isinstance(demo, Mapping):
        return None
    return {key: _finite_or_none(demo.get(key)) for key in ("precision", "recall", "noise_rate", "num_flipped")}


def _consistency_warnings(
    summary: Mapping[str, Any], num_examples: int, num_set_aside: int, counts: Mapping[str, int]
) -> list[str]:
    """Disagreements between summary.json and the Parquet files (the page shows the
    Parquet figures)."""
    warnings = []
    if "num_examples" in summary and summary["num_examples"] != num_examples:
        warnings.append(
            f"summary.json says {summary['num_examples']} examples; examples.parquet has {num_examples} rows."
        )
    if "num_set_aside" in summary and summary["num_set_aside"] != num_set_aside:
        warnings.append(
            f"summary.json says {summary['num_set_aside']} set aside; set_aside.parquet has {num_set_aside} rows."
        )
    for flag, count in (summary.get("counts") or {}).items():
        if flag in counts and count != counts[flag]:
            warnings.append(f"summary.json counts {count} '{flag}'; examples.parquet has {counts[flag]}.")
    return warnings


def _label_tables(
    examples: pd.DataFrame, class_names: Sequence[str], fit_rows: Sequence[Any] = ()
) -> dict[str, Any]:
    """The per-class table (counts from examples.parquet; training recall, share fitted
    and the not-learned verdict from summary.json's ``per_class``) and the given ->
    suggested pairs."""
    given = examples["given_label"].astype(str)
    flags = examples["flag"].astype(str)
    table = pd.crosstab(given, flags)
    for flag in FLAGS:
        if flag not in table:
            table[flag] = 0
    fits = {str(row.get("class")): row for row in fit_rows if isinstance(row, Mapping)}
    order = list(class_names) + sorted(set(table.index) - set(class_names))
    per_class = []
    for position, name in enumerate(order):
        found = {flag: int(table.loc[name, flag]) if name in table.index else 0 for flag in FLAGS}
        count = sum(found.values())
        fit = fits.get(name, {})
        flagged = found["mislabeled"] + found["hard"] + found["outlier"]
        per_class.append(
            {
                "name": name,
                "count": count,
                **found,
                "flagged": flagged,
                "mislabeled_rate": found["mislabeled"] / count if count else 0.0,
                "hard_rate": found["hard"] / count if count else 0.0,
                "outlier_rate": found["outlier"] / count if count else 0.0,
                "flagged_rate": flagged / count if count else 0.0,
                "recall": _finite_or_none(fit.get("training_recall")),
                "fitted": _finite_or_none(fit.get("fraction_fitted")),
                "predicted_as": fit.get("predicted_as"),
                "not_learned": bool(fit.get("not_learned")),
                "position": position,
            }
        )
    # Classes not learned first (their flags say nothing), then by share flagged mislabeled.
    per_class.sort(key=lambda row: (not row["not_learned"], -row["mislabeled_rate"], -row["flagged_rate"],
                                    row["position"]))

    mislabeled = examples.loc[flags == "mislabeled"]
    pairs: list[dict[str, Any]] = []
    num_pairs = 0
    if len(mislabeled) and "suggested_label" in mislabeled:
        sizes = (
            mislabeled.assign(given=given[flags == "mislabeled"], suggested=mislabeled["suggested_label"].astype(str))
            .groupby(["given", "suggested"], sort=False)
            .size()
            .sort_values(ascending=False, kind="stable")
        )
        num_pairs = len(sizes)
        class_counts = given.value_counts()
        for (given_label, suggested_label), count in sizes.head(LABEL_PAIRS_MAX_ROWS).items():
            pairs.append(
                {
                    "given": given_label,
                    "suggested": suggested_label,
                    "count": int(count),
                    "share_of_given": int(count) / int(class_counts.get(given_label, 0) or 1),
                }
            )
    max_rate = max((row["flagged_rate"] for row in per_class), default=0.0)
    return {"per_class": per_class, "per_class_max_rate": max_rate, "label_pairs": pairs, "num_label_pairs": num_pairs}


# What the diagnostics mean, beside their figures on the page.
DIAGNOSTIC_NOTES = {
    "train_accuracy": "share of examples whose largest output is the given label at the end of training "
                      "(the verdict reads this)",
    "balanced_accuracy": "the same per class, averaged over the classes (the verdict reads this)",
    "fraction_fitted": "share with the given label ahead by the full training margin at its last visit in training; "
                       "under the norm term most examples end just short of the margin while still predicted "
                       "right, so this is lower than train_accuracy and not used by the verdict",
    "max_multiplier": "C, the cap every multiplier is boxed to",
    "fraction_at_cap": "share of examples pushed with the full force C",
}


def _diagnostic_rows(diagnostics: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(name, value, what it means) for the convergence table."""
    return [(str(key), format_number(value), DIAGNOSTIC_NOTES.get(str(key), "")) for key, value in diagnostics.items()]


def _settings_rows(config: Mapping[str, Any], diagnostics: Mapping[str, Any], kind: str) -> list[tuple[str, str]]:
    """The run's settings as it used them: the cap C actually applied (not only its
    factor), the damping actually used, the workers actually started."""
    rows = []
    for key, value in config.items():
        text = format_number(value)
        if key == "multiplier_cap":
            cap = _finite_or_none(diagnostics.get("max_multiplier"))
            if value is None:
                text = "none (hard margin: --no-multiplier-cap)"
            elif cap is not None:
                text = (f"C = {format_number(cap)} ({format_number(value)} \u00d7 the 90th percentile of the examples' "
                        "largest multipliers, set after the first epoch)")
            else:
                text = f"{format_number(value)} \u00d7 the 90th percentile of the examples' largest multipliers"
        elif key == "damping" and value is None:
            dual_lr = _finite_or_none(config.get("dual_lr"))
            text = "2 \u00d7 dual_lr" + (f" = {format_number(2 * dual_lr)}" if dual_lr is not None else "")
        elif key == "workers":
            cores = _int_or_none(config.get("cpu_cores"))
            if kind == "table":
                text = "none needed (a table is not decoded)"
            elif cores is not None:
                text = f"{format_number(value)} (at most the {cores} CPU cores)"
        elif key == "cpu_cores":
            continue
        rows.append((str(key), text))
    return rows


def _cap(diagnostics: Mapping[str, Any]) -> dict[str, float] | None:
    """The soft-margin cap C at the end of training and the share of examples at it,
    when the run had a cap (for "how to read"); None otherwise."""
    cap, share = diagnostics.get("max_multiplier"), diagnostics.get("fraction_at_cap")
    if not isinstance(cap, (int, float)) or not isinstance(share, (int, float)):
        return None
    if not (math.isfinite(cap) and math.isfinite(share)):
        return None
    return {"value": float(cap), "share": float(share)}


def _rows(mapping: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [(str(key), format_number(value)) for key, value in mapping.items()]


def _backbone_rows(backbone: Any) -> list[tuple[str, str]]:
    """summary.json's ``backbone`` as key/value rows (``feature_cache.*`` for its cache)."""
    if not isinstance(backbone, Mapping):
        return []
    rows = []
    for key, value in backbone.items():
        if isinstance(value, Mapping):
            rows.extend((f"{key}.{name}", format_number(item)) for name, item in value.items())
        else:
            rows.append((str(key), format_number(value)))
    return rows


def _provenance_rows(metadata: Mapping[str, Any], *, skip: set[str]) -> list[tuple[str, str]]:
    """Seed, dataset fingerprint and versions from the Parquet metadata (keys already
    shown with the settings are left out)."""
    rows = []
    for key in ("seed", "dataset_fingerprint", "fingerprint", "versions"):
        if key in metadata and key not in skip:
            value = metadata[key]
            if isinstance(value, Mapping):
                rows.extend((f"{key}.{name}", format_number(item)) for name, item in value.items())
            else:
                rows.append((key, format_number(value)))
    return rows
