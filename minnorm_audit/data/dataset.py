"""What every loader returns and raises: :class:`LoadedDataset`, :class:`SetAsideItem`
and :class:`DataError`, with the argument checks and message helpers they share.

Two kinds of problems are kept apart. One unusable example (a truncated JPEG, a
``notes.txt`` in a class folder, a manifest row whose file is gone or whose path or label
is empty, a table row with an empty label or a missing or infinite value) is *set aside*
with a reason and the run goes on. A problem with the input as a whole (no label column,
a single class, a manifest path that escapes its folder, a value beyond float32's range,
a column bad in more than half of its rows) raises :class:`DataError`, whose message is
one line naming the problem and the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

FORMATS = ("auto", "images", "manifest", "table")
TASKS = ("classification", "regression")
# A few bad rows (an empty label, a missing feature value, an empty manifest path) are
# set aside; a column where more than this share of the rows is bad is a problem with
# the input as a whole (wrong column, wrong file) and stops the run.
MOSTLY_BAD_SHARE = 0.5


class DataError(Exception):
    """The input is unusable as a whole.

    ``str(err)`` is one line naming the problem and the file, fit to show a user as is.
    """

    def __init__(self, message: str) -> None:
        # File and column names are user input: a newline in one must not break the one-line contract.
        super().__init__(" ".join(message.splitlines()))


class DataNotice(UserWarning):
    """Something about the input was read in a way worth knowing (a saved pandas index
    left out, pixel values clipped, a ';'-delimited CSV). The run goes on; the same
    line is kept in :attr:`LoadedDataset.notes` and in ``summary.json``'s ``notes``."""


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
    kind : {"images", "table", "text"}
    task : {"classification", "regression"}
    root : Path or None
        The data path given by the user (folder or file), resolved; None for data
        given in memory (see ``origin``).
    sources : list of str
        One per kept example: a relative POSIX path for images, the 0-based row number
        for tables.
    inputs : Tensor or LazyImages
        Images: uint8, shape (N, 3, S, S); a :class:`~minnorm_audit.data.placement.LazyImages`
        (decoded per item, same pixels) when the images do not fit ``max_memory_gb``. Tables: float32, shape (N, D), not
        standardized (the trainer standardizes). Text: int64 hashed n-gram ids, shape
        (N, L), 0 = padding (:func:`~minnorm_audit.data.text.encode_texts`).
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
    notes : list of str
        One line per thing the loader decided about the input that the user should
        know (see :class:`DataNotice`); :func:`~minnorm_audit.audit` warns with each
        and writes them into ``summary.json``.
    splits : list of str or None
        A split root (``DATA/<split>/<class>/...``, see :mod:`.folder`): each example's
        split folder name as written (``"train"``, ``"val"``, ...). None otherwise.
    column_encodings : list of dict
        Tables and text: how each feature column was encoded
        (:meth:`~minnorm_audit.data.encode.ColumnEncoding.to_dict`; summary.json's
        ``column_encodings``). Empty for images.
    original_values : DataFrame or None
        Tables with encoded (non-numeric) columns, and text: the feature cells as
        given, one row per kept example (same order as ``sources``), for the gallery.
        None when every feature is numeric (``inputs`` already shows them).
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
    notes: list[str] = field(default_factory=list)
    splits: list[str] | None = None
    column_encodings: list[dict[str, Any]] = field(default_factory=list)
    original_values: Any = None


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")


def _refuse_mostly_bad(
    bad_rows: list[int], total: int, shown: str, problem: str, advice: str, *, unit: str = "row"
) -> None:
    """Raise when ``problem`` (e.g. ``"empty label in column 'label'"``) is in more than
    :data:`MOSTLY_BAD_SHARE` of the ``total`` rows (or items); fewer are set aside."""
    if total and len(bad_rows) > MOSTLY_BAD_SHARE * total:
        raise DataError(
            f"{shown}: {problem} in {len(bad_rows)} of {total} {unit}s (first at {unit} {bad_rows[0]}); "
            f"over half the {unit}s is not a few bad items to set aside: {advice}"
        )


def _list_names(names: Iterable[Any], *, quote: bool = True, limit: int = 20) -> str:
    names = [repr(str(name)) if quote else str(name) for name in names]
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
