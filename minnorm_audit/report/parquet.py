"""Writing and reading a run folder: atomic file writes, Parquet with described fields.

A run folder holds ``examples.parquet``, ``summary.json``, ``set_aside.parquet`` and
``gallery.parquet`` (see the column descriptions below). Every file is written to a
temporary file in the same folder and moved into place with :func:`os.replace`, so a
reader sees either the previous file or the new one, never half of one, and a failed
write leaves the previous file as it was (pyarrow deletes the target of a failed
write, which is why we never write to the target directly). The temporary file is
created private (0600) and given the mode a plain ``open()`` would have given the file
(``0o666`` less the process umask: 0644 under umask 022) before it is moved into
place; a caller may ask for another mode (the checkpoint stays 0600).

Parquet files carry a description on every field (field metadata key
``b"description"``) and the run's metadata as JSON under the schema metadata key
``b"minnorm_audit"``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "COLUMN_TYPES",
    "EXAMPLES_DESCRIPTIONS",
    "GALLERY_DESCRIPTIONS",
    "METADATA_KEY",
    "RUN_FILES",
    "SET_ASIDE_DESCRIPTIONS",
    "RunFiles",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_run",
    "read_metadata",
    "to_strict_json",
    "write_json_atomic",
    "write_parquet_atomic",
]

METADATA_KEY = b"minnorm_audit"
DESCRIPTION_KEY = b"description"

EXAMPLES_FILE = "examples.parquet"
SUMMARY_FILE = "summary.json"
SET_ASIDE_FILE = "set_aside.parquet"
GALLERY_FILE = "gallery.parquet"
REPORT_FILE = "report.html"
RUN_FILES = (EXAMPLES_FILE, SUMMARY_FILE, SET_ASIDE_FILE, GALLERY_FILE)

# --------------------------------------------------------------------------- descriptions

_SHARED_DESCRIPTIONS: dict[str, str] = {
    "example_id": "Position of the example in the loaded dataset (0-based); the index of its multipliers.",
    "source": "Where the example came from: its path relative to DATA, or its row number in a table.",
    "given_label": "The label the dataset gives the example.",
    "suggested_label": (
        "The label to use if acting on the flag: the competing label when flag is "
        "'mislabeled', otherwise the given label (an outlier's has no better label)."
    ),
    "competing_label": (
        "The class training pushed the example toward: the competing class it violated "
        "most on average (score_state 'violation'), else its largest multiplier."
    ),
    "difficulty": (
        "How hard the network had to push to fit the given label; higher means more "
        "suspect. score_state 'violation' (default): the largest mean margin violation "
        "over competing classes across training (the dual ascent before projection; "
        "> 0: on average inside the margin); 'average'/'final': the largest multiplier."
    ),
    "difficulty_percentile": "Rank percentile of difficulty among all examples, in [0, 100].",
    "flag": (
        "'mislabeled' (the network settled on another class: the suggested label), 'hard' (fitted far "
        "worse than its class, no single better class), 'outlier' (far from every row of the data and not "
        "fitted like its class: belongs to no class) or 'ok'; regression: 'hard' or 'ok'. The rule and its "
        "thresholds are in summary.json (flag_rule); when summary.json's 'inconclusive' is set, the network "
        "has not learned the data and no flag is to be trusted."
    ),
    "given_target": "Regression: the target value the dataset gives the example.",
    "predicted_target": "Regression: the network's output for the example at the scored epoch.",
}

EXAMPLES_DESCRIPTIONS: dict[str, str] = {
    **_SHARED_DESCRIPTIONS,
    "label_concentration": (
        "How much of the example's push points at one competing class, in [0, 1]: 0 "
        "spread evenly over the other classes, 1 all on one."
    ),
    "margin": "Output for the given label minus the best other output, at the end of training.",
    "predicted_label": (
        "The class the trained network predicts for the example at the end of training (its largest "
        "output); equal to given_label exactly when margin > 0."
    ),
    "class_multipliers": (
        "Final multiplier per class, in the order of class_names in the metadata (written for "
        "up to 100 classes)."
    ),
    # score_duplicates.py: splits, duplicates, conflicting copies, leaks.
    "split": "The split folder the example lies in (a split root DATA/<split>/<class>/...).",
    "duplicate_group": "Group of exact or near copies the example belongs to (null: none).",
    "duplicate_of": "Source of the example's nearest copy (null: none).",
    "duplicate_distance": "Distance to the nearest copy in the duplicate search's features (0: exact copy).",
    "duplicate_kind": "'exact' (same decoded pixels or row values) or 'near' (closer than the calibrated radius).",
    "duplicate_labels": "The labels the copies of the group carry, '|'-separated.",
    "duplicate_verdict": (
        "'agree' (the copies carry one label), 'mislabeled' (the group and the network contradict this "
        "copy's label), 'supported' (the label the evidence supports), 'conflicting' (a person must decide), "
        "'too large' (a group of over 1% of the data: inputs that do not tell examples apart; not judged)."
    ),
    "duplicate_evidence": "Why, e.g. 'duplicate of train/7/12.png labeled 7 (...)'.",
    "leak": "True when a copy of the example lies in another split.",
}

SET_ASIDE_DESCRIPTIONS: dict[str, str] = {
    "source": "Path relative to DATA (or row number) of an item that could not be used.",
    "reason": "Why the item was set aside (unreadable, empty, truncated, missing label, ...).",
}

GALLERY_DESCRIPTIONS: dict[str, str] = {
    **_SHARED_DESCRIPTIONS,
    "thumbnail_png": "Small PNG thumbnail of the image (null for tables).",
    "feature_values": "JSON object {feature name: value} of the first features (tables; null for images).",
}

# Types used for known columns whatever pandas infers (an all-null or empty column
# would otherwise come out as pyarrow's null type).
COLUMN_TYPES: dict[str, pa.DataType] = {
    "example_id": pa.int64(),
    "source": pa.string(),
    "given_label": pa.string(),
    "suggested_label": pa.string(),
    "competing_label": pa.string(),
    "difficulty": pa.float64(),
    "difficulty_percentile": pa.float64(),
    "flag": pa.string(),
    "label_concentration": pa.float64(),
    "margin": pa.float64(),
    "class_multipliers": pa.list_(pa.float32()),
    "given_target": pa.float64(),
    "predicted_target": pa.float64(),
    "reason": pa.string(),
    "thumbnail_png": pa.binary(),
    "feature_values": pa.string(),
}

# --------------------------------------------------------------------------- atomic writes


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None], *, mode: int | None = None) -> Path:
    """Call ``write`` on a temp file in the same folder, fsync it, then replace ``path``.

    The file ends with permissions ``mode``, by default those a plain ``open()`` would
    give it (``0o666`` less the umask). On any failure the temporary file is removed and
    an existing ``path`` is left untouched.
    """
    target = Path(path)
    temp = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    try:
        with temp:
            # mkstemp creates 0600 and os.replace keeps the temp file's mode.
            _set_mode(temp, 0o666 & ~current_umask() if mode is None else mode)
            write(temp)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp.name, target)
    except BaseException:
        _remove_quietly(temp.name)
        raise
    _fsync_folder(target.parent)
    return target


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where possible.

    Linux: the ``Umask:`` line of ``/proc/self/status`` (exact and thread-safe).
    Elsewhere the only way is ``os.umask``, which sets it to read it back; it is set to
    ``0o077`` for that instant (under a lock), so a file another thread creates
    meanwhile is at worst more private, never less.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def _set_mode(stream: Any, mode: int) -> None:
    try:
        os.fchmod(stream.fileno(), mode)
    except (AttributeError, NotImplementedError, OSError):  # no fchmod (Windows before Python 3.13)
        os.chmod(stream.name, mode)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_strict_json(obj: Any) -> Any:
    """A copy of ``obj`` that :func:`json.dumps` accepts with ``allow_nan=False``.

    NaN and +/-inf become ``None``; numpy scalars and arrays become Python numbers and
    lists; paths and other unknown objects become strings.
    """
    if obj is None or obj is pd.NA or obj is pd.NaT:
        return None
    if isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        return {str(key): to_strict_json(value) for key, value in obj.items()}
    if isinstance(obj, np.ndarray):
        return [to_strict_json(value) for value in obj.tolist()]
    if isinstance(obj, (Sequence, set, frozenset)) and not isinstance(obj, (bytes, bytearray)):
        return [to_strict_json(value) for value in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as strict JSON (indent=2; NaN and inf written as ``null``) atomically."""
    text = json.dumps(to_strict_json(obj), indent=2, allow_nan=False, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def write_parquet_atomic(
    path: str | os.PathLike[str],
    df: pd.DataFrame,
    *,
    descriptions: Mapping[str, str],
    metadata: Mapping[str, Any],
) -> Path:
    """Write ``df`` to ``path`` as Parquet with described fields, atomically.

    Parameters
    ----------
    path : path-like
        Target file; its folder must exist.
    df : DataFrame
        Written without its index. Known columns (:data:`COLUMN_TYPES`) get their
        fixed type; others keep the type pyarrow infers.
    descriptions : mapping of column name to description
        Must cover every column of ``df`` (extra entries are ignored).
    metadata : mapping
        Stored as strict JSON under the schema metadata key ``b"minnorm_audit"``.

    Raises
    ------
    ValueError
        If a column has no description.
    """
    target = Path(path)
    missing = [str(column) for column in df.columns if not descriptions.get(str(column))]
    if missing:
        raise ValueError(f"{target.name}: no description for column(s) {', '.join(missing)}")
    table = _table_with_descriptions(df, descriptions, metadata)
    return atomic_write(target, lambda stream: pq.write_table(table, stream))


def _table_with_descriptions(
    df: pd.DataFrame, descriptions: Mapping[str, str], metadata: Mapping[str, Any]
) -> pa.Table:
    inferred = pa.Schema.from_pandas(df, preserve_index=False)
    fields = []
    for field in inferred:
        data_type = COLUMN_TYPES.get(field.name, field.type)
        if pa.types.is_large_string(data_type):
            data_type = pa.string()
        fields.append(pa.field(field.name, data_type, nullable=True, metadata={DESCRIPTION_KEY: descriptions[field.name]}))
    schema = pa.schema(fields)
    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False)
    run_metadata = json.dumps(to_strict_json(dict(metadata)), allow_nan=False, ensure_ascii=False)
    schema_metadata = dict(table.schema.metadata or {})
    schema_metadata[METADATA_KEY] = run_metadata.encode("utf-8")
    return table.replace_schema_metadata(schema_metadata)


