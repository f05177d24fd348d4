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
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
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
from .parquet import REPORT_FILE, RunFiles, atomic_write_text, load_run
from .plots import _difficulty_plot_svg, _history_plot_svg

__all__ = [
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
GALLERY_MAX_ITEMS = 500
TEMPLATE_NAME = "report.html.j2"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Columns of examples.parquet the page needs; the rest (per-class multipliers, ...)
# is never read, so a large run stays cheap to render.
REPORT_EXAMPLE_COLUMNS = (
    "difficulty",
    "flag",
    "given_label",
    "suggested_label",
    "given_target",
    "predicted_target",
)



# --------------------------------------------------------------------------- public API


def render_report(run_dir: str | os.PathLike[str]) -> Path:
    """Render ``report.html`` into a run folder from the folder's own files.

    Parameters
    ----------
    run_dir : path-like
        A folder holding ``examples.parquet``, ``summary.json``, ``set_aside.parquet``
        and ``gallery.parquet``.

    Returns
    -------
    Path
        The written ``report.html`` (replaced atomically).
    """
    run = load_run(run_dir, example_columns=REPORT_EXAMPLE_COLUMNS)
    page = build_report_html(run)
    return atomic_write_text(Path(run_dir) / REPORT_FILE, page)


def build_report_html(run: RunFiles) -> str:
    """The report page for ``run`` as one self-contained HTML string."""
    environment = _shared_environment()
    script = _asset_text("report.js")
    context = _report_context(run)
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
    environment.filters.update(count=format_count, number=format_number, percent=format_percent)
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


def _report_context(run: RunFiles) -> dict[str, Any]:
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

    context: dict[str, Any] = {
        "title": f"minnorm-audit report: {summary.get('data', run.run_dir.name)}",
        "summary": summary,
        "data_path": str(summary.get("data", "")),
        "tool_version": str(summary.get("version", "")),
        "run_name": run.run_dir.name,
        "kind": str(summary.get("kind") or run.metadata.get("kind") or ""),
        "task": run.task,
        "regression": regression,
        "num_examples": num_examples,
        "num_set_aside": num_set_aside,
        "counts": counts,
        "num_classes": len(class_names),
        "warnings": _consistency_warnings(summary, num_examples, num_set_aside, counts),
        "demo": _demo(summary.get("demo")),
        # A network that has not learned the data: the flags are not to be trusted.
        "inconclusive": _inconclusive(summary.get("inconclusive")),
        "flag_rule": flag_rule,
        "threshold": threshold,
        "num_zero_difficulty": int((difficulty == 0).sum()),
        "difficulty_plot": Markup(_difficulty_plot_svg(difficulty, flags.to_numpy(), threshold)),
        "history_plot": Markup(_history_plot_svg(summary.get("history") or [], summary.get("diagnostics") or {})),
        "diagnostics": _rows(summary.get("diagnostics") or {}),
        "cap": _cap(summary.get("diagnostics") or {}),
        # What the loader decided about the input (summary.json "notes"), shown under Set aside.
        "input_notes": [str(note) for note in summary.get("notes") or []],
        "timings": _rows(summary.get("timings") or {}),
        "config": _rows(summary.get("config") or {}),
        # The pretrained network the images went through (--backbone), flattened.
        "backbone": _backbone_rows(summary.get("backbone")),
        "provenance": _provenance_rows(run.metadata, skip=set(summary.get("config") or {})),
    }

    if regression or "given_label" not in examples:
        context.update(per_class=[], label_pairs=[], num_label_pairs=0)
    else:
        context.update(_label_tables(examples, class_names))

    gallery = run.gallery
    flagged = gallery["flag"].astype(str) if "flag" in gallery else pd.Series([], dtype=str)
    context["gallery_total"] = int((flagged != "outlier").sum())
    gallery = gallery.head(GALLERY_MAX_ITEMS)
    all_items = [_gallery_item(row, regression) for row in gallery.to_dict("records")]
    # Outliers get their own section: they belong to no class, so "given vs suggested"
    # and the class filter mean nothing for them.
    items = [item for item in all_items if item["flag"] != "outlier"]
    context["outlier_gallery"] = [item for item in all_items if item["flag"] == "outlier"]
    context["gallery"] = items
    context["gallery_flags"] = [flag for flag in FLAGS if any(item["flag"] == flag for item in items)]
    context["gallery_classes"] = _gallery_classes(items, class_names)
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


def _label_tables(examples: pd.DataFrame, class_names: Sequence[str]) -> dict[str, Any]:
    given = examples["given_label"].astype(str)
    flags = examples["flag"].astype(str)
    table = pd.crosstab(given, flags)
    for flag in FLAGS:
        if flag not in table:
            table[flag] = 0
    order = list(class_names) + sorted(set(table.index) - set(class_names))
    per_class = []
    for position, name in enumerate(order):
        if name in table.index:
            row = table.loc[name]
            count = int(row.sum())
            mislabeled, hard = int(row["mislabeled"]), int(row["hard"])
        else:
            count = mislabeled = hard = 0
        per_class.append(
            {
                "name": name,
                "count": count,
                "mislabeled": mislabeled,
                "hard": hard,
                "mislabeled_rate": mislabeled / count if count else 0.0,
                "hard_rate": hard / count if count else 0.0,
                "position": position,
            }
        )
    per_class.sort(key=lambda row: (-row["mislabeled_rate"], -row["hard_rate"], row["position"]))

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
    max_rate = max((row["mislabeled_rate"] + row["hard_rate"] for row in per_class), default=0.0)
    return {"per_class": per_class, "per_class_max_rate": max_rate, "label_pairs": pairs, "num_label_pairs": num_pairs}


def _gallery_item(row: Mapping[str, Any], regression: bool) -> dict[str, Any]:
    thumbnail = row.get("thumbnail_png")
    thumbnail_uri = None
    if isinstance(thumbnail, (bytes, bytearray, memoryview)) and bytes(thumbnail[:8]) == PNG_SIGNATURE:
        thumbnail_uri = "data:image/png;base64," + base64.b64encode(bytes(thumbnail)).decode("ascii")
    features: list[tuple[str, str]] | None = None
    features_raw = None
    raw = row.get("feature_values")
    if isinstance(raw, str) and raw:
        try:
            parsed = json.loads(raw)
        except json.JSONDecodeError:
            features_raw = raw
        else:
            if isinstance(parsed, Mapping):
                features = [(str(name), format_number(value)) for name, value in parsed.items()]
            else:
                features_raw = raw
    item = {
        "example_id": _int_or_none(row.get("example_id")),
        "source": _text(row.get("source")),
        "flag": _text(row.get("flag")),
        "difficulty": _finite_or_none(row.get("difficulty")),
        "percentile": _finite_or_none(row.get("difficulty_percentile")),
        "thumbnail": thumbnail_uri,
        "features": features,
        "features_raw": features_raw,
        "given": _text(row.get("given_label")),
        "suggested": _text(row.get("suggested_label")),
        "competing": _text(row.get("competing_label")),
    }
    if regression:
        given_target = _finite_or_none(row.get("given_target"))
        predicted_target = _finite_or_none(row.get("predicted_target"))
        item.update(
            given_target=given_target,
            predicted_target=predicted_target,
            residual=None if given_target is None or predicted_target is None else predicted_target - given_target,
        )
    return item


def _gallery_classes(items: Iterable[Mapping[str, Any]], class_names: Sequence[str]) -> list[dict[str, Any]]:
    involved: dict[str, int] = {}
    for item in items:
        for name in {item["given"], item["suggested"]}:
            if name:
                involved[name] = involved.get(name, 0) + 1
    order = [name for name in class_names if name in involved]
    order += sorted(set(involved) - set(order))
    return [{"name": name, "count": involved[name]} for name in order]


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


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return None
