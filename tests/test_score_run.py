"""From the violation state to difficulty, suggested label and flags (score_run.score_classification),
on hand-made training results whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minnorm_audit.audit import AuditOptions
from minnorm_audit.data import LoadedDataset
from minnorm_audit.score_run import score_classification
from minnorm_audit.training import FitResult, TrainConfig


def loaded_for(labels: np.ndarray, class_names: list[str]) -> LoadedDataset:
    return LoadedDataset(
        kind="table", task="classification", root=None, sources=[str(i) for i in range(len(labels))],
        inputs=torch.zeros(len(labels), 2), targets=torch.as_tensor(labels), class_names=class_names,
        target_names=[], feature_names=["a", "b"], set_aside=[], fingerprint="x", image_size=None,
    )


def result_for(mean_violations: np.ndarray, labels: np.ndarray) -> FitResult:
    zeros = np.zeros_like(mean_violations, dtype=np.float32)
    return FitResult(final_multipliers=zeros, average_multipliers=zeros, labels=labels,
                     final_outputs=zeros, mean_violations=mean_violations.astype(np.float32))


def test_violation_state_flags_contradicted_labels_mislabeled_and_ambiguous_ones_hard():
    rng = np.random.default_rng(0)
    count = 200
    labels = rng.integers(0, 3, size=count)
    # Fitted examples: every competing class well satisfied (violation about -1).
    violations = rng.normal(-1.0, 0.1, size=(count, 3))
    # The own-label column holds +margin in real runs (-g of the own column); it must be ignored.
    violations[np.arange(count), labels] = 1.0
    # Flips among classes a and b; ambiguous examples of class c (a group of its own,
    # but one that on average never preferred another class: no error group there).
    flipped = np.flatnonzero(labels < 2)[:10]
    ambiguous = np.flatnonzero(labels == 2)[:10]
    true_class = (labels[flipped] + 1) % 3
    violations[flipped, true_class] = 2.0  # the network preferred the true class by one logit
    other = (labels[ambiguous] + 2) % 3
    violations[ambiguous, other] = 0.7  # inside the margin, but never preferred
    examples, rule = score_classification(result_for(violations, labels), loaded_for(labels, ["a", "b", "c"]),
                                          AuditOptions(train=TrainConfig()))
    flag = examples["flag"].to_numpy()
    assert (flag[flipped] == "mislabeled").all()
    assert (flag[ambiguous] == "hard").all()
    rest = np.setdiff1d(np.arange(count), np.concatenate([flipped, ambiguous]))
    assert (flag[rest] == "ok").all()
    names = np.array(["a", "b", "c"])
    assert (examples["suggested_label"].to_numpy()[flipped] == names[true_class]).all()
    # Hard examples keep their given label; their competing class is still reported.
    assert (examples["suggested_label"].to_numpy()[ambiguous] == names[labels[ambiguous]]).all()
    assert (examples["competing_label"].to_numpy()[ambiguous] == names[other]).all()
    np.testing.assert_allclose(examples["difficulty"].to_numpy()[flipped], 2.0, rtol=1e-6)
    # The count-then-rank rule (calibration.calibrated_flags): per class, written down.
    assert rule["hard_z"] == 2.5 and rule["difficulty_threshold"] is None
    assert [row["class"] for row in rule["class_thresholds"]] == ["a", "b", "c"]
    assert all(row["hard_from_difficulty"] < 0.7 for row in rule["class_thresholds"])
    # Ten errors among 200: the classes with flips have error groups of about their size.
    assert [row["error_group"] for row in rule["class_thresholds"]] == [True, True, False]
    assert sum(row["expected_errors"] for row in rule["class_thresholds"]) == pytest.approx(10, abs=1)
    assert rule["expected_errors_among_flagged"] == pytest.approx(10, abs=1)
    # Final outputs of zeros: the network predicts no label at all, so the audit is inconclusive.
    assert "has not learned" in rule["inconclusive"]["reason"]


def test_overrides_keep_the_difficulty_threshold():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, size=100)
    violations = rng.normal(-1.0, 0.1, size=(100, 3))
    violations[np.arange(100), labels] = 1.0
    violations[:5, :] = 2.0
    violations[np.arange(5), labels[:5]] = 1.0
    examples, rule = score_classification(result_for(violations, labels), loaded_for(labels, ["a", "b", "c"]),
                                          AuditOptions(train=TrainConfig(), flag_fraction=0.05))
    assert (examples["flag"][:5] != "ok").all() and (examples["flag"][5:] == "ok").all()
    assert rule["difficulty_threshold_method"] == "top 0.05 of examples by difficulty"


def test_binary_violation_state_reads_the_single_output_column():
    labels = np.array([0, 1, 0, 1, 0, 1] * 10)
    violations = np.full((len(labels), 1), -1.0)
    violations[:3, 0] = 2.5  # examples 0-2 are on the wrong side of the boundary
    examples, _ = score_classification(result_for(violations, labels), loaded_for(labels, ["no", "yes"]),
                                       AuditOptions(train=TrainConfig()))
    assert list(examples["flag"][:3]) == ["mislabeled"] * 3
    assert (examples["flag"][3:] == "ok").all()
    assert list(examples["suggested_label"][:3]) == ["yes", "no", "yes"]
