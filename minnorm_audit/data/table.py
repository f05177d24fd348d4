"""CSV and Parquet files, and tables: numeric feature columns and a label column.

A CSV is read with every cell as text (numbers are parsed per column, so ``"007"``
labels stay labels and a stray word is reported by column and row); a Parquet file
keeps its types. A manifest is read the same way (:mod:`.manifest`).

What people's tables really look like:

- The delimiter is found from the first 64 KB: ``,`` unless those lines split
  consistently only on ``;``, tab or ``|``. In a file not delimited by ``,``, a column
  whose every number has a decimal comma (``1,5``) is read with decimal commas. Both
  are kept as notes (:attr:`LoadedDataset.notes`); pandas' fast C parser reads the file.
- A first column without a header holding increasing integers ``0, 1, 2, ...`` is the
  index ``DataFrame.to_csv(path)`` writes: it is left out of the features, with a note.
  ``ignore_columns`` leaves out any other column; ``feature_columns`` names them all.
- A column of fixed-length numeric lists (an embedding: a pyarrow ``list`` or
  ``fixed_size_list`` column, or pandas cells holding lists or arrays) becomes one
  feature per element, ``name[0]``, ``name[1]``, ...; ``feature_columns`` may name the
  column or single elements. Lists of different lengths stop the run naming the rows.
- A row with an empty label, a missing target or a missing or infinite feature value
  is set aside with the reason; a column bad in more than half of its rows
  (:data:`~.dataset.MOSTLY_BAD_SHARE`) stops the run. A finite value beyond float32's
  range stops it too (training runs in float32), naming the column and row.
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .encode import ColumnEncoding, NumbersWithText, encode_column, shorten
from .dataset import DataError, LoadedDataset, SetAsideItem, _list_names, _refuse_mostly_bad
from .fingerprint import _Fingerprint, _little_endian_bytes
from .text import detect_text_column, encode_texts
from .labels import (
    _check_label_shape,
    _labels_as_numbers,
    _MISSING_TOKENS,
    _cell_text,
    _class_indices,
    _label_texts,
    _non_finite_reasons,
    _numeric_targets,
    _refuse_beyond_float32,
    _to_numeric,
)

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
# The CSV delimiter is decided on the first lines of this many bytes.
SNIFF_BYTES = 1 << 16
_DELIMITERS = (",", ";", "\t", "|")
_DELIMITER_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}
_DECIMAL_COMMA_NUMBER = re.compile(r"[+-]?(?:\d+,\d*|,\d+|\d+)(?:[eE][+-]?\d+)?")
# pandas names a blank CSV header "Unnamed: <position>".
_UNNAMED = re.compile(r"(?:Unnamed: \d+)?")
_VECTOR_ELEMENT = re.compile(r"(.+)\[(\d+)\]")
# What _read_frame learned about a CSV, carried to the loaders in DataFrame.attrs.
_NOTES_ATTR = "minnorm_audit_notes"
_DELIMITER_ATTR = "minnorm_audit_delimiter"
# The CSV header as written (pandas renames a repeated name "label" to "label.1").
_HEADER_ATTR = "minnorm_audit_header"


def _read_frame(file_path: Path, shown: str) -> pd.DataFrame:
    """Read a CSV (every cell as text, delimiter detected) or a Parquet file (native types)."""
    suffix = file_path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(
            f"unsupported file extension {file_path.suffix!r} for {shown}: use a folder of images, .csv or .parquet"
        )
    try:
        if suffix == ".csv":
            # Text first: numbers are parsed per column later, so that "007" labels stay
            # labels and a stray word is reported by column and row instead of silently
            # turning the column into text.
            delimiter = _sniff_delimiter(file_path)
            frame = pd.read_csv(file_path, sep=delimiter, dtype=str, keep_default_na=False)
            notes = []
            if delimiter != ",":
                converted = _read_decimal_commas(frame)
                with_commas = f", with decimal commas in {_list_names(converted)}" if converted else ""
                notes.append(f"{shown} was read as a {_DELIMITER_NAMES[delimiter]}-delimited CSV{with_commas}")
            frame.attrs[_NOTES_ATTR] = notes
            frame.attrs[_DELIMITER_ATTR] = delimiter
            frame.attrs[_HEADER_ATTR] = _header_names(file_path, delimiter)
            return frame
        return pq.read_table(file_path).to_pandas()
    except (ValueError, OSError, NotImplementedError, pa.ArrowException) as err:
        kind = "CSV" if suffix == ".csv" else "Parquet"
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataError(f"cannot read {kind} file {shown}: {detail}") from err


def _header_names(file_path: Path, delimiter: str) -> list[str] | None:
    """The first line's fields as written, or None when it cannot be read as text."""
    with open(file_path, encoding="utf-8-sig", errors="replace", newline="") as stream:
        try:
            return next(csv.reader(stream, delimiter=delimiter))
        except (StopIteration, csv.Error):
            return None


