"""Labels and numbers read from cells (table, manifest or in-memory columns).

Labels become stripped text (``3`` and ``3.0`` both ``"3"``) and class indices into
the sorted class names, sorted numerically when every label is an integer. Regression
targets and feature columns become floats, with missing-value tokens told apart from
text that is not a number.
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch

from .dataset import DataError, _refuse_mostly_bad

# Cell texts that mean "no value" in a CSV; they become NaN and are reported as missing
# rather than as non-numeric text.
_MISSING_TOKENS = frozenset({"", "nan", "-nan", "na", "n/a", "null", "none"})
_INTEGER_TEXT = re.compile(r"[+-]?\d+")
# Training runs in float32: a finite value beyond this would become inf.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _cell_text(value: Any) -> str:
    """A cell as stripped text: missing -> "", an integral float -> "3".

    Integral floats matter because pandas turns a Parquet int column with nulls into floats.
    """
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if math.isfinite(value) and float(value).is_integer():
            return str(int(value))
        return repr(float(value))
    if isinstance(value, (np.integer, np.bool_)):
        return str(value.item())
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    return str(value).strip()


def _label_texts(column: pd.Series, shown: str, label_column: str) -> tuple[list[str], dict[int, str]]:
    """Labels as stripped text, and {row: reason} for the rows whose label is empty
    (set aside); raise when more than half of them are empty."""
    texts = [_cell_text(value) for value in column.tolist()]
    empty_rows = [row for row, text in enumerate(texts) if not text]
    problem = f"empty label in column {label_column!r}"
    _refuse_mostly_bad(empty_rows, len(texts), shown, problem, "check the label column")
    return texts, {row: problem for row in empty_rows}


def _to_numeric(column: pd.Series) -> tuple[np.ndarray | None, int]:
    """Column as float64 (missing -> NaN), or (None, first non-numeric row)."""
    if pd.api.types.is_bool_dtype(column) or (
        pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_complex_dtype(column)
    ):
        return column.to_numpy(dtype=np.float64, na_value=np.nan), -1
    if pd.api.types.is_string_dtype(column) and not column.isna().any():
        texts = column.astype(str).str.strip()  # the CSV case, vectorized: every cell is text
    else:
        texts = pd.Series([_cell_text(value) for value in column.tolist()], dtype=object)
    numbers = pd.to_numeric(texts, errors="coerce")
    is_missing = texts.str.lower().isin(_MISSING_TOKENS)
    is_text = numbers.isna() & ~is_missing
    if is_text.any():
        return None, int(np.flatnonzero(is_text.to_numpy())[0])
    return numbers.to_numpy(dtype=np.float64, na_value=np.nan), -1


def _numeric_targets(column: pd.Series, shown: str, label_column: str) -> tuple[np.ndarray, dict[int, str]]:
    """Regression targets as float32 (N,), and {row: reason} for the rows whose target
    is missing or infinite (set aside); raise on text, on a finite value beyond float32's
    range, and when more than half of the targets are missing or infinite."""
    values, first_bad_row = _to_numeric(column)
    if values is None:
        example = _cell_text(column.iloc[first_bad_row])
        raise DataError(
            f"{shown}: regression target column {label_column!r} is not numeric "
            f"(e.g. {example!r} in row {first_bad_row})"
        )
    _refuse_beyond_float32(values.reshape(-1, 1), [label_column], shown, "regression target column")
    bad = _non_finite_reasons(values.reshape(-1, 1), [label_column], "target in column")
    _refuse_mostly_bad(sorted(bad), len(values), shown, f"missing or infinite target in column {label_column!r}",
                       "check the target column")
    return values.astype(np.float32), bad


def _refuse_beyond_float32(values: np.ndarray, names: list[str], shown: str, role: str) -> None:
    """Raise naming the first finite value of ``values`` (rows x columns, float64) that
    float32 cannot hold (it would become inf). Checked before any cast, so numpy's
    overflow RuntimeWarning is never printed."""
    huge = np.isfinite(values) & (np.abs(values) > FLOAT32_MAX)
    if huge.any():
        row, column = (int(index) for index in np.argwhere(huge)[0])  # row-major: the first bad row
        raise DataError(
            f"{shown}: value {values[row, column]:.6g} in {role} {names[column]!r} at row {row} is beyond "
            f"float32 range (about +/-3.4e38), which training uses; rescale the column or drop the row"
        )


def _non_finite_reasons(values: np.ndarray, names: list[str], role: str) -> dict[int, str]:
    """{row: reason} for each row of ``values`` (rows x columns) holding NaN or inf,
    naming the first such column."""
    not_finite = ~np.isfinite(values)
    reasons: dict[int, str] = {}
    for row in np.flatnonzero(not_finite.any(axis=1)).tolist():
        column = int(np.flatnonzero(not_finite[row])[0])
        kind = "missing" if np.isnan(values[row, column]) else "infinite"
        reasons[row] = f"{kind} {role} {names[column]!r}"
    return reasons


def _sorted_class_names(names: Iterable[str]) -> list[str]:
    """Unique names sorted as text, or numerically when every name is an integer ("9" < "10")."""
    unique = set(names)
    if all(_INTEGER_TEXT.fullmatch(name) for name in unique):
        return sorted(unique, key=lambda name: (int(name), name))
    return sorted(unique)


def _nfc(text: str) -> str:
    """``text`` in Unicode NFC: ``café`` typed on Linux (one code point for é) and
    written by macOS (e + a combining accent, NFD) are one name."""
    return unicodedata.normalize("NFC", text)


def _class_indices(labels: list[str], shown: str, notes: list[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """Sorted class names (see _sorted_class_names) and int64 indices into them.

    Labels are put in Unicode NFC first, so names that differ only in their Unicode
    form are one class; each such merge is added to ``notes`` (when given) as a line.
    """
    normalized = [_nfc(label) for label in labels]
    if notes is not None and normalized != labels:
        spellings: dict[str, set[str]] = {}
        for label, name in zip(labels, normalized):
            spellings.setdefault(name, set()).add(label)
        for name, forms in sorted(spellings.items()):
            if len(forms | {name}) > 1:
                notes.append(f"labels {', '.join(ascii(form) for form in sorted(forms | {name}))} of {shown} "
                             f"are one name in different Unicode forms; merged into class {name!r} (NFC)")
    labels = normalized
    class_names = _sorted_class_names(labels)
    if len(class_names) < 2:
        raise DataError(
            f"only one class ({class_names[0]!r}) among the readable examples of {shown}; "
            "classification needs at least two"
        )
    index_of = {name: index for index, name in enumerate(class_names)}
    return class_names, torch.tensor([index_of[label] for label in labels], dtype=torch.int64)


# A label column with at least this many distinct numeric values, most of them on one
# row only, looks like a continuous target: classification would make one-row classes.
REGRESSION_HINT_CLASSES = 20
_MULTI_LABEL_SEPARATORS = ("|", ";")


def _labels_as_numbers(texts: list[str], shown: str, label_column: str, notes: list[str]) -> list[str]:
    """Labels compared as numbers: when every present label is a number and two
    spellings name the same number (``1`` and ``1.0``, what a column that went through
    float looks like), each becomes its plain spelling (``"1"``), with a note."""
    present = [text for text in texts if text]
    if not present:
        return texts
    spellings = set(present)
    numbers = pd.to_numeric(pd.Series(sorted(spellings), dtype=object), errors="coerce")
    if numbers.isna().any():
        return texts
    canonical = {text: _cell_text(float(value)) for text, value in zip(sorted(spellings), numbers.tolist())}
    if len(set(canonical.values())) == len(spellings):
        return texts  # no two spellings of one number: the labels stay as written
    merged = sorted({text for text in spellings if canonical[text] != text})
    notes.append(f"{shown}: labels in column {label_column!r} are compared as numbers, so "
                 f"{_short_list(merged)} are read as {_short_list(sorted({canonical[t] for t in merged}))}")
    return [canonical.get(text, text) for text in texts]


def _check_label_shape(texts: list[str], shown: str, label_column: str, notes: list[str]) -> None:
    """Stop when the labels look like a regression target; note ``a|b`` multi-label cells."""
    present = [text for text in texts if text]
    counts = pd.Series(present, dtype=object).value_counts()
    if len(counts) >= REGRESSION_HINT_CLASSES and (counts == 1).sum() > len(counts) / 2:
        numeric = pd.to_numeric(counts.index.to_series(), errors="coerce").notna().all()
        if numeric:
            raise DataError(
                f"{shown}: label column {label_column!r} holds {len(counts)} distinct numbers, most of them on one row "
                f"only: it looks like a continuous target; audit it with --task regression (task='regression'), "
                "or bin it into classes first"
            )
    for separator in _MULTI_LABEL_SEPARATORS:
        joined = [label for label in counts.index if separator in label]
        if not joined:
            continue
        parts = {part.strip() for label in joined for part in label.split(separator)}
        rows = int(counts[joined].sum())
        if rows >= max(2, 0.05 * len(present)) or parts & set(counts.index):
            notes.append(
                f"{shown}: {rows} label(s) in column {label_column!r} hold several labels joined by {separator!r} "
                f"(e.g. {_short_list(joined[:1])}); multi-label audits are not supported yet, so each joined set is "
                "its own class: keep one label per row, or audit one yes/no column per label"
            )
            return


def _short_list(texts: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(text[:40]) for text in texts[:limit])
    return shown + (f" and {len(texts) - limit} more" if len(texts) > limit else "")
