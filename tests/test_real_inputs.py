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


# --------------------------------------------------------------------------- 12. tables and text as people have them (issue 21)

from minnorm_audit.data.encode import HASH_DIMS, MAX_ONE_HOT_LEVELS, encode_column  # noqa: E402
from minnorm_audit.data.text import NUM_BUCKETS, text_ids  # noqa: E402
from helpers import image_bytes  # noqa: E402


def traits(rows: int = 60, seed: int = 0) -> pd.DataFrame:
    """Leaf-trait-like table: the class follows the categorical 'shape' and a number."""
    rng = np.random.default_rng(seed)
    shape = rng.choice(["ovate", "lanceolate", "cordate"], size=rows)
    labels = np.where(shape == "ovate", "oak", np.where(shape == "lanceolate", "willow", "lime"))
    return pd.DataFrame({
        "apex": rng.choice(["acute", "obtuse"], size=rows),
        "shape": shape,
        "toothed": rng.choice([True, False], size=rows),
        "width": rng.normal(size=rows) + (shape == "cordate") * 3.0,
        "label": labels,
    })


def test_a_mixed_type_csv_runs_and_records_each_columns_encoding(tmp_path: Path) -> None:
    frame = traits()
    frame["day"] = pd.date_range("2024-01-01", periods=len(frame), freq="D").strftime("%Y-%m-%d")
    frame.to_csv(tmp_path / "leaves.csv", index=False)
    result = minnorm_audit.audit(tmp_path / "leaves.csv", out=tmp_path / "run", epochs=2, device="cpu")
    encodings = {entry["column"]: entry for entry in result.summary["column_encodings"]}
    assert encodings["apex"]["encoding"] == "one-hot" and encodings["apex"]["features"] == ["apex=acute", "apex=obtuse"]
    assert encodings["shape"]["levels"] == 3
    assert encodings["toothed"] == {"column": "toothed", "encoding": "boolean", "features": ["toothed"]}
    assert encodings["width"]["encoding"] == "numeric"
    assert encodings["day"]["features"] == ["day.year", "day.month", "day.day", "day.weekday"]
    assert len(result.examples) == 60
    gallery = pd.read_parquet(tmp_path / "run" / "gallery.parquet")
    if len(gallery):  # the page shows the cells as given, not the encoded features
        shown = json.loads(gallery["feature_values"].iloc[0])
        row = int(gallery["source"].iloc[0])
        assert shown["shape"] == frame["shape"].iloc[row] and shown["day"] == frame["day"].iloc[row]


def test_encodings_against_known_values() -> None:
    booleans = pd.Series(["True", "False", "false", "TRUE"])
    values, encoding = encode_column(booleans, "b", named=False)
    assert encoding.encoding == "boolean" and values[:, 0].tolist() == [1.0, 0.0, 0.0, 1.0]
    arrow = pd.Series([True, False, None], dtype="bool[pyarrow]")
    values, encoding = encode_column(arrow, "a", named=False)  # missing: a level of its own
    assert encoding.encoding == "one-hot" and encoding.features == ["a=(missing)", "a=False", "a=True"]
    assert values.tolist() == [[0, 0, 1], [0, 1, 0], [1, 0, 0]]
    cells = pd.Series(["x", "y", "x", None])
    values, encoding = encode_column(cells, "c", named=False)
    assert encoding.features == ["c=(missing)", "c=x", "c=y"] and encoding.pooled_levels == 0
    assert values.tolist() == [[0, 1, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]
    # 35 levels (over the cap of 32): the 31 most frequent keep a feature, the 4 rare share "(other)"
    tail = pd.Series([f"L{i:02d}" for i in range(31) for _ in range(10)] + ["r1", "r2", "r3", "r4"])
    values, encoding = encode_column(tail, "t", named=False)
    assert MAX_ONE_HOT_LEVELS == 32 and encoding.levels == 35 and encoding.pooled_levels == 4
    assert encoding.features[-1] == "t=(other)" and values.shape == (314, 32)
    assert values[-4:, -1].tolist() == [1, 1, 1, 1] and values[0, 0] == 1
    dates = pd.Series(pd.to_datetime(["2024-03-01 13:30", "2023-12-31 00:00"]))
    values, encoding = encode_column(dates, "d", named=False)
    assert values.tolist() == [[2024, 3, 1, 4, 13.5], [2023, 12, 31, 6, 0.0]]
    many = pd.Series([f"level{i % 50}" for i in range(500)])
    values, encoding = encode_column(many, "m", named=False)
    assert MAX_ONE_HOT_LEVELS < 50 and encoding.encoding == "hashed" and values.shape == (500, HASH_DIMS)
    assert np.array_equal(values[0], values[50]) and not np.array_equal(values[0], values[1])
    assert np.allclose(np.abs(values), 1 / np.sqrt(HASH_DIMS))
    ids = pd.Series([f"user-{i:04d}" for i in range(20)])
    values, encoding = encode_column(ids, "user", named=False)
    assert values is None and encoding.encoding == "left out" and "'user'" in encoding.note


def test_a_pandas_csv_with_true_false_columns_reads_like_its_parquet(tmp_path: Path) -> None:
    frame = traits()[["toothed", "width", "label"]]
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    from_csv, from_parquet = load_dataset(tmp_path / "t.csv"), load_dataset(tmp_path / "t.parquet")
    assert torch.equal(from_csv.inputs, from_parquet.inputs)
    assert from_csv.inputs[:, 0].tolist() == frame["toothed"].astype(float).tolist()


def test_an_id_column_is_left_out_with_a_note_and_a_stray_word_in_numbers_is_named(tmp_path: Path) -> None:
    frame = traits()
    frame["sample_id"] = [f"S{i:03d}" for i in range(len(frame))]
    frame.to_csv(tmp_path / "t.csv", index=False)
    loaded = load_dataset(tmp_path / "t.csv")
    assert not any(name.startswith("sample_id") for name in loaded.feature_names)
    assert any("'sample_id'" in note and "not used as a feature" in note for note in loaded.notes)
    frame["width"] = frame["width"].astype(str)
    frame.loc[3, "width"] = "n.a.x"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "bad.csv")
    assert_one_line_error(excinfo, "'width'", "'n.a.x' in row 3")