def _sniff_delimiter(file_path: Path) -> str:
    """``,`` unless the first lines split into the same number (> 1) of fields only on
    ``;``, tab or ``|``; ``,`` too when nothing splits consistently (pandas then reports)."""
    with open(file_path, "rb") as stream:
        sample = stream.read(SNIFF_BYTES)
    lines = sample.decode("utf-8", errors="replace").splitlines()
    if len(sample) == SNIFF_BYTES:
        lines = lines[:-1]  # the last line may be cut
    lines = [line for line in lines[:200] if line.strip()]
    for delimiter in _DELIMITERS:
        try:
            widths = {len(row) for row in csv.reader(lines, delimiter=delimiter)}
        except csv.Error:
            continue
        if len(widths) == 1 and widths.pop() > 1:
            return delimiter
    return ","


def _read_decimal_commas(frame: pd.DataFrame) -> list[str]:
    """Columns whose every present value is a number and some have a decimal comma get
    ``.`` instead (in place); returns their names."""
    converted = []
    for name in frame.columns:
        texts = frame[name].astype(str).str.strip()
        values = texts[~texts.str.lower().isin(_MISSING_TOKENS)]
        if len(values) and values.str.contains(",", regex=False).any() and values.str.fullmatch(_DECIMAL_COMMA_NUMBER).all():
            frame[name] = texts.str.replace(",", ".", regex=False)
            converted.append(str(name))
    return converted


def _require_columns(frame: pd.DataFrame, shown: str, columns: dict[str, str]) -> None:
    """Raise naming the first missing column (role -> name) and listing those present."""
    for role, name in columns.items():
        if name not in frame.columns:
            raise DataError(f"{shown} has no {role} column {name!r}; its columns are: {_list_names(frame.columns)}"
                            f"{_delimiter_hint(frame)}")


def _delimiter_hint(frame: pd.DataFrame) -> str:
    """For a CSV read as one column whose name holds another delimiter: say how it was read."""
    delimiter = frame.attrs.get(_DELIMITER_ATTR)
    if delimiter is None or len(frame.columns) != 1:
        return ""
    if not any(other in str(frame.columns[0]) for other in _DELIMITERS if other != delimiter):
        return ""
    return f" (the file was read as {_DELIMITER_NAMES[delimiter]}-delimited: its lines do not split evenly on another delimiter)"


