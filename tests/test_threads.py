"""CPU threads chosen for the work, the user's overrides, and flushed denormals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import minnorm_audit
from minnorm_audit.training import default_batch_size
from minnorm_audit.cli import main
from minnorm_audit.training import build_model
from minnorm_audit.training.threads import (
    THREAD_ENV_VARS,
    WORK_PER_THREAD,
    choose_threads,
    cpu_compute,
    forward_multiply_adds,
)


@pytest.fixture
def no_thread_env(monkeypatch):
    for name in THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


def _table(rows: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=rows)
    features = rng.normal(size=(3, 6))[labels] + rng.normal(scale=0.8, size=(rows, 6))
    flipped = rng.choice(rows, rows // 10, replace=False)
    labels[flipped] = (labels[flipped] + 1) % 3
    return features, labels


def test_multiply_adds_of_the_default_networks_match_their_layer_shapes():
    mlp = build_model("mlp", torch.randn(4, 26), 3)
    assert forward_multiply_adds(mlp, torch.randn(1, 26)) == 26 * 512 + 512 * 512 + 512 * 3
    cnn = build_model("cnn", torch.randn(4, 3, 32, 32), 10)
    # Three 3x3 conv blocks (32, 64, 128 channels) at 32, 16 and 8 pixels, then a linear head.
    expected = 32 * 32 * 32 * 3 * 9 + 16 * 16 * 64 * 32 * 9 + 8 * 8 * 128 * 64 * 9 + 128 * 10
    assert forward_multiply_adds(cnn, torch.randn(1, 3, 32, 32)) == expected
    assert cnn.training  # counting leaves the mode as it was


def test_one_thread_for_the_mlp_on_a_table_more_for_a_cnn_on_large_images(no_thread_env):
    mlp_step = 128 * forward_multiply_adds(build_model("mlp", torch.randn(4, 784), 10), torch.randn(1, 784))
    cnn_step = 128 * forward_multiply_adds(build_model("cnn", torch.randn(4, 3, 32, 32), 10), torch.randn(1, 3, 32, 32))
    assert choose_threads(None, mlp_step, cores=16).threads == 1
    chosen = choose_threads(None, cnn_step, cores=16)
    assert (chosen.threads, chosen.source) == (int(cnn_step // WORK_PER_THREAD), "chosen") == (5, "chosen")
    assert choose_threads(None, cnn_step, cores=2).threads == 2  # never more than the cores
    assert choose_threads(None, 0.0, cores=8).threads == 1


def test_torchrun_ranks_share_the_cores_of_their_node(no_thread_env, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_threads(None, 100 * WORK_PER_THREAD).threads == 2


def test_the_given_count_wins_then_the_users_environment(no_thread_env, monkeypatch):
    assert choose_threads(3, 1e12).to_record()["threads"] == 3
    assert choose_threads(3, 1e12).source == "given"
    monkeypatch.setenv("MKL_NUM_THREADS", "1")
    from_env = choose_threads(None, 1e12, cores=16)
    assert (from_env.threads, from_env.source) == (torch.get_num_threads(), "MKL_NUM_THREADS")
    assert choose_threads(2, 1e12).threads == 2
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0)


def test_cpu_compute_flushes_denormals_and_restores_the_callers_settings():
    subnormal = 1e-40  # below float32's smallest normal, 1.18e-38
    before = torch.get_num_threads()
    assert torch.tensor(subnormal).item() != 0.0
    with cpu_compute(1):
        assert torch.get_num_threads() == 1
        assert torch.tensor(subnormal).item() == 0.0
        assert (torch.tensor([1e-20]) * torch.tensor([1e-20])).item() == 0.0
    assert torch.get_num_threads() == before
    assert torch.tensor(subnormal).item() != 0.0
    torch.set_flush_denormal(True)  # a caller that flushes keeps flushing
    try:
        with cpu_compute(1):
            pass
        assert torch.tensor(subnormal).item() == 0.0
    finally:
        torch.set_flush_denormal(False)


def test_the_audit_records_its_threads_and_leaves_the_process_as_it_was(tmp_path, no_thread_env):
    before = torch.get_num_threads()
    result = minnorm_audit.audit(_table(), out=tmp_path / "chosen", epochs=2, device="cpu")
    config = result.summary["config"]
    assert (config["threads"], config["threads_source"], config["flush_denormal"]) == (1, "chosen", True)
    # One training step: the batch (default_batch_size of the table's rows) times the
    # MLP's multiply-adds per example.
    batch = default_batch_size(result.summary["num_examples"])
    assert config["step_multiply_adds"] == batch * (6 * 512 + 512 * 512 + 512 * 3)
    assert torch.get_num_threads() == before
    assert torch.tensor(1e-40).item() != 0.0
    given = minnorm_audit.audit(_table(), out=tmp_path / "given", epochs=2, device="cpu", threads=2)
    assert (given.summary["config"]["threads"], given.summary["config"]["threads_source"]) == (2, "given")


def test_cli_threads_option_lands_in_summary_and_zero_is_refused(tmp_path, no_thread_env):
    features, labels = _table(120)
    path = tmp_path / "table.csv"
    import pandas as pd

    pd.DataFrame(features, columns=[f"f{i}" for i in range(6)]).assign(label=labels).to_csv(path, index=False)
    run = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run"), "--epochs", "1", "--device", "cpu",
                                    "--quiet", "--threads", "2"])
    assert run.exit_code == 0, run.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["config"]["threads"], summary["config"]["threads_source"]) == (2, "given")
    refused = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "zero"), "--threads", "0"])
    assert refused.exit_code == 2 and "--threads" in refused.output


def test_flushing_denormals_leaves_the_scores_unchanged(tmp_path, no_thread_env, monkeypatch):
    data = _table(300, seed=1)
    flushed = minnorm_audit.audit(data, out=tmp_path / "flushed", epochs=8, device="cpu")
    # The same audit with flushing turned off (torch.set_flush_denormal becomes a no-op).
    monkeypatch.setattr(torch, "set_flush_denormal", lambda mode: False)
    kept = minnorm_audit.audit(data, out=tmp_path / "kept", epochs=8, device="cpu")
    np.testing.assert_allclose(flushed.examples["difficulty"], kept.examples["difficulty"], rtol=1e-4, atol=1e-6)
    assert (flushed.examples["flag"] == kept.examples["flag"]).all()
    assert flushed.examples["difficulty"].std() > 0  # the scores tell examples apart


def test_threads_are_applied_where_the_model_trains(tmp_path, no_thread_env, monkeypatch):
    seen: list[int] = []
    original = nn.Linear.forward

    def recording(self, inputs):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return original(self, inputs)

    monkeypatch.setattr(nn.Linear, "forward", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller's count differs from the one asked for
    try:
        minnorm_audit.audit(_table(60), out=tmp_path / "run", epochs=1, device="cpu", threads=1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