def reviews(rows: int = 120, seed: int = 0) -> pd.DataFrame:
    """Generated product reviews: positive and negative words decide the label."""
    rng = np.random.default_rng(seed)
    good = ["great", "delicious", "love", "perfect", "excellent", "tasty"]
    bad = ["awful", "stale", "bland", "broken", "terrible", "refund"]
    filler = ["the", "coffee", "box", "arrived", "this", "product", "taste", "and", "was", "really", "my", "kids"]
    texts, labels = [], []
    for row in range(rows):
        positive = row % 2 == 0
        words = list(rng.choice(filler, size=12)) + list(rng.choice(good if positive else bad, size=4))
        rng.shuffle(words)
        texts.append(" ".join(words) + f" order {row}")
        labels.append("good" if positive else "bad")
    return pd.DataFrame({"review": texts, "score": labels})


def test_a_review_column_is_detected_and_the_text_network_finds_flipped_labels(tmp_path: Path) -> None:
    frame = reviews()
    flipped = np.arange(0, 120, 12)  # 10 of 120
    frame.loc[flipped, "score"] = np.where(frame.loc[flipped, "score"] == "good", "bad", "good")
    frame.to_csv(tmp_path / "reviews.csv", index=False)
    with pytest.warns(DataNotice, match="free text"):
        result = minnorm_audit.audit(tmp_path / "reviews.csv", out=tmp_path / "run", label_column="score",
                                     device="cpu", seed=0, epochs=40, batch_size=32)
    assert result.summary["column_encodings"] == [{"column": "review", "encoding": "text", "features": ["review"]}]
    ranked = result.examples.sort_values("difficulty", ascending=False)["source"].astype(int).head(len(flipped))
    assert len(set(ranked) & set(flipped.tolist())) >= 8  # the flips top the ranking
    gallery = pd.read_parquet(tmp_path / "run" / "gallery.parquet")
    shown = json.loads(gallery["feature_values"].iloc[0])
    assert shown["review"] == frame["review"].iloc[int(gallery["source"].iloc[0])]


def test_text_ids_are_hashed_word_and_character_ngrams() -> None:
    ids = text_ids("Good tea")
    # 2 words + 1 bigram + character 3- and 4-grams of "<good>" (4 + 3) and "<tea>" (3 + 2)
    assert len(ids) == 2 + 1 + 7 + 5 and all(1 <= i < NUM_BUCKETS for i in ids)
    assert text_ids("good TEA") == ids and text_ids("tea good") != ids
    assert text_ids("...") == []


def hf_image_parquet(path: Path, cells: list, labels: list) -> Path:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(cells, type=image_type), "label": labels})
    pq.write_table(table, path)
    return path


def test_a_hugging_face_image_column_is_decoded_and_bad_rows_are_set_aside(tmp_path: Path) -> None:
    png = lambda color: image_bytes(solid(color), "PNG")  # noqa: E731
    cells = [{"bytes": png((200, 0, 0)), "path": "a.png"}, {"bytes": png((0, 200, 0)), "path": "b.png"}] * 3
    cells.append({"bytes": b"\x89PNG\r\n" + b"\x00" * 5000, "path": "broken.png"})
    table = hf_image_parquet(tmp_path / "train.parquet", cells, [0, 1] * 3 + [0])
    loaded = load_dataset(table, image_size=8)
    assert loaded.kind == "images" and loaded.inputs.shape == (6, 3, 8, 8)
    assert loaded.inputs[0, 0, 0, 0] == 200 and loaded.inputs[1, 1, 0, 0] == 200
    reasons = set_aside_reasons(loaded)
    assert list(reasons) == ["6"] and len(reasons["6"]) < 200
    raw = pa.table({"png": pa.array([b"not an image " * 3000] * 4, type=pa.binary()), "label": [0, 1, 0, 1]})
    pq.write_table(raw, tmp_path / "raw.parquet")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "raw.parquet")
    assert_one_line_error(excinfo, "no readable images", "row 0")
    assert len(str(excinfo.value)) < 300 and "not an image not" not in str(excinfo.value)