def _load_table(
    frame: pd.DataFrame,
    table_path: Path,
    shown: str,
    *,
    label_column: str,
    feature_columns: list[str] | None,
    task: str,
    ignore_columns: list[str] | None = None,
    text_column: str | None = None,
) -> LoadedDataset:
    """Load features (numbers, booleans, categories, dates: :mod:`.encode`) or a text
    column (:mod:`.text`) and a label (or regression target) column; rows with an
    empty label or a missing value are set aside (see the module notes)."""
    _refuse_duplicated_columns(frame, shown)
    _require_columns(frame, shown, {"label": label_column})
    notes: list[str] = list(frame.attrs.get(_NOTES_ATTR, []))
    frame = _drop_trailing_empty_rows(frame, shown, notes)
    if len(frame) == 0:
        raise DataError(f"{shown} has no rows")
    if text_column is not None:
        _require_columns(frame, shown, {"text": text_column})
        if text_column == label_column:
            raise DataError(f"{shown}: the label column {label_column!r} is also given as the text column")
    elif feature_columns is None:
        text_column = detect_text_column(frame, [name for name in frame.columns if name != label_column
                                                 and name not in (ignore_columns or [])])
        if text_column is not None:
            notes.append(f"{shown}: column {text_column!r} holds free text (long values, mostly different), so it is "
                         "audited with the text network (give --text-column to choose another)")
    if text_column is not None:
        others = [str(name) for name in frame.columns if name not in (label_column, text_column)
                  and name not in (ignore_columns or [])]
        if others and feature_columns is None:
            notes.append(f"{shown}: the text network reads the text column {text_column!r} only; "
                         f"{_list_names(others)} are not used")
        inputs, token_reasons = encode_texts(frame[text_column], text_column, shown)
        features = None
        reasons = dict(token_reasons)
        feature_names = [text_column]
        encodings = [ColumnEncoding(text_column, "text", [text_column])]
        display_columns = [text_column]
    else:
        feature_names = _feature_column_names(frame, shown, label_column, feature_columns, ignore_columns, notes)
        if not feature_names:
            raise DataError(f"{shown} has no feature columns besides the label column {label_column!r}")
        features, feature_names, reasons, encodings = _numeric_features(
            frame, feature_names, shown, named=feature_columns is not None)
        notes.extend(f"{shown}: {encoding.note}" for encoding in encodings if encoding.note)
        display_columns = [encoding.column for encoding in encodings
                           if encoding.encoding not in ("left out", "vector") and encoding.column in frame.columns]
    label_texts: list[str] | None = None
    if task == "regression":
        target_values, label_reasons = _numeric_targets(frame[label_column], shown, label_column)
    else:
        label_texts, label_reasons = _label_texts(frame[label_column], shown, label_column)
        label_texts = _labels_as_numbers(label_texts, shown, label_column, notes)
        _check_label_shape(label_texts, shown, label_column, notes)
    reasons.update(label_reasons)  # a row's label problem is named before its features'
    kept = np.array([row for row in range(len(frame)) if row not in reasons], dtype=np.int64)
    set_aside = [SetAsideItem(str(row), reasons[row]) for row in sorted(reasons)]
    if kept.size == 0:
        first = set_aside[0]
        raise DataError(f"no usable rows in {shown}: all {len(frame)} rows were set aside "
                        f"(first: row {first.source}: {first.reason})")
    sources = [str(row) for row in kept.tolist()]
    fingerprint = _Fingerprint("table" if features is not None else "text", task, None)
    for name in feature_names:
        fingerprint.add_text(name)
    if features is not None:
        if set_aside:
            features = np.ascontiguousarray(features[kept])
        fingerprint.add_bytes(_little_endian_bytes(features))
        input_tensor = torch.from_numpy(features)
    else:
        input_tensor = inputs[torch.from_numpy(kept)] if set_aside else inputs
        fingerprint.add_bytes(_little_endian_bytes(input_tensor.numpy()))
    if set_aside:  # which rows were kept (a table without bad rows keeps its former fingerprint)
        fingerprint.add_text(" ".join(sources))

    if label_texts is None:  # regression
        kept_targets = np.ascontiguousarray(target_values[kept]).reshape(-1, 1)
        fingerprint.add_bytes(_little_endian_bytes(kept_targets))
        targets = torch.from_numpy(kept_targets)
        class_names: list[str] = []
        target_names = [label_column]
    else:
        kept_labels = [label_texts[row] for row in kept.tolist()]
        for label in kept_labels:
            fingerprint.add_text(label)
        class_names, targets = _class_indices(kept_labels, shown)
        target_names = []

    # The cells as given, for the page's gallery (encoded features are not readable).
    plain = all(encoding.encoding in ("numeric", "vector") for encoding in encodings)
    original = None if plain or not display_columns else frame[display_columns].iloc[kept].reset_index(drop=True)
    return LoadedDataset(
        kind="table" if features is not None else "text",
        task=task,
        root=table_path,
        sources=sources,
        inputs=input_tensor,
        targets=targets,
        class_names=class_names,
        target_names=target_names,
        feature_names=feature_names,
        set_aside=set_aside,
        fingerprint=fingerprint.hexdigest(),
        image_size=None,
        notes=notes,
        column_encodings=[encoding.to_dict() for encoding in encodings],
        original_values=original,
    )


