"""The report's gallery: every flagged example as JSON for the page's script to page
through, and the first page of each section (mislabeled and hard; outliers) as items
for the template, so the page reads without JavaScript too."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from markupsafe import Markup

from .formatting import FLAGS, _finite_or_none, format_number
from .parquet import RunFiles

GALLERY_MAX_ITEMS = 500
# The page lists at most this many flagged examples per section (most difficult
# first) for paging through, at about 100 bytes each without a thumbnail: 2 MB. Beyond
# it the page says how many more are in examples.parquet.
FLAGGED_LIST_MAX = 20_000
# Gallery page size when neither the caller nor the run's settings give one.
DEFAULT_PAGE_SIZE = 60
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gallery_context(run: RunFiles, regression: bool, class_names: Sequence[str], page_size: int) -> dict[str, Any]:
    """The gallery: every flagged example (most difficult first, up to
    FLAGGED_LIST_MAX) as JSON for the page's script to page through, and the first page
    of each section rendered as HTML for a reader without JavaScript. Thumbnails and
    feature rows come from gallery.parquet (the run's ``--gallery-size`` most difficult
    of each section)."""
    examples = run.examples
    flags = examples["flag"].astype(str) if "flag" in examples else pd.Series([], dtype=str)
    stored = {}
    for row in run.gallery.head(2 * GALLERY_MAX_ITEMS).to_dict("records"):
        item = _gallery_item(row, regression)
        if item["example_id"] is not None:
            stored[item["example_id"]] = item
    flagged = examples.loc[flags != "ok"]
    if "difficulty" in flagged:
        flagged = flagged.sort_values("difficulty", ascending=False, kind="stable")
    sections: dict[str, list[dict[str, Any]]] = {"gallery": [], "outliers": []}
    totals = {"gallery": 0, "outliers": 0}
    for name, rows in (("gallery", flagged[flagged["flag"].astype(str) != "outlier"]),
                       ("outliers", flagged[flagged["flag"].astype(str) == "outlier"])):
        totals[name] = len(rows)
        for row in rows.head(FLAGGED_LIST_MAX).to_dict("records"):
            item = _gallery_item(row, regression)
            extra = stored.get(item["example_id"]) if item["example_id"] is not None else None
            if extra is not None:
                item.update(thumbnail=extra["thumbnail"], features=extra["features"],
                            features_raw=extra["features_raw"])
            sections[name].append(item)
    if not len(examples.columns.intersection(["example_id"])):  # an old folder: the stored rows alone
        items = list(stored.values())
        sections = {"gallery": [item for item in items if item["flag"] != "outlier"],
                    "outliers": [item for item in items if item["flag"] == "outlier"]}
        totals = {name: len(items) for name, items in sections.items()}
    items = sections["gallery"]
    data = {
        "pageSize": page_size,
        "regression": regression,
        "table": str(run.summary.get("kind") or "") == "table",
        "sections": {name: {"total": totals[name], "items": [_item_json(item) for item in section]}
                     for name, section in sections.items()},
    }
    return {
        "gallery": items[:page_size],
        "gallery_listed": len(items),
        "gallery_total": totals["gallery"],
        "outlier_gallery": sections["outliers"][:page_size],
        "outliers_listed": len(sections["outliers"]),
        "page_size": page_size,
        "gallery_flags": [flag for flag in FLAGS if flag != "outlier" and any(item["flag"] == flag for item in items)],
        "gallery_classes": _gallery_classes(items, class_names),
        "suggested_classes": _suggested_classes(items, class_names),
        "gallery_json": Markup(_script_json(data)),
    }


def _item_json(item: Mapping[str, Any]) -> dict[str, Any]:
    """One gallery item as the page's script reads it (short keys: the list can hold
    thousands)."""
    out: dict[str, Any] = {"i": item["example_id"], "s": item["source"], "f": item["flag"],
                           "d": item["difficulty"], "q": item["percentile"]}
    for key, name in (("g", "given"), ("p", "suggested"), ("c", "competing")):
        if item.get(name):
            out[key] = item[name]
    for key, name in (("gt", "given_target"), ("pt", "predicted_target"), ("r", "residual")):
        if item.get(name) is not None:
            out[key] = item[name]
    if item.get("thumbnail"):
        out["t"] = item["thumbnail"]
    if item.get("features"):
        out["x"] = item["features"]
    elif item.get("features_raw"):
        out["xr"] = item["features_raw"]
    return out


def _script_json(data: Any) -> str:
    """JSON safe inside a ``<script type="application/json">`` element: ``<``, ``>``,
    ``&`` and the line separators escaped, so no text can close the element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for character, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                               ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(character, escaped)
    return text


def _harder_than(percentile: float | None) -> str | None:
    """A difficulty percentile in words: "harder than 82% of examples"."""
    if percentile is None:
        return None
    share = max(0.0, min(100.0, percentile))
    return f"harder than {share:.1f}% of examples" if 99 <= share < 100 else f"harder than {share:.0f}% of examples"


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
        "percentile": _harder_than(_finite_or_none(row.get("difficulty_percentile"))),
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


def _suggested_classes(items: Iterable[Mapping[str, Any]], class_names: Sequence[str]) -> list[dict[str, Any]]:
    """The suggested labels of the likely mislabeled examples, for the gallery's filter."""
    found: dict[str, int] = {}
    for item in items:
        if item["flag"] == "mislabeled" and item["suggested"]:
            found[item["suggested"]] = found.get(item["suggested"], 0) + 1
    order = [name for name in class_names if name in found] + sorted(set(found) - set(class_names))
    return [{"name": name, "count": found[name]} for name in order]


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None or pd.isna(value) else int(value)
    except (TypeError, ValueError):
        return None
