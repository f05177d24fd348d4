"""Load a labeled dataset into tensors, read-only, setting aside what cannot be read.

Three layouts are understood (see :func:`load_dataset`):

- an image folder, ``DATA/<class_name>/<image files>`` (torchvision's ImageFolder layout);
- a manifest, a CSV or Parquet file with a path column and a label column;
- a table, a CSV or Parquet file with numeric feature columns and a label column.

Two kinds of problems are kept apart. One unreadable example (a truncated JPEG, a
``notes.txt`` in a class folder, a manifest row whose file is gone) is *set aside* with a
reason and the run goes on. A problem with the input as a whole (no label column, a
single class, a manifest path that escapes its folder) raises :class:`DataError`, whose
message is one line naming the problem and the file.

Nothing under the data path is ever created, changed or deleted: files are opened for
reading only and nothing is cached beside them.

The module also ships a small demo: scikit-learn's copy of the UCI handwritten digits
(:func:`load_bundled_digits`), which :func:`write_demo_dataset` writes out as an image
folder with a known share of labels flipped, so that an audit can be checked against
the truth.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import math
import os
import re
import secrets
import shutil
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_FORMATS",
    "DataError",
    "DemoDataset",
    "LoadedDataset",
    "SetAsideItem",
    "load_arrays",
    "load_bundled_digits",
    "load_dataset",
    "load_frame",
    "load_torch_dataset",
    "write_demo_dataset",
]

FORMATS = ("auto", "images", "manifest", "table")
TASKS = ("classification", "regression")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")

# Cell texts that mean "no value" in a CSV; they become NaN and are reported as missing
# rather than as non-numeric text.
_MISSING_TOKENS = frozenset({"", "nan", "-nan", "na", "n/a", "null", "none"})
_INTEGER_TEXT = re.compile(r"[+-]?\d+")
# Pillow modes holding more than 8 bits per pixel; they are scaled down to 8 bits.
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_FINGERPRINT_VERSION = "minnorm-audit-data-v1"
# Raster formats Pillow may try. Not "any format": EPS would hand a file from DATA to
# Ghostscript, and the rarer decoders (WMF, PSD, FITS, ...) are more attack surface than use.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "AVIF", "PPM", "TGA", "ICO", "JPEG2000", "QOI")


class DataError(Exception):
    """The input is unusable as a whole.

    ``str(err)`` is one line naming the problem and the file, fit to show a user as is.
    """

    def __init__(self, message: str) -> None:
        # File and column names are user input: a newline in one must not break the one-line contract.
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class SetAsideItem:
    """One example that could not be used, and why.

    Attributes
    ----------
    source : str
        Path relative to the data root (image folder) or as written in the manifest;
        for a table, the 0-based data row as a string.
    reason : str
        Short human reason, e.g. ``"zero-byte file"`` or ``"truncated image"``.
    """

    source: str
    reason: str


@dataclass
class LoadedDataset:
    """A dataset ready for training: one row of ``inputs`` and ``targets`` per example.

    The example id is the position in ``sources``/``inputs``/``targets``.

    Attributes
    ----------
    kind : {"images", "table"}
    task : {"classification", "regression"}
    root : Path or None
        The data path given by the user (folder or file), resolved; None for data
        given in memory (see ``origin``).
    sources : list of str
        One per kept example: a relative POSIX path for images, the 0-based row number
        for tables.
    inputs : Tensor or LazyImages
        Images: uint8, shape (N, 3, S, S); a :class:`~minnorm_audit.streaming.LazyImages`
        (decoded per item, same pixels) when the images do not fit ``max_memory_gb``. Tables: float32, shape (N, D), not
        standardized (the trainer standardizes).
    targets : Tensor
        Classification: int64 class indices into ``class_names``, shape (N,).
        Regression: float32, shape (N, T).
    class_names : list of str
        Classification: the sorted class names. Regression: empty.
    target_names : list of str
        Regression: the target column name(s). Classification: empty.
    feature_names : list of str
        Tables: the feature column names. Images: empty.
    set_aside : list of SetAsideItem
        Examples that could not be read, with reasons.
    fingerprint : str
        sha256 hex digest over the sources, labels or targets and input bytes (each
        image file's content hash, or a table's feature array) plus the kind, task and
        image size: stable across runs, different when any label, file or row changes.
    image_size : int or None
        Images: the side ``S`` every image was resized to. Tables: None.
    origin : {"dataframe", "arrays", "dataset"} or None
        Data given in memory (:func:`load_frame`, :func:`load_arrays`,
        :func:`load_torch_dataset`): what it was; ``sources`` are then positions.
        None for data read from disk.
    """

    kind: str
    task: str
    root: Path | None
    sources: list[str]
    inputs: torch.Tensor
    targets: torch.Tensor
    class_names: list[str]
    target_names: list[str]
    feature_names: list[str]
    set_aside: list[SetAsideItem]
    fingerprint: str
    image_size: int | None
    origin: str | None = None


@dataclass
class DemoDataset:
    """Where :func:`write_demo_dataset` wrote the demo, and which labels it flipped.

    Attributes
    ----------
    root : Path
        The written image folder (resolved).
    flipped_sources : list of str
        Sources, as :func:`load_dataset` reports them, whose label was flipped.
    original_labels : dict of str to str
        Source -> the original (true) class name, for the flipped sources.
    """

    root: Path
    flipped_sources: list[str]
    original_labels: dict[str, str]


# --------------------------------------------------------------------------- public API


def load_dataset(
    path: str | Path,
    *,
    format: str = "auto",
    label_column: str = "label",
    path_column: str = "path",
    task: str = "classification",
    image_size: int = 32,
    feature_columns: list[str] | None = None,
    data_root: str | Path | None = None,
    max_memory_gb: float | None = None,
) -> LoadedDataset:
    """Load an image folder, a manifest or a table, read-only.

    Parameters
    ----------
    path : str or Path
        A folder (image folder) or a ``.csv``/``.parquet`` file (manifest or table).
    format : {"auto", "images", "manifest", "table"}, default="auto"
        ``"auto"``: a folder is an image folder; a file is a manifest when it has
        ``path_column``, else a table.
    label_column : str, default="label"
        Manifest and table: the column holding labels (or regression targets).
    path_column : str, default="path"
        Manifest: the column holding image paths, relative to the manifest's folder.
    task : {"classification", "regression"}, default="classification"
        Regression needs a manifest or a table with a numeric label column.
    image_size : int, default=32
        Images are resized to ``image_size x image_size``. The whole image is resized
        (bilinear, antialiased when shrinking) and the aspect ratio is not kept, so
        nothing is cropped away: a mislabel visible only at an edge stays visible.
    feature_columns : list of str, optional
        Table: the feature columns. Default: every column but ``label_column``.
    data_root : str or Path, optional
        Manifest only: the folder its paths are relative to, instead of the
        manifest's own folder (e.g. a manifest written by ``minnorm-audit clean``,
        which lives outside the data). Paths must still stay inside that folder.
    max_memory_gb : float, optional
        Images: the most decoded pixels (``N x 3 x S x S`` bytes) to hold in memory.
        Above it, ``inputs`` is a :class:`~minnorm_audit.streaming.LazyImages` that
        decodes each image on access (same pixels), after a cheap pre-scan that sets
        unreadable files aside. Default: half of the memory available now.

    Returns
    -------
    LoadedDataset

    Raises
    ------
    DataError
        The input is unusable as a whole; the message is one line naming the problem
        and the file.
    ValueError
        An argument is out of range (``format``, ``task``, ``image_size``).

    Notes
    -----
    Labels are turned into text (``3`` and ``3.0`` both become ``"3"``; surrounding
    spaces are dropped) and sorted into class indices, numerically when every label is
    an integer (so ``"10"`` comes after ``"9"``). Only classes with at least one kept
    example are listed.

    Images: every file in a class folder, at any depth, is tried as one of
    ``IMAGE_FORMATS`` (hidden files and folders, whose name starts with ``.``, are
    skipped); those that cannot be decoded are set aside with a reason, as are files
    lying directly in the root. Multi-frame files (GIF, TIFF) give their first frame.
    Palette, gray, CMYK, 1-bit and 16-bit/float images become RGB: transparency is
    composited onto white, and 16-bit/32-bit/float images are scaled by their own
    maximum (float images already within [0, 1] by 1) so 12-bit data stored in 16 bits
    is not near-black. EXIF orientation is applied. JPEGs much larger than ``image_size`` are decoded at a
    reduced scale (``Image.draft``). Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``) stays on: an image over it is set aside.

    Row numbers in messages and in table ``sources`` are 0-based data rows (the header
    is not counted).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")

    data_path = Path(path).expanduser()
    shown = str(path)
    if not data_path.exists():
        raise DataError(f"data path not found: {shown}")
    root = data_path.resolve()

    if root.is_dir():
        if data_root is not None:
            raise DataError(f"a data root applies to a manifest, but {shown} is a folder")
        if format not in ("auto", "images"):
            raise DataError(f"format {format!r} needs a .csv or .parquet file, but {shown} is a folder")
        if task != "classification":
            raise DataError(
                f"task {task!r} needs a manifest or table with numeric targets, but {shown} is an image folder"
            )
        return _load_image_folder(root, shown, image_size=image_size, max_memory_gb=max_memory_gb)

    if format == "images":
        raise DataError(f"format 'images' needs a folder of class subfolders, but {shown} is a file")
    frame = _read_frame(root, shown)
    if format == "manifest" or (format == "auto" and path_column in frame.columns):
        return _load_manifest(
            frame, root, shown, label_column=label_column, path_column=path_column, task=task, image_size=image_size,
            base_dir=_data_root_folder(data_root), max_memory_gb=max_memory_gb,
        )
    if data_root is not None:
        raise DataError(f"a data root applies to a manifest (a file with a {path_column!r} column), but {shown} is a table")
    return _load_table(frame, root, shown, label_column=label_column, feature_columns=feature_columns, task=task)


