"""The bundled demo: scikit-learn's copy of the UCI handwritten digits
(:func:`load_bundled_digits`), which :func:`write_demo_dataset` writes out as an image
folder with a known share of labels flipped, so that an audit can be checked against
the truth."""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import DataError


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
