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
    assert set(examples["flag"]) <= {"mislabeled", "hard", "outlier", "ok"}
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


# --------------------------------------------------------------------------- issue 23: CLI and install


def _package_env() -> dict[str, str]:
    """The environment of a child Python that imports this checkout's package."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def test_version_and_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from minnorm_audit.cli import main\n"
        "for arguments in (['--version'], ['run', '-h'], ['report', '-h']):\n"
        "    try:\n"
        "        main(arguments, prog_name='minnorm-audit')\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == 0, (arguments, stop.code)\n"
        "print('torch imported' if 'torch' in sys.modules else 'no torch')\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                               env=_package_env())
    assert completed.returncode == 0, completed.stderr
    assert "minnorm-audit, version" in completed.stdout
    assert completed.stdout.strip().splitlines()[-1] == "no torch"


def test_public_names_resolve_lazily_and_stay_functions():
    import types

    import minnorm_audit
    import minnorm_audit.audit  # noqa: F401 - the submodules of the same name as the functions
    import minnorm_audit.clean  # noqa: F401

    assert isinstance(minnorm_audit.audit, types.FunctionType)
    assert isinstance(minnorm_audit.clean, types.FunctionType)
    assert minnorm_audit.DataError.__name__ == "DataError"
    assert set(minnorm_audit.__all__) <= set(dir(minnorm_audit))
    with pytest.raises(AttributeError):
        minnorm_audit.not_a_name  # noqa: B018


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "CUDA:3", "mps"])
def test_device_option_accepts_cuda_index(name):
    from minnorm_audit.cli import DeviceName

    assert DeviceName().convert(name, None, None) == name.lower()


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cpu:1", "cuda:-1"])
def test_device_option_refuses_other_names(table, tmp_path, name):
    result = CliRunner().invoke(main, ["run", str(table), "--out", str(tmp_path / "r"), "--device", name, "--quiet"])
    assert result.exit_code == 2 and "is not a device" in result.output and "cuda:N" in result.output


def test_cuda_index_past_the_gpus_is_one_clear_line(table, tmp_path):
    import torch

    beyond = torch.cuda.device_count() if torch.cuda.is_available() else 0
    result = CliRunner().invoke(main, ["run", str(table), "--out", str(tmp_path / "r"), "--epochs", "1", "--quiet",
                                       "--device", f"cuda:{beyond}"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    expected = "numbered from 0" if torch.cuda.is_available() else "no CUDA GPU is available"
    assert expected in result.output and f"cuda:{beyond}" in result.output


def test_progress_bar_in_a_terminal_and_not_in_a_pipe(table, tmp_path):
    import pty

    primary, secondary = pty.openpty()  # a terminal nobody sized: 0 x 0, as under `script`
    command = [sys.executable, "-m", "minnorm_audit", "run", str(table), "--out", str(tmp_path / "tty"),
               "--epochs", "2", "--device", "cpu"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=secondary,
                               env=_package_env())
    os.close(secondary)
    written = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        written += chunk
    assert process.wait(timeout=300) == 0, written.decode(errors="replace")
    os.close(primary)
    text = written.decode(errors="replace")
    assert "minnorm: 100%" in text and "2/2" in text, text
    piped = CliRunner().invoke(main, ["run", str(table), "--out", str(tmp_path / "pipe"), "--epochs", "2",
                                      "--device", "cpu"])
    assert piped.exit_code == 0, piped.output
    assert "minnorm:" not in piped.output and "epoch/s" not in piped.output


def test_report_gallery_size_option(table, tmp_path):
    out = tmp_path / "run"
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(table), "--out", str(out), *FAST, "--flag-fraction", "0.2"]).exit_code == 0
    result = runner.invoke(main, ["report", str(out), "--gallery-size", "5"])
    assert result.exit_code == 0, result.output
    page = (out / "report.html").read_text(encoding="utf-8")
    assert '"pageSize":5' in page and page.count('<article class="item') <= 10
    assert runner.invoke(main, ["report", str(out), "--gallery-size", "0"]).exit_code == 2
