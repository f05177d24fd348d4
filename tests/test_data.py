"""Tests for minnorm_audit.data: layouts, bad items, odd modes, whole-input errors, the demo."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from minnorm_audit.data import (
    DataError,
    DemoDataset,
    LoadedDataset,
    SetAsideItem,
    load_bundled_digits,
    load_dataset,
    write_demo_dataset,
)

IMAGE_SIZE = 16


# --------------------------------------------------------------------------- helpers


def save_image(path: Path, image: Image.Image, **save_options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_options)
    return path


def solid(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.new("RGB", size, color)


def image_bytes(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def noisy_rgb(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """Random pixels: compresses badly, so a cut file is really missing data."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_image_folder(root: Path) -> Path:
    """cat: 2 top-level + 1 nested image, dog: 2 images; hidden and stray files around them."""
    save_image(root / "cat" / "a.png", solid((255, 0, 0)))
    save_image(root / "cat" / "b.jpg", solid((250, 5, 5)))
    save_image(root / "cat" / "deeper" / "c.png", solid((240, 10, 10)))
    save_image(root / "dog" / "a.png", solid((0, 0, 255)))
    save_image(root / "dog" / "d.png", solid((5, 5, 250)))
    save_image(root / "dog" / ".hidden.png", solid((0, 255, 0)))
    save_image(root / "dog" / ".thumbs" / "t.png", solid((0, 255, 0)))
    save_image(root / ".git" / "x.png", solid((0, 255, 0)))
    (root / "README.txt").write_text("stray file at the root")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under root (files and folders) -> (content sha256 or 'dir', mtime_ns)."""
    state = {}
    for dir_path, dir_names, file_names in os.walk(root):
        for name in dir_names:
            full = Path(dir_path) / name
            state[full.relative_to(root).as_posix()] = ("dir", full.stat().st_mtime_ns)
        for name in file_names:
            full = Path(dir_path) / name
            digest = hashlib.sha256(full.read_bytes()).hexdigest()
            state[full.relative_to(root).as_posix()] = (digest, full.stat().st_mtime_ns)
    state["."] = ("dir", root.stat().st_mtime_ns)
    return state


def set_aside_reasons(dataset: LoadedDataset) -> dict[str, str]:
    return {item.source: item.reason for item in dataset.set_aside}


def assert_one_line_error(excinfo: pytest.ExceptionInfo[DataError], *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --------------------------------------------------------------------------- layouts


def test_image_folder_loads_classes_sources_and_shapes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data")

    dataset = load_dataset(root, image_size=IMAGE_SIZE)

    assert dataset.kind == "images" and dataset.task == "classification"
    assert dataset.root == root.resolve()
    assert dataset.class_names == ["cat", "dog"]
    assert dataset.sources == ["cat/a.png", "cat/b.jpg", "cat/deeper/c.png", "dog/a.png", "dog/d.png"]
    assert dataset.targets.tolist() == [0, 0, 0, 1, 1]
    assert dataset.targets.dtype == torch.int64
    assert dataset.inputs.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and dataset.inputs.dtype == torch.uint8
    assert dataset.image_size == IMAGE_SIZE
    assert dataset.feature_names == [] and dataset.target_names == []
    assert set_aside_reasons(dataset) == {"README.txt": "not inside a class folder"}
    # Red cats, blue dogs: pixels land in the right rows and channels.
    assert dataset.inputs[0, 0].min() > 200 and dataset.inputs[0, 2].max() < 30
    assert dataset.inputs[3, 2].min() > 200 and dataset.inputs[3, 0].max() < 30


def test_integer_class_folders_sort_numerically(tmp_path: Path) -> None:
    for name in ["10", "9", "2"]:
        save_image(tmp_path / name / "x.png", solid((1, 2, 3)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.class_names == ["2", "9", "10"]
    assert dataset.sources == ["2/x.png", "9/x.png", "10/x.png"]
    assert dataset.targets.tolist() == [0, 1, 2]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_manifest_loads_rows_in_order_and_sets_missing_files_aside(tmp_path: Path, suffix: str) -> None:
    save_image(tmp_path / "images" / "one.png", solid((255, 255, 255)))
    save_image(tmp_path / "images" / "two.png", solid((0, 0, 0)))
    save_image(tmp_path / "three.png", solid((9, 9, 9)))
    frame = pd.DataFrame(
        {"path": ["images/two.png", "images/one.png", "gone.png", "three.png"], "label": [1, 0, 1, 10], "x": 1}
    )
    manifest = tmp_path / f"manifest{suffix}"
    frame.to_csv(manifest, index=False) if suffix == ".csv" else frame.to_parquet(manifest, index=False)

    dataset = load_dataset(manifest, image_size=IMAGE_SIZE)

    assert dataset.kind == "images" and dataset.root == manifest.resolve()
    assert dataset.sources == ["images/two.png", "images/one.png", "three.png"]
    assert dataset.class_names == ["0", "1", "10"]
    assert dataset.targets.tolist() == [1, 0, 2]
    assert dataset.set_aside == [SetAsideItem("gone.png", "file not found")]
    assert dataset.inputs[0].max() == 0 and dataset.inputs[1].min() == 255


def test_manifest_regression_targets(tmp_path: Path) -> None:
    for name in ["a", "b", "c"]:
        save_image(tmp_path / f"{name}.png", solid((1, 2, 3)))
    manifest = tmp_path / "ages.csv"
    pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "age": [3.5, 7, 1]}).to_csv(manifest, index=False)

    dataset = load_dataset(manifest, label_column="age", task="regression", image_size=IMAGE_SIZE)

    assert dataset.targets.dtype == torch.float32 and dataset.targets.shape == (3, 1)
    assert dataset.targets[:, 0].tolist() == [3.5, 7.0, 1.0]
    assert dataset.class_names == [] and dataset.target_names == ["age"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_loads_features_unstandardized(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame(
        {"height": [1.5, 2.0, 3.25, 4.0], "label": ["b", "a", "b", "c"], "weight": [10, 20, 30, 40]}
    )
    table = tmp_path / f"table{suffix}"
    frame.to_csv(table, index=False) if suffix == ".csv" else frame.to_parquet(table, index=False)

    dataset = load_dataset(table)

    assert dataset.kind == "table" and dataset.image_size is None and dataset.set_aside == []
    assert dataset.feature_names == ["height", "weight"]
    assert dataset.sources == ["0", "1", "2", "3"]
    assert dataset.class_names == ["a", "b", "c"]
    assert dataset.targets.tolist() == [1, 0, 1, 2]
    assert dataset.inputs.dtype == torch.float32
    assert torch.equal(dataset.inputs, torch.tensor([[1.5, 10], [2.0, 20], [3.25, 30], [4.0, 40]]))


def test_table_feature_columns_and_regression(tmp_path: Path) -> None:
    table = tmp_path / "houses.csv"
    pd.DataFrame({"id": ["h1", "h2", "h3"], "rooms": [2, 3, 4], "price": [100.0, 150.5, 210.0]}).to_csv(
        table, index=False
    )

    dataset = load_dataset(table, label_column="price", task="regression", feature_columns=["rooms"])

    assert dataset.feature_names == ["rooms"] and dataset.inputs.shape == (3, 1)
    assert dataset.targets.dtype == torch.float32 and dataset.targets[:, 0].tolist() == [100.0, 150.5, 210.0]
    assert dataset.target_names == ["price"] and dataset.class_names == []


def test_integer_labels_become_numerically_sorted_class_names(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    pd.DataFrame({"f": range(11), "label": list(range(11))}).to_csv(table, index=False)

    dataset = load_dataset(table)

    assert dataset.class_names == [str(label) for label in range(11)]
    assert dataset.targets.tolist() == list(range(11))


# --------------------------------------------------------------------------- bad items


def test_every_bad_item_is_set_aside_with_a_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = solid((10, 20, 30), (8, 8))  # 64 pixels: under the lowered limit below
    save_image(tmp_path / "a" / "good.png", good)
    save_image(tmp_path / "b" / "good.png", good)
    png, jpeg = image_bytes(noisy_rgb((32, 32)), "PNG"), image_bytes(noisy_rgb((32, 32)), "JPEG")
    (tmp_path / "a" / "zero.png").write_bytes(b"")
    (tmp_path / "a" / "cut.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "a" / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "a" / "garbage.png").write_bytes(np.random.default_rng(1).bytes(200))
    broken = bytearray(png)
    broken[len(png) // 2 : len(png) // 2 + 40] = bytes(40)  # valid header, mangled pixel data
    (tmp_path / "a" / "broken.png").write_bytes(bytes(broken))
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    # A valid EPS header: Pillow could open it, but only by running Ghostscript on it.
    (tmp_path / "b" / "page.eps").write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; both must be set aside.
    save_image(tmp_path / "b" / "bomb_warn.png", solid((0, 0, 0), (60, 60)))  # 3,600 pixels
    save_image(tmp_path / "b" / "bomb_error.png", solid((0, 0, 0), (100, 100)))  # 10,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3_000)

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.sources == ["a/good.png", "b/good.png"]
    reasons = set_aside_reasons(dataset)
    assert reasons["a/zero.png"] == "zero-byte file"
    assert reasons["a/cut.png"] == "truncated image"
    assert reasons["a/cut.jpg"] == "truncated image"
    assert reasons["a/garbage.png"] == "cannot identify image file"
    assert reasons["a/broken.png"].startswith("cannot decode image (")
    assert reasons["b/notes.txt"] == "cannot identify image file"
    assert reasons["b/page.eps"] == "cannot identify image file"
    assert "decompression-bomb" in reasons["b/bomb_warn.png"]
    assert "decompression-bomb" in reasons["b/bomb_error.png"]
    assert len(reasons) == 9


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".gif", ".bmp", ".tiff", ".webp", ".ppm", ".tga"])
def test_common_formats_load(tmp_path: Path, suffix: str) -> None:
    save_image(tmp_path / "a" / f"image{suffix}", solid((200, 100, 50)))
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.set_aside == [] and dataset.sources[0] == f"a/image{suffix}"
    assert dataset.inputs[0, :, 0, 0].tolist() == pytest.approx([200, 100, 50], abs=8)


def _palette_image(with_transparency: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 255, 0] + [255, 0, 0] * 255)  # index 0 green, the rest red
    if with_transparency:
        image.info["transparency"] = 0
    return image


# (mode name, image factory, file suffix, expected RGB of the uniform result)
ODD_MODES = [
    ("P", lambda: _palette_image(False), ".png", (0, 255, 0)),
    ("P+transparency", lambda: _palette_image(True), ".png", (255, 255, 255)),
    ("RGBA", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), ".png", (255, 255, 255)),
    ("RGBA opaque", lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 255)), ".png", (255, 0, 0)),
    ("LA", lambda: Image.new("LA", (8, 8), (0, 0)), ".png", (255, 255, 255)),
    ("L", lambda: Image.new("L", (8, 8), 77), ".png", (77, 77, 77)),
    ("1", lambda: Image.new("1", (8, 8), 1), ".png", (255, 255, 255)),
    ("I;16", lambda: Image.fromarray(np.full((8, 8), 4095, dtype=np.uint16)), ".png", (255, 255, 255)),
    ("I", lambda: Image.fromarray(np.full((8, 8), 70_000, dtype=np.int32)), ".tiff", (255, 255, 255)),
    ("F", lambda: Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), ".tiff", (128, 128, 128)),
    ("CMYK", lambda: Image.new("CMYK", (8, 8), (255, 0, 0, 0)), ".tiff", (0, 255, 255)),
    ("CMYK jpeg", lambda: Image.new("CMYK", (8, 8), (0, 0, 0, 0)), ".jpg", (255, 255, 255)),
]


@pytest.mark.parametrize(("mode", "factory", "suffix", "expected_rgb"), ODD_MODES, ids=[m[0] for m in ODD_MODES])
def test_odd_modes_decode_to_rgb_uint8(
    tmp_path: Path, mode: str, factory: Callable[[], Image.Image], suffix: str, expected_rgb: tuple[int, int, int]
) -> None:
    save_image(tmp_path / "odd" / f"image{suffix}", factory())
    save_image(tmp_path / "plain" / "image.png", solid((1, 2, 3)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.set_aside == []
    assert dataset.inputs.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and dataset.inputs.dtype == torch.uint8
    odd = dataset.inputs[dataset.sources.index(f"odd/image{suffix}")]
    per_channel = odd.reshape(3, -1)
    assert (per_channel.amin(dim=1) == per_channel.amax(dim=1)).all(), "a uniform image stays uniform"
    assert per_channel[:, 0].tolist() == pytest.approx(list(expected_rgb), abs=2)


def test_sixteen_bit_scaled_by_its_maximum(tmp_path: Path) -> None:
    ramp = np.zeros((8, 8), dtype=np.uint16)
    ramp[:, 4:] = 4000  # 12-bit data in a 16-bit container: must not come out near black
    save_image(tmp_path / "a" / "ramp.png", Image.fromarray(ramp))
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    pixels = load_dataset(tmp_path, image_size=8).inputs[0]

    assert pixels[:, :, 0].max() == 0 and pixels[:, :, -1].min() == 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored landscape: left half red, right half blue. Orientation 6 = rotate 90 degrees
    # clockwise for display, which puts red on top.
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))
    exif = Image.Exif()
    exif[0x0112] = 6
    save_image(tmp_path / "a" / "rotated.jpg", stored, exif=exif, quality=95)
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    pixels = load_dataset(tmp_path, image_size=IMAGE_SIZE).inputs[0].int()

    top, bottom = pixels[:, 2, IMAGE_SIZE // 2], pixels[:, -3, IMAGE_SIZE // 2]
    assert top[0] > 200 and top[2] < 60, "red on top"
    assert bottom[2] > 200 and bottom[0] < 60, "blue at the bottom"


def test_large_jpeg_is_reduced_to_image_size(tmp_path: Path) -> None:
    large = Image.new("RGB", (3000, 2000), (0, 128, 0))
    save_image(tmp_path / "a" / "large.jpg", large)
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    dataset = load_dataset(tmp_path, image_size=IMAGE_SIZE)

    assert dataset.inputs.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert dataset.inputs[0, 1].float().mean() == pytest.approx(128, abs=3)


def test_whole_image_resized_without_cropping(tmp_path: Path) -> None:
    # A wide image with a distinctive stripe at its far right edge: a centre crop would lose it.
    wide = Image.new("RGB", (64, 16), (0, 0, 0))
    wide.paste((255, 255, 255), (48, 0, 64, 16))
    save_image(tmp_path / "a" / "wide.png", wide)
    save_image(tmp_path / "b" / "x.png", solid((0, 0, 0)))

    pixels = load_dataset(tmp_path, image_size=8).inputs[0]

    assert pixels[0, :, -1].min() > 200 and pixels[0, :, 0].max() == 0


# --------------------------------------------------------------------------- whole-input errors


def _write_table(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path, index=False)
    return path


def test_missing_path_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "nowhere")
    assert_one_line_error(excinfo, "not found", "nowhere")


def test_folder_without_class_subfolders(tmp_path: Path) -> None:
    save_image(tmp_path / "data" / "loose.png", solid((1, 1, 1)))
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "data")
    assert_one_line_error(excinfo, "no class subfolders", "data")


def test_single_class_is_refused(tmp_path: Path) -> None:
    save_image(tmp_path / "data" / "only" / "x.png", solid((1, 1, 1)))
    (tmp_path / "data" / "empty_class").mkdir()
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "data")
    assert_one_line_error(excinfo, "only one class", "'only'", "data")


def test_no_readable_items(tmp_path: Path) -> None:
    for name in ["a", "b"]:
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "x.png").write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "data")
    assert_one_line_error(excinfo, "no readable images", "data", "zero-byte file")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_label_column_lists_the_columns(tmp_path: Path, suffix: str) -> None:
    table = _write_table(tmp_path / f"t{suffix}", pd.DataFrame({"f": [1, 2], "klass": ["a", "b"]}))
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, f"t{suffix}", "'label'", "'f'", "'klass'")


def test_manifest_format_needs_the_path_column(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "m.csv", pd.DataFrame({"file": ["x.png"], "label": ["a"]}))
    with pytest.raises(DataError) as excinfo:
        load_dataset(table, format="manifest")
    assert_one_line_error(excinfo, "m.csv", "'path'", "'file'")


def test_non_numeric_feature_columns_are_named(tmp_path: Path) -> None:
    frame = pd.DataFrame({"ok": [1, 2], "colour": ["red", "blue"], "size": ["1", "big"], "label": ["a", "b"]})
    table = _write_table(tmp_path / "t.csv", frame)
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, "t.csv", "non-numeric", "'colour'", "'size'", "'big' in row 1")
    assert "'ok'" not in str(excinfo.value)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, None])
def test_nan_or_inf_feature_names_column_and_row(tmp_path: Path, bad_value: float | None) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "label": ["x", "y", "x"]})
    frame["b"] = frame["b"].astype(object)
    frame.loc[2, "b"] = bad_value
    table = _write_table(tmp_path / "t.csv", frame)
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, "t.csv", "'b'", "row 2")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_label_names_the_first_row(tmp_path: Path, suffix: str) -> None:
    frame = pd.DataFrame({"f": [1, 2, 3, 4], "label": ["a", "b", None, ""]})
    table = _write_table(tmp_path / f"t{suffix}", frame)
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, f"t{suffix}", "empty label", "row 2")


def test_non_numeric_regression_target(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "t.csv", pd.DataFrame({"f": [1, 2], "label": ["3.5", "tall"]}))
    with pytest.raises(DataError) as excinfo:
        load_dataset(table, task="regression")
    assert_one_line_error(excinfo, "t.csv", "not numeric", "'tall'", "row 1")


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "data.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "data.xlsx")
    assert_one_line_error(excinfo, "unsupported file extension", "data.xlsx")


@pytest.mark.parametrize(("name", "content"), [("bad.csv", b"\xff\xfe\x00\x00garbage\xff"), ("bad.parquet", b"nope")])
def test_unreadable_table_file(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / name)
    assert_one_line_error(excinfo, "cannot read", name)


def test_empty_csv_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_bytes(b"")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "empty.csv")
    assert_one_line_error(excinfo, "empty.csv")


@pytest.mark.parametrize(
    ("columns", "options", "fragments"),
    [
        ({"f": [1, 2], "label": ["a", "b"]}, {"feature_columns": ["g"]}, ["no feature column", "'g'", "'f'"]),
        ({"f": [1, 2], "label": ["a", "b"]}, {"feature_columns": ["label"]}, ["also listed as a feature"]),
        ({"label": ["a", "b"]}, {}, ["no feature columns"]),
        ({"f": [1, 1], "label": ["a", "a"]}, {}, ["only one class", "'a'"]),
        ({"path": ["x.png", ""], "label": ["a", "b"]}, {}, ["row 1", "empty 'path'"]),
    ],
    ids=["unknown feature", "label as feature", "no features", "one class", "empty manifest path"],
)
def test_more_table_and_manifest_errors(tmp_path: Path, columns: dict, options: dict, fragments: list[str]) -> None:
    table = _write_table(tmp_path / "t.csv", pd.DataFrame(columns))
    with pytest.raises(DataError) as excinfo:
        load_dataset(table, **options)
    assert_one_line_error(excinfo, "t.csv", *fragments)


def test_format_and_task_mismatches(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data")
    table = _write_table(tmp_path / "t.csv", pd.DataFrame({"f": [1, 2], "label": ["a", "b"]}))
    with pytest.raises(DataError, match="is a folder"):
        load_dataset(root, format="table")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(table, format="images")
    with pytest.raises(DataError, match="image folder"):
        load_dataset(root, task="regression")
    with pytest.raises(ValueError):
        load_dataset(root, format="zip")


def test_error_message_stays_one_line_for_hostile_names(tmp_path: Path) -> None:
    table = _write_table(tmp_path / "t.csv", pd.DataFrame({"f\nnew line": [1, 2], "label": ["a", "b"]}))
    with pytest.raises(DataError) as excinfo:
        load_dataset(table, label_column="missing")
    assert_one_line_error(excinfo, "t.csv")


# --------------------------------------------------------------------------- manifest path safety


@pytest.mark.parametrize("escape", ["../outside.png", "sub/../../outside.png", "ABSOLUTE", "link.png"])
def test_manifest_paths_escaping_the_folder_are_refused(tmp_path: Path, escape: str) -> None:
    outside = save_image(tmp_path / "outside.png", solid((1, 1, 1)))
    folder = tmp_path / "manifest_dir"
    save_image(folder / "inside.png", solid((2, 2, 2)))
    (folder / "link.png").symlink_to(outside)
    written = str(outside) if escape == "ABSOLUTE" else escape
    manifest = _write_table(folder / "m.csv", pd.DataFrame({"path": ["inside.png", written], "label": ["a", "b"]}))

    with pytest.raises(DataError) as excinfo:
        load_dataset(manifest)

    assert_one_line_error(excinfo, "m.csv", "row 1", written)


def test_manifest_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    save_image(tmp_path / "real.png", solid((3, 3, 3)))
    save_image(tmp_path / "other.png", solid((4, 4, 4)))
    (tmp_path / "alias.png").symlink_to(tmp_path / "real.png")
    manifest = _write_table(tmp_path / "m.csv", pd.DataFrame({"path": ["alias.png", "other.png"], "label": [0, 1]}))

    assert load_dataset(manifest, image_size=IMAGE_SIZE).sources == ["alias.png", "other.png"]


# --------------------------------------------------------------------------- read-only and fingerprint


def test_data_is_never_touched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_folder(tmp_path / "data")
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "dog" / "notes.txt").write_text("notes")
    (root / "dog" / "cut.jpg").write_bytes(image_bytes(noisy_rgb(), "JPEG")[:300])
    _write_table(root / "table.csv", pd.DataFrame({"f": [1.0, 2.0], "label": ["a", "b"]}))
    _write_table(root / "table.parquet", pd.DataFrame({"f": [1.0, 2.0], "label": ["a", "b"]}))
    manifest = pd.DataFrame({"path": ["cat/a.png", "dog/a.png", "gone.png"], "label": [0, 1, 1]})
    _write_table(root / "manifest.csv", manifest)
    monkeypatch.chdir(root)  # so a stray relative write (a cache, a log) would land in DATA and be caught
    before = snapshot(root)

    load_dataset(root, image_size=IMAGE_SIZE)
    load_dataset(root / "table.csv")
    load_dataset(root / "table.parquet")
    load_dataset(root / "manifest.csv", image_size=IMAGE_SIZE)

    assert snapshot(root) == before


def test_fingerprint_is_stable_and_tracks_labels_and_content(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data")
    first = load_dataset(root, image_size=IMAGE_SIZE).fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert load_dataset(root, image_size=IMAGE_SIZE).fingerprint == first

    (root / "cat" / "a.png").rename(root / "dog" / "moved.png")  # one label changes
    relabeled = load_dataset(root, image_size=IMAGE_SIZE).fingerprint
    assert relabeled != first

    save_image(root / "dog" / "moved.png", solid((9, 9, 9)))  # same place, new content
    assert load_dataset(root, image_size=IMAGE_SIZE).fingerprint not in (first, relabeled)


def test_table_fingerprint_tracks_one_label_and_one_value(tmp_path: Path) -> None:
    frame = pd.DataFrame({"f": [1.0, 2.0, 3.0], "label": ["a", "b", "a"]})
    table = _write_table(tmp_path / "t.csv", frame)
    first = load_dataset(table).fingerprint
    assert load_dataset(table).fingerprint == first

    _write_table(table, frame.assign(label=["a", "b", "b"]))
    assert load_dataset(table).fingerprint != first
    _write_table(table, frame.assign(f=[1.0, 2.0, 3.5]))
    assert load_dataset(table).fingerprint != first


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
