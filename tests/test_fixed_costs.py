"""Fixed costs of an audit that have nothing to do with the data: no torch._dynamo
import on a path that does not compile (the optimizers that avoid it step exactly like
torch's own), no matplotlib for the report's plots, checkpoints by time, diagnostics
on the device, and many image files decoded in processes with the pixels of one."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from minnorm_audit.minnorm import eager


def test_a_small_audit_never_imports_torch_dynamo(tmp_path):
    # A fresh interpreter: this test process may have imported it already.
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import minnorm_audit

        rng = np.random.default_rng(0)
        X = rng.normal(size=(64, 4)).astype("float32")
        y = (X[:, 0] > 0).astype("int64") + (X[:, 1] > 0)
        minnorm_audit.audit((X, y), out={str(tmp_path / "run")!r}, epochs=2, device="cpu", gallery_size=4)
        loaded = sorted(name for name in ("torch._dynamo", "torch._inductor", "matplotlib") if name in sys.modules)
        print("LOADED", ",".join(loaded))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    assert "LOADED \n" in completed.stdout or completed.stdout.rstrip().endswith("LOADED"), completed.stdout
    assert (tmp_path / "run" / "report.html").is_file()


def _train(optimizer_class, steps=5, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = optimizer_class(model.parameters(), **options)
    inputs, targets = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.parametrize(
    ("mine", "theirs", "options"),
    [
        (eager.Adam, torch.optim.Adam, {"lr": 1e-2}),
        (eager.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.0}),
        (eager.SGD, torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    ],
)
def test_the_eager_optimizers_step_bit_for_bit_like_torchs(mine, theirs, options):
    model_a, optimizer_a = _train(mine, **options)
    model_b, optimizer_b = _train(theirs, **options)
    assert isinstance(optimizer_a, theirs)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    # The states are interchangeable: the one saved by either loads into the other.
    state_a, state_b = optimizer_a.state_dict(), optimizer_b.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    for key in state_a["state"]:
        for name, value in state_a["state"][key].items():
            assert torch.equal(value, state_b["state"][key][name])
    optimizer_b.load_state_dict(state_a)
    optimizer_a.load_state_dict(state_b)


def test_step_hooks_still_run_and_grad_mode_is_restored():
    model, optimizer = _train(eager.Adam, steps=1, lr=1e-3)
    calls = []
    optimizer.register_step_pre_hook(lambda *_: calls.append("pre"))
    optimizer.register_step_post_hook(lambda *_: calls.append("post"))
    model(torch.randn(2, 6)).sum().backward()
    optimizer.step()
    assert calls == ["pre", "post"]
    assert torch.is_grad_enabled()


def test_without_torch_dynamo_loaded_the_eager_optimizers_match_torchs_too(tmp_path):
    # The in-process tests above may run with torch._dynamo already imported (then the
    # decorated methods run); a fresh interpreter takes the undecorated path.
    script = textwrap.dedent(
        f"""
        import sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_fixed_costs import _train, test_step_hooks_still_run_and_grad_mode_is_restored
        from minnorm_audit.minnorm import eager

        test_step_hooks_still_run_and_grad_mode_is_restored()
        results = {{}}
        for name, options in (("Adam", {{"lr": 1e-2}}), ("SGD", {{"lr": 0.1, "momentum": 0.9}})):
            model, optimizer = _train(getattr(eager, name), **options)
            results[name] = ([p.detach() for p in model.parameters()], optimizer.state_dict())
        torch.save(results, {str(tmp_path / "eager.pt")!r})
        assert "torch._dynamo" not in sys.modules
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               check=False)
    assert completed.returncode == 0, completed.stderr
    results = torch.load(tmp_path / "eager.pt", weights_only=True)
    for name, options in (("Adam", {"lr": 1e-2}), ("SGD", {"lr": 0.1, "momentum": 0.9})):
        model, optimizer = _train(getattr(torch.optim, name), **options)
        parameters, state = results[name]
        assert all(torch.equal(a, b) for a, b in zip(parameters, model.parameters()))
        optimizer.load_state_dict(state)


def test_once_torch_dynamo_is_loaded_the_decorated_methods_run_and_agree():
    import torch._dynamo  # (someone compiled: torch's own methods from now on)

    assert eager.dynamo_loaded()
    test_step_hooks_still_run_and_grad_mode_is_restored()
    test_the_eager_optimizers_step_bit_for_bit_like_torchs(eager.Adam, torch.optim.Adam, {"lr": 1e-2})


