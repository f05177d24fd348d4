"""The cleaned dataset: its rows (a manifest, or the audited table's own rows), the output
paths and the checks that keep them off the data and the run, and the atomic writers.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..report.parquet import atomic_write_bytes, write_json_atomic, write_parquet_atomic
from .decisions import CleanError

__all__ = ["MANIFEST_DESCRIPTIONS", "OUTPUT_SUFFIXES", "TRAIL_DESCRIPTIONS"]

OUTPUT_SUFFIXES = (".csv", ".parquet", ".pq")

MANIFEST_DESCRIPTIONS = {
    "path": "Image path relative to the audited data's root (see provenance paths_relative_to).",
    "label": "The example's label after cleaning (the reviewer's or rule's new label when relabeled).",
    "source": "The example's source in the audit (examples.parquet): its path or its position.",
    "action": "What was done: 'kept' or 'relabeled' (dropped examples are only in the trail file).",
    "old_label": "The label the audited dataset gave the example.",
}
TRAIL_DESCRIPTIONS = {
    "source": "The example's source in the audit (examples.parquet / set_aside.parquet).",
    "action": "'kept', 'dropped' or 'relabeled'.",
    "label": "The label after cleaning; empty when dropped.",
    "old_label": "The label the audited dataset gave the example.",
    "decided_by": "'reviewer' (the decisions file), 'rule' (the automatic rule) or 'set aside' (unreadable in the run).",
    "decision_line": "Line of the decisions file the reviewer's decision came from; empty otherwise.",
    "flag": "The audit's flag: 'mislabeled', 'hard' or 'ok' (empty for set-aside items).",
    "suggested_label": "The audit's suggested label.",
    "difficulty": "The audit's difficulty (higher = more suspect).",
    "note": "Why a set-aside item was dropped (the run's reason).",
}


# --------------------------------------------------------------------------- the cleaned dataset


def _input_description(metadata: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    """The run's ``input`` metadata; inferred (with the CLI's default columns) for runs
    written before it was recorded."""
    described = metadata.get("input")
    if isinstance(described, Mapping) and described.get("layout"):
        return dict(described)
    data = metadata.get("data") or summary.get("data")
    kind = metadata.get("kind") or summary.get("kind")
    if not data:
        raise CleanError("the run folder does not say which data it audited (no 'data' in its metadata)")
    data_path = Path(str(data))
    if data_path.is_dir():
        return {"layout": "images", "kind": "images", "path": str(data_path), "paths_relative_to": str(data_path)}
    if kind == "images":
        return {"layout": "manifest", "kind": "images", "path": str(data_path),
                "paths_relative_to": str(data_path.parent), "path_column": "path", "label_column": "label"}
    return {"layout": "table", "kind": "table", "path": str(data_path), "label_column": "label"}


def _cleaned_dataset(
    trail: pd.DataFrame, source_input: Mapping[str, Any], metadata: Mapping[str, Any], regression: bool
) -> pd.DataFrame:
    """The rows of the output file: the kept and relabeled examples, in audit order."""
    kept = trail[trail["action"].isin(["kept", "relabeled"]) & (trail["decided_by"] != "set aside")]
    layout = source_input["layout"]
    if layout == "table":
        return _cleaned_table(kept, source_input, metadata, regression)
    columns: dict[str, Any] = {}
    if layout in ("images", "manifest"):
        # The source is the path as the run read it, relative to paths_relative_to.
        columns["path"] = kept["source"].to_numpy()
    columns.update(
        label=kept["label"].to_numpy(),
        source=kept["source"].to_numpy(),
        action=kept["action"].to_numpy(),
        old_label=kept["old_label"].to_numpy(),
    )
    frame = pd.DataFrame(columns).reset_index(drop=True)
    return frame.astype({name: kept[name].dtype for name in ("label", "source", "action", "old_label")})


def _cleaned_table(
    kept: pd.DataFrame, source_input: Mapping[str, Any], metadata: Mapping[str, Any], regression: bool
) -> pd.DataFrame:
    """The audited table's rows that are kept, with the new labels written in.

    The table is loaded again exactly as the run loaded it and must give the run's
    dataset fingerprint: a table changed since the audit is refused.
    """
    from ..data import DataError, load_dataset
    from ..data.table import _read_frame

    table_path = Path(source_input["path"])
    label_column = str(source_input.get("label_column") or "label")
    try:
        loaded = load_dataset(
            table_path,
            format="table",
            label_column=label_column,
            task="regression" if regression else "classification",
            feature_columns=source_input.get("feature_columns"),
        )
    except DataError as error:
        raise CleanError(f"cannot read the audited table again: {error}") from None
    if metadata.get("dataset_fingerprint") and loaded.fingerprint != metadata["dataset_fingerprint"]:
        raise CleanError(
            f"{table_path} changed since the audit (its dataset fingerprint differs); audit it again before cleaning"
        )
    frame = _read_frame(table_path, str(table_path))
    positions = kept["source"].astype(int).to_numpy()
    rows = frame.iloc[positions].reset_index(drop=True)
    relabeled = (kept["action"] == "relabeled").to_numpy()
    if relabeled.any():
        new_labels = kept["label"].astype(object).to_numpy()
        column = rows[label_column]
        if pd.api.types.is_integer_dtype(column.dtype) and all(_is_integer_text(label) for label in new_labels):
            values: Any = new_labels.astype(np.int64)
        else:
            rows[label_column] = column.astype(object)
            values = new_labels
        rows.loc[relabeled, label_column] = values[relabeled]
    return rows


def _is_integer_text(text: Any) -> bool:
    return re.fullmatch(r"[+-]?\d+", str(text).strip()) is not None


# --------------------------------------------------------------------------- writing


def _output_paths(out: Path) -> dict[str, Path]:
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise CleanError(f"--out {out} must end in .csv or .parquet")
    if out.exists() and out.is_dir():
        raise CleanError(f"--out {out} is a folder; give a file name ending in .csv or .parquet")
    paths = {"manifest": out, "trail": out.with_name(f"{out.stem}.trail{out.suffix}")}
    if suffix == ".csv":
        paths["provenance"] = out.with_name(f"{out.stem}.provenance.json")
    return paths


def _check_outputs(outputs: list[Path], source_input: Mapping[str, Any], protected_files: list[Path]) -> None:
    """Refuse outputs inside the data folder, over the data file, over the run's files."""
    data_folders = []
    if source_input.get("layout") in ("images", "manifest") and source_input.get("paths_relative_to"):
        data_folders.append(Path(source_input["paths_relative_to"]).resolve())
    protected = {path.resolve() for path in protected_files}
    if source_input.get("path"):
        protected.add(Path(source_input["path"]).resolve())
    for output in outputs:
        resolved = output.resolve()
        for folder in data_folders:
            if resolved == folder or folder in resolved.parents:
                raise CleanError(f"refusing to write {output} inside the data folder {folder}; choose a path outside it")
        if resolved in protected:
            raise CleanError(f"refusing to write {output}: it would replace the run's or the data's own file {resolved}")


