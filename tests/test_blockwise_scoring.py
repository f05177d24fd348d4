"""Scoring a large run block by block gives the audit that full arrays give.

Above ``training.loop.DENSE_RESULT_ELEMENTS`` examples x classes, fit() keeps no full per-class
arrays and the audit reads the trained state in blocks of about
``score_run.SCORE_BLOCK_ELEMENTS`` examples x classes. Here both limits are lowered so that a small run takes that path, and its
examples table must equal the one scored from full arrays.
"""

from __future__ import annotations

import importlib

import numpy as np
import pandas as pd
import pytest

import minnorm_audit
from minnorm_audit import score_run

# The modules, not the audit() and fit() functions exported under the same names.
audit_module = importlib.import_module("minnorm_audit.audit")
from minnorm_audit.training import loop as fit_module


def flipped_digits(count: int = 600, flips: int = 60):
    datasets = pytest.importorskip("sklearn.datasets")
    features, labels = datasets.load_digits(return_X_y=True)
    features, labels = features[:count].astype(np.float32), labels[:count].copy()
    rng = np.random.default_rng(1)
    flipped = rng.choice(count, flips, replace=False)
    labels[flipped] = (labels[flipped] + rng.integers(1, 10, size=flips)) % 10
    return features, labels, flipped


@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [
        {"multiplier_store": "dense"},
        {"multiplier_store": "compact", "multiplier_slots": 3},
        {"multiplier_store": "dense", "score_state": "average"},
    ],
    ids=["dense-violation", "compact-violation", "dense-average"],
)
def test_blockwise_scoring_equals_scoring_from_full_arrays(tmp_path, monkeypatch, options):
    features, labels, flipped = flipped_digits()
    settings = dict(epochs=6, device="cpu", seed=0, deterministic=True, **options)
    whole = minnorm_audit.audit((features, labels), out=tmp_path / "whole", **settings)

    monkeypatch.setattr(fit_module, "DENSE_RESULT_ELEMENTS", 0)
    monkeypatch.setattr(score_run, "SCORE_BLOCK_ELEMENTS", 1280)  # 128 rows: 5 blocks, the last partial
    fitted = []
    original_fit = audit_module.fit
    monkeypatch.setattr(audit_module, "fit", lambda *a, **k: fitted.append(original_fit(*a, **k)) or fitted[-1])
    blocks = minnorm_audit.audit((features, labels), out=tmp_path / "blocks", **settings)

    result = fitted[0]
    assert result.final_multipliers is None and result.mean_violations is None and result.final_outputs is None
    assert result.final_margins is not None and result.final_margins.shape == (len(labels),)
    # The predicted class comes from the margin pass too; the frames below compare it.
    assert result.final_predicted is not None and result.final_predicted.dtype == np.int64
    assert "predicted_label" in blocks.examples
    pd.testing.assert_frame_equal(blocks.examples, whole.examples)
    # Not a vacuous comparison: the run found the flips.
    top = np.argsort(-whole.examples["difficulty"].to_numpy())[: len(flipped)]
    assert len(set(top) & set(flipped)) >= 0.6 * len(flipped)


def test_class_multipliers_column_is_left_out_above_its_class_limit(tmp_path, monkeypatch):
    features, labels, _ = flipped_digits(300, 30)
    monkeypatch.setattr(score_run, "CLASS_MULTIPLIERS_MAX_CLASSES", 5)
    result = minnorm_audit.audit((features, labels), out=tmp_path / "run", epochs=2, device="cpu")
    assert "class_multipliers" not in result.examples.columns
    written = pd.read_parquet(tmp_path / "run" / "examples.parquet")
    assert "class_multipliers" not in written.columns
    assert {"difficulty", "flag", "suggested_label", "margin"} <= set(written.columns)


def test_predicted_classes_of_single_and_multi_output():
    import torch

    from minnorm_audit.training import predicted_classes

    assert predicted_classes(torch.tensor([[0.3], [-0.2], [0.0]])).tolist() == [1, 0, 0]
    assert predicted_classes(np.array([[0.1, 0.5, -1.0], [2.0, 0.0, 1.0]])).tolist() == [1, 0]