# --------------------------------------------------------------------------- checkpoints by time


def _table(num_examples: int = 192):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(num_examples, 8, generator=generator), torch.randint(0, 3, (num_examples,), generator=generator)


class _InterruptAt(torch.nn.Module):
    """An MLP that raises KeyboardInterrupt (Ctrl-C) at its ``at``-th forward pass."""

    def __init__(self, at: int | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        self.calls, self.at = 0, at

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.at is not None and self.calls == self.at:
            raise KeyboardInterrupt
        return self.body(inputs)


def _fit(checkpoint, *, at=None, resume=False, on_epoch=None, **config):
    from minnorm_audit.training import TrainConfig, fit

    inputs, labels = _table()
    settings = {"epochs": 5, "batch_size": 64, "device": "cpu", "dual_lr": 0.05, **config}
    return fit(_InterruptAt(at), inputs, labels, form="margin", num_outputs=3, config=TrainConfig(**settings),
               dataset_fingerprint="t", checkpoint_path=checkpoint, resume=resume, on_epoch=on_epoch)


def _epoch_on_disk(checkpoint) -> int:
    return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])


@pytest.mark.parametrize(("seconds", "expected"), [(0, [1, 2, 3, 4, 5]), (3600, [0, 0, 0, 0, 5])])
def test_the_checkpoint_is_written_by_time_and_always_after_the_last_epoch(tmp_path, seconds, expected):
    checkpoint = tmp_path / "checkpoint.pt"
    on_disk = []
    _fit(checkpoint, checkpoint_seconds=seconds, on_epoch=lambda _: on_disk.append(_epoch_on_disk(checkpoint)))
    assert on_disk == expected


def test_a_checkpoint_is_written_once_the_seconds_have_passed(tmp_path, monkeypatch):
    import importlib
    import types

    from minnorm_audit.training import loop as fit_module

    clock = {"now": 0.0}

    def monotonic() -> float:  # every reading is 25 s after the previous one
        clock["now"] += 25.0
        return clock["now"]

    monkeypatch.setattr(fit_module, "time", types.SimpleNamespace(monotonic=monotonic, perf_counter=time_perf_counter))
    checkpoint = tmp_path / "checkpoint.pt"
    on_disk = []
    _fit(checkpoint, checkpoint_seconds=60, on_epoch=lambda _: on_disk.append(_epoch_on_disk(checkpoint)))
    # Epoch 0 written at 25 s; epoch 1 ends at 50 s and epoch 2 at 75 s (under 60 s
    # later: kept in memory), epoch 3 at 100 s (written, done at 125 s), epoch 4 at
    # 150 s (kept), epoch 5 is the last (written).
    assert on_disk == [0, 0, 3, 3, 5]


def time_perf_counter() -> float:
    import time

    return time.perf_counter()


def test_ctrl_c_writes_the_last_finished_epoch_and_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path):
    from minnorm_audit.training import TrainingInterrupted

    reference = _fit(tmp_path / "reference.pt", checkpoint_seconds=3600)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(TrainingInterrupted):
        _fit(checkpoint, at=3 * 3 + 2, checkpoint_seconds=3600)  # 3 batches an epoch: in epoch 4
    assert _epoch_on_disk(checkpoint) == 3  # not 0: written on Ctrl-C from memory
    resumed = _fit(checkpoint, resume=True, checkpoint_seconds=3600)
    assert [entry["epoch"] for entry in resumed.history] == [1, 2, 3, 4, 5]
    np.testing.assert_array_equal(resumed.mean_violations, reference.mean_violations)
    np.testing.assert_array_equal(resumed.final_multipliers, reference.final_multipliers)
    assert _epoch_on_disk(checkpoint) == 5


# --------------------------------------------------------------------------- diagnostics on the device


def test_rank_stability_on_the_device_matches_the_host_spearman_ties_included():
    from minnorm_audit.minnorm import spearman
    from minnorm_audit.minnorm.stats import spearman_tensors

    rng = np.random.default_rng(0)
    for size in (3, 50, 5000):
        first = rng.integers(0, 12, size).astype(np.float64)  # many ties
        second = first + rng.normal(scale=4.0, size=size)
        second[::4] = 0.0
        assert spearman_tensors(torch.from_numpy(first), torch.from_numpy(second)) == pytest.approx(
            spearman(first, second), abs=1e-12)
    assert np.isnan(spearman_tensors(torch.ones(5), torch.arange(5.0)))