def _rerun_command(manifest: Path, source_input: Mapping[str, Any], regression: bool) -> str | None:
    layout = source_input["layout"]
    if layout not in ("images", "manifest", "table"):
        return None
    command = ["minnorm-audit", "run", str(manifest)]
    if layout in ("images", "manifest"):
        command += ["--data-root", str(source_input["paths_relative_to"])]
    else:
        label_column = str(source_input.get("label_column") or "label")
        if label_column != "label":
            command += ["--label-column", label_column]
        # The cleaned table keeps every column: the run's choice of features goes with it.
        for option, key in (("--feature-columns", "feature_columns_option"), ("--ignore-columns", "ignore_columns")):
            if source_input.get(key):
                command += [option, ",".join(str(name) for name in source_input[key])]
    if regression:
        command += ["--task", "regression"]
    return shlex.join(command)


def _write(
    paths: Mapping[str, Path],
    manifest: pd.DataFrame,
    trail: pd.DataFrame,
    provenance: Mapping[str, Any],
    source_input: Mapping[str, Any],
) -> None:
    paths["manifest"].parent.mkdir(parents=True, exist_ok=True)
    if "provenance" in paths:  # CSV: no place for metadata inside the file
        _write_csv(paths["trail"], trail)
        _write_csv(paths["manifest"], manifest)
        write_json_atomic(paths["provenance"], provenance)
        return
    metadata = {"clean": provenance}
    write_parquet_atomic(paths["trail"], trail, descriptions=TRAIL_DESCRIPTIONS, metadata=metadata)
    descriptions = dict(MANIFEST_DESCRIPTIONS)
    if source_input["layout"] == "table":
        label_column = str(source_input.get("label_column") or "label")
        manifest = _numeric_features(manifest, label_column)
        descriptions = {
            str(name): ("The label after cleaning." if name == label_column else "Feature copied from the audited table.")
            for name in manifest.columns
        }
    write_parquet_atomic(paths["manifest"], manifest, descriptions=descriptions, metadata=metadata)


def _numeric_features(frame: pd.DataFrame, label_column: str) -> pd.DataFrame:
    """A table read from CSV holds text; its feature columns go into Parquet as numbers."""
    frame = frame.copy()
    for name in frame.columns:
        if name != label_column and (frame[name].dtype == object or pd.api.types.is_string_dtype(frame[name])):
            try:
                frame[name] = pd.to_numeric(frame[name])
            except (ValueError, TypeError):
                pass  # left as text, which the table loader reads as it read the CSV
    return frame


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    atomic_write_bytes(path, frame.to_csv(index=False, lineterminator="\n").encode("utf-8"))
