"""Small helpers shared by test files (pytest puts this folder on sys.path)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from PIL import Image

if TYPE_CHECKING:
    from minnorm_audit.data import DataError, LoadedDataset


def tree_hash(root: Path) -> str:
    """sha256 over every path and file content under ``root``: equal before and after
    means nothing was created, changed or deleted."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- data loading


def save_image(path: Path, image: Image.Image, **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)
    return path


def solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def image_bytes(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def noisy_rgb(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """Random pixels: compresses badly, so a cut file is really missing data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def set_aside_reasons(dataset: LoadedDataset) -> dict[str, str]:
    return {item.source: item.reason for item in dataset.set_aside}


def assert_one_line_error(excinfo: pytest.ExceptionInfo[DataError], *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
