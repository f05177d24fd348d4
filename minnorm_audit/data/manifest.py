"""A manifest: a CSV or Parquet file with a path column and a label column.

Paths are relative to the manifest's folder, or to an explicit data root; a path that
is absolute or resolves (through ``..`` or a symlink) outside that folder is refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import torch

from .dataset import DataError, LoadedDataset, SetAsideItem
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
) -> LoadedDataset:
    """Load the images a manifest lists, each path relative to the manifest's folder
    (or to ``base_dir``, an explicit data root)."""
    _require_columns(frame, shown, {"path": path_column, "label": label_column})
    if len(frame) == 0:
        raise DataError(f"{shown} has no rows")
    manifest_dir = base_dir or manifest_path.parent
    base_name = "the data root" if base_dir else "the manifest's folder"

    written_paths: list[str] = []
    file_paths: list[Path] = []
    for row, value in enumerate(frame[path_column].tolist()):
        written = _cell_text(value)
        if not written:
            raise DataError(f"{shown} row {row}: empty {path_column!r}")
        file_paths.append(_contained_path(manifest_dir, written, f"{shown} row {row}", base_name))
        written_paths.append(written)

    if task == "regression":
        label_texts = None
        all_targets = _numeric_targets(frame[label_column], shown, label_column)
    else:
        label_texts = _label_texts(frame[label_column], shown, label_column)
        all_targets = None

    decoded = _read_image_files(file_paths, image_size, max_memory_gb)
    kept_rows = [row for row, result in enumerate(decoded) if result.reason is None]
    set_aside = [
        SetAsideItem(written_paths[row], result.reason or "unreadable")
        for row, result in enumerate(decoded)
        if result.reason is not None
    ]
    if not kept_rows:
        raise DataError(_nothing_readable_message(shown, set_aside))

    if all_targets is not None:  # regression
        kept_targets = all_targets[kept_rows]
        kept = [(written_paths[row], "", decoded[row]) for row in kept_rows]
        return _image_dataset(
            manifest_path,
            kept,
            [],
            torch.from_numpy(kept_targets.reshape(-1, 1)),
            set_aside,
            image_size,
            task="regression",
            target_names=[label_column],
        )
    assert label_texts is not None  # classification: set above
    kept = [(written_paths[row], label_texts[row], decoded[row]) for row in kept_rows]
    class_names, targets = _class_indices([label for _, label, _ in kept], shown)
    return _image_dataset(manifest_path, kept, class_names, targets, set_aside, image_size)


def _contained_path(base_dir: Path, written: str, where: str, base_name: str = "the manifest's folder") -> Path:
    """Resolve ``written`` under ``base_dir``; refuse anything that lands outside it."""
    if os.path.isabs(written) or written.startswith(("/", "\\")):
        raise DataError(f"{where}: path {written!r} is absolute; manifest paths must be relative to {base_name}")
    # resolve() follows symlinks and '..', so both kinds of escape are caught here.
    resolved = (base_dir / written).resolve()
    if not resolved.is_relative_to(base_dir):
        raise DataError(f"{where}: path {written!r} points outside {base_name} {base_dir}")
    return resolved


def _data_root_folder(data_root: str | Path | None) -> Path | None:
    """An explicit data root for manifest paths, resolved; it must be a folder."""
    if data_root is None:
        return None
    folder = Path(data_root).expanduser()
    if not folder.is_dir():
        raise DataError(f"data root {data_root} is not a folder")
    return folder.resolve()
