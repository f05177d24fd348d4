"""Placement of the training data (data/placement.py): images streamed from disk when they
do not fit the memory budget, and the batch sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from minnorm_audit.audit import AuditOptions, run_audit
from minnorm_audit.data import image_files, load_dataset
from minnorm_audit.data.placement import LazyImages, LoaderBatches, images_fit_in_memory, make_batch_source
from minnorm_audit.training import TrainConfig

TINY_BUDGET_GB = 1e-9  # forces the streaming path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 14 images (PNG and JPEG, 12x12), 2 mislabeled, 4 unreadable files."""
    root = tmp_path_factory.mktemp("streaming") / "images"
    rng = np.random.default_rng(0)
    for label in range(3):
        (root / f"class{label}").mkdir(parents=True)
        for index in range(14):
            shown_as = (label + 1) % 3 if index == 13 and label < 2 else label
            pixels = rng.integers(0, 70, size=(12, 12, 3)) + 80 * shown_as
            pixels[:, :, shown_as] += 100
            suffix = "png" if index % 2 else "jpg"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / f"class{label}" / f"{index:02d}.{suffix}")
    png = (root / "class0" / "01.png").read_bytes()
    (root / "class0" / "truncated.png").write_bytes(png[: len(png) // 2])
    jpeg = (root / "class1" / "00.jpg").read_bytes()
    (root / "class1" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "class1" / "empty.png").write_bytes(b"")
    (root / "class2" / "notes.txt").write_text("not an image")
    return root


def test_budget_rule_compares_decoded_bytes_with_the_budget():
    decoded = 100 * 3 * 32 * 32
    assert images_fit_in_memory(100, 32, max_memory_gb=decoded / 2**30)
    assert not images_fit_in_memory(100, 32, max_memory_gb=(decoded - 1) / 2**30)
    assert images_fit_in_memory(100, 32, max_memory_gb=None)  # auto: half of what is available


def test_streamed_load_equals_eager_load_without_decoding_everything(image_folder, monkeypatch):
    eager = load_dataset(image_folder, image_size=8)
    monkeypatch.setattr(image_files, "_decode_image_files", _refuse_eager_decoding)
    streamed = load_dataset(image_folder, image_size=8, max_memory_gb=TINY_BUDGET_GB)
    assert isinstance(streamed.inputs, LazyImages) and isinstance(eager.inputs, torch.Tensor)
    assert streamed.inputs.shape == eager.inputs.shape
    # Same examples, set-aside items (found by the pre-scan) and fingerprint.
    assert streamed.sources == eager.sources
    assert streamed.set_aside == eager.set_aside and len(streamed.set_aside) == 4
    assert streamed.fingerprint == eager.fingerprint
    assert torch.equal(streamed.targets, eager.targets)
    assert torch.equal(streamed.inputs[:], eager.inputs)  # same decoding, pixel for pixel
    assert torch.equal(streamed.inputs[5], eager.inputs[5])


def test_streamed_manifest_sets_aside_missing_files(image_folder, tmp_path):
    manifest = pd.DataFrame({"path": ["class0/00.jpg", "class1/03.png", "gone.png", "class2/notes.txt"],
                             "label": ["a", "b", "a", "b"]})
    manifest.to_csv(image_folder / "manifest.csv", index=False)
    try:
        eager = load_dataset(image_folder / "manifest.csv", image_size=8)
        streamed = load_dataset(image_folder / "manifest.csv", image_size=8, max_memory_gb=TINY_BUDGET_GB)
    finally:
        (image_folder / "manifest.csv").unlink()
    assert isinstance(streamed.inputs, LazyImages)
    assert streamed.set_aside == eager.set_aside and streamed.fingerprint == eager.fingerprint
    assert torch.equal(streamed.inputs[:], eager.inputs)


def test_loader_yields_the_ids_of_each_batch_in_order(image_folder):
    eager = load_dataset(image_folder, image_size=8)
    streamed = load_dataset(image_folder, image_size=8, max_memory_gb=TINY_BUDGET_GB)
    source = make_batch_source(streamed.inputs, torch.device("cpu"), workers=2)
    assert isinstance(source, LoaderBatches) and source.placement == "stream"
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(1))
    batches = list(order.split(16)) + [order[:0]]  # an empty slice, as a DDP rank may get
    for _ in range(2):  # persistent workers replay new batches on the next pass
        seen = list(source.iterate(batches))
        assert len(seen) == len(batches)
        for wanted, (ids, images) in zip(batches, seen):
            assert torch.equal(ids, wanted)
            assert torch.equal(images, eager.inputs[wanted])
    source.close()


def test_host_tensor_loader_gives_the_same_batches():
    inputs = torch.arange(40 * 3, dtype=torch.float32).reshape(40, 3)
    source = LoaderBatches(inputs, torch.device("cpu"), workers=2)
    assert source.placement == "host"
    batches = list(torch.randperm(40, generator=torch.Generator().manual_seed(0)).split(7))
    for wanted, (ids, rows) in zip(batches, source.iterate(batches), strict=True):
        assert torch.equal(ids, wanted) and torch.equal(rows, inputs[wanted])
    source.close()


def test_streamed_audit_matches_in_memory_audit(image_folder, tmp_path, monkeypatch):
    settings = AuditOptions(image_size=8, train=TrainConfig(epochs=3, batch_size=16, device="cpu", workers=2,
                                                            dual_lr=0.05), gallery_size=5)
    eager = run_audit(load_dataset(image_folder, image_size=8), settings, tmp_path / "eager")

    monkeypatch.setattr(image_files, "_decode_image_files", _refuse_eager_decoding)
    streamed_settings = AuditOptions(image_size=8, train=TrainConfig(**{**settings.train.to_dict(),
                                                                       "max_memory_gb": TINY_BUDGET_GB}),
                                     gallery_size=5)
    loaded = load_dataset(image_folder, image_size=8, max_memory_gb=TINY_BUDGET_GB)
    streamed = run_audit(loaded, streamed_settings, tmp_path / "streamed")

    assert streamed.summary["config"]["data_placement"] == "stream"
    assert eager.summary["config"]["data_placement"] == "device"
    np.testing.assert_allclose(streamed.examples["difficulty"], eager.examples["difficulty"], rtol=1e-4, atol=1e-6)
    assert eager.examples["difficulty"].max() > 0
    assert (streamed.examples["flag"] == eager.examples["flag"]).all()
    assert (streamed.examples["suggested_label"] == eager.examples["suggested_label"]).all()
    gallery = pd.read_parquet(tmp_path / "streamed" / "gallery.parquet")
    assert gallery["thumbnail_png"].notna().all()  # thumbnails decoded on demand


def _refuse_eager_decoding(*args, **kwargs):
    raise AssertionError("the streaming path must not decode the whole dataset")
