"""An image folder, ``DATA/<class_name>/<image files>`` (torchvision's ImageFolder layout),
or a split root over class folders, ``DATA/<split>/<class_name>/<image files>``.

Every file in a class folder, at any depth, is tried as an image; hidden files and
folders (name starting with ``.``) are skipped, files lying directly in the root are
set aside.

Split roots: when every top-level folder is a split name (:data:`SPLIT_NAMES`, any
case; or the names given as ``split_folders``) and each holds class folders, the
splits are audited together in one run: classes come from the inner level and each
example's split is kept (``LoadedDataset.splits``). Auditing ``train/`` and ``val/``
as two classes would call every ``val`` image mislabeled.

The Hugging Face ``imagefolder`` layout, a ``metadata.csv`` or ``metadata.jsonl`` with
a ``file_name`` column beside the images (at the root or in each split folder), is read
as a manifest when it has the label column; else its labels come from the folders.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .dataset import DataError, LoadedDataset, SetAsideItem
from .image_files import _image_dataset, _nothing_readable_message, _read_image_files
from .images import _DecodedImage
from .labels import _class_indices, _nfc, _sorted_class_names

# Top-level folder names read as splits (compared case-insensitively).
SPLIT_NAMES = ("train", "training", "val", "valid", "validation", "test", "testing", "dev", "eval", "holdout")
# The Hugging Face imagefolder metadata files, and the column naming each image.
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
METADATA_PATH_COLUMN = "file_name"


def _load_image_folder(
    root: Path, shown: str, *, image_size: int, max_memory_gb: float | None = None, workers: int | None = None,
    split_folders: list[str] | None = None, label_column: str = "label",
) -> LoadedDataset:
    """Load ``root/<class>/<files>`` or ``root/<split>/<class>/<files>`` (see the module
    docstring); ``split_folders``: the split folder names (None: detect them from
    :data:`SPLIT_NAMES`; ``["none"]``: never read the top level as splits)."""
    top_dirs, stray_files = _visible_entries(root)
    split_dirs = _split_dirs(top_dirs, shown, split_folders) if top_dirs else []
    notes: list[str] = []
    if split_dirs:
        notes.append(f"{shown} read as a split root: splits {', '.join(repr(d.name) for d in split_dirs)}, "
                     "classes from the folders inside them (turn off with --split-folders none)")

    # (source, label, file, split)
    candidates: list[tuple[str, str, Path, str | None]] = []
    metadata = _metadata_candidates(root, split_dirs, label_column, shown)
    if metadata is not None:
        candidates, metadata_aside = metadata
        stray_files = metadata_aside
        notes.append(f"{shown}: labels read from the imagefolder metadata ({METADATA_PATH_COLUMN!r} and "
                     f"{label_column!r} columns), not from the folders")
    elif not top_dirs:
        raise DataError(f"no class subfolders in {shown}: expected DATA/<class_name>/<image files>")
    else:
        for split_dir in split_dirs or [None]:
            if split_dir is None:
                class_dirs = top_dirs
            else:
                class_dirs, split_strays = _visible_entries(split_dir)
                stray_files += [SetAsideItem(f"{split_dir.name}/{item.source}", "not inside a class folder")
                                for item in split_strays]
            # Examples in class order, then by path: the same order on every run.
            for folder in sorted(class_dirs, key=lambda folder: (_nfc(folder.name), folder.name)):
                if not _is_utf8(folder.name):  # the run folder's Parquet files hold UTF-8 text only
                    stray_files += [SetAsideItem(_shown_name(file_path.relative_to(root).as_posix()),
                                                 _NOT_UTF8_FOLDER) for file_path in _walk_visible_files(folder)]
                    continue
                for file_path in _walk_visible_files(folder):
                    source = file_path.relative_to(root).as_posix()
                    if not _is_utf8(source):  # named, set aside
                        stray_files.append(SetAsideItem(_shown_name(source), _NOT_UTF8_NAME))
                        continue
                    candidates.append((source, folder.name, file_path, None if split_dir is None else split_dir.name))
        if not candidates and stray_files and all(item.reason in (_NOT_UTF8_FOLDER, _NOT_UTF8_NAME)
                                                  for item in stray_files):
            raise DataError(_nothing_readable_message(shown, stray_files))
        order = {name: index for index, name in
                 enumerate(_sorted_class_names({_nfc(label) for _, label, _, _ in candidates}))}
        candidates.sort(key=lambda item: (order[_nfc(item[1])], item[0]))
    if not candidates:
        raise DataError(f"no files in the class subfolders of {shown}")

    decoded = _read_image_files([file_path for _, _, file_path, _ in candidates], image_size, max_memory_gb,
                                workers=workers)
    kept: list[tuple[str, str, _DecodedImage]] = []
    kept_splits: list[str] = []
    unreadable: list[SetAsideItem] = []
    for (source, label, _, split), result in zip(candidates, decoded):
        if result.reason is not None:
            unreadable.append(SetAsideItem(source, result.reason or "unreadable"))
        else:
            kept.append((source, label, result))
            kept_splits.append(split or "")
    if not kept:
        raise DataError(_nothing_readable_message(shown, unreadable))
    class_names, targets = _class_indices([label for _, label, _ in kept], shown, notes=notes)
    loaded = _image_dataset(root, kept, class_names, targets, stray_files + unreadable, image_size)
    if split_dirs:
        loaded.splits = kept_splits
    loaded.notes = notes + loaded.notes
    return loaded


def _visible_entries(folder: Path) -> tuple[list[Path], list[SetAsideItem]]:
    """Visible subfolders of ``folder`` (sorted by name) and its files, set aside."""
    dirs: list[Path] = []
    files: list[SetAsideItem] = []
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            dirs.append(entry)
        elif entry.name not in METADATA_FILES:
            files.append(SetAsideItem(_shown_name(entry.name), "not inside a class folder"))
    return dirs, files


def _split_dirs(top_dirs: list[Path], shown: str, split_folders: list[str] | None) -> list[Path]:
    """The top-level folders that are splits ([] when the root is a plain image folder)."""
    if split_folders is not None and [name.lower() for name in split_folders] == ["none"]:
        return []
    if split_folders is None:
        names = set(SPLIT_NAMES)
        # Every top folder a split name, each holding folders (its classes) or imagefolder
        # metadata: a class folder named 'test' holds image files only.
        if not all(folder.name.lower() in names and (_visible_entries(folder)[0] or _has_metadata(folder))
                   for folder in top_dirs):
            return []
        return top_dirs
    wanted = {name.lower() for name in split_folders}
    splits = [folder for folder in top_dirs if folder.name.lower() in wanted]
    others = [folder.name for folder in top_dirs if folder.name.lower() not in wanted]
    if not splits:
        raise DataError(f"none of the split folders {', '.join(map(repr, split_folders))} is in {shown}")
    if others:
        raise DataError(f"{shown}: folder {others[0]!r} is not one of the split folders "
                        f"{', '.join(map(repr, split_folders))}; name it in --split-folders or move it")
    empty = [folder.name for folder in splits if not (_visible_entries(folder)[0] or _has_metadata(folder))]
    if empty:
        raise DataError(f"{shown}: split folder {empty[0]!r} holds no class folders")
    return splits


def _has_metadata(folder: Path) -> bool:
    return any((folder / name).is_file() for name in METADATA_FILES)


def _metadata_candidates(
    root: Path, split_dirs: list[Path], label_column: str, shown: str
) -> tuple[list[tuple[str, str, Path, str | None]], list[SetAsideItem]] | None:
    """The images and labels an imagefolder ``metadata.csv``/``.jsonl`` lists (at the root,
    or in each split folder), or None when there is none with the label column."""
    folders: list[tuple[Path, str | None]] = [(root, None)] + [(folder, folder.name) for folder in split_dirs]
    found = [(folder, split, folder / name) for folder, split in folders for name in METADATA_FILES
             if (folder / name).is_file()]
    if not found:
        return None
    from .labels import _label_texts
    from .manifest import _contained_path

    candidates: list[tuple[str, str, Path, str | None]] = []
    set_aside: list[SetAsideItem] = []
    for folder, split, metadata_path in found:
        where = metadata_path.relative_to(root).as_posix()
        try:
            if metadata_path.suffix == ".jsonl":
                frame = pd.read_json(metadata_path, lines=True, dtype=False)
            else:
                frame = pd.read_csv(metadata_path, dtype=str, keep_default_na=False)
        except (ValueError, OSError) as error:
            raise DataError(f"{shown}: cannot read {where}: {' '.join(str(error).split())}") from error
        if METADATA_PATH_COLUMN not in frame.columns or label_column not in frame.columns:
            return None  # not a labeled metadata file: the labels come from the folders
        labels, reasons = _label_texts(frame[label_column], where, label_column)
        for row, value in enumerate(frame[METADATA_PATH_COLUMN].tolist()):
            written, resolved = _contained_path(folder.resolve(), str(value), f"{where} row {row}", "its folder")
            source = resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else written
            if row in reasons:
                set_aside.append(SetAsideItem(source, reasons[row]))
            else:
                candidates.append((source, labels[row], resolved, split))
    return candidates, set_aside


_NOT_UTF8_NAME = "file name is not valid UTF-8 (shown with \\x escapes); rename the file to use it"
_NOT_UTF8_FOLDER = "class folder name is not valid UTF-8 (shown with \\x escapes); rename the folder to use it"


def _is_utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (Python keeps them as lone
    surrogates, which cannot be written to Parquet or JSON)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown_name(name: str) -> str:
    """A name as printable UTF-8: bytes that are not UTF-8 become ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _walk_visible_files(folder: Path) -> list[Path]:
    """Files under ``folder`` at any depth, hidden files and folders skipped, sorted by path."""
    found: list[Path] = []
    # followlinks=False: a symlinked folder loop must not hang the walk.
    for dir_path, dir_names, file_names in os.walk(folder):
        dir_names[:] = sorted(name for name in dir_names if not name.startswith("."))
        found += [Path(dir_path) / name for name in file_names if not name.startswith(".")]
    return sorted(found, key=lambda file_path: file_path.relative_to(folder).as_posix())
