""":func:`load_dataset`: a path on disk to a :class:`~minnorm_audit.data.dataset.LoadedDataset`.

A folder is an image folder (:mod:`.folder`); a ``.csv`` or ``.parquet`` file is a
manifest (:mod:`.manifest`) when it has the path column, else a table (:mod:`.table`).
Nothing under the data path is ever created, changed or deleted: files are opened for
reading only and nothing is cached beside them.
"""

from __future__ import annotations

from pathlib import Path

from .dataset import FORMATS, TASKS, DataError, LoadedDataset
from .folder import _is_utf8, _load_image_folder, _shown_name as _printable
from .manifest import _data_root_folder, _load_manifest
from .image_table import _load_image_table, detect_image_column
from .table import _load_table, _read_frame


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
    ignore_columns: list[str] | None = None,
    workers: int | None = None,
    split_folders: list[str] | None = None,
    text_column: str | None = None,
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
        Table: the feature columns. Default: every column but ``label_column``, those
        in ``ignore_columns`` and a saved pandas index (a first column without a header
        counting the rows, as ``DataFrame.to_csv(path)`` writes it; left out with a
        note). A column of fixed-length numeric lists (an embedding) gives one feature
        per element, ``name[0]``, ``name[1]``, ...; single elements may be named so.
    data_root : str or Path, optional
        Manifest only: the folder its paths are relative to, instead of the
        manifest's own folder (e.g. a manifest written by ``minnorm-audit clean``,
        which lives outside the data). Paths must still stay inside that folder.
    max_memory_gb : float, optional
        Images: the most decoded pixels (``N x 3 x S x S`` bytes) to hold in memory.
        Above it, ``inputs`` is a :class:`~minnorm_audit.data.placement.LazyImages` that
        decodes each image on access (same pixels), after a cheap pre-scan that sets
        unreadable files aside. Default: half of the memory available now.
    ignore_columns : list of str, optional
        Table: columns that are not features (ids, notes, ...).
    text_column : str, optional
        Table: a column of free text to audit with the built-in text network
        (:mod:`minnorm_audit.data.text`). Default: detected, when no feature columns
        are named, as a string column of long, mostly different values with spaces.
    workers : int, optional
        Images decoded into memory: the most worker processes decoding 2,000 files or
        more (the same pixels as in one process); 0: this process only. Default: one
        per CPU.
    split_folders : list of str, optional
        Image folder: the top-level folders that are splits over the same class folders
        (``DATA/<split>/<class>/...``). Default: detected, when every top-level folder
        is a split name (``train``, ``val``, ``valid``, ``validation``, ``test``,
        ``dev``, ... any case) holding folders; ``["none"]``: never read as splits.
        The splits are audited together; ``LoadedDataset.splits`` names each
        example's split.

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

    Class names and labels are put in Unicode NFC (``café`` written by Linux and by
    macOS are one class); each merge is a note.

    Image folders: a Hugging Face ``imagefolder`` ``metadata.csv`` / ``metadata.jsonl``
    (``file_name`` and ``label_column``) at the root or in each split folder is read as
    a manifest.

    Images: every file in a class folder, at any depth, is tried as one of
    ``IMAGE_FORMATS`` (hidden files and folders, whose name starts with ``.``, are
    skipped); those that cannot be decoded are set aside with a reason, as are files
    lying directly in the root. Multi-frame files (GIF, TIFF) give their first frame.
    Palette, gray, CMYK, 1-bit and 16-bit/float images become RGB: transparency is
    composited onto white, and high bit depths are brought to 8 bits by one scale per
    format, never per image, so a dark class stays darker than a bright one: 16-bit
    values are divided by 257 (a 16-bit image reads like its 8-bit copy; 12-bit data
    stored in 16 bits comes out dark, up to 16 of 255), 32-bit integer images are read
    on the same 16-bit scale (above 65,535 is white), and float images are read as
    [0, 1] data when within [-0.01, 1.01], else on the 0..255 scale when within it,
    else on the 16-bit scale (clipped). EXIF orientation is applied. JPEGs much larger
    than ``image_size`` are decoded at a reduced scale (``Image.draft``). Pillow's
    decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) stays on: an image over
    it is set aside.

    Manifests: backslashes in paths are read as ``/`` (Windows paths), and paths must
    still stay inside their folder. A row with an empty path or label (or a missing
    regression target) is set aside with the reason, like a missing file.

    Tables: see :mod:`minnorm_audit.data.table` (delimiter and decimal commas, saved
    index, vector columns). A row with an empty label, a missing target or a missing
    or infinite feature value is set aside with the reason; a column bad in more than
    half of its rows, and any finite value beyond float32's range, stop the load with
    one line naming the column and row.

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
        raise DataError(f"data path not found: {_printable(shown)}")
    root = data_path.resolve()
    if not _is_utf8(str(root)):
        # Checked before training: the run folder's Parquet and JSON files hold UTF-8 text only.
        raise DataError(f"the data path {_printable(str(root))} is not valid UTF-8 (shown with \\x escapes); "
                        "rename it or link to it from a UTF-8 name")

    if root.is_dir():
        if data_root is not None:
            raise DataError(f"a data root applies to a manifest, but {shown} is a folder")
        if format not in ("auto", "images"):
            raise DataError(f"format {format!r} needs a .csv or .parquet file, but {shown} is a folder")
        if task != "classification":
            raise DataError(
                f"task {task!r} needs a manifest or table with numeric targets, but {shown} is an image folder"
            )
        return _load_image_folder(root, shown, image_size=image_size, max_memory_gb=max_memory_gb, workers=workers,
                                  split_folders=split_folders, label_column=label_column)

    if format == "images":
        raise DataError(f"format 'images' needs a folder of class subfolders, but {shown} is a file")
    frame = _read_frame(root, shown)
    if format == "manifest" or (format == "auto" and path_column in frame.columns):
        return _load_manifest(
            frame, root, shown, label_column=label_column, path_column=path_column, task=task, image_size=image_size,
            base_dir=_data_root_folder(data_root), max_memory_gb=max_memory_gb, workers=workers,
        )
    if data_root is not None:
        raise DataError(f"a data root applies to a manifest (a file with a {path_column!r} column), but {shown} is a table")
    if feature_columns is None and text_column is None and label_column in frame.columns:
        image_column = detect_image_column(frame, [name for name in frame.columns if name != label_column])
        if image_column is not None:
            return _load_image_table(frame, root, shown, label_column=label_column, image_column=image_column,
                                     task=task, image_size=image_size)
    return _load_table(frame, root, shown, label_column=label_column, feature_columns=feature_columns, task=task,
                       ignore_columns=ignore_columns, text_column=text_column)
