"""Many image files at once (an image folder's or a manifest's): decoded when the
decoded images fit the memory budget (in a pool of processes for 2,000 files or more
on a machine with several CPUs, else in a thread pool: the same function gives the
same pixels either way), else pre-scanned and streamed
(:class:`~minnorm_audit.data.placement.LazyImages`), then assembled into one
:class:`~minnorm_audit.data.dataset.LoadedDataset` with its fingerprint."""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .dataset import LoadedDataset, SetAsideItem
from .fingerprint import _Fingerprint, _little_endian_bytes
from .images import _decode_image_file, _DecodedImage, prescan_image_file
from .placement import LazyImages, images_fit_in_memory


# Decoding small files is mostly Python work under the GIL: from this many files on,
# a process pool (each worker decoding chunks of files) beats threads on 2+ CPUs.
PROCESS_POOL_MIN_FILES = 2000
PROCESS_CHUNK_FILES = 128


def _read_image_files(
    file_paths: Sequence[Path], image_size: int, max_memory_gb: float | None, *, workers: int | None = None
) -> list[_DecodedImage]:
    """Decode every file when the decoded images fit ``max_memory_gb``, else pre-scan
    them. ``workers``: most decoding processes (the ``--workers`` option; 0: none, in
    this process only; None: one per CPU)."""
    if images_fit_in_memory(len(file_paths), image_size, max_memory_gb):
        return _decode_image_files(file_paths, image_size, processes=_decode_processes(len(file_paths), workers))
    max_workers = min(32, (os.cpu_count() or 1) + 4)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
        scanned = list(pool.map(prescan_image_file, file_paths))
    return [
        _DecodedImage(None, reason, content_sha256, None if reason else file_path)
        for file_path, (reason, content_sha256) in zip(file_paths, scanned)
    ]


def _decode_processes(num_files: int, workers: int | None) -> int:
    """How many processes decode ``num_files`` files (1: this one, with threads)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if num_files < PROCESS_POOL_MIN_FILES or not _fork_available():
        return 1
    return max(1, min(cpus, cpus if workers is None else workers, -(-num_files // PROCESS_CHUNK_FILES)))


def _fork_available() -> bool:
    # Workers are forked, as torch's DataLoader workers are on Linux: a spawned one
    # would import torch again before decoding anything (seconds per worker).
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def _decode_image_files(file_paths: Sequence[Path], image_size: int, *, processes: int = 1) -> list[_DecodedImage]:
    """Decode files in a thread pool, or in ``processes`` forked processes (chunks of
    ``PROCESS_CHUNK_FILES``); results in the order of ``file_paths``, the same pixels
    and reasons either way."""
    if processes > 1 and len(file_paths) > 1:
        chunks = [list(file_paths[start:start + PROCESS_CHUNK_FILES])
                  for start in range(0, len(file_paths), PROCESS_CHUNK_FILES)]
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=processes, mp_context=context) as pool:
            return [result for chunk in pool.map(functools.partial(_decode_chunk, image_size=image_size), chunks)
                    for result in chunk]
    decode = functools.partial(_decode_image_file, image_size=image_size)
    # Pillow decodes with the GIL released, so threads scale; map() keeps the order.
    max_workers = min(32, (os.cpu_count() or 1) + 4)
    # Turn Pillow's bomb warning into an error for this item. Filters are process-wide
    # on Python < 3.14, so the workers see this one; _check_pixel_limit backs it up.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max_workers) as pool:
            return list(pool.map(decode, file_paths))


def _decode_chunk(file_paths: Sequence[Path], image_size: int) -> list[_DecodedImage]:
    """One worker process's share, decoded in order (with the bomb warning an error, as
    in the thread pool)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return [_decode_image_file(file_path, image_size) for file_path in file_paths]


def _lazy_images(kept: Sequence[tuple[str, str, _DecodedImage]], image_size: int) -> LazyImages:
    return LazyImages([result.file_path for _, _, result in kept if result.file_path is not None], image_size)


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
