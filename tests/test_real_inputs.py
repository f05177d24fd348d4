"""The inputs people really have: 16-bit images, float images a hair over 1, a saved
pandas index, embeddings in one list column, interrupted long runs, a umask, huge
values, one bad row, Windows paths, ';'-delimited CSVs with decimal commas, and the
training accuracy every run reports. Everything is generated small in tmp_path."""

from __future__ import annotations

import importlib
import json
import os
import shlex
import stat
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import minnorm_audit
from minnorm_audit.cli import main
from minnorm_audit.data import (
    DataError,
    DataNotice,
    SetAsideItem,
    load_arrays,
    load_dataset,
    load_frame,
    load_torch_dataset,
)
from minnorm_audit.report.parquet import current_umask, read_metadata
from helpers import assert_one_line_error, save_image, set_aside_reasons, solid

FAST = ["--epochs", "2", "--quiet", "--device", "cpu"]


def blobs(rows: int = 40, seed: int = 0, classes: int = 2) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % classes
    frame = pd.DataFrame(rng.normal(size=(rows, 3)) + labels[:, None] * 3.0, columns=["a", "b", "c"])
    frame["label"] = [f"c{label}" for label in labels]
    return frame


def error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, output
    return lines[0]


# --------------------------------------------------------------------------- 1. 16-bit images


def test_sixteen_bit_png_decodes_exactly_like_its_eight_bit_copy(tmp_path: Path) -> None:
    values = np.random.default_rng(0).integers(0, 256, size=(8, 8), dtype=np.uint16)
    save_image(tmp_path / "eight" / "x.png", Image.fromarray(values.astype(np.uint8)))
    save_image(tmp_path / "sixteen" / "x.png", Image.fromarray(values * 257))  # mode I;16

    same_size = load_dataset(tmp_path, image_size=8).inputs
    assert torch.equal(same_size[0], same_size[1])  # v * 257 in 16 bits is v in 8 bits, exactly

    resized = load_dataset(tmp_path, image_size=5).inputs.int()  # float vs 8-bit resampling: within rounding
    assert (resized[0] - resized[1]).abs().max() <= 1


def test_dark_and_bright_sixteen_bit_classes_keep_their_brightness(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for name, level in (("dark", 4000), ("bright", 60000)):
        for item in range(3):
            pixels = (level + rng.integers(-300, 300, size=(8, 8))).astype(np.uint16)
            save_image(tmp_path / name / f"{item}.png", Image.fromarray(pixels))

    dataset = load_dataset(tmp_path, image_size=8)

    brightness = dataset.inputs.float().mean(dim=(1, 2, 3))
    dark = brightness[dataset.targets == dataset.class_names.index("dark")]
    bright = brightness[dataset.targets == dataset.class_names.index("bright")]
    assert dark.max() < 20 and bright.min() > 225  # 4000 / 257 = 15.6, 60000 / 257 = 233.5


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((8, 8), 32896, dtype=np.int32), 128),  # "I": the 16-bit scale (32896 = 128 * 257)
        (np.full((8, 8), 0.5, dtype=np.float32), 128),  # "F" within [0, 1]
        (np.full((8, 8), 1.005, dtype=np.float32), 255),  # "F" a hair over 1: still [0, 1], clipped
        (np.full((8, 8), 100.0, dtype=np.float32), 100),  # "F" on the 0..255 scale
        (np.full((8, 8), 25700.0, dtype=np.float32), 100),  # "F" beyond 255: the 16-bit scale
    ],
    ids=["I", "F unit", "F overshoot", "F 0..255", "F 16-bit"],
)
def test_high_depth_modes_use_a_fixed_scale(tmp_path: Path, array: np.ndarray, expected: int) -> None:
    save_image(tmp_path / "odd" / "x.tiff", Image.fromarray(array))
    save_image(tmp_path / "plain" / "x.png", solid((1, 2, 3)))
    dataset = load_dataset(tmp_path, image_size=8)
    assert dataset.inputs[dataset.sources.index("odd/x.tiff")].unique().tolist() == [expected]


def test_sixteen_bit_pil_images_in_a_torch_dataset_read_like_files() -> None:
    items = [(Image.fromarray(np.full((8, 8), level * 257, dtype=np.uint16)), label)
             for level, label in ((10, "dark"), (200, "bright"))]
    loaded = load_torch_dataset(items, image_size=8)
    assert loaded.inputs[0].unique().tolist() == [10] and loaded.inputs[1].unique().tolist() == [200]


