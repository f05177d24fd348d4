"""A manifest: a CSV or Parquet file with a path column and a label column.

Paths are relative to the manifest's folder, or to an explicit data root; a path that
is absolute or resolves (through ``..`` or a symlink) outside that folder is refused.
Backslashes are read as ``/`` (a manifest written on Windows: ``images\\cat\\1.jpg``),
and the example's ``source`` is the path with ``/``. A row whose path or label is
empty is set aside with the reason, like a row whose file is missing or unreadable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .dataset import DataError, LoadedDataset, SetAsideItem, _refuse_mostly_bad
from .images import _DecodedImage
from .image_files import _image_dataset, _nothing_readable_message, _read_image_files
from .labels import _cell_text, _class_indices, _label_texts, _numeric_targets
from .table import _require_columns


def _load_manifest(
    frame: pd.DataFrame,
    manifest_path: Path,
    shown: str,
    *,
    label_column: str,
    path_column: str,
    task: str,
    image_size: int,
    base_dir: Path | None = None,
    max_memory_gb: float | None = None,
    workers: int | None = None,
) -> LoadedDataset:
    """Load the images a manifest lists, each path relative to the manifest's folder
    (or to ``base_dir``, an explicit data root). A row whose path or label is empty, or
    whose file cannot be read, is set aside; a column empty in most rows stops the load."""
    _require_columns(frame, shown, {"path": path_column, "label": label_column})
    if len(frame) == 0:
        raise DataError(f"{shown} has no rows")
    manifest_dir = base_dir or manifest_path.parent
    base_name = "the data root" if base_dir else "the manifest's folder"

    reasons: dict[int, str] = {}
    written_paths: list[str] = []
    file_paths: dict[int, Path] = {}
    for row, value in enumerate(frame[path_column].tolist()):
        written = _cell_text(value)
        if not written:
            reasons[row] = f"empty {path_column!r}"
            written_paths.append(f"row {row}")
            continue
        written, file_paths[row] = _contained_path(manifest_dir, written, f"{shown} row {row}", base_name)
        written_paths.append(written)
    _refuse_mostly_bad(sorted(reasons), len(frame), shown, f"empty {path_column!r}", "check the path column")

    label_texts: list[str] | None = None
    if task == "regression":
        all_targets, label_reasons = _numeric_targets(frame[label_column], shown, label_column)
    else:
        label_texts, label_reasons = _label_texts(frame[label_column], shown, label_column)
    for row, reason in label_reasons.items():
        reasons.setdefault(row, reason)

    notes: list[str] = []
    repeated = _repeated_files(file_paths, reasons, label_texts if label_texts is not None else
                               [_cell_text(value) for value in all_targets.tolist()], notes, shown)
    reasons.update(repeated)
    # Only the rows still in play are read.
    to_read = [row for row in range(len(frame)) if row not in reasons]
    decoded: dict[int, _DecodedImage] = {}
    read = _read_image_files([file_paths[row] for row in to_read], image_size, max_memory_gb, workers=workers)
    for row, result in zip(to_read, read):
        if result.reason is None:
            decoded[row] = result
        else:
            reasons[row] = result.reason or "unreadable"
    kept_rows = sorted(decoded)
    set_aside = [SetAsideItem(written_paths[row], reasons[row]) for row in sorted(reasons)]
    if not kept_rows:
        raise DataError(_nothing_readable_message(shown, set_aside))

    if label_texts is None:  # regression
        kept_targets = np.ascontiguousarray(all_targets[kept_rows])
        kept = [(written_paths[row], "", decoded[row]) for row in kept_rows]
        loaded = _image_dataset(
            manifest_path,
            kept,
            [],
            torch.from_numpy(kept_targets.reshape(-1, 1)),
            set_aside,
            image_size,
            task="regression",
            target_names=[label_column],
        )
        loaded.notes = notes + loaded.notes
        return loaded
    kept = [(written_paths[row], label_texts[row], decoded[row]) for row in kept_rows]
    class_names, targets = _class_indices([label for _, label, _ in kept], shown, notes=notes)
    loaded = _image_dataset(manifest_path, kept, class_names, targets, set_aside, image_size)
    loaded.notes = notes + loaded.notes
    return loaded


def _repeated_files(
    file_paths: dict[int, Path], reasons: dict[int, str], labels: list[str], notes: list[str], shown: str
) -> dict[int, str]:
    """{row: reason} for each row naming a file an earlier row already named: one file
    is one example (two rows would share one ``source``, and ``clean`` would keep both).
    The first row is kept; a later row with another label is a conflict a person must
    settle, said in its reason and in a note."""
    first_row: dict[Path, int] = {}
    repeated: dict[int, str] = {}
    conflicts = 0
    for row in sorted(file_paths):
        if row in reasons:
            continue
        first = first_row.setdefault(file_paths[row], row)
        if first == row:
            continue
        if labels[row] == labels[first]:
            repeated[row] = f"same file as row {first}, listed again"
        else:
            conflicts += 1
            repeated[row] = (f"same file as row {first}, labeled {labels[first]!r} there and {labels[row]!r} here: "
                             f"conflicting labels, row {first} kept; a person must decide")
    if repeated:
        notes.append(f"{shown}: {len(repeated)} rows name a file an earlier row names ({conflicts} with another "
                     "label); each file is audited once, with its first row's label, and the repeats are set aside")
    return repeated


# "C:\\photos\\x.jpg", "C:/photos/x.jpg": absolute on Windows, whatever the OS reading it.
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[/\\]")


def _contained_path(base_dir: Path, written: str, where: str, base_name: str = "the manifest's folder") -> tuple[str, Path]:
    """The path as a POSIX source (backslashes read as ``/``: a manifest written on
    Windows) and resolved under ``base_dir``; refuse anything that lands outside it."""
    if os.path.isabs(written) or written.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(written):
        raise DataError(f"{where}: path {written!r} is absolute; manifest paths must be relative to {base_name}")
    posix = written.replace("\\", "/")
    # resolve() follows symlinks and '..', so both kinds of escape are caught here.
    resolved = (base_dir / posix).resolve()
    if not resolved.is_relative_to(base_dir):
        raise DataError(f"{where}: path {written!r} points outside {base_name} {base_dir}")
    return posix, resolved


def _data_root_folder(data_root: str | Path | None) -> Path | None:
    """An explicit data root for manifest paths, resolved; it must be a folder."""
    if data_root is None:
        return None
    folder = Path(data_root).expanduser()
    if not folder.is_dir():
        raise DataError(f"data root {data_root} is not a folder")
    return folder.resolve()
