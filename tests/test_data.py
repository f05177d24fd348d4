"""Tests for minnorm_audit.data's load_dataset: layouts, whole-input errors, manifest path
safety, read-only access and the fingerprint (decoding: test_images.py; demo: test_demo.py)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from minnorm_audit.data import DataError, SetAsideItem, load_dataset
from helpers import assert_one_line_error, image_bytes, noisy_rgb, save_image, set_aside_reasons, solid

IMAGE_SIZE = 16


# --------------------------------------------------------------------------- helpers


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


def test_text_in_a_numeric_column_is_named_and_a_category_is_encoded(tmp_path: Path) -> None:
    frame = pd.DataFrame({"ok": [1, 2], "colour": ["red", "blue"], "size": ["1", "big"], "label": ["a", "b"]})
    table = _write_table(tmp_path / "t.csv", frame)
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, "t.csv", "non-numeric", "'size'", "'big' in row 1")
    assert "'ok'" not in str(excinfo.value) and "'colour'" not in str(excinfo.value)
    loaded = load_dataset(table, feature_columns=["ok", "colour"])
    assert loaded.feature_names == ["ok", "colour=blue", "colour=red"]


@pytest.mark.parametrize(("bad_value", "kind"), [(np.nan, "missing"), (np.inf, "infinite"), (None, "missing")])
def test_nan_or_inf_feature_row_is_set_aside_and_a_mostly_bad_column_names_column_and_row(
    tmp_path: Path, bad_value: float | None, kind: str
) -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "label": ["x", "y", "x"]})
    frame["b"] = frame["b"].astype(object)
    frame.loc[2, "b"] = bad_value
    table = _write_table(tmp_path / "t.csv", frame)
    dataset = load_dataset(table)
    assert dataset.sources == ["0", "1"]
    assert dataset.set_aside == [SetAsideItem("2", f"{kind} value in feature column 'b'")]

    frame.loc[1, "b"] = bad_value  # two of three rows: the column, not a row, is the problem
    table = _write_table(tmp_path / "t.csv", frame)
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, "t.csv", "'b'", "2 of 3 rows", "first at row 1")


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_empty_labels_are_set_aside_and_a_mostly_empty_label_column_names_the_first_row(
    tmp_path: Path, suffix: str
) -> None:
    frame = pd.DataFrame({"f": [1, 2, 3, 4], "label": ["a", "b", None, ""]})
    dataset = load_dataset(_write_table(tmp_path / f"t{suffix}", frame))
    assert dataset.sources == ["0", "1"] and dataset.class_names == ["a", "b"]
    assert set_aside_reasons(dataset) == {"2": "empty label in column 'label'", "3": "empty label in column 'label'"}

    table = _write_table(tmp_path / f"t{suffix}", frame.assign(label=["a", "", None, ""]))
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, f"t{suffix}", "empty label", "3 of 4 rows", "first at row 1")


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
        ({"path": ["x.png", "", ""], "label": ["a", "b", "c"]}, {}, ["first at row 1", "empty 'path'"]),
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