# --------------------------------------------------------------------------- 2. floats a hair over 1


def unit_images(count: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 1.0, size=(count, 3, 8, 8)).astype(np.float32)
    return images, np.arange(count) % 2


def test_one_overshooting_pixel_keeps_float_images_in_zero_one_and_says_so() -> None:
    images, labels = unit_images()
    reference = load_arrays(images, labels, image_size=8)
    assert reference.notes == []

    overshoot = images.copy()
    overshoot[2, 0, 3, 3] = 1.0001
    overshoot[4, 1, 0, 0] = -0.002
    loaded = load_arrays(overshoot, labels, image_size=8)

    expected = reference.inputs.clone()
    expected[2, 0, 3, 3], expected[4, 1, 0, 0] = 255, 0  # clipped
    assert torch.equal(loaded.inputs, expected)
    assert len(loaded.notes) == 1
    assert "2 pixel value(s) lie outside [0, 1]" in loaded.notes[0] and "clipped" in loaded.notes[0]


def test_overshoot_in_a_torch_dataset_is_clipped_too() -> None:
    images, labels = unit_images()
    images[0, 0, 0, 0] = 1.004
    loaded = load_torch_dataset([(torch.from_numpy(image), int(label)) for image, label in zip(images, labels)],
                                image_size=8)
    assert loaded.inputs[0, 0, 0, 0] == 255 and loaded.inputs[1].float().mean() > 90  # not blacked out
    assert len(loaded.notes) == 1 and "outside [0, 1]" in loaded.notes[0]


def test_values_far_outside_zero_one_are_mapped_by_the_data_range_with_a_note() -> None:
    images, labels = unit_images()
    loaded = load_arrays(images * 4.0 - 2.0, labels, image_size=8)  # normalized tensors, say
    assert loaded.inputs.min() == 0 and loaded.inputs.max() == 255
    assert len(loaded.notes) == 1 and "mapped linearly" in loaded.notes[0]


def test_audit_warns_once_per_note_and_records_notes_in_the_summary(tmp_path: Path) -> None:
    images, labels = unit_images(count=8)
    images[0, 0, 0, 0] = 1.001
    with pytest.warns(DataNotice, match=r"outside \[0, 1\]"):
        result = minnorm_audit.audit((images, labels), out=tmp_path / "run", epochs=1, device="cpu", image_size=8)
    assert len(result.summary["notes"]) == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["notes"] == result.summary["notes"]


# --------------------------------------------------------------------------- 3. a saved pandas index


def test_saved_pandas_index_is_left_out_with_a_note(tmp_path: Path) -> None:
    frame = blobs(rows=12)
    table = tmp_path / "t.csv"
    frame.to_csv(table)  # index=True: a first column "" holding 0..11

    loaded = load_dataset(table)
    assert loaded.feature_names == ["a", "b", "c"]
    assert len(loaded.notes) == 1 and "'Unnamed: 0'" in loaded.notes[0] and "index" in loaded.notes[0]

    # The same file read back by pandas and handed over as a DataFrame.
    assert load_frame(pd.read_csv(table)).feature_names == ["a", "b", "c"]
    # A filtered frame's index has gaps: still the index.
    frame.iloc[::3].to_csv(table)
    assert load_dataset(table).feature_names == ["a", "b", "c"]
    # Named on purpose, it is a feature.
    assert load_dataset(table, feature_columns=["Unnamed: 0", "a"]).feature_names == ["Unnamed: 0", "a"]