def load_bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """The UCI handwritten digits bundled with the package (scikit-learn's copy).

    Returns
    -------
    images : ndarray of uint8, shape (1797, 8, 8)
        Pixel counts 0..16.
    labels : ndarray of int64, shape (1797,)
        Digits 0..9.

    Notes
    -----
    E. Alpaydin and C. Kaynak, UCI Machine Learning Repository, CC BY 4.0; see
    ``minnorm_audit/datasets/README.md``.
    """
    archive_file = resources.files("minnorm_audit") / "datasets" / "digits.npz"
    with archive_file.open("rb") as stream, np.load(stream) as archive:
        images = np.asarray(archive["images"], dtype=np.uint8)
        labels = np.asarray(archive["labels"], dtype=np.int64)
    return images, labels


def write_demo_dataset(out_dir: str | Path, *, noise_rate: float = 0.1, seed: int = 0) -> DemoDataset:
    """Write the bundled digits as an image folder with a known share of labels flipped.

    Each digit becomes ``out_dir/<given label>/<index:04d>.png``: an 8-bit grayscale PNG
    upscaled from 8x8 to 32x32 (nearest neighbour, values 0..16 scaled to 0..255).
    Exactly ``round(noise_rate * 1797)`` examples, drawn without replacement, get a
    label drawn uniformly from the *other* nine classes, i.e. their file goes into the
    wrong class folder. File names do not reveal which.

    Parameters
    ----------
    out_dir : str or Path
        A folder that does not exist yet, or is empty.
    noise_rate : float, default=0.1
        Share of labels to flip, in [0, 1].
    seed : int, default=0
        Seed of the numpy Generator that picks the flips.

    Returns
    -------
    DemoDataset

    Raises
    ------
    DataError
        ``out_dir`` exists and is not an empty folder.
    ValueError
        ``noise_rate`` is outside [0, 1].
    """
    if not 0.0 <= noise_rate <= 1.0:
        raise ValueError(f"noise_rate must be in [0, 1], got {noise_rate!r}")
    target_dir = Path(out_dir).expanduser()
    if target_dir.exists() and (not target_dir.is_dir() or any(target_dir.iterdir())):
        raise DataError(f"refusing to write the demo dataset into {out_dir}: it exists and is not an empty folder")

    images, true_labels = load_bundled_digits()
    n_examples = len(true_labels)
    n_classes = int(true_labels.max()) + 1
    rng = np.random.default_rng(seed)
    flipped_indices = np.sort(rng.choice(n_examples, size=round(noise_rate * n_examples), replace=False))
    # A shift of 1..n_classes-1 modulo n_classes is uniform over the other classes.
    shifts = rng.integers(1, n_classes, size=len(flipped_indices))
    given_labels = true_labels.copy()
    given_labels[flipped_indices] = (true_labels[flipped_indices] + shifts) % n_classes

    # 0..16 -> 0..255 (rounded), then 4x nearest-neighbour so people can see the digits.
    gray = ((images.astype(np.uint16) * 255 + 8) // 16).astype(np.uint8)
    gray = gray.repeat(4, axis=1).repeat(4, axis=2)

    # Write beside the target, then rename into place: a crash never leaves half a dataset.
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging_dir = target_dir.parent / f".{target_dir.name}.partial-{secrets.token_hex(4)}"
    staging_dir.mkdir()
    try:
        for label in range(n_classes):
            (staging_dir / str(label)).mkdir()
        for index in range(n_examples):
            Image.fromarray(gray[index]).save(staging_dir / str(given_labels[index]) / f"{index:04d}.png")
        if target_dir.exists():
            target_dir.rmdir()  # empty, checked above; renaming onto a folder fails on some systems
        os.replace(staging_dir, target_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise

    flipped_sources = [f"{given_labels[index]}/{index:04d}.png" for index in flipped_indices]
    original_labels = {
        source: str(true_labels[index]) for source, index in zip(flipped_sources, flipped_indices)
    }
    return DemoDataset(root=target_dir.resolve(), flipped_sources=flipped_sources, original_labels=original_labels)


# --------------------------------------------------------------------------- image folder


def _load_image_folder(root: Path, shown: str, *, image_size: int, max_memory_gb: float | None = None) -> LoadedDataset:
    """Load ``root/<class>/<files>``; every class-folder file is tried as an image."""
    stray_files: list[SetAsideItem] = []
    class_dirs: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            class_dirs.append(entry)
        else:
            stray_files.append(SetAsideItem(entry.name, "not inside a class folder"))
    if not class_dirs:
        raise DataError(f"no class subfolders in {shown}: expected DATA/<class_name>/<image files>")

    candidates: list[tuple[str, str, Path]] = []  # (source, label, file)
    # Examples in class-index order, then by path: the same order on every run.
    dir_of_class = {folder.name: folder for folder in class_dirs}
    for class_name in _sorted_class_names(dir_of_class):
        class_dir = dir_of_class[class_name]
        for file_path in _walk_visible_files(class_dir):
            candidates.append((file_path.relative_to(root).as_posix(), class_dir.name, file_path))
    if not candidates:
        raise DataError(f"no files in the class subfolders of {shown}")

    decoded = _read_image_files([file_path for _, _, file_path in candidates], image_size, max_memory_gb)
    kept: list[tuple[str, str, _DecodedImage]] = []
    unreadable: list[SetAsideItem] = []
    for (source, label, _), result in zip(candidates, decoded):
        if result.reason is not None:
            unreadable.append(SetAsideItem(source, result.reason or "unreadable"))
        else:
            kept.append((source, label, result))
    if not kept:
        raise DataError(_nothing_readable_message(shown, unreadable))
    class_names, targets = _class_indices([label for _, label, _ in kept], shown)
    return _image_dataset(root, kept, class_names, targets, stray_files + unreadable, image_size)


def _walk_visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` at any depth, hidden files and folders skipped, sorted by path."""
    found: list[Path] = []
    # followlinks=False: a symlinked folder loop must not hang the walk.
    for dir_path, dir_names, file_names in os.walk(folder):
        dir_names[:] = sorted(name for name in dir_names if not name.startswith("."))
        found += [Path(dir_path) / name for name in file_names if not name.startswith(".")]
    return sorted(found, key=lambda file_path: file_path.relative_to(folder).as_posix())


def _image_dataset(
    root: Path,
    kept: Sequence[tuple[str, str, _DecodedImage]],
    class_names: list[str],
    targets: torch.Tensor,
    set_aside: list[SetAsideItem],
    image_size: int,
    *,
    task: str = "classification",
    target_names: list[str] | None = None,
) -> LoadedDataset:
    """Assemble a LoadedDataset from decoded images (one (source, label, image) per example)."""
    # Pre-scanned (not decoded) images are streamed: decoded per item on access.
    lazy = bool(kept) and kept[0][2].pixels is None
    pixels = None if lazy else np.empty((len(kept), 3, image_size, image_size), dtype=np.uint8)
    fingerprint = _Fingerprint("images", task, image_size)
    for position, (source, label, result) in enumerate(kept):
        if pixels is not None:
            pixels[position] = result.pixels
        fingerprint.add_text(source)
        fingerprint.add_text(label)
        fingerprint.add_bytes(result.content_sha256)
    if task == "regression":
        fingerprint.add_bytes(_little_endian_bytes(targets.numpy()))
    return LoadedDataset(
        kind="images",
        task=task,
        root=root,
        sources=[source for source, _, _ in kept],
        inputs=_lazy_images(kept, image_size) if pixels is None else torch.from_numpy(pixels),
        targets=targets,
        class_names=class_names,
        target_names=target_names or [],
        feature_names=[],
        set_aside=set_aside,
        fingerprint=fingerprint.hexdigest(),
        image_size=image_size,
    )


def _nothing_readable_message(shown: str, set_aside: list[SetAsideItem]) -> str:
    first = set_aside[0]
    return (
        f"no readable images in {shown}: all {len(set_aside)} items were set aside "
        f"(first: {first.source!r}: {first.reason})"
    )


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class _DecodedImage:
    """One file's outcome: pixels (3, S, S) or the reason it was set aside.

    A streamed (pre-scanned, not decoded) readable file has ``pixels`` None,
    ``reason`` None and its ``file_path``.
    """

    pixels: np.ndarray | None
    reason: str | None
    content_sha256: bytes
    file_path: Path | None = None


def _read_image_files(file_paths: Sequence[Path], image_size: int, max_memory_gb: float | None) -> list[_DecodedImage]:
    """Decode every file when the decoded images fit ``max_memory_gb``, else pre-scan them."""
    from .streaming import images_fit_in_memory, prescan_image_file

    if images_fit_in_memory(len(file_paths), image_size, max_memory_gb):
        return _decode_image_files(file_paths, image_size)
    max_workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        scanned = list(pool.map(prescan_image_file, file_paths))
    return [
        _DecodedImage(None, reason, content_sha256, None if reason else file_path)
        for file_path, (reason, content_sha256) in zip(file_paths, scanned)
    ]


def _lazy_images(kept: Sequence[tuple[str, str, _DecodedImage]], image_size: int) -> Any:
    from .streaming import LazyImages

    return LazyImages([result.file_path for _, _, result in kept if result.file_path is not None], image_size)


def _decode_image_files(file_paths: Sequence[Path], image_size: int) -> list[_DecodedImage]:
    """Decode files in a thread pool; results in the order of ``file_paths``."""
    decode = functools.partial(_decode_image_file, image_size=image_size)
    # Pillow decodes with the GIL released, so threads scale; map() keeps the order.
    max_workers = min(32, (os.cpu_count() or 1) + 4)
    # Turn Pillow's bomb warning into an error for this item. Filters are process-wide
    # on Python < 3.14, so the workers see this one; _check_pixel_limit backs it up.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(decode, file_paths))


def _decode_image_file(file_path: Path, image_size: int) -> _DecodedImage:
    """Read one file and decode it to uint8 (3, S, S), or say why it cannot be used."""
    try:
        content = file_path.read_bytes()  # read-only; one read serves both hash and decode
    except FileNotFoundError:
        return _DecodedImage(None, "file not found", b"")
    except IsADirectoryError:
        return _DecodedImage(None, "not a file", b"")
    except OSError as err:
        return _DecodedImage(None, f"cannot read file ({err.strerror or err})", b"")
    content_sha256 = hashlib.sha256(content).digest()
    if not content:
        return _DecodedImage(None, "zero-byte file", content_sha256)
    try:
        pixels = _decode_image_bytes(content, image_size)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _DecodedImage(None, "over Pillow's decompression-bomb pixel limit", content_sha256)
    except UnidentifiedImageError:
        return _DecodedImage(None, "cannot identify image file", content_sha256)
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the run; the reason keeps what happened
        return _DecodedImage(None, _describe_decode_error(err), content_sha256)
    return _DecodedImage(pixels, None, content_sha256)


def _describe_decode_error(err: Exception) -> str:
    message = " ".join(str(err).split()) or type(err).__name__
    if "truncated" in message.lower():
        return "truncated image"
    if isinstance(err, MemoryError):
        return "out of memory while decoding"
    return f"cannot decode image ({message[:100]})"


def _decode_image_bytes(content: bytes, image_size: int) -> np.ndarray:
    """Decode image bytes to uint8 (3, image_size, image_size), see load_dataset's Notes."""
    target = (image_size, image_size)
    with Image.open(io.BytesIO(content), formats=IMAGE_FORMATS) as opened:
        _check_pixel_limit(opened)
        # JPEG only (a no-op elsewhere): decode at 1/2, 1/4 or 1/8 scale, never below the target.
        opened.draft(None, target)
        opened.load()
        image = _apply_exif_orientation(opened)  # stays inside `with`: it may be `opened` itself
        if image.mode in _HIGH_DEPTH_MODES:
            # Resize in float before scaling to 8 bits, so the 16-bit precision feeds the average.
            as_float = image.convert("F").resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
            gray = _scale_to_uint8(np.asarray(as_float, dtype=np.float32), already_unit=image.mode == "F")
            return np.broadcast_to(gray, (3, image_size, image_size)).copy()
        rgb = _to_rgb(image).resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def _check_pixel_limit(image: Image.Image) -> None:
    """Raise for images over Pillow's bomb limit, in case the warning filter did not apply."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and image.width * image.height > limit:
        raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels exceeds the limit of {limit}")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost a readable image
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any 8-bit mode to RGB, compositing transparency onto white."""
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")


def _scale_to_uint8(values: np.ndarray, *, already_unit: bool) -> np.ndarray:
    """Scale non-negative values to 0..255 by their maximum (by 1 for floats within [0, 1])."""
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    peak = float(values.max(initial=0.0))
    scale = 1.0 if already_unit and peak <= 1.0 else peak
    if scale <= 0.0:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint(values * (255.0 / scale)).clip(0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- manifest and table


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


def _numeric_targets(column: pd.Series, shown: str, label_column: str) -> np.ndarray:
    """Regression targets as float32 (N,); raise on text, missing or infinite values."""
    values, first_bad_row = _to_numeric(column)
    if values is None:
        example = _cell_text(column.iloc[first_bad_row])
        raise DataError(
            f"{shown}: regression target column {label_column!r} is not numeric "
            f"(e.g. {example!r} in row {first_bad_row})"
        )
    targets = values.astype(np.float32)
    not_finite = ~np.isfinite(targets)
    if not_finite.any():
        row = int(np.flatnonzero(not_finite)[0])
        raise DataError(f"{shown}: missing, NaN or infinite target in column {label_column!r} at row {row}")
    return targets


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


def _label_texts(column: pd.Series, shown: str, label_column: str) -> list[str]:
    """Labels as stripped text; raise naming the first empty one."""
    texts = [_cell_text(value) for value in column.tolist()]
    empty_rows = [row for row, text in enumerate(texts) if not text]
    if empty_rows:
        more = f" ({len(empty_rows) - 1} more)" if len(empty_rows) > 1 else ""
        raise DataError(f"{shown}: empty label in column {label_column!r} at row {empty_rows[0]}{more}")
    return texts


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


# --------------------------------------------------------------------------- shared helpers


def _sorted_class_names(names: Iterable[str]) -> list[str]:
    """Unique names sorted as text, or numerically when every name is an integer ("9" < "10")."""
    unique = set(names)
    if all(_INTEGER_TEXT.fullmatch(name) for name in unique):
        return sorted(unique, key=lambda name: (int(name), name))
    return sorted(unique)


def _class_indices(labels: list[str], shown: str) -> tuple[list[str], torch.Tensor]:
    """Sorted class names (see _sorted_class_names) and int64 indices into them."""
    class_names = _sorted_class_names(labels)
    if len(class_names) < 2:
        raise DataError(
            f"only one class ({class_names[0]!r}) among the readable examples of {shown}; "
            "classification needs at least two"
        )
    index_of = {name: index for index, name in enumerate(class_names)}
    return class_names, torch.tensor([index_of[label] for label in labels], dtype=torch.int64)


def _list_names(names: Iterable[Any], *, quote: bool = True, limit: int = 20) -> str:
    names = [repr(str(name)) if quote else str(name) for name in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _little_endian_bytes(array: np.ndarray) -> bytes:
    """Array bytes in a fixed byte order, so the fingerprint does not depend on the machine."""
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


class _Fingerprint:
    """sha256 over length-prefixed fields, so ("ab", "c") and ("a", "bc") differ."""

    def __init__(self, kind: str, task: str, image_size: int | None) -> None:
        self._hash = hashlib.sha256()
        for field in (_FINGERPRINT_VERSION, kind, task, str(image_size)):
            self.add_text(field)

    def add_text(self, text: str) -> None:
        # surrogateescape: file names that are not valid UTF-8 still hash (os.walk hands them over escaped).
        self.add_bytes(text.encode("utf-8", errors="surrogateescape"))

    def add_bytes(self, data: bytes) -> None:
        self._hash.update(len(data).to_bytes(8, "little"))
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# --------------------------------------------------------------------------- in-memory inputs
#
# Data that is already in memory (a DataFrame, numpy arrays, a torch Dataset) goes
# through the same validation as the files: a table's features and labels through
# _load_table, images through the same conversion to uint8 RGB at image_size. Its
# ``sources`` are positions (0-based), ``root`` is None and ``origin`` says what it was.

_CHANNEL_COUNTS = (1, 3, 4)


def load_frame(
    frame: pd.DataFrame,
    *,
    label_column: str = "label",
    feature_columns: list[str] | None = None,
    task: str = "classification",
) -> LoadedDataset:
    """Load a pandas DataFrame of numeric features and a label column.

    Parameters
    ----------
    frame : DataFrame
        One row per example. Its index is ignored: examples are identified by
        position (``sources`` are ``"0"``, ``"1"``, ...).
    label_column : str, default="label"
        The column holding labels (or regression targets).
    feature_columns : list of str, optional
        The feature columns. Default: every column but ``label_column``.
    task : {"classification", "regression"}, default="classification"

    Returns
    -------
    LoadedDataset
        ``kind="table"``, ``root=None``, ``origin="dataframe"``.

    Raises
    ------
    DataError
        The same one-line errors as a table file: missing label column, non-numeric
        feature columns, NaN/inf features, empty labels, a single class, no rows.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"load_frame needs a pandas DataFrame, got {type(frame).__name__}")
    _check_task(task)
    named = frame.rename(columns=str).reset_index(drop=True)
    if named.columns.duplicated().any():
        duplicated = sorted(set(named.columns[named.columns.duplicated()]))
        raise DataError(f"the DataFrame has duplicated column names: {_list_names(duplicated)}")
    loaded = _load_table(
        named, None, "the DataFrame",  # type: ignore[arg-type]  # no file: root is None
        label_column=str(label_column),
        feature_columns=None if feature_columns is None else [str(name) for name in feature_columns],
        task=task,
    )
    loaded.origin = "dataframe"
    return loaded


def load_arrays(
    inputs: Any,
    labels: Any,
    *,
    task: str = "classification",
    image_size: int = 32,
) -> LoadedDataset:
    """Load numpy arrays ``(X, y)``: features (2-D ``X``) or images (3-D/4-D ``X``).

    Parameters
    ----------
    inputs : array-like
        ``(N, D)`` features; ``(N, C, H, W)`` or ``(N, H, W, C)`` images with
        ``C`` in 1, 3, 4 (channels first is assumed when both axes could be
        channels); ``(N, H, W)`` gray images. Anything ``numpy.asarray`` accepts,
        CPU tensors included.
    labels : array-like, shape (N,)
        Class labels (any type that turns into text) or regression targets.
    task : {"classification", "regression"}, default="classification"
    image_size : int, default=32
        Images are resized to ``image_size x image_size``.

    Returns
    -------
    LoadedDataset
        ``root=None``, ``origin="arrays"``; ``sources`` are positions.

    Raises
    ------
    DataError
        Shapes that do not fit, NaN/inf values, empty labels, a single class.

    Notes
    -----
    Images become uint8 RGB: uint8 values are used as they are, other values within
    [0, 1] are scaled by 255, values within [0, 255] kept, and anything else (e.g.
    normalized tensors) is mapped linearly from the data's overall minimum and
    maximum to 0..255 (one map for the whole dataset, so relative brightness
    between images is kept). Four channels are RGBA, composited onto white.
    """
    _check_task(task)
    _check_image_size(image_size)
    array = np.asarray(inputs)
    targets = np.asarray(labels)
    if targets.ndim == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    if targets.ndim != 1:
        raise DataError(f"labels must be one-dimensional (N,), got shape {targets.shape}")
    if array.ndim == 0 or array.shape[0] != targets.shape[0]:
        raise DataError(f"inputs and labels differ in length: inputs {array.shape}, labels {targets.shape}")
    if array.shape[0] == 0:
        raise DataError("the arrays (X, y) have no rows")
    if array.ndim == 2:
        frame = pd.DataFrame(array, columns=[f"feature_{index}" for index in range(array.shape[1])])
        frame["label"] = targets
        loaded = _load_table(frame, None, "the arrays (X, y)", label_column="label",  # type: ignore[arg-type]
                             feature_columns=None, task=task)
        loaded.origin = "arrays"
        return loaded
    if array.ndim == 3:
        images = list(array)
    elif array.ndim == 4:
        channels_first = array.shape[1] in _CHANNEL_COUNTS
        if not channels_first and array.shape[3] not in _CHANNEL_COUNTS:
            raise DataError(
                f"cannot tell the channel axis of images shaped {array.shape}: expected (N, C, H, W) "
                "or (N, H, W, C) with C = 1, 3 or 4"
            )
        images = list(array.transpose(0, 2, 3, 1) if channels_first else array)
    else:
        raise DataError(f"inputs must be 2-D features or 3-D/4-D images, got shape {array.shape}")
    positions = list(range(len(images)))
    return _in_memory_images(
        images, list(targets), positions, [], task=task, image_size=image_size, origin="arrays", shown="the arrays (X, y)"
    )


def load_torch_dataset(
    dataset: Any,
    *,
    task: str = "classification",
    image_size: int = 32,
) -> LoadedDataset:
    """Load a torch ``Dataset`` (or any iterable) yielding ``(input, label)`` pairs.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset or iterable
        Read once, in order: ``dataset[i]`` for ``i < len(dataset)`` when it has
        both, else ``iter(dataset)``. An input is a tensor or array (``(D,)``
        features, ``(C, H, W)``/``(H, W, C)``/``(H, W)`` image) or a PIL image; a
        label is a number, a string or a one-element tensor.
    task : {"classification", "regression"}, default="classification"
    image_size : int, default=32

    Returns
    -------
    LoadedDataset
        ``root=None``, ``origin="dataset"``; ``sources`` are positions in the dataset.

    Raises
    ------
    DataError
        Nothing usable, inputs of mixed kinds, feature vectors of different lengths.

    Notes
    -----
    An item whose loading raises, or that is not an ``(input, label)`` pair, is set
    aside with the reason, like an unreadable file; the others keep their position as
    ``source``. Image values are converted as in :func:`load_arrays`.
    """
    _check_task(task)
    _check_image_size(image_size)
    inputs: list[np.ndarray] = []
    labels: list[Any] = []
    positions: list[int] = []
    set_aside: list[SetAsideItem] = []
    for position, item in _dataset_items(dataset):
        try:
            if isinstance(item, BaseException):
                raise item
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise _ItemError("item is not an (input, label) pair")
            value, label = item
            inputs.append(_item_array(value))
            labels.append(_item_label(label))
        except Exception as err:  # noqa: BLE001 - one bad item never stops the run; the reason keeps what happened
            detail = str(err) if isinstance(err, _ItemError) else f"cannot load item ({type(err).__name__}: {' '.join(str(err).split())[:100]})"
            set_aside.append(SetAsideItem(str(position), detail))
            del inputs[len(positions):], labels[len(positions):]
            continue
        positions.append(position)
    shown = "the torch Dataset"
    if not positions:
        if not set_aside:
            raise DataError(f"{shown} yielded no items")
        raise DataError(
            f"no usable items in {shown}: all {len(set_aside)} items were set aside "
            f"(first: item {set_aside[0].source}: {set_aside[0].reason})"
        )
    vectors = [array.ndim == 1 for array in inputs]
    if any(vectors) and not all(vectors):
        first = vectors.index(not vectors[0])
        raise DataError(f"{shown} mixes feature vectors and images (item {positions[0]} and item {positions[first]})")
    if not vectors[0]:
        return _in_memory_images(inputs, labels, positions, set_aside, task=task, image_size=image_size,
                                 origin="dataset", shown=shown)
    lengths = {len(array) for array in inputs}
    if len(lengths) > 1:
        raise DataError(f"{shown} yields feature vectors of different lengths: {sorted(lengths)[:5]}")
    frame = pd.DataFrame(np.stack(inputs), columns=[f"feature_{index}" for index in range(len(inputs[0]))])
    frame["label"] = pd.Series(labels, dtype=object)
    loaded = _load_table(frame, None, shown, label_column="label", feature_columns=None, task=task)  # type: ignore[arg-type]
    loaded.sources = [str(position) for position in positions]
    loaded.set_aside = set_aside
    loaded.origin = "dataset"
    return loaded


class _ItemError(Exception):
    """A dataset item that is not usable; the message is the set-aside reason."""


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _data_root_folder(data_root: str | Path | None) -> Path | None:
    """An explicit data root for manifest paths, resolved; it must be a folder."""
    if data_root is None:
        return None
    folder = Path(data_root).expanduser()
    if not folder.is_dir():
        raise DataError(f"data root {data_root} is not a folder")
    return folder.resolve()


def _dataset_items(dataset: Any) -> Iterable[tuple[int, Any]]:
    """(position, item) pairs; an exception raised by ``dataset[i]`` is yielded as the item."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        for position in range(len(dataset)):
            try:
                item = dataset[position]
            except Exception as err:  # noqa: BLE001 - reported as this item's set-aside reason
                item = err
            yield position, item
        return
    try:
        iterator = iter(dataset)
    except TypeError:
        raise TypeError(f"a torch Dataset or an iterable of (input, label) pairs is needed, got {type(dataset).__name__}") from None
    yield from enumerate(iterator)


def _item_array(value: Any) -> np.ndarray:
    """A dataset item's input as a numpy array: (D,) features, (H, W) or (H, W, C) image."""
    if isinstance(value, Image.Image):
        image = _apply_exif_orientation(value)
        if image.mode in _HIGH_DEPTH_MODES:
            return np.asarray(image.convert("F"), dtype=np.float32)
        if image.mode not in ("L", "RGB", "RGBA"):
            image = image.convert("RGBA" if image.has_transparency_data else "RGB")
        return np.asarray(image)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise _ItemError(f"input is not numeric (dtype {array.dtype})")
    if array.ndim == 3:
        if array.shape[0] in _CHANNEL_COUNTS:  # (C, H, W), torchvision's layout
            return array.transpose(1, 2, 0)
        if array.shape[2] not in _CHANNEL_COUNTS:
            raise _ItemError(f"cannot tell the channel axis of an image shaped {array.shape}")
        return array
    if array.ndim in (1, 2):
        return array
    raise _ItemError(f"input must be a feature vector or an image, got shape {array.shape}")


def _item_label(label: Any) -> Any:
    if isinstance(label, torch.Tensor):
        if label.numel() != 1:
            raise _ItemError(f"label is not a single value (shape {tuple(label.shape)})")
        return label.item()
    if isinstance(label, np.ndarray):
        if label.size != 1:
            raise _ItemError(f"label is not a single value (shape {label.shape})")
        return label.reshape(()).item()
    return label


def _in_memory_images(
    images: list[np.ndarray],
    labels: list[Any],
    positions: list[int],
    set_aside: list[SetAsideItem],
    *,
    task: str,
    image_size: int,
    origin: str,
    shown: str,
) -> LoadedDataset:
    """Images given as (H, W) or (H, W, C) arrays -> a LoadedDataset of uint8 (N, 3, S, S)."""
    sources = [str(position) for position in positions]
    label_series = pd.Series(labels, dtype=object)
    if task == "regression":
        target_values = _numeric_targets(label_series, shown, "label")
        label_texts = None
    else:
        label_texts = _label_texts(label_series, shown, "label")
        target_values = None
    scale = _image_value_map(images, positions, shown)
    pixels = np.empty((len(images), 3, image_size, image_size), dtype=np.uint8)
    fingerprint = _Fingerprint("images", task, image_size)
    for index, image in enumerate(images):
        if image.ndim == 3 and image.shape[2] not in _CHANNEL_COUNTS:
            raise DataError(f"{shown}: item {positions[index]} has {image.shape[2]} channels; expected 1, 3 or 4")
        pixels[index] = _array_to_pixels(image, scale, image_size)
        fingerprint.add_text(sources[index])
        fingerprint.add_text(label_texts[index] if label_texts is not None else "")
        raw = np.ascontiguousarray(image)
        fingerprint.add_bytes(
            hashlib.sha256(f"{raw.dtype.str}{raw.shape}".encode() + _little_endian_bytes(raw)).digest()
        )
    if target_values is not None:
        fingerprint.add_bytes(_little_endian_bytes(target_values))
        class_names: list[str] = []
        targets = torch.from_numpy(target_values.reshape(-1, 1))
        target_names = ["label"]
    else:
        assert label_texts is not None
        class_names, targets = _class_indices(label_texts, shown)
        target_names = []
    return LoadedDataset(
        kind="images",
        task=task,
        root=None,
        sources=sources,
        inputs=torch.from_numpy(pixels),
        targets=targets,
        class_names=class_names,
        target_names=target_names,
        feature_names=[],
        set_aside=set_aside,
        fingerprint=fingerprint.hexdigest(),
        image_size=image_size,
        origin=origin,
    )


def _image_value_map(images: list[np.ndarray], positions: list[int], shown: str) -> tuple[float, float]:
    """(offset, factor) taking the non-uint8 images' values to 0..255 (see load_arrays' Notes)."""
    low, high = math.inf, -math.inf
    for index, image in enumerate(images):
        if image.dtype == np.uint8:
            continue
        values = image.astype(np.float64, copy=False)
        if not np.isfinite(values).all():
            raise DataError(f"{shown}: item {positions[index]} has NaN or infinite pixel values")
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if low == math.inf or (low >= 0.0 and high <= 255.0 and high > 1.0):
        return 0.0, 1.0
    if low >= 0.0 and high <= 1.0:
        return 0.0, 255.0
    return low, 255.0 / (high - low) if high > low else 0.0


def _array_to_pixels(image: np.ndarray, value_map: tuple[float, float], image_size: int) -> np.ndarray:
    """One (H, W) or (H, W, C) image -> uint8 (3, S, S), resized like the files are."""
    if image.dtype != np.uint8:
        offset, factor = value_map
        image = np.rint((image.astype(np.float64) - offset) * factor).clip(0, 255).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    rgb = _to_rgb(Image.fromarray(np.ascontiguousarray(image)))  # L, RGB or RGBA from the shape
    target = (image_size, image_size)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()
