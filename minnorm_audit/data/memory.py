"""Data that is already in memory: a DataFrame, numpy arrays, a torch Dataset.

It goes through the same validation as the files: a table's features and labels
through the table loader, images through the same conversion to uint8 RGB at
``image_size``. Its ``sources`` are positions (0-based), ``root`` is None and
``origin`` says what it was.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .dataset import (
    DataError,
    LoadedDataset,
    SetAsideItem,
    _check_image_size,
    _check_task,
    _list_names,
    _refuse_mostly_bad,
)
from .fingerprint import _Fingerprint, _little_endian_bytes
from .images import _HIGH_DEPTH_MODES, UNIT_TOLERANCE, _apply_exif_orientation, _high_depth_to_uint8, _to_rgb
from .labels import _class_indices, _label_texts, _numeric_targets
from .table import _load_table

_CHANNEL_COUNTS = (1, 3, 4)


def load_frame(
    frame: pd.DataFrame,
    *,
    label_column: str = "label",
    feature_columns: list[str] | None = None,
    task: str = "classification",
    ignore_columns: list[str] | None = None,
    text_column: str | None = None,
) -> LoadedDataset:
    """Load a pandas DataFrame of feature columns (or a text column) and a label column.

    Parameters
    ----------
    frame : DataFrame
        One row per example. Its index is ignored: examples are identified by
        position (``sources`` are ``"0"``, ``"1"``, ...).
    label_column : str, default="label"
        The column holding labels (or regression targets).
    feature_columns : list of str, optional
        The feature columns. Default: every column but ``label_column``, those in
        ``ignore_columns`` and a saved pandas index (see :func:`load_dataset`). A column
        of fixed-length numeric lists or arrays gives one feature per element.
    task : {"classification", "regression"}, default="classification"
    ignore_columns : list of str, optional
        Columns that are not features.
    text_column : str, optional
        A column of free text for the text network (default: detected, see
        :func:`load_dataset`).

    Returns
    -------
    LoadedDataset
        ``kind="table"``, ``root=None``, ``origin="dataframe"``. Rows with an empty
        label or a missing or infinite value are set aside, as in a table file.

    Raises
    ------
    DataError
        The same one-line errors as a table file: missing label column, non-numeric
        feature columns, a column bad in more than half of its rows, a value beyond
        float32's range, a single class, no rows.
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
        ignore_columns=None if ignore_columns is None else [str(name) for name in ignore_columns],
        text_column=None if text_column is None else str(text_column),
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
        Shapes that do not fit, a single class, more than half of the items bad.

    Notes
    -----
    Images become uint8 RGB: uint8 values are used as they are; other values within
    [-0.01, 1.01] (``UNIT_TOLERANCE``: a pixel at 1.0001 is rounding, not another
    scale) are [0, 1] data, clipped and scaled by 255, with a notice when any value
    was outside [0, 1]; values within [-0.01, 257.55] are 0..255 data, clipped (with
    the same notice); anything else (e.g.
    normalized tensors) is mapped linearly from the data's overall minimum and
    maximum to 0..255, with a notice (one map for the whole dataset, so relative brightness
    between images is kept). Four channels are RGBA, composited onto white. An item
    with an empty label or with NaN or infinite pixels is set aside (``source``: its
    position); features go through the table loader, whose bad rows are set aside too.
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
    # The table's rows are the usable items, in order: back to positions in the dataset.
    loaded.sources = [str(positions[int(row)]) for row in loaded.sources]
    bad_rows = [SetAsideItem(str(positions[int(item.source)]), item.reason) for item in loaded.set_aside]
    loaded.set_aside = sorted(set_aside + bad_rows, key=lambda item: int(item.source))
    loaded.origin = "dataset"
    return loaded


