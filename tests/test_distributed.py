"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner

from minnorm_audit.cli import main
from minnorm_audit.training import distributed
from minnorm_audit.training.distributed import DistributedContext, rank_slice

TORCHRUN = Path(sys.executable).with_name("torchrun")
WORKER = Path(__file__).with_name("ddp_fit_worker.py")
needs_torchrun = pytest.mark.skipif(
    not (TORCHRUN.exists() and dist.is_available() and dist.is_gloo_available()),
    reason="needs torchrun and the gloo backend",
)


def torchrun(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    return subprocess.run(
        [str(TORCHRUN), "--nproc_per_node=2", "--standalone", *arguments],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("num_examples,batch_size,world_size", [(129, 32, 2), (10, 4, 3), (7, 8, 4), (2, 5, 3)])
def test_rank_slices_cover_every_example_exactly_once_without_padding(num_examples, batch_size, world_size):
    order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(0))
    for global_batch in order.split(batch_size):
        parts = [rank_slice(global_batch, DistributedContext(rank, world_size, rank, world_size))
                 for rank in range(world_size)]
        assert torch.equal(torch.cat(parts), global_batch)  # contiguous, in order, nothing added
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


class _HardExit(Exception):
    pass


@pytest.mark.parametrize("body_exit,code", [(None, 0), (3, 3), (0, 0)])
def test_a_rank_that_left_its_group_ends_with_the_blocks_exit_status(monkeypatch, body_exit, code):
    calls = []

    def fake_exit(status):
        calls.append(status)
        raise _HardExit

    monkeypatch.setattr(distributed.os, "_exit", fake_exit)
    with pytest.raises(_HardExit):
        with distributed.exit_rank_after(True):
            if body_exit is not None:
                sys.exit(body_exit)
    assert calls == [code]


def test_a_plain_run_keeps_its_normal_exit(monkeypatch):
    monkeypatch.setattr(distributed.os, "_exit", lambda status: pytest.fail("os._exit in a plain run"))
    with distributed.exit_rank_after(False):
        pass
    with pytest.raises(SystemExit) as stop, distributed.exit_rank_after(False):
        sys.exit(3)
    assert stop.value.code == 3
    assert distributed.teardown() is False  # no group joined here


def _load_worker():
    spec = importlib.util.spec_from_file_location("ddp_fit_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@needs_torchrun
def test_two_gloo_ranks_match_one_process_and_agree(tmp_path):
    """Same global batches (129 examples in batches of 32: rank 1 gets an empty slice
    of the last one) -> the multipliers of a single float64 run, on both ranks."""
    completed = torchrun([str(WORKER), str(tmp_path)], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    ranks = [dict(np.load(tmp_path / f"rank{rank}.npz")) for rank in (0, 1)]
    assert int(ranks[0]["world_size"]) == 2
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)  # every rank agrees
    (tmp_path / "single").mkdir()
    single = _load_worker().run(tmp_path / "single")
    for key in ("final_multipliers", "average_multipliers", "mean_violations", "difficulty", "final_outputs", "norms"):
        np.testing.assert_allclose(ranks[0][key], single[key], rtol=1e-6, atol=1e-9, err_msg=key)
    # The multipliers did move (the default soft-margin cap keeps them small).
    assert np.abs(single["final_multipliers"]).max() > 0.05
    assert np.abs(single["mean_violations"]).max() > 0.5


@pytest.mark.slow
@needs_torchrun
def test_torchrun_cli_run_writes_once_from_rank_zero_and_matches_single_process(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, size=161)
    features = rng.normal(size=(3, 8))[labels] + rng.normal(scale=0.7, size=(161, 8))
    table = pd.DataFrame(features, columns=[f"f{i}" for i in range(8)]).assign(label=labels)
    table.to_csv(tmp_path / "table.csv", index=False)
    options = ["--device", "cpu", "--epochs", "3", "--batch-size", "32", "--gallery-size", "5"]

    completed = torchrun(["-m", "minnorm_audit", "run", "table.csv", "--out", "ddp", *options], cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr.count("examples audited") == 1  # rank 0 alone reports
    single = CliRunner().invoke(main, ["run", str(tmp_path / "table.csv"), "--out", str(tmp_path / "single"),
                                       "--quiet", *options])
    assert single.exit_code == 0, single.output

    ddp_examples = pd.read_parquet(tmp_path / "ddp" / "examples.parquet")
    single_examples = pd.read_parquet(tmp_path / "single" / "examples.parquet")
    np.testing.assert_allclose(ddp_examples["difficulty"], single_examples["difficulty"], rtol=1e-4, atol=1e-6)
    assert (ddp_examples["flag"] == single_examples["flag"]).mean() >= 0.98
    summary = pd.read_json(tmp_path / "ddp" / "summary.json", typ="series")
    assert summary["config"]["world_size"] == 2