@pytest.mark.parametrize(("form", "store"), [("margin", "dense"), ("margin", "compact"), ("equality", "dense")])
def test_the_diagnostics_difficulty_is_difficulty_without_leaving_the_device(form, store):
    from minnorm_audit.minnorm import Minnorm, readout

    torch.manual_seed(0)
    inputs = torch.randn(96, 8)
    model = torch.nn.Linear(8, 4)
    targets = torch.randint(0, 4, (96,)) if form == "margin" else torch.randn(96, 4)
    optimizer = Minnorm(eager.SGD(model.parameters(), lr=0.05), num_examples=96, num_outputs=4, form=form,
                        dual_lr=0.1, multiplier_store=store, multiplier_slots=2 if store == "compact" else None)
    stability = []
    for _ in range(3):
        for ids in torch.randperm(96).split(32):
            loss = optimizer.lagrangian(model(inputs[ids]), targets[ids], ids)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        on_host = optimizer.difficulty()
        on_device = readout.difficulty_tensor(optimizer.multipliers, form=form)
        assert on_device.device == optimizer.device and on_device.dtype == torch.float64
        np.testing.assert_array_equal(on_device.numpy(), on_host)
        stability.append(optimizer.diagnostics()["rank_stability"])
    assert np.isnan(stability[0]) and all(-1.0 <= value <= 1.0 for value in stability[1:])
    # The previous scores travel with the state, as a tensor.
    state = optimizer.state_dict()["minnorm"]["previous_scores"]
    assert isinstance(state, torch.Tensor) and state.shape == (96,)


# --------------------------------------------------------------------------- decoding in processes


def _image_folder(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(40):
        pixels = rng.integers(0, 256, (20 + index % 7, 24, 3), dtype=np.uint8)
        kind = index % 5
        path = root / f"{index:02d}.{'jpg' if kind == 1 else 'png'}"
        if kind == 0:
            Image.fromarray(pixels).save(path)
        elif kind == 1:
            Image.fromarray(pixels).save(path, quality=85)
        elif kind == 2:
            Image.fromarray(pixels[:, :, 0], "L").save(path)
        elif kind == 3:
            Image.fromarray(np.dstack([pixels, pixels[:, :, :1]]), "RGBA").save(path)
        else:
            Image.fromarray(pixels[:, :, 0].astype(np.uint16) * 257).save(path)  # 16-bit gray
        paths.append(path)
    paths[5].write_bytes(b"")  # zero-byte
    paths[6].write_bytes(paths[6].read_bytes()[:60])  # truncated JPEG
    paths[7].write_text("not an image")
    paths[8].write_bytes(paths[8].read_bytes()[:-30])  # PNG without its end
    return paths


def test_decoding_in_a_process_pool_gives_the_pixels_and_reasons_of_one_process(tmp_path):
    from minnorm_audit.data import image_files

    paths = _image_folder(tmp_path)
    one = image_files._decode_image_files(paths, 16, processes=1)
    pooled = image_files._decode_image_files(paths, 16, processes=2)
    assert [item.reason for item in pooled] == [item.reason for item in one]
    assert sum(item.reason is not None for item in one) == 4
    assert [item.content_sha256 for item in pooled] == [item.content_sha256 for item in one]
    kept = [index for index, item in enumerate(one) if item.pixels is not None]
    assert torch.equal(torch.from_numpy(np.stack([pooled[i].pixels for i in kept])),
                       torch.from_numpy(np.stack([one[i].pixels for i in kept])))


def test_the_process_pool_is_used_for_many_files_on_several_cpus_and_never_with_workers_0(monkeypatch):
    from minnorm_audit.data import image_files

    monkeypatch.setattr(image_files.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(image_files, "_fork_available", lambda: True)
    assert image_files._decode_processes(1999, None) == 1  # few files: threads
    assert image_files._decode_processes(10_000, None) == 4  # one per CPU
    assert image_files._decode_processes(10_000, 2) == 2  # --workers 2
    assert image_files._decode_processes(10_000, 0) == 1  # --workers 0: this process only
    monkeypatch.setattr(image_files.os, "sched_getaffinity", lambda _pid: {0}, raising=False)
    assert image_files._decode_processes(10_000, None) == 1  # one CPU
