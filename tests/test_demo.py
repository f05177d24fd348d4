"""The bundled digits and the demo dataset (data/demo.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minnorm_audit.data import DataError, DemoDataset, load_bundled_digits, load_dataset, write_demo_dataset
from helpers import assert_one_line_error


# --------------------------------------------------------------------------- bundled digits and demo


def test_bundled_digits() -> None:
    images, labels = load_bundled_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataset:
    out_dir = tmp_path_factory.mktemp("demo") / "digits"
    out_dir.mkdir()  # an existing empty folder is fine to write into
    return write_demo_dataset(out_dir, noise_rate=0.1, seed=0)


def test_demo_flips_exactly_the_requested_share_to_other_classes(demo: DemoDataset) -> None:
    assert len(demo.flipped_sources) == round(0.1 * 1797) == 180
    assert len(set(demo.flipped_sources)) == 180
    assert set(demo.original_labels) == set(demo.flipped_sources)
    for source in demo.flipped_sources:
        given_label = source.split("/")[0]
        assert given_label != demo.original_labels[source]
        assert (demo.root / source).is_file()
    # Flips land in every other class, not just one neighbour.
    assert len({source.split("/")[0] for source in demo.flipped_sources}) == 10


def test_demo_loads_as_an_image_folder_with_flips_in_wrong_folders(demo: DemoDataset) -> None:
    dataset = load_dataset(demo.root, image_size=32)
    images, true_labels = load_bundled_digits()

    assert len(dataset.sources) == 1797 and dataset.set_aside == []
    assert dataset.class_names == [str(digit) for digit in range(10)]
    assert all(re.fullmatch(r"\d/\d{4}\.png", source) for source in dataset.sources), "names do not reveal flips"
    flipped = set(demo.flipped_sources)
    for source, target in zip(dataset.sources, dataset.targets.tolist()):
        index = int(source.split("/")[1][:4])
        assert (dataset.class_names[target] != str(true_labels[index])) == (source in flipped)
    # Pixels are the digits, 4x nearest-neighbour upscaled and 0..16 scaled to 0..255.
    position = next(position for position, source in enumerate(dataset.sources) if source.endswith("/0005.png"))
    expected = np.rint(images[5].astype(float) * 255 / 16).repeat(4, axis=0).repeat(4, axis=1)
    assert np.abs(dataset.inputs[position, 0].numpy().astype(float) - expected).max() <= 1


def test_demo_leaves_no_staging_folder(demo: DemoDataset) -> None:
    assert [path.name for path in demo.root.parent.iterdir()] == ["digits"]


def test_demo_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError) as excinfo:
        write_demo_dataset(tmp_path / "busy")
    assert_one_line_error(excinfo, "busy")
    assert [path.name for path in tmp_path.iterdir()] == ["busy"]
    assert [path.name for path in (tmp_path / "busy").iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError):
        write_demo_dataset(tmp_path / "new", noise_rate=1.5)


def test_demo_is_reproducible_per_seed(demo: DemoDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the choice of flips matters here; skip the 1,797 PNG writes.
    monkeypatch.setattr(Image.Image, "save", lambda self, *args, **kwargs: None)
    again = write_demo_dataset(tmp_path / "same", noise_rate=0.1, seed=0)
    other = write_demo_dataset(tmp_path / "other", noise_rate=0.1, seed=1)
    assert again.flipped_sources == demo.flipped_sources and again.original_labels == demo.original_labels
    assert other.flipped_sources != demo.flipped_sources