def test_labels_one_and_one_point_zero_are_one_class(tmp_path: Path) -> None:
    frame = blobs(rows=30, classes=3)
    frame["label"] = [["1", "2", "3"][i % 3] if i % 2 else ["1.0", "2.0", "3.0"][i % 3] for i in range(30)]
    frame.to_csv(tmp_path / "t.csv", index=False)
    loaded = load_dataset(tmp_path / "t.csv")
    assert loaded.class_names == ["1", "2", "3"]
    assert any("compared as numbers" in note for note in loaded.notes)


def test_a_duplicated_label_header_stops_naming_it(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("a,label,b,label\n1,x,2,y\n3,y,4,x\n")
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "t.csv")
    assert_one_line_error(excinfo, "t.csv", "'label' twice", "columns 2 and 4")


def test_a_price_label_suggests_regression_and_joined_labels_get_a_note(tmp_path: Path) -> None:
    frame = blobs(rows=90)
    frame["label"] = np.round(np.random.default_rng(0).uniform(5, 500, size=90), 2)
    frame.to_csv(tmp_path / "price.csv", index=False)
    with pytest.raises(DataError) as excinfo:
        load_dataset(tmp_path / "price.csv")
    assert_one_line_error(excinfo, "'label'", "continuous target", "--task regression")
    assert load_dataset(tmp_path / "price.csv", task="regression").targets.shape == (90, 1)
    frame = blobs(rows=40)
    frame.loc[::4, "label"] = "c0|c1"
    frame.to_csv(tmp_path / "multi.csv", index=False)
    notes = load_dataset(tmp_path / "multi.csv").notes
    assert any("joined by '|'" in note and "not supported yet" in note for note in notes)


def test_bare_comma_rows_at_the_end_are_dropped_with_a_note(tmp_path: Path) -> None:
    frame = blobs(rows=60)
    frame.to_csv(tmp_path / "t.csv", index=False)
    with open(tmp_path / "t.csv", "a") as stream:
        stream.write(",,,\n" * 100)
    loaded = load_dataset(tmp_path / "t.csv")
    assert len(loaded.sources) == 60 and loaded.set_aside == []
    assert any("100 row(s) at the end are empty" in note for note in loaded.notes)


def image_folder(root: Path) -> Path:
    for name, color in (("red", (255, 0, 0)), ("green", (0, 255, 0))):
        for index in range(4):
            save_image(root / name / f"{index}.png", solid(color))
    return root


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_named_pipe_and_a_link_to_a_device_are_set_aside_unopened(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = image_folder(tmp_path / "data")
    os.mkfifo(root / "red" / "pipe.png")
    os.symlink("/dev/zero", root / "green" / "zero.png")
    script = ("import sys; from minnorm_audit.data import load_dataset; d = load_dataset(sys.argv[1], image_size=8); "
              "print(sorted((i.source, i.reason) for i in d.set_aside)); print(len(d.sources))")
    done = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True, timeout=240,  # a hang, not a slow import
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert "('green/zero.png', 'not a regular file (a device file); not opened')" in done.stdout
    assert "('red/pipe.png', 'not a regular file (a named pipe (FIFO)); not opened')" in done.stdout
    assert done.stdout.splitlines()[-1] == "8"


def test_a_file_name_that_is_not_utf8_is_set_aside_by_name_and_the_run_finishes(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "data")
    bad_name = os.fsdecode(b"caf\xe9.png")
    try:
        save_image(root / "red" / bad_name, solid((255, 0, 0)))
    except (UnicodeEncodeError, OSError):
        pytest.skip("the file system refuses names that are not UTF-8")
    result = minnorm_audit.audit(root, out=tmp_path / "run", epochs=1, device="cpu", image_size=8)
    assert list(result.set_aside["source"]) == ["red/caf\\xe9.png"]
    assert "not valid UTF-8" in result.set_aside["reason"].iloc[0]
    assert len(result.examples) == 8


def test_a_data_folder_whose_name_is_not_utf8_stops_before_training_naming_it(tmp_path: Path) -> None:
    try:
        root = image_folder(tmp_path / os.fsdecode(b"d\xe9mo"))
    except (UnicodeEncodeError, OSError):
        pytest.skip("the file system refuses names that are not UTF-8")
    with pytest.raises(DataError) as excinfo:
        load_dataset(root, image_size=8)
    assert_one_line_error(excinfo, "d\\xe9mo", "not valid UTF-8")