def _remove_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# --------------------------------------------------------------------------- reading


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The run metadata stored under ``b"minnorm_audit"`` in a Parquet file's schema.

    Raises
    ------
    ValueError
        If the file has no such metadata (it was not written by minnorm-audit).
    """
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{Path(path).name} has no minnorm_audit metadata (not written by minnorm-audit?)")
    return json.loads(raw)


@dataclass
class RunFiles:
    """The contents of a run folder, as read by :func:`load_run`."""

    run_dir: Path
    examples: pd.DataFrame
    summary: dict[str, Any]
    set_aside: pd.DataFrame
    gallery: pd.DataFrame
    metadata: dict[str, Any]

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``."""
        return str(self.summary.get("task") or self.metadata.get("task") or "classification")


def load_run(run_dir: str | os.PathLike[str], *, example_columns: Sequence[str] | None = None) -> RunFiles:
    """Read a run folder.

    Parameters
    ----------
    run_dir : path-like
        A folder written by ``minnorm-audit run``.
    example_columns : sequence of str, optional
        Read only these columns of ``examples.parquet`` (those that exist); all by
        default. The report reads a few columns so large runs stay cheap.

    Raises
    ------
    FileNotFoundError
        If the folder or one of its files is missing (one line naming it).
    ValueError
        If ``summary.json`` is not valid JSON or not an object.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a run folder: {folder} does not exist or is not a folder")
    for name in RUN_FILES:
        if not (folder / name).is_file():
            raise FileNotFoundError(f"not a run folder: {folder} has no {name}")
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{folder / SUMMARY_FILE} is not valid JSON: {error}") from None
    if not isinstance(summary, dict):
        raise ValueError(f"{folder / SUMMARY_FILE} must hold a JSON object")
    examples_path = folder / EXAMPLES_FILE
    columns = None
    if example_columns is not None:
        present = set(pq.read_schema(examples_path).names)
        columns = [column for column in example_columns if column in present]
    try:
        metadata = read_metadata(examples_path)
    except ValueError:
        metadata = {}
    return RunFiles(
        run_dir=folder,
        examples=pd.read_parquet(examples_path, columns=columns),
        summary=summary,
        set_aside=pd.read_parquet(folder / SET_ASIDE_FILE),
        gallery=pd.read_parquet(folder / GALLERY_FILE),
        metadata=metadata,
    )
