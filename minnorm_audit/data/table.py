"""CSV and Parquet files, and tables: numeric feature columns and a label column.

A CSV is read with every cell as text (numbers are parsed per column, so ``"007"``
labels stay labels and a stray word is reported by column and row); a Parquet file
keeps its types. A manifest is read the same way (:mod:`.manifest`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .dataset import DataError, LoadedDataset, _list_names
from .fingerprint import _Fingerprint, _little_endian_bytes
from .labels import _cell_text, _class_indices, _label_texts, _numeric_targets, _to_numeric

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")


def _read_frame(file_path: Path, shown: str) -> pd.DataFrame:
    """Read a CSV (every cell as text) or a Parquet file (native types)."""
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
            return pd.read_csv(file_path, dtype=str, keep_default_na=False)
        return pq.read_table(file_path).to_pandas()
    except (ValueError, OSError, NotImplementedError, pa.ArrowException) as err:
        kind = "CSV" if suffix == ".csv" else "Parquet"
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataError(f"cannot read {kind} file {shown}: {detail}") from err


def _require_columns(frame: pd.DataFrame, shown: str, columns: dict[str, str]) -> None:
    """Raise naming the first missing column (role -> name) and listing those present."""
    for role, name in columns.items():
        if name not in frame.columns:
            raise DataError(f"{shown} has no {role} column {name!r}; its columns are: {_list_names(frame.columns)}")


def _load_table(
    frame: pd.DataFrame,
    table_path: Path,
    shown: str,
    *,
    label_column: str,
    feature_columns: list[str] | None,
    task: str,
) -> LoadedDataset:
    """Load numeric features and a label (or regression target) column."""
    _require_columns(frame, shown, {"label": label_column})
    if feature_columns is None:
        feature_names = [str(name) for name in frame.columns if name != label_column]
    else:
        feature_names = list(feature_columns)
        missing = [name for name in feature_names if name not in frame.columns]
        if missing:
            raise DataError(
                f"{shown} has no feature column(s) {_list_names(missing)}; "
                f"its columns are: {_list_names(frame.columns)}"
            )
        if label_column in feature_names:
            raise DataError(f"{shown}: the label column {label_column!r} is also listed as a feature column")
    if not feature_names:
        raise DataError(f"{shown} has no feature columns besides the label column {label_column!r}")
    if len(frame) == 0:
        raise DataError(f"{shown} has no rows")

    features = _numeric_features(frame, feature_names, shown)
    sources = [str(row) for row in range(len(frame))]
    fingerprint = _Fingerprint("table", task, None)
    for name in feature_names:
        fingerprint.add_text(name)
    fingerprint.add_bytes(_little_endian_bytes(features))

    if task == "regression":
        target_values = _numeric_targets(frame[label_column], shown, label_column).reshape(-1, 1)
        fingerprint.add_bytes(_little_endian_bytes(target_values))
        targets = torch.from_numpy(target_values)
        class_names: list[str] = []
        target_names = [label_column]
    else:
        label_texts = _label_texts(frame[label_column], shown, label_column)
        for label in label_texts:
            fingerprint.add_text(label)
        class_names, targets = _class_indices(label_texts, shown)
        target_names = []

    return LoadedDataset(
        kind="table",
        task=task,
        root=table_path,
        sources=sources,
        inputs=torch.from_numpy(features),
        targets=targets,
        class_names=class_names,
        target_names=target_names,
        feature_names=feature_names,
        set_aside=[],
        fingerprint=fingerprint.hexdigest(),
        image_size=None,
    )


def _numeric_features(frame: pd.DataFrame, feature_names: list[str], shown: str) -> np.ndarray:
    """Feature columns as float32 (N, D); raise naming non-numeric or non-finite columns."""
    columns: list[np.ndarray] = []
    non_numeric: list[str] = []
    for name in feature_names:
        values, first_bad_row = _to_numeric(frame[name])
        if values is None:
            example = _cell_text(frame[name].iloc[first_bad_row])
            non_numeric.append(f"{name!r} (e.g. {example!r} in row {first_bad_row})")
        else:
            columns.append(values)
    if non_numeric:
        raise DataError(
            f"{shown} has non-numeric feature columns: {_list_names(non_numeric, quote=False)}; "
            "choose the feature columns or drop these"
        )
    # Cast before the check: a value beyond float32's range becomes inf and is caught too.
    features = np.ascontiguousarray(np.stack(columns, axis=1).astype(np.float32))
    not_finite = ~np.isfinite(features)
    if not_finite.any():
        row, column = np.argwhere(not_finite)[0]  # argwhere is row-major: the first bad row
        raise DataError(
            f"{shown}: missing, NaN or infinite value in feature column {feature_names[column]!r} "
            f"at row {row}; fill or drop it"
        )
    return features
