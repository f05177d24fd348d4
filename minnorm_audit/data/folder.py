"""An image folder, ``DATA/<class_name>/<image files>`` (torchvision's ImageFolder layout).

Every file in a class folder, at any depth, is tried as an image; hidden files and
folders (name starting with ``.``) are skipped, files lying directly in the root are
set aside.
"""

from __future__ import annotations

import os
from pathlib import Path

from .dataset import DataError, LoadedDataset, SetAsideItem
from .image_files import _image_dataset, _nothing_readable_message, _read_image_files
from .images import _DecodedImage
from .labels import _class_indices, _sorted_class_names


def _load_image_folder(
    root: Path, shown: str, *, image_size: int, max_memory_gb: float | None = None, workers: int | None = None
) -> LoadedDataset:
    """Load ``root/<class>/<files>``; every class-folder file is tried as an image."""
    stray_files: list[SetAsideItem] = []
    class_dirs: list[Path] = []
    for entry in sorted(root.iterdir(), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if _is_utf8(entry.name):
                class_dirs.append(entry)
            else:
                stray_files += [SetAsideItem(_shown_name(file_path.relative_to(root).as_posix()), _NOT_UTF8_FOLDER)
                                for file_path in _walk_visible_files(entry)]
        else:
            stray_files.append(SetAsideItem(_shown_name(entry.name), "not inside a class folder"))
    if not class_dirs and stray_files and all(item.reason == _NOT_UTF8_FOLDER for item in stray_files):
        raise DataError(_nothing_readable_message(shown, stray_files))
    if not class_dirs:
        raise DataError(f"no class subfolders in {shown}: expected DATA/<class_name>/<image files>")

    candidates: list[tuple[str, str, Path]] = []  # (source, label, file)
    # Examples in class-index order, then by path: the same order on every run.
    dir_of_class = {folder.name: folder for folder in class_dirs}
    for class_name in _sorted_class_names(dir_of_class):
        class_dir = dir_of_class[class_name]
        for file_path in _walk_visible_files(class_dir):
            source = file_path.relative_to(root).as_posix()
            if _is_utf8(source):
                candidates.append((source, class_dir.name, file_path))
            else:  # the run folder's Parquet files hold UTF-8 text only: named, set aside
                stray_files.append(SetAsideItem(_shown_name(source), _NOT_UTF8_NAME))
    if not candidates and stray_files:
        raise DataError(_nothing_readable_message(shown, stray_files))
    if not candidates:
        raise DataError(f"no files in the class subfolders of {shown}")

    decoded = _read_image_files([file_path for _, _, file_path in candidates], image_size, max_memory_gb,
                                workers=workers)
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