def _refuse_duplicated_columns(frame: pd.DataFrame, shown: str) -> None:
    """A header naming one column twice (pandas reads the CSV copy as ``name.1``)."""
    header = frame.attrs.get(_HEADER_ATTR)
    names = [str(name) for name in (header if header is not None else frame.columns)]
    seen: dict[str, int] = {}
    for position, name in enumerate(names):
        if name in seen:
            raise DataError(f"{shown}: the header names column {shorten(name)!r} twice (columns {seen[name] + 1} and "
                            f"{position + 1}); rename or remove one so that it is clear which is meant")
        seen[name] = position


def _drop_trailing_empty_rows(frame: pd.DataFrame, shown: str, notes: list[str]) -> pd.DataFrame:
    """Without the rows at the end that are empty in every column (what spreadsheets
    export for formatted empty rows: ``,,,``); a note says how many."""
    if not len(frame) or not len(frame.columns):
        return frame
    last = frame.iloc[-min(len(frame), 1):]
    if not _empty_rows(last).all():
        return frame
    empty = _empty_rows(frame)
    filled = np.flatnonzero(~empty)
    keep = int(filled[-1]) + 1 if filled.size else 0
    dropped = len(frame) - keep
    notes.append(f"{shown}: {dropped} row(s) at the end are empty in every column (rows {keep} to {len(frame) - 1}) "
                 "and were dropped")
    trimmed = frame.iloc[:keep]
    trimmed.attrs = dict(frame.attrs)
    return trimmed


def _empty_rows(frame: pd.DataFrame) -> np.ndarray:
    empty = np.ones(len(frame), dtype=bool)
    for name in frame.columns:
        column = frame[name]
        if column.dtype == object or pd.api.types.is_string_dtype(column):
            cells = column.astype("string").str.strip()
            empty &= (cells.isna() | (cells == "")).to_numpy(dtype=bool, na_value=True)
        else:
            empty &= column.isna().to_numpy(dtype=bool)
        if not empty.any():
            break
    return empty


def _feature_column_names(
    frame: pd.DataFrame,
    shown: str,
    label_column: str,
    feature_columns: list[str] | None,
    ignore_columns: list[str] | None,
    notes: list[str],
) -> list[str]:
    """The feature columns as named (vector columns not yet expanded): ``feature_columns``,
    or every column but the label, the ignored ones and a saved pandas index."""
    ignored = [str(name) for name in ignore_columns or []]
    unknown = [name for name in ignored if name not in frame.columns]
    if unknown:
        raise DataError(
            f"{shown} has no column(s) {_list_names(unknown)} to ignore; its columns are: {_list_names(frame.columns)}"
        )
    if label_column in ignored:
        raise DataError(f"{shown}: the label column {label_column!r} is also listed as a column to ignore")
    if feature_columns is None:
        names = [str(name) for name in frame.columns if name != label_column and name not in ignored]
        index_column = _saved_index_column(frame, names)
        if index_column is not None:
            names.remove(index_column)
            notes.append(
                f"{shown}: column {index_column!r} has no header and counts the rows (0, 1, 2, ...), the index "
                "that pandas' to_csv writes, so it is not used as a feature (name it in the feature columns to use it)"
            )
        return names
    names = [str(name) for name in feature_columns]
    missing = [name for name in names if name not in frame.columns and _vector_element(frame, name) is None]
    if missing:
        raise DataError(
            f"{shown} has no feature column(s) {_list_names(missing)}; "
            f"its columns are: {_list_names(frame.columns)}"
        )
    if label_column in names:
        raise DataError(f"{shown}: the label column {label_column!r} is also listed as a feature column")
    both = [name for name in names if name in ignored]
    if both:
        raise DataError(f"{shown}: column(s) {_list_names(both)} listed both as feature columns and as columns to ignore")
    return names


