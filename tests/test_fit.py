"""fit() on real data with injected label flips; checkpoint/resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minnorm_audit.training import TrainConfig, TrainingError, build_model, fit, resolve_device

datasets = pytest.importorskip("sklearn.datasets")
metrics = pytest.importorskip("sklearn.metrics")


def flipped_digits(rate: float, seed: int):
    features, labels = datasets.load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), int(round(rate * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, size=len(flipped))) % 10
    mask = np.zeros(len(labels), dtype=bool)
    mask[flipped] = True
    return torch.tensor(features, dtype=torch.float32), labels, noisy, mask


@pytest.mark.slow
def test_mlp_on_digits_ranks_flipped_labels_first_and_recovers_them():
    inputs, clean, noisy, flipped = flipped_digits(0.1, seed=0)
    torch.manual_seed(0)
    result = fit(build_model("mlp", inputs, 10), inputs, torch.tensor(noisy), form="margin", num_outputs=10,
                 config=TrainConfig(epochs=20, device="cpu"))
    # The default scored state: mean violation per competing class, own label excluded.
    violations = result.scored_multipliers("violation").astype(np.float64)
    violations[np.arange(len(noisy)), noisy] = -np.inf
    difficulty = violations.max(axis=1)
    # Measured AUROC 0.998 (seed 0); the floor leaves room for platform noise.
    assert metrics.roc_auc_score(flipped, difficulty) >= 0.98
    assert metrics.average_precision_score(flipped, difficulty) >= 0.9  # measured 0.98
    suggested = violations.argmax(axis=1)
    assert (suggested[flipped] == clean[flipped]).mean() >= 0.85  # measured 0.93
    assert result.history[-1]["rank_stability"] > 0.8


def test_the_soft_margin_cap_bounds_every_multiplier_and_none_leaves_them_free():
    inputs, _, noisy, _ = flipped_digits(0.1, seed=2)
    inputs, targets = inputs[:400], torch.tensor(noisy[:400])
    capped = fit(build_model("mlp", inputs, 10), inputs, targets, form="margin", num_outputs=10,
                 config=TrainConfig(epochs=6, dual_lr=0.05, device="cpu", multiplier_cap=1.0))
    free = fit(build_model("mlp", inputs, 10), inputs, targets, form="margin", num_outputs=10,
               config=TrainConfig(epochs=6, dual_lr=0.05, device="cpu", multiplier_cap=None))
    # After the last epoch the cap is 1.0 x the 90th percentile of the largest
    # multipliers as they stood one epoch earlier; no multiplier may exceed the cap of
    # the epoch it was updated in, so the largest ones pile up at a common ceiling.
    largest = capped.final_multipliers.max(axis=1)
    ceiling = largest.max()
    assert (np.isclose(largest, ceiling, rtol=1e-6)).sum() >= 10
    free_largest = free.final_multipliers.max(axis=1)
    assert free_largest.max() > 1.5 * np.quantile(free_largest, 0.9)  # unbounded tail


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    inputs, _, noisy, _ = flipped_digits(0.1, seed=1)
    inputs, targets = inputs[:300], torch.tensor(noisy[:300])
    config = TrainConfig(epochs=4, dual_lr=0.05, device="cpu", batch_size=64)

    def train(epochs, checkpoint, resume=False):
        torch.manual_seed(0)
        model = build_model("mlp", inputs, 10)
        return fit(model, inputs, targets, form="margin", num_outputs=10,
                   config=TrainConfig(**{**config.to_dict(), "epochs": epochs}),
                   dataset_fingerprint="f", checkpoint_path=checkpoint, resume=resume)

    uninterrupted = train(4, tmp_path / "a.pt")
    train(2, tmp_path / "b.pt")
    resumed = train(4, tmp_path / "b.pt", resume=True)
    np.testing.assert_array_equal(resumed.final_multipliers, uninterrupted.final_multipliers)
    np.testing.assert_array_equal(resumed.average_multipliers, uninterrupted.average_multipliers)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]


def test_resume_refuses_checkpoint_of_other_data(tmp_path):
    inputs, _, noisy, _ = flipped_digits(0.1, seed=1)
    inputs, targets = inputs[:100], torch.tensor(noisy[:100])
    config = TrainConfig(epochs=1, device="cpu")
    fit(build_model("mlp", inputs, 10), inputs, targets, form="margin", num_outputs=10, config=config,
        dataset_fingerprint="one", checkpoint_path=tmp_path / "c.pt")
    with pytest.raises(TrainingError, match="another dataset"):
        fit(build_model("mlp", inputs, 10), inputs, targets, form="margin", num_outputs=10, config=config,
            dataset_fingerprint="two", checkpoint_path=tmp_path / "c.pt", resume=True)


def test_divergence_stops_with_a_message_naming_the_setting(tmp_path):
    inputs, _, noisy, _ = flipped_digits(0.1, seed=1)
    inputs, targets = inputs[:100] * 1e30, torch.tensor(noisy[:100])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(TrainingError, match="lower --lr or --dual-lr"):
        fit(model, inputs, targets, form="margin", num_outputs=10,
            config=TrainConfig(epochs=3, lr=1e30, optimizer="sgd", device="cpu"))


def test_auto_device_is_cpu_without_gpu_and_cuda_request_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(TrainingError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_channels_last_training_matches_the_default_layout(monkeypatch):
    """The CPU twin of the NHWC lever: a CNN trained channels-last (weights and batches)
    ends where the NCHW run ends, up to rounding."""
    import importlib

    setup = importlib.import_module("minnorm_audit.training.setup")
    from minnorm_audit.training import loop as fit_module
    images, _, noisy, _ = flipped_digits(0.1, seed=1)
    images = (images[:400] / 16.0).reshape(-1, 1, 8, 8)
    labels = torch.tensor(noisy[:400])
    config = TrainConfig(epochs=2, device="cpu")
    assert setup.uses_channels_last(build_model("cnn", images, 10), images)
    assert not setup.uses_channels_last(build_model("mlp", images, 10), images)

    def trained(layout_on: bool):
        monkeypatch.setattr(fit_module, "uses_channels_last", lambda model, inputs: layout_on)
        torch.manual_seed(0)
        model = build_model("cnn", images, 10)
        result = fit(model, images, labels, form="margin", num_outputs=10, config=config)
        # The second convolution: with one input channel both layouts are the same memory.
        conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][1]
        return result, conv.weight.is_contiguous(memory_format=torch.channels_last)

    nhwc, nhwc_weights = trained(True)
    nchw, nchw_weights = trained(False)
    assert nhwc_weights and not nchw_weights
    np.testing.assert_allclose(nhwc.final_outputs, nchw.final_outputs, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(nhwc.scored_multipliers("violation"), nchw.scored_multipliers("violation"),
                               rtol=1e-3, atol=1e-4)