def test_unnamed_columns_that_do_not_count_rows_stay_features(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    blobs(rows=12).assign(a=lambda f: f["a"]).to_csv(table, index=False)
    text = table.read_text().splitlines()
    table.write_text("\n".join([",".join([""] + text[0].split(",")[1:])] + text[1:]) + "\n")  # blank header over 'a'
    loaded = load_dataset(table)
    assert loaded.feature_names == ["Unnamed: 0", "b", "c"] and loaded.notes == []


def test_cli_feature_and_ignore_columns(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    blobs(rows=30).assign(id=[f"row{i}" for i in range(30)], d=1.0).to_csv(table)
    runner = CliRunner()

    result = runner.invoke(main, ["run", str(table), "--out", str(tmp_path / "ignored"), *FAST,
                                  "--ignore-columns", "id", "--ignore-columns", "d"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "ignored" / "examples.parquet")["input"]["feature_columns"] == ["a", "b", "c"]
    # `clean` keeps every column of the table; its re-audit command keeps the choice.
    cleaned = minnorm_audit.clean(tmp_path / "ignored", tmp_path / "cleaned.csv", rule="none")
    assert "--ignore-columns id,d" in cleaned.rerun_command
    again = runner.invoke(main, [*shlex.split(cleaned.rerun_command)[1:], "--out", str(tmp_path / "again"), *FAST])
    assert again.exit_code == 0, again.output
    assert read_metadata(tmp_path / "again" / "examples.parquet")["input"]["feature_columns"] == ["a", "b", "c"]

    result = runner.invoke(main, ["run", str(table), "--out", str(tmp_path / "chosen"), *FAST,
                                  "--feature-columns", "a,c", "--feature-columns", "d"])
    assert result.exit_code == 0, result.output
    assert read_metadata(tmp_path / "chosen" / "examples.parquet")["input"]["feature_columns"] == ["a", "c", "d"]

    result = runner.invoke(main, ["run", str(table), "--out", str(tmp_path / "bad"), *FAST, "--ignore-columns", "nope"])
    assert result.exit_code == 1 and "no column(s) 'nope' to ignore" in error_line(result.output)


def test_cli_prints_the_note_about_a_saved_index(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    blobs(rows=20).to_csv(table)
    result = CliRunner().invoke(main, ["run", str(table), "--out", str(tmp_path / "run"), "--epochs", "1",
                                       "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert any(line.startswith("note: ") and "Unnamed: 0" in line for line in result.output.splitlines())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["notes"]) == 1 and "Unnamed: 0" in summary["notes"][0]
    page = (tmp_path / "run" / "report.html").read_text()
    assert "How the input was read" in page and "Unnamed: 0" in page


def test_api_ignore_columns(tmp_path: Path) -> None:
    frame = blobs(rows=30).assign(id=np.arange(30) * 7.0)
    assert load_frame(frame, ignore_columns=["id"]).feature_names == ["a", "b", "c"]
    result = minnorm_audit.audit(frame, out=tmp_path / "run", epochs=1, device="cpu", ignore_columns=["id"],
                                 flag_fraction=0.5)
    shown = [json.loads(values) for values in pd.read_parquet(result.paths["gallery"])["feature_values"]]
    assert shown and all(list(values) == ["a", "b", "c"] for values in shown)
    with pytest.raises(DataError, match="also listed as a column to ignore"):
        load_frame(frame, ignore_columns=["label"])


# --------------------------------------------------------------------------- 4. embeddings in one column


def embedding_frame(rows: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(2)
    labels = np.arange(rows) % 2
    vectors = rng.normal(size=(rows, 4)) + labels[:, None]
    return pd.DataFrame({"embedding": list(vectors), "size": np.arange(rows, dtype=float), "label": labels})


def test_parquet_list_column_becomes_one_feature_per_element(tmp_path: Path) -> None:
    frame = embedding_frame()
    path = tmp_path / "emb.parquet"
    frame.to_parquet(path)  # pyarrow list<double>

    loaded = load_dataset(path)

    assert loaded.feature_names == ["embedding[0]", "embedding[1]", "embedding[2]", "embedding[3]", "size"]
    expected = np.column_stack([np.stack(frame["embedding"]), frame["size"]]).astype(np.float32)
    assert np.array_equal(loaded.inputs.numpy(), expected)
    # Names as the run records them select the same features again (what `clean` does).
    again = load_dataset(path, feature_columns=loaded.feature_names)
    assert again.fingerprint == loaded.fingerprint
    assert load_dataset(path, feature_columns=["embedding"]).feature_names[:4] == loaded.feature_names[:4]
    assert load_dataset(path, feature_columns=["embedding[2]"]).inputs[:, 0].tolist() == expected[:, 2].tolist()


def test_fixed_size_list_and_pandas_array_cells(tmp_path: Path) -> None:
    frame = embedding_frame()
    vectors = np.stack(frame["embedding"]).astype(np.float32)
    table = pa.table({
        "vec": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4),
        "label": pa.array(frame["label"].to_numpy()),
    })
    path = tmp_path / "fixed.parquet"
    pq.write_table(table, path)
    loaded = load_dataset(path)
    assert loaded.feature_names == [f"vec[{index}]" for index in range(4)]
    assert np.array_equal(loaded.inputs.numpy(), vectors)

    in_memory = load_frame(pd.DataFrame({"vec": [list(row) for row in vectors], "label": frame["label"]}))
    assert np.array_equal(in_memory.inputs.numpy(), vectors)


def test_ragged_list_column_names_the_column_and_rows(tmp_path: Path) -> None:
    frame = embedding_frame()
    frame.at[3, "embedding"] = np.array([1.0, 2.0])
    frame.at[7, "embedding"] = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    path = tmp_path / "ragged.parquet"
    frame.to_parquet(path)
    with pytest.raises(DataError) as excinfo:
        load_dataset(path)
    assert_one_line_error(excinfo, "ragged.parquet", "'embedding'", "different lengths", "4 values in most rows",
                          "row 3 (2)", "row 7 (5)")


def test_missing_vector_cell_sets_the_row_aside(tmp_path: Path) -> None:
    frame = embedding_frame()
    frame.at[5, "embedding"] = None
    path = tmp_path / "gap.parquet"
    frame.to_parquet(path)
    loaded = load_dataset(path)
    assert "5" not in loaded.sources and set_aside_reasons(loaded) == {"5": "missing value in feature column 'embedding[0]'"}


# --------------------------------------------------------------------------- 5. --resume keeps the run's settings


def interrupt_after(monkeypatch: pytest.MonkeyPatch, epochs: int) -> None:
    """Ctrl-C during epoch ``epochs + 1`` of the next run (the checkpoint holds ``epochs``)."""
    from minnorm_audit.training import loop as fit_module
    real = fit_module.train_one_epoch
    calls = {"count": 0}

    def train_one_epoch(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] > epochs:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fit_module, "train_one_epoch", train_one_epoch)


def test_resume_as_printed_reproduces_the_run_and_refuses_other_settings(tmp_path, monkeypatch):
    table = tmp_path / "t.csv"
    blobs(rows=48, classes=3).to_csv(table, index=False)
    settings = ["--epochs", "6", "--lr", "0.003", "--batch-size", "16", "--seed", "3", "--device", "cpu",
                "--deterministic", "--quiet"]
    runner = CliRunner()
    reference = tmp_path / "reference"
    assert runner.invoke(main, ["run", str(table), "--out", str(reference), *settings]).exit_code == 0

    interrupted = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        interrupt_after(patch, 2)
        result = runner.invoke(main, ["run", str(table), "--out", str(interrupted), *settings])
    assert result.exit_code == 130, result.output
    printed = result.output.strip().splitlines()[-1]
    assert printed == f"interrupted; resume with: minnorm-audit run {table} --resume {interrupted}"
    checkpoint = torch.load(interrupted / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 2 and checkpoint["settings"]["train"]["epochs"] == 6
    assert checkpoint["settings"]["train"]["lr"] == 0.003 and checkpoint["settings"]["label_column"] == "label"

    # An option given that would change what is trained: one line naming it; nothing runs.
    for option, fragment in ((["--lr", "0.01"], "--lr gives lr=0.01"), (["--batch-size", "32"], "--batch-size"),
                             (["--epochs", "1"], "--epochs 1 is fewer than the 2 epochs"),
                             (["--image-size", "16"], "--image-size")):
        refused = runner.invoke(main, ["run", str(table), "--resume", str(interrupted), *option])
        assert refused.exit_code == 1, refused.output
        assert fragment in error_line(refused.output) and "Traceback" not in refused.output
    assert torch.load(interrupted / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] == 2

    # The command as printed (where the run goes on may change: --device, --quiet).
    command = shlex.split(printed.split("resume with: ", 1)[1])[1:]
    resumed = runner.invoke(main, [*command, "--device", "cpu", "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    summary = json.loads((interrupted / "summary.json").read_text())
    assert [entry["epoch"] for entry in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert summary["config"]["epochs"] == 6 and summary["config"]["lr"] == 0.003 and summary["config"]["batch_size"] == 16
    columns = ["example_id", "difficulty", "flag", "suggested_label"]
    pd.testing.assert_frame_equal(pd.read_parquet(interrupted / "examples.parquet", columns=columns),
                                  pd.read_parquet(reference / "examples.parquet", columns=columns))


def test_fit_refuses_to_resume_with_other_training_settings(tmp_path):
    from torch import nn

    from minnorm_audit.training import TrainConfig, TrainingError, fit

    generator = torch.Generator().manual_seed(0)
    inputs, labels = torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator)
    checkpoint = tmp_path / "checkpoint.pt"
    config = TrainConfig(epochs=2, lr=0.001, device="cpu")
    fit(nn.Linear(4, 1), inputs, labels, form="margin", num_outputs=1, config=config, checkpoint_path=checkpoint)
    with pytest.raises(TrainingError, match=r"trained with lr=0\.001, not 0\.01"):
        fit(nn.Linear(4, 1), inputs, labels, form="margin", num_outputs=1, checkpoint_path=checkpoint, resume=True,
            config=TrainConfig(epochs=2, lr=0.01, device="cpu"))
    with pytest.raises(TrainingError, match="2 finished epochs, more than epochs=1"):
        fit(nn.Linear(4, 1), inputs, labels, form="margin", num_outputs=1, checkpoint_path=checkpoint, resume=True,
            config=TrainConfig(epochs=1, lr=0.001, device="cpu"))


# --------------------------------------------------------------------------- 6. file modes follow the umask


@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_outputs_get_the_umask_mode_and_the_checkpoint_stays_private(tmp_path, umask_022):
    assert current_umask() == 0o022
    table = tmp_path / "t.csv"
    blobs(rows=30).to_csv(table, index=False)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(table), "--out", str(run_dir), *FAST])
    assert result.exit_code == 0, result.output
    modes = {path.name: mode(path) for path in run_dir.iterdir()}
    assert modes.pop("checkpoint.pt") == 0o600
    assert set(modes) == {"examples.parquet", "summary.json", "set_aside.parquet", "gallery.parquet", "report.html"}
    assert set(modes.values()) == {0o644}, modes

    assert CliRunner().invoke(main, ["report", str(run_dir)]).exit_code == 0
    assert mode(run_dir / "report.html") == 0o644
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"cleaned{suffix}"
        cleaned = minnorm_audit.clean(run_dir, out)
        for path in cleaned.paths.values():
            assert mode(Path(path)) == 0o644, path

    os.umask(0o077)  # a stricter umask is followed too
    minnorm_audit.clean(run_dir, tmp_path / "private.csv")
    assert mode(tmp_path / "private.csv") == 0o600


# --------------------------------------------------------------------------- 7. huge finite values


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_a_value_beyond_float32_is_named_without_a_runtime_warning(tmp_path: Path, task: str) -> None:
    frame = blobs(rows=12).assign(label=np.arange(12) % 2 * 1.5)
    column = "b" if task == "classification" else "label"
    frame[column] = frame[column].astype(object)
    frame.at[7, column] = "1e300"
    table = tmp_path / "t.csv"
    frame.to_csv(table, index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning would fail the test
        with pytest.raises(DataError) as excinfo:
            load_dataset(table, task=task)
    assert_one_line_error(excinfo, "t.csv", "1e+300", f"'{column}'", "row 7", "beyond float32 range")
    assert "NaN" not in str(excinfo.value)

    result = CliRunner().invoke(main, ["run", str(table), "--task", task, "--out", str(tmp_path / "run"), *FAST])
    assert result.exit_code == 1 and "beyond float32 range" in error_line(result.output)
    assert "RuntimeWarning" not in result.output


# --------------------------------------------------------------------------- 8. one bad row is set aside


def test_one_empty_label_and_one_missing_value_are_set_aside_and_listed(tmp_path: Path) -> None:
    frame = blobs(rows=30)
    frame["b"] = frame["b"].astype(object)
    frame.at[4, "label"] = ""
    frame.at[9, "b"] = ""
    table = tmp_path / "t.csv"
    frame.to_csv(table, index=False)
    run_dir = tmp_path / "run"

    result = CliRunner().invoke(main, ["run", str(table), "--out", str(run_dir), *FAST])

    assert result.exit_code == 0, result.output
    set_aside = pd.read_parquet(run_dir / "set_aside.parquet")
    assert set_aside.to_dict("records") == [
        {"source": "4", "reason": "empty label in column 'label'"},
        {"source": "9", "reason": "missing value in feature column 'b'"},
    ]
    examples = pd.read_parquet(run_dir / "examples.parquet")
    assert len(examples) == 28 and not {"4", "9"} & set(examples["source"])
    assert json.loads((run_dir / "summary.json").read_text())["num_set_aside"] == 2
    page = (run_dir / "report.html").read_text()
    assert "empty label in column" in page and "missing value in feature column" in page


def test_regression_row_without_a_target_is_set_aside(tmp_path: Path) -> None:
    frame = blobs(rows=20).assign(price=lambda f: f["a"] * 2.0).drop(columns="label")
    frame["price"] = frame["price"].astype(object)
    frame.at[6, "price"] = "NA"
    table = tmp_path / "houses.csv"
    frame.to_csv(table, index=False)
    loaded = load_dataset(table, task="regression", label_column="price")
    assert loaded.set_aside == [SetAsideItem("6", "missing target in column 'price'")]
    assert len(loaded.sources) == 19 and "6" not in loaded.sources

    frame.loc[:12, "price"] = ""  # 13 of 20: the column is the problem
    frame.to_csv(table, index=False)
    with pytest.raises(DataError) as excinfo:
        load_dataset(table, task="regression", label_column="price")
    assert_one_line_error(excinfo, "houses.csv", "missing or infinite target in column 'price'", "13 of 20 rows")


def test_dataframes_and_feature_datasets_set_bad_rows_aside_the_same_way(tmp_path: Path) -> None:
    frame = blobs(rows=12)
    frame.at[3, "c"] = np.nan
    frame.at[5, "label"] = None
    path = tmp_path / "t.csv"
    frame.to_csv(path, index=False)
    expected = {"3": "missing value in feature column 'c'", "5": "empty label in column 'label'"}
    assert set_aside_reasons(load_dataset(path)) == expected
    assert set_aside_reasons(load_frame(frame)) == expected

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, index: int):
            if index == 0:
                raise OSError("unreadable")
            return torch.tensor(frame.loc[index, ["a", "b", "c"]].to_numpy(dtype=np.float32)), frame.at[index, "label"]

    loaded = load_torch_dataset(Items())
    assert set_aside_reasons(loaded) == {"0": "cannot load item (OSError: unreadable)",
                                         "3": "missing value in feature column 'feature_2'",
                                         "5": "empty label in column 'label'"}
    assert loaded.sources == [str(index) for index in range(12) if index not in (0, 3, 5)]


def test_manifest_rows_with_an_empty_label_are_set_aside(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        save_image(tmp_path / f"{name}.png", solid((1, 2, 3)))
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"path": ["a.png", "b.png", "c.png", "d.png"], "label": ["x", "", "y", "x"]}).to_csv(manifest, index=False)
    loaded = load_dataset(manifest, image_size=8)
    assert loaded.sources == ["a.png", "c.png", "d.png"]
    assert loaded.set_aside == [SetAsideItem("b.png", "empty label in column 'label'")]


def test_image_arrays_with_an_empty_label_or_nan_pixels_are_set_aside() -> None:
    images, labels = unit_images(count=8)
    images[6, 0, 0, 0] = np.nan
    given = np.array([str(label) for label in labels], dtype=object)
    given[1] = ""
    loaded = load_arrays(images, given, image_size=8)
    assert set_aside_reasons(loaded) == {"1": "empty label in column 'label'", "6": "NaN or infinite pixel values"}
    assert loaded.sources == ["0", "2", "3", "4", "5", "7"]


# --------------------------------------------------------------------------- 9. Windows paths in manifests


def test_windows_paths_in_a_manifest_are_read_and_still_confined(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    save_image(folder / "images" / "cat" / "1.png", solid((250, 0, 0)))
    save_image(folder / "images" / "dog" / "1.png", solid((0, 0, 250)))
    save_image(tmp_path / "x.png", solid((0, 0, 0)))
    manifest = folder / "m.csv"
    pd.DataFrame({"path": ["images\\cat\\1.png", "images\\dog\\1.png"], "label": ["cat", "dog"]}).to_csv(
        manifest, index=False)

    loaded = load_dataset(manifest, image_size=8)
    assert loaded.sources == ["images/cat/1.png", "images/dog/1.png"] and loaded.set_aside == []

    for escape, fragment in (("..\\..\\x.png", "points outside"), ("..\\x.png", "points outside"),
                             ("C:\\photos\\x.png", "is absolute"), ("\\\\server\\x.png", "is absolute")):
        pd.DataFrame({"path": ["images\\cat\\1.png", escape], "label": ["cat", "dog"]}).to_csv(manifest, index=False)
        with pytest.raises(DataError) as excinfo:
            load_dataset(manifest, image_size=8)
        assert_one_line_error(excinfo, "m.csv", "row 1", fragment)


# --------------------------------------------------------------------------- 10. delimiters and decimal commas


@pytest.mark.parametrize(("separator", "decimal", "named"), [(";", ",", "';'"), ("\t", ".", "tab"), ("|", ",", "'|'")])
def test_other_delimiters_and_decimal_commas_read_like_the_comma_file(tmp_path, separator, decimal, named):
    frame = blobs(rows=12)
    frame["a"] = frame["a"].round(3)
    plain, other = tmp_path / "plain.csv", tmp_path / "other.csv"
    frame.to_csv(plain, index=False)
    frame.to_csv(other, index=False, sep=separator, decimal=decimal)

    expected, loaded = load_dataset(plain), load_dataset(other)

    assert loaded.feature_names == expected.feature_names == ["a", "b", "c"]
    assert torch.equal(loaded.inputs, expected.inputs) and torch.equal(loaded.targets, expected.targets)
    assert expected.notes == [] and len(loaded.notes) == 1
    assert f"read as a {named}-delimited CSV" in loaded.notes[0]
    assert ("decimal commas in 'a', 'b', 'c'" in loaded.notes[0]) == (decimal == ",")


def test_a_column_mixing_decimal_styles_is_refused_naming_the_delimiter(tmp_path: Path) -> None:
    table = tmp_path / "mixed.csv"
    table.write_text("a;b;label\n1,5;2;x\n2.5;3;y\n3,0;4;x\n")
    with pytest.raises(DataError) as excinfo:
        load_dataset(table)
    assert_one_line_error(excinfo, "non-numeric", "'a'", "'1,5' in row 0", "read as ';'-delimited", "decimal commas")


# --------------------------------------------------------------------------- 11. training accuracy in every summary


def check_train_accuracy(summary: dict, examples: pd.DataFrame) -> float:
    accuracy = summary["fit"]["train_accuracy"]
    assert accuracy == pytest.approx(float((examples["margin"] > 0).mean()))
    assert summary["diagnostics"]["train_accuracy"] == accuracy
    return accuracy


def test_train_accuracy_for_a_table_an_image_folder_and_arrays(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    blobs(rows=40, classes=2).to_csv(table, index=False)
    result = minnorm_audit.audit(table, out=tmp_path / "table", epochs=5, device="cpu")
    assert check_train_accuracy(result.summary, result.examples) >= 0.9  # well separated blobs

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, colour in (("red", (220, 30, 30)), ("blue", (30, 30, 220))):
        for item in range(6):
            pixels = np.clip(np.array(colour) + rng.integers(-20, 20, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            save_image(folder / name / f"{item}.png", Image.fromarray(pixels))
    result = minnorm_audit.audit(folder, out=tmp_path / "folder", epochs=2, device="cpu", image_size=8)
    check_train_accuracy(result.summary, result.examples)
    on_disk = json.loads((tmp_path / "folder" / "summary.json").read_text())
    assert on_disk["fit"] == result.summary["fit"]

    images, labels = unit_images(count=10)
    result = minnorm_audit.audit((images, labels), out=tmp_path / "arrays", epochs=2, device="cpu", image_size=8)
    check_train_accuracy(result.summary, result.examples)


def test_train_r2_for_regression(tmp_path: Path) -> None:
    frame = blobs(rows=40).drop(columns="label").assign(price=lambda f: 2.0 * f["a"] - f["b"])
    result = minnorm_audit.audit(frame, out=tmp_path / "run", label_column="price", task="regression", epochs=5,
                                 device="cpu")
    given, predicted = result.examples["given_target"], result.examples["predicted_target"]
    expected = 1.0 - ((given - predicted) ** 2).sum() / ((given - given.mean()) ** 2).sum()
    assert result.summary["fit"]["train_r2"] == pytest.approx(expected)
    assert set(result.summary["fit"]) == {"train_r2", "fraction_fitted"}
    assert 0.0 <= result.summary["fit"]["fraction_fitted"] <= 1.0
    assert "train_accuracy" not in result.summary["fit"]