def _saved_index_column(frame: pd.DataFrame, candidates: list[str]) -> str | None:
    """The first column, when it has no header and holds increasing non-negative
    integers (``0..N-1``, or the gapped index of a filtered DataFrame)."""
    if len(frame.columns) == 0:
        return None
    first = str(frame.columns[0])
    if first not in candidates or not _UNNAMED.fullmatch(first) or _is_vector_column(frame[frame.columns[0]]):
        return None
    values, _ = _to_numeric(frame[frame.columns[0]])
    if values is None or not len(values) or not np.isfinite(values).all():
        return None
    if values[0] < 0 or not (values == np.round(values)).all() or not (np.diff(values) > 0).all():
        return None
    return first


def _numeric_features(
    frame: pd.DataFrame, feature_names: list[str], shown: str, *, named: bool = False
) -> tuple[np.ndarray, list[str], dict[int, str], list[ColumnEncoding]]:
    """Feature columns as float32 (N, D), their names (vector columns expanded,
    categories one-hot or hashed, dates in parts: :mod:`.encode`), {row: reason} for
    the rows holding a missing or infinite value, and each column's encoding. Raise
    naming a value beyond float32's range, or a column mostly missing.
    ``named``: the user named the feature columns (an id-like column is then kept)."""
    pieces: list[tuple[list[str], np.ndarray]] = []  # (names, values (N, width))
    encodings: list[ColumnEncoding] = []
    non_numeric: list[str] = []
    vectors: dict[str, np.ndarray] = {}
    for name in feature_names:
        element = None if name in frame.columns else _vector_element(frame, name)
        if element is not None:  # "name[i]": one element of a vector column
            base, index = element
            matrix = vectors.setdefault(base, _vector_values(frame[base], base, shown))
            if index >= matrix.shape[1]:
                raise DataError(f"{shown}: no feature {name!r}: column {base!r} holds lists of {matrix.shape[1]} values")
            pieces.append(([name], matrix[:, index : index + 1]))
            encodings.append(ColumnEncoding(name, "vector", [name]))
            continue
        column = frame[name]
        if _is_vector_column(column):
            matrix = vectors.setdefault(name, _vector_values(column, name, shown))
            element_names = [f"{name}[{index}]" for index in range(matrix.shape[1])]
            pieces.append((element_names, matrix))
            encodings.append(ColumnEncoding(name, "vector", element_names))
            continue
        try:
            values, encoding = encode_column(column, name, named=named)
        except NumbersWithText as mixed:
            example = shorten(_cell_text(column.iloc[mixed.row]))
            non_numeric.append(f"{name!r} (e.g. {example!r} in row {mixed.row})")
            continue
        encodings.append(encoding)
        if values is not None:
            pieces.append((encoding.features, values))
    if non_numeric:
        raise DataError(
            f"{shown} has numeric feature columns holding text: {_list_names(non_numeric, quote=False)} (non-numeric "
            f"values); fix those cells or leave the columns out{_decimal_comma_hint(frame, non_numeric)}"
        )
    if not pieces:
        raise DataError(f"{shown} has no usable feature columns: {_list_names(feature_names)} were all left out "
                        "(ids or names); name the feature columns to use them")
    names = [name for piece_names, _ in pieces for name in piece_names]
    features = np.empty((len(frame), len(names)), dtype=np.float32)
    start = 0
    for piece_names, values in pieces:
        # Checked before the cast: a huge value is named instead of becoming inf.
        _refuse_beyond_float32(values, piece_names, shown, "feature column")
        with np.errstate(over="ignore"):
            features[:, start : start + values.shape[1]] = values
        start += values.shape[1]
    not_finite = ~np.isfinite(features)
    if not_finite.any():
        counts = not_finite.sum(axis=0)
        worst = int(np.argmax(counts))
        _refuse_mostly_bad(np.flatnonzero(not_finite[:, worst]).tolist(), len(frame), shown,
                           f"missing, NaN or infinite value in feature column {names[worst]!r}",
                           "fill the column or leave it out (ignore columns)")
    return features, names, _non_finite_reasons(features, names, "value in feature column"), encodings


