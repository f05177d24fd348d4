"""Images stored inside a table: a Parquet column of Hugging Face ``Image`` cells
(``struct<bytes: binary, path: string>``) or of raw encoded bytes.

Each cell is decoded like an image file (:func:`.images._decode_image_bytes`: same
formats, resizing, bit depths and limits); a cell that cannot be decoded sets its row
aside with the reason, as a bad file does in a folder. A struct cell without bytes but
with a ``path`` is read from that file, relative to the table's folder (and must stay
inside it, as a manifest's paths must). Messages never hold the bytes: a value shown
in one is cut to a few characters.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from .dataset import DataError, LoadedDataset, SetAsideItem
from .encode import ColumnEncoding
from .fingerprint import _Fingerprint, _little_endian_bytes
from .images import _decode_image_bytes, _describe_decode_error
from .labels import _check_label_shape, _class_indices, _label_texts, _labels_as_numbers, _numeric_targets

_BYTE_TYPES = (bytes, bytearray, memoryview)


def detect_image_column(frame: pd.DataFrame, candidates: Iterable[str]) -> str | None:
    """The first candidate column whose first present cell is encoded bytes or a
    ``{"bytes": ..., "path": ...}`` struct (Hugging Face ``Image``), or None."""
    for name in candidates:
        column = frame[name]
        if column.dtype != object:
            continue
        first = next((cell for cell in column.iloc[:100] if cell is not None and not _is_nan(cell)), None)
        if isinstance(first, _BYTE_TYPES) or (isinstance(first, dict) and "bytes" in first):
            return str(name)
    return None


def _is_nan(cell: Any) -> bool:
    return isinstance(cell, float) and cell != cell


def _cell_bytes(cell: Any, folder: Path | None) -> tuple[bytes | None, str | None]:
    """(encoded bytes, None) or (None, reason) for one cell."""
    if cell is None or _is_nan(cell):
        return None, "missing image"
    if isinstance(cell, _BYTE_TYPES):
        return bytes(cell), None
    if isinstance(cell, dict):
        content = cell.get("bytes")
        if isinstance(content, _BYTE_TYPES) and len(content):
            return bytes(content), None
        path = cell.get("path")
        if isinstance(path, str) and path:
            if folder is None:
                return None, "image given by path only, and the table has no folder to read it from"
            from .manifest import _contained_path

            try:
                _, file_path = _contained_path(folder, path, "image path", "the table's folder")
            except DataError as err:
                return None, str(err)[:120]
            if not file_path.is_file():
                return None, f"image path {path[:60]!r} is not a file"
            try:
                return file_path.read_bytes(), None
            except OSError as err:
                return None, f"cannot read image path {path[:60]!r} ({err.strerror or type(err).__name__})"
        return None, "empty image"
    return None, f"not image bytes (a {type(cell).__name__})"


def _decode_cell(content: bytes, image_size: int) -> tuple[np.ndarray | None, str | None]:
    try:
        return _decode_image_bytes(content, image_size), None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, "over Pillow's decompression-bomb pixel limit"
    except UnidentifiedImageError:
        return None, "cannot identify image"
    except Exception as err:  # noqa: BLE001 - one bad cell must never stop the run; the reason keeps what happened
        return None, _describe_decode_error(err)


def _load_image_table(
    frame: pd.DataFrame,
    table_path: Path | None,
    shown: str,
    *,
    label_column: str,
    image_column: str,
    task: str,
    image_size: int,
) -> LoadedDataset:
    """Decode the image column row by row; rows with a bad image or label are set aside."""
    notes: list[str] = [f"{shown}: column {image_column!r} holds encoded images, so the table is audited as images"]
    if task == "regression":
        targets_all, reasons = _numeric_targets(frame[label_column], shown, label_column)
        label_texts: list[str] | None = None
    else:
        label_texts, reasons = _label_texts(frame[label_column], shown, label_column)
        label_texts = _labels_as_numbers(label_texts, shown, label_column, notes)
        _check_label_shape(label_texts, shown, label_column, notes)
    folder = table_path.parent if table_path is not None else None
    pixels: list[np.ndarray] = []
    kept: list[int] = []
    hashes: list[bytes] = []
    for row, cell in enumerate(frame[image_column].tolist()):
        if row in reasons:
            continue
        content, reason = _cell_bytes(cell, folder)
        if content is not None:
            decoded, reason = _decode_cell(content, image_size)
        if reason is not None:
            reasons[row] = reason
            continue
        pixels.append(decoded)  # type: ignore[arg-type]
        kept.append(row)
        hashes.append(hashlib.sha256(content).digest())  # type: ignore[arg-type]
    set_aside = [SetAsideItem(str(row), reasons[row]) for row in sorted(reasons)]
    if not kept:
        first = set_aside[0]
        raise DataError(f"no readable images in {shown}: all {len(frame)} rows were set aside "
                        f"(first: row {first.source}: {first.reason})")
    fingerprint = _Fingerprint("images", task, image_size)
    sources = [str(row) for row in kept]
    for source, digest in zip(sources, hashes):
        fingerprint.add_text(source)
        fingerprint.add_bytes(digest)
    if label_texts is None:
        kept_targets = np.ascontiguousarray(targets_all[kept]).reshape(-1, 1)
        fingerprint.add_bytes(_little_endian_bytes(kept_targets))
        targets = torch.from_numpy(kept_targets)
        class_names: list[str] = []
        target_names = [label_column]
    else:
        kept_labels = [label_texts[row] for row in kept]
        for label in kept_labels:
            fingerprint.add_text(label)
        class_names, targets = _class_indices(kept_labels, shown)
        target_names = []
    return LoadedDataset(
        kind="images",
        task=task,
        root=table_path,
        sources=sources,
        inputs=torch.from_numpy(np.stack(pixels)),
        targets=targets,
        class_names=class_names,
        target_names=target_names,
        feature_names=[],
        set_aside=set_aside,
        fingerprint=fingerprint.hexdigest(),
        image_size=image_size,
        notes=notes,
        column_encodings=[ColumnEncoding(image_column, "image").to_dict()],
    )