class _ItemError(Exception):
    """A dataset item that is not usable; the message is the set-aside reason."""


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
        if image.mode in _HIGH_DEPTH_MODES:  # the same fixed scale per format as an image file
            return _high_depth_to_uint8(np.asarray(image.convert("F"), dtype=np.float32), image.mode)
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
    """Images given as (H, W) or (H, W, C) arrays -> a LoadedDataset of uint8 (N, 3, S, S);
    items with an empty label or non-finite pixels are set aside."""
    label_series = pd.Series(labels, dtype=object)
    label_texts: list[str] | None = None
    if task == "regression":
        target_values, reasons = _numeric_targets(label_series, shown, "label")
    else:
        label_texts, reasons = _label_texts(label_series, shown, "label")
    not_finite = []
    for index, image in enumerate(images):
        if image.ndim == 3 and image.shape[2] not in _CHANNEL_COUNTS:
            raise DataError(f"{shown}: item {positions[index]} has {image.shape[2]} channels; expected 1, 3 or 4")
        if image.dtype != np.uint8 and not np.isfinite(image).all():
            not_finite.append(index)
    _refuse_mostly_bad([positions[index] for index in not_finite], len(images), shown, "NaN or infinite pixel values",
                       "check the inputs", unit="item")
    for index in not_finite:
        reasons.setdefault(index, "NaN or infinite pixel values")
    kept = [index for index in range(len(images)) if index not in reasons]
    set_aside = sorted(set_aside + [SetAsideItem(str(positions[index]), reason) for index, reason in reasons.items()],
                       key=lambda item: int(item.source))
    if not kept:
        raise DataError(f"no usable items in {shown}: all {len(set_aside)} items were set aside "
                        f"(first: item {set_aside[0].source}: {set_aside[0].reason})")
    sources = [str(positions[index]) for index in kept]
    scale, note = _image_value_map([images[index] for index in kept], shown)
    pixels = np.empty((len(kept), 3, image_size, image_size), dtype=np.uint8)
    fingerprint = _Fingerprint("images", task, image_size)
    for row, index in enumerate(kept):
        image = images[index]
        pixels[row] = _array_to_pixels(image, scale, image_size)
        fingerprint.add_text(sources[row])
        fingerprint.add_text(label_texts[index] if label_texts is not None else "")
        raw = np.ascontiguousarray(image)
        fingerprint.add_bytes(
            hashlib.sha256(f"{raw.dtype.str}{raw.shape}".encode() + _little_endian_bytes(raw)).digest()
        )
    if label_texts is None:  # regression
        kept_targets = np.ascontiguousarray(target_values[kept])
        fingerprint.add_bytes(_little_endian_bytes(kept_targets))
        class_names: list[str] = []
        targets = torch.from_numpy(kept_targets.reshape(-1, 1))
        target_names = ["label"]
    else:
        class_names, targets = _class_indices([label_texts[index] for index in kept], shown)
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
        notes=[note] if note else [],
    )


def _image_value_map(images: list[np.ndarray], shown: str) -> tuple[tuple[float, float], str | None]:
    """(offset, factor) taking the non-uint8 images' values to 0..255 (see load_arrays'
    Notes), and a notice when values were clipped or mapped from the data's range."""
    low, high = math.inf, -math.inf
    for image in images:
        if image.dtype != np.uint8 and image.size:
            low, high = min(low, float(image.min())), max(high, float(image.max()))
    if low == math.inf:
        return (0.0, 1.0), None
    # The tolerance is relative at the top (255.3 is 0..255 data) and -UNIT_TOLERANCE at
    # the bottom: data reaching well below 0 (normalized tensors) is neither scale.
    for top, factor in ((1.0, 255.0), (255.0, 1.0)):
        if low >= -UNIT_TOLERANCE and high <= top * (1.0 + UNIT_TOLERANCE):
            if low >= 0.0 and high <= top:
                return (0.0, factor), None
            outside = sum(int(((image < 0) | (image > top)).sum()) for image in images if image.dtype != np.uint8)
            return (0.0, factor), (
                f"{shown}: {outside} pixel value(s) lie outside [0, {top:g}] (from {low:.6g} to {high:.6g}), within "
                f"the tolerance ({-UNIT_TOLERANCE:g} to {top * (1.0 + UNIT_TOLERANCE):g}): the images are read as "
                f"[0, {top:g}] data and those values clipped"
            )
    return (low, 255.0 / (high - low) if high > low else 0.0), (
        f"{shown}: pixel values range from {low:.6g} to {high:.6g}, neither [0, 1] nor [0, 255] data: they are "
        "mapped linearly to 0..255, one map for the whole dataset"
    )


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
