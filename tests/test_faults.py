"""Faults: kill -9 and Ctrl-C during training, a kill while outputs are written,
NaN/inf during training, and untrusted checkpoints.

The process tests run ``python -m minnorm_audit run`` in subprocesses on a small
generated table and signal them once a checkpoint after epoch >= 1 is on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from minnorm_audit.cli import main
from minnorm_audit.training import TrainConfig, TrainingError, fit

EPOCHS = 12
SCORE_COLUMNS = ["example_id", "difficulty", "difficulty_percentile", "flag", "suggested_label", "competing_label"]


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,200 rows, 8 features, 4 classes, 5% flipped labels."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=1200)
    centers = rng.normal(scale=2.0, size=(4, 8))
    features = centers[labels] + rng.normal(size=(1200, 8))
    flipped = rng.choice(1200, 60, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 4, size=60)) % 4
    frame = pd.DataFrame(features, columns=[f"f{i}" for i in range(8)])
    frame["label"] = labels
    path = tmp_path_factory.mktemp("data") / "table.csv"
    frame.to_csv(path, index=False)
    return path


def run_command(table: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "minnorm_audit", "run", str(table), *args,
        "--epochs", str(EPOCHS), "--batch-size", "32", "--device", "cpu", "--seed", "0",
        "--deterministic", "--quiet",
        # A checkpoint after every epoch (not every 60 s), so the test sees epoch 1 on disk.
        "--checkpoint-seconds", "0",
    ]


def start(command: list[str]) -> subprocess.Popen[str]:
    # One thread each: several runs share the CPUs (every run alike, so results match).
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)


def checkpoint_epoch(checkpoint: Path) -> int | None:
    if not checkpoint.exists():
        return None
    # os.replace swaps the name atomically: an open file is always one whole checkpoint.
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])


def wait_for_epoch(checkpoint: Path, process: subprocess.Popen[str], minimum: int = 1, timeout: float = 600) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before a checkpoint after epoch {minimum}: "
                        f"{process.stderr.read() if process.stderr else ''}")
        epoch = checkpoint_epoch(checkpoint)
        if epoch is not None and epoch >= minimum:
            return epoch
        time.sleep(0.02)
    pytest.fail(f"no checkpoint after epoch {minimum} within {timeout} s")


def finish(process: subprocess.Popen[str], timeout: float = 600) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def scores(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "examples.parquet", columns=SCORE_COLUMNS)


@pytest.mark.slow
def test_kill_9_and_ctrl_c_then_resume_give_the_scores_of_an_uninterrupted_run(table, tmp_path):
    reference_dir, killed_dir, interrupted_dir = tmp_path / "reference", tmp_path / "killed", tmp_path / "interrupted"
    reference = start(run_command(table, "--out", str(reference_dir)))
    killed = start(run_command(table, "--out", str(killed_dir)))
    interrupted = start(run_command(table, "--out", str(interrupted_dir)))

    wait_for_epoch(killed_dir / "checkpoint.pt", killed)
    killed.send_signal(signal.SIGKILL)
    wait_for_epoch(interrupted_dir / "checkpoint.pt", interrupted)
    interrupted.send_signal(signal.SIGINT)

    code, _, _ = finish(killed)
    assert code == -signal.SIGKILL
    assert not (killed_dir / "examples.parquet").exists()
    code, _, stderr = finish(interrupted)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted; resume with: minnorm-audit run {table} --resume {interrupted_dir}"
    )
    for run_dir in (killed_dir, interrupted_dir):
        assert 1 <= checkpoint_epoch(run_dir / "checkpoint.pt") < EPOCHS  # stopped mid-run

    resumed = [start(run_command(table, "--resume", str(run_dir))) for run_dir in (killed_dir, interrupted_dir)]
    for process in [reference, *resumed]:
        code, _, stderr = finish(process)
        assert code == 0, stderr
    expected = scores(reference_dir)
    for run_dir in (killed_dir, interrupted_dir):
        pd.testing.assert_frame_equal(scores(run_dir), expected)
    assert expected["flag"].isin(["mislabeled", "hard"]).sum() > 0  # the runs flag something


WRITER = r"""
import sys, time
import numpy as np, pandas as pd
import pyarrow.parquet as pq
from minnorm_audit.report.parquet import write_parquet_atomic

path, mode = sys.argv[1], sys.argv[2]
descriptions = {"example_id": "id", "difficulty": "score"}
frames = [pd.DataFrame({"example_id": np.arange(300_000), "difficulty": np.full(300_000, float(value))})
          for value in (1.0, 2.0)]
if mode == "stall":
    real_write_table = pq.write_table

    def write_then_stall(table, where, **options):
        real_write_table(table, where, **options)
        where.flush()
        print("mid-write", flush=True)  # the temp file is written, not yet moved into place
        time.sleep(600)

    pq.write_table = write_then_stall
print("ready", flush=True)
version = 0
while True:
    write_parquet_atomic(path, frames[version % 2], descriptions=descriptions, metadata={"version": version})
    version += 1
