"""The command line end to end on small generated data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from minnorm_audit.cli import main
from helpers import tree_hash

FAST = ["--epochs", "3", "--quiet", "--device", "cpu"]


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for class_index, name in enumerate(["cat", "dog", "<img src=x onerror=alert(1)>"]):
        (root / name).mkdir(parents=True)
        for item in range(12):
            pixels = rng.integers(0, 60, size=(12, 12, 3)) + 60 * class_index
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{item}.png")
    (root / "cat" / "broken.png").write_bytes(b"")
    return root


@pytest.fixture()
def table(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(3), 40)
    features = rng.normal(size=(120, 6)) + labels[:, None] * 2.0
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(6)])
    frame["label"] = labels
    path = tmp_path / "table.csv"
    frame.to_csv(path, index=False)
    return path


def test_every_command_has_help():
    runner = CliRunner()
    for command in ([], ["run"], ["report"], ["demo"]):
        result = runner.invoke(main, [*command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
    assert runner.invoke(main, ["-h"]).exit_code == 0
    assert "minnorm-audit" in runner.invoke(main, ["--version"]).output


def test_run_on_image_folder_writes_outputs_and_leaves_data_untouched(image_folder, tmp_path):
    before = tree_hash(image_folder)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(image_folder), "--out", str(out), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["num_examples"] == 36 and summary["num_set_aside"] == 1
    examples = pd.read_parquet(out / "examples.parquet")
    assert len(examples) == 36
    assert {"source", "given_label", "suggested_label", "difficulty", "difficulty_percentile", "flag"} <= set(examples)
    assert set(examples["flag"]) <= {"mislabeled", "hard", "ok"}
    set_aside = pd.read_parquet(out / "set_aside.parquet")
    assert list(set_aside["source"]) == ["cat/broken.png"]
    assert (out / "report.html").exists() and (out / "checkpoint.pt").exists()
    assert tree_hash(image_folder) == before


def test_run_on_table_and_report_rerender(table, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(table), "--out", str(out), *FAST]).exit_code == 0
    (out / "report.html").unlink()
    result = runner.invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").exists()


def test_regression_table(tmp_path):
    rng = np.random.default_rng(2)
    frame = pd.DataFrame(rng.normal(size=(80, 4)), columns=list("abcd"))
    frame["target"] = frame["a"] * 2 + rng.normal(scale=0.1, size=80)
    path = tmp_path / "reg.parquet"
    frame.to_parquet(path)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(path), "--task", "regression", "--label-column", "target",
                                       "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    examples = pd.read_parquet(out / "examples.parquet")
    assert {"given_target", "predicted_target", "difficulty", "flag"} <= set(examples)


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: (root / "one" / "only").mkdir(parents=True) or root / "one", "class"),
    ],
)
def test_unusable_input_exits_1_with_one_line(tmp_path, make_input, message):
    result = CliRunner().invoke(main, ["run", str(make_input(tmp_path)), *FAST])
    assert result.exit_code in (1, 2)
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_label_column_is_one_clear_line(table, tmp_path):
    result = CliRunner().invoke(main, ["run", str(table), "--label-column", "nope", *FAST, "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "nope" in error_lines[0]


def test_out_inside_data_is_refused(image_folder):
    before = tree_hash(image_folder)
    result = CliRunner().invoke(main, ["run", str(image_folder), "--out", str(image_folder / "run"), *FAST])
    assert result.exit_code == 1 and "inside the data folder" in result.output
    assert tree_hash(image_folder) == before


def test_qa_gate_exits_3_after_writing_outputs(table, tmp_path):
    out = tmp_path / "run"
    # Trained long enough to be conclusive (3 epochs leave it near chance: exit 4, tests/test_verdicts.py).
    result = CliRunner().invoke(main, ["run", str(table), "--out", str(out), "--epochs", "10", "--lr", "0.01",
                                       "--quiet", "--device", "cpu", "--flag-fraction", "0.5", "--fail-on-flagged", "0.0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inconclusive"] is None
    if summary["counts"]["mislabeled"] > 0:
        assert result.exit_code == 3
    assert (out / "examples.parquet").exists()


def test_resume_continues_interrupted_run(table, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(table), "--out", str(out), "--epochs", "2", "--quiet", "--device", "cpu"]).exit_code == 0
    result = runner.invoke(main, ["run", str(table), "--resume", str(out), "--epochs", "4", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["epoch"] for entry in summary["history"]] == [1, 2, 3, 4]


def test_demo_catches_flipped_labels_in_a_real_subprocess(tmp_path):
    out = tmp_path / "demo"
    completed = subprocess.run(
        [sys.executable, "-m", "minnorm_audit", "demo", "--out", str(out), "--quiet", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env={**os.environ},
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads((out / "run" / "summary.json").read_text())
    # Measured on this demo: precision 0.93, recall 0.92 (seed 0).
    assert summary["demo"]["num_flipped"] == 180
    assert summary["demo"]["precision"] >= 0.8 and summary["demo"]["recall"] >= 0.7
    assert "precision" in completed.stdout