def _decimal_comma_hint(frame: pd.DataFrame, non_numeric: list[str]) -> str:
    delimiter = frame.attrs.get(_DELIMITER_ATTR)
    if delimiter is None or not any(re.search(r"\d,\d", entry) for entry in non_numeric):
        return ""
    return (
        f" (the file was read as {_DELIMITER_NAMES[delimiter]}-delimited; decimal commas are read only in a file "
        "not delimited by ',' and when every number in the column has one)"
    )


def _is_vector_column(column: pd.Series) -> bool:
    """A column of lists or arrays (pyarrow list types come to pandas as object cells)."""
    if isinstance(column.dtype, pd.ArrowDtype):
        arrow_type = column.dtype.pyarrow_dtype
        return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)
    if column.dtype != object:
        return False
    first = next((value for value in column if not _is_missing_cell(value)), None)
    return isinstance(first, (list, tuple, np.ndarray))


def _is_missing_cell(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _vector_element(frame: pd.DataFrame, name: str) -> tuple[str, int] | None:
    """``"embedding[3]"`` -> ``("embedding", 3)`` when ``embedding`` is a vector column."""
    match = _VECTOR_ELEMENT.fullmatch(name)
    if match is None or match.group(1) not in frame.columns or not _is_vector_column(frame[match.group(1)]):
        return None
    return match.group(1), int(match.group(2))


def _vector_values(column: pd.Series, name: str, shown: str) -> np.ndarray:
    """A vector column as (N, L) floats (NaN rows for missing cells); raise naming the
    column and the first rows whose lists differ in length from the others."""
    arrays: list[np.ndarray | None] = []
    for row, cell in enumerate(column.tolist()):
        if _is_missing_cell(cell):
            arrays.append(None)
            continue
        if not isinstance(cell, (list, tuple, np.ndarray)):
            raise DataError(f"{shown}: column {name!r} holds lists of numbers, but row {row} holds "
                            f"{_cell_text(cell)[:40]!r}; every row needs a list of the same length")
        try:
            array = np.asarray(cell, dtype=None if isinstance(cell, np.ndarray) else np.float64)
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                array = array.astype(np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{shown}: column {name!r} row {row} holds a list that is not all numbers") from None
        if array.ndim != 1:
            raise DataError(f"{shown}: column {name!r} row {row} holds an array of shape {array.shape}; "
                            "a vector column needs flat lists of numbers")
        arrays.append(array)
    lengths = np.array([-1 if array is None else len(array) for array in arrays], dtype=np.int64)
    present = np.flatnonzero(lengths >= 0)
    if not present.size:
        return np.full((len(arrays), 1), np.nan)  # all missing: reported as a mostly missing column
    values, counts = np.unique(lengths[present], return_counts=True)
    length = int(values[np.argmax(counts)])
    odd = present[lengths[present] != length]
    if odd.size:
        listed = ", ".join(f"row {row} ({lengths[row]})" for row in odd[:5].tolist())
        more = f" and {odd.size - 5} more rows" if odd.size > 5 else ""
        raise DataError(f"{shown}: vector column {name!r} has lists of different lengths: {length} values in most "
                        f"rows, but {listed}{more}; every row needs the same length")
    if length == 0:
        raise DataError(f"{shown}: vector column {name!r} holds empty lists")
    small = all(arrays[row].dtype in (np.float32, np.float16) for row in present.tolist())  # type: ignore[union-attr]
    matrix = np.full((len(arrays), length), np.nan, dtype=np.float32 if small else np.float64)
    matrix[present] = np.stack([arrays[row] for row in present.tolist()])  # type: ignore[misc]
    return matrix