"""


def old_file(path: Path) -> pd.DataFrame:
    from minnorm_audit.report.parquet import write_parquet_atomic

    frame = pd.DataFrame({"example_id": np.arange(1000), "difficulty": np.zeros(1000)})
    write_parquet_atomic(path, frame, descriptions={"example_id": "id", "difficulty": "score"}, metadata={"version": "old"})
    return frame


def test_kill_while_writing_leaves_the_previous_file_intact(tmp_path):
    target = tmp_path / "examples.parquet"
    previous = old_file(target)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "stall"], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None
    assert writer.stdout.readline().strip() == "ready"
    assert writer.stdout.readline().strip() == "mid-write"
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)

    pd.testing.assert_frame_equal(pd.read_parquet(target), previous)
    assert pq.read_schema(target).metadata[b"minnorm_audit"] == b'{"version": "old"}'
    # The killed write left its temp file (a complete table, never moved into place):
    # hidden, named after the target, and ignored by readers.
    leftovers = [path for path in tmp_path.iterdir() if path != target]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".examples.parquet.")
    assert leftovers[0].name.endswith(".tmp") and len(pd.read_parquet(leftovers[0])) == 300_000


@pytest.mark.parametrize("delay", [0.1, 0.4])
def test_kill_at_any_moment_of_a_write_loop_leaves_one_whole_file(tmp_path, delay):
    target = tmp_path / "examples.parquet"
    old_file(target)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "loop"], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    time.sleep(delay)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    frame = pd.read_parquet(target)
    assert len(frame) in (1000, 300_000)
    assert frame["difficulty"].nunique() == 1 and frame["difficulty"].iloc[0] in (0.0, 1.0, 2.0)


def digits_like(num_examples: int = 256):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(num_examples, 16, generator=generator), torch.randint(0, 4, (num_examples,), generator=generator)


def test_huge_learning_rate_stops_with_the_setting_to_change_and_keeps_the_checkpoint(tmp_path):
    inputs, labels = digits_like()
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingError) as caught:
        fit(nn.Linear(16, 4), inputs * 1e30, labels, form="margin", num_outputs=4, checkpoint_path=checkpoint,
            config=TrainConfig(epochs=3, lr=1e30, optimizer="sgd", device="cpu"))
    message = str(caught.value)
    assert "\n" not in message
    assert "in epoch 1" in message and "learning rate too high" in message and "--lr, now 1e+30" in message
    assert f"last good checkpoint ({checkpoint}, epoch 0) is kept" in message
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0
    assert all(torch.isfinite(value).all() for value in saved["model"].values())


class NaNAfter(nn.Module):
    """A linear model whose outputs turn NaN after ``calls`` forward passes."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)
        self.calls_left = calls

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls_left -= 1
        outputs = self.linear(inputs)
        return outputs * float("nan") if self.calls_left < 0 else outputs


def test_nan_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path):
    inputs, labels = digits_like()
    checkpoint = tmp_path / "checkpoint.pt"
    torch.manual_seed(0)
    model = NaNAfter(calls=2 * 256 // 64 + 1)  # epochs 1 and 2 are clean, epoch 3 is not
    with pytest.raises(TrainingError, match="in epoch 3: the weights became NaN or inf"):
        fit(model, inputs, labels, form="margin", num_outputs=4, checkpoint_path=checkpoint,
            config=TrainConfig(epochs=5, batch_size=64, device="cpu"))
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 2 and [entry["epoch"] for entry in saved["history"]] == [1, 2]
    assert all(torch.isfinite(value).all() for value in saved["model"].values())
    store = saved["optimizer"]["minnorm"]["store"]
    assert torch.isfinite(store["multipliers"]).all() and torch.isfinite(store["average"]).all()


def test_cli_reports_divergence_in_one_line(table, tmp_path):
    result = CliRunner().invoke(main, ["run", str(table), "--out", str(tmp_path / "run"), "--epochs", "2",
                                       "--lr", "1e30", "--optimizer", "sgd", "--device", "cpu", "--quiet"])
    assert result.exit_code == 1
    assert "Error: training diverged in epoch 1" in result.output and "lower --lr" in result.output
    assert "Traceback" not in result.output


class RunsCode:
    """Pickles to a call of ``Path.touch``: a full unpickler would create the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    inputs, labels = digits_like(64)
    checkpoint, marker = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    torch.save({"model": {}, "optimizer": {}, "epoch": 1, "payload": RunsCode(marker)}, checkpoint)
    with pytest.raises(TrainingError, match="cannot be loaded safely"):
        fit(nn.Linear(16, 4), inputs, labels, form="margin", num_outputs=4, checkpoint_path=checkpoint,
            resume=True, config=TrainConfig(epochs=2, device="cpu"))
    assert not marker.exists()


def test_pillow_decompression_bomb_limit_stays_on():
    from PIL import Image

    import minnorm_audit.data  # noqa: F401 - importing must not lift the limit
    import minnorm_audit.data.placement  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 200_000_000


def test_interrupt_before_any_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch):
    import minnorm_audit.cli as cli

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minnorm_audit.data.load_dataset", interrupted)
    data = tmp_path / "t.csv"
    data.write_text("a,label\n1,0\n2,1\n")
    result = CliRunner().invoke(cli.main, ["run", str(data), "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert "interrupted before the first checkpoint; nothing to resume" in result.output
