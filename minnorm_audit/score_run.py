"""Scoring a training run: the trained state (a FitResult) -> the examples table and
its flag rule, the "score" step of the data path. The arithmetic is scoring.py's pure
numpy functions; this module reads the run's state into them a block of rows at a time
and lays the answers out as the rows of ``examples.parquet``.

Which multipliers are scored (the crux, measured in benchmarks/label_noise.py; written
when "average" was the default state, which is now "violation", see
``training.config.SCORE_STATES``): the **mean of the multipliers over all epochs**
("average" state), read with the **max over competing classes**, after a fixed budget
of ``epochs`` epochs. The final multipliers are a worse detector: once the flipped
labels are memorized, clean hard examples carry large multipliers too (the
prototype's AUROC fell from 0.997 at 15-20 epochs to 0.85 at 200). On digits with 10%
symmetric flips (20 epochs, dual_lr 0.01) the final state gave AUROC 0.95 / AP 0.88
and the average 0.99 / 0.98. The average is a time integral of the multipliers, i.e.
a doubly integrated constraint violation, which weighs the early epochs where the
network still follows the majority.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .data import LoadedDataset
from .scoring import difficulty_scores, flag_examples, label_concentration, percentile_ranks, suggested_labels
from .training import FitResult, output_margins

if TYPE_CHECKING:
    from .options import AuditOptions

# Scoring reads the trained state in blocks of about this many examples x classes
# (32 MB per float64 temporary).
SCORE_BLOCK_ELEMENTS = 1 << 22
# examples.parquet's class_multipliers column (one float per class and example) is
# written up to this many classes: at 1,000 classes and a million examples it alone
# would be 4 GB.
CLASS_MULTIPLIERS_MAX_CLASSES = 100


@dataclass
class ClassificationScores:
    """Per-example scores of a classification run, before flagging."""

    difficulty: np.ndarray
    concentration: np.ndarray
    competing: np.ndarray
    # One float32 row per example, or empty above CLASS_MULTIPLIERS_MAX_CLASSES.
    class_multipliers: list[np.ndarray] = field(default_factory=list)


def score_classification(
    result: FitResult, loaded: LoadedDataset, settings: AuditOptions
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The examples table of a classification audit."""
    labels = loaded.targets.numpy().astype(np.int64)
    keep_class_multipliers = len(loaded.class_names) <= CLASS_MULTIPLIERS_MAX_CLASSES
    scores = classification_scores(result, labels, len(loaded.class_names), settings, keep_class_multipliers)
    margins = result.final_margins
    if margins is None:  # a FitResult built by hand, with the outputs only
        if result.final_outputs is None:
            raise ValueError("the fit result holds neither final_margins nor final_outputs")
        margins = output_margins(torch.from_numpy(result.final_outputs), torch.from_numpy(labels)).numpy()
    flags, rule = classification_flags(scores, settings)
    suggested = np.where(flags == "mislabeled", scores.competing, labels)
    names = np.asarray(loaded.class_names, dtype=object)
    examples = pd.DataFrame(
        {
            "example_id": np.arange(len(labels), dtype=np.int64),
            "source": pd.array(loaded.sources, dtype="string"),
            "given_label": pd.array(names[labels], dtype="string"),
            "suggested_label": pd.array(names[suggested], dtype="string"),
            "competing_label": pd.array(names[scores.competing], dtype="string"),
            "difficulty": scores.difficulty,
            "difficulty_percentile": percentile_ranks(scores.difficulty),
            "flag": pd.array(flags, dtype="string"),
            "label_concentration": scores.concentration,
            "margin": margins,
        }
    )
    if keep_class_multipliers:
        examples["class_multipliers"] = scores.class_multipliers
    return examples, rule


def classification_scores(
    result: FitResult, labels: np.ndarray, class_count: int, settings: AuditOptions, keep_class_multipliers: bool
) -> ClassificationScores:
    """Difficulty, label concentration and competing class of every example, read a
    block of rows at a time: an examples x classes table in float64 would not fit in
    memory for an ImageNet-size audit."""
    count = len(labels)
    scores = ClassificationScores(
        difficulty=np.empty(count, dtype=np.float64),
        concentration=np.empty(count, dtype=np.float64),
        competing=np.empty(count, dtype=np.int64),
    )
    block_rows = max(1, SCORE_BLOCK_ELEMENTS // max(class_count, 1))
    for start in range(0, count, block_rows):
        stop = min(count, start + block_rows)
        block_labels = labels[start:stop]
        per_class, direction = scored_state(result, block_labels, class_count, settings.train.score_state, start)
        # The total of a violation state is the total positive push (the max skips -inf).
        summed = direction if settings.train.score_state == "violation" and settings.statistic == "sum" else per_class
        scores.difficulty[start:stop] = difficulty_scores(summed, statistic=settings.statistic)  # type: ignore[arg-type]
        scores.concentration[start:stop] = label_concentration(direction)
        scores.competing[start:stop] = suggested_labels(direction, block_labels)
        if keep_class_multipliers:
            final = class_mass(result.state_rows("final", start, stop), block_labels, class_count)
            scores.class_multipliers.extend(final.astype(np.float32))
    return scores


def classification_flags(scores: ClassificationScores, settings: AuditOptions) -> tuple[np.ndarray, dict[str, Any]]:
    """mislabeled / hard / ok for every example, and the rule that decided."""
    if settings.train.score_state != "violation":
        return flag_examples(
            scores.difficulty,
            scores.concentration,
            flag_fraction=settings.flag_fraction,
            threshold=settings.threshold,
            concentration_threshold=settings.concentration_threshold,
        )
    # Difficulty is in logit units here: difficulty - margin is how far, averaged over
    # training, the network preferred the competing class over the given label. The
    # cap keeps flipped examples from being memorized, so a preference > 0 is the
    # network contradicting the label; flagged examples without it are ambiguous.
    preference = scores.difficulty - settings.train.margin
    flags, rule = flag_examples(
        scores.difficulty, preference, flag_fraction=settings.flag_fraction, threshold=settings.threshold,
        concentration_threshold=settings.preference_threshold, log_scale=False,
    )
    rule.pop("concentration_threshold")
    rule["preference_threshold"] = settings.preference_threshold
    rule["rule"] = (
        "flagged when difficulty >= difficulty_threshold and difficulty > 0; mislabeled when "
        "difficulty - margin >= preference_threshold (the network preferred the suggested "
        "class over the given label on average over training), else hard"
    )
    return flags, rule


def scored_state(
    result: FitResult, labels: np.ndarray, class_count: int, state: str, start: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class scores ``(n, K)`` and the per-class push ``(n, K)`` that the suggested
    label and ``label_concentration`` are read from (both 0 on the own-label column),
    for the examples ``start : start + len(labels)``.

    ``"violation"``: the mean violation per competing class (training.SCORE_STATES); the
    own-label column is set below every competing one so the max ignores it, and the
    push is its positive part. ``"average"``/``"final"``: multipliers; the push is read
    from the final multipliers, since the average keeps the first epochs, where every
    class pushes on every example, and blurs the direction.
    """
    rows = np.arange(len(labels))
    stop = start + len(labels)
    if state == "violation":
        # Binary single output: class_mass puts its one column on the competing class.
        violations = class_mass(result.state_rows(state, start, stop), labels, class_count)
        violations[rows, labels] = -np.inf
        push = np.clip(violations, 0.0, None)
        push[rows, labels] = 0.0
        return violations, push
    per_class = class_mass(result.state_rows(state, start, stop), labels, class_count)
    return per_class, class_mass(result.state_rows("final", start, stop), labels, class_count)


def score_regression(
    result: FitResult, loaded: LoadedDataset, settings: AuditOptions, predictions: np.ndarray
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The examples table of a regression audit (equality form: ``|mu_i|``)."""
    multipliers = result.scored_multipliers(settings.train.score_state)
    difficulty = difficulty_scores(multipliers, form="equality")
    # Regression has no "other class": a large multiplier only says "hard".
    flags, rule = flag_examples(
        difficulty,
        np.zeros_like(difficulty),
        flag_fraction=settings.flag_fraction,
        threshold=settings.threshold,
        concentration_threshold=1.0,
    )
    rule["rule"] = "flagged hard when difficulty >= difficulty_threshold and difficulty > 0"
    targets = loaded.targets.numpy()
    examples = pd.DataFrame(
        {
            "example_id": np.arange(len(targets), dtype=np.int64),
            "source": pd.array(loaded.sources, dtype="string"),
            "given_target": targets[:, 0].astype(np.float64),
            "predicted_target": predictions[:, 0].astype(np.float64),
            "difficulty": difficulty,
            "difficulty_percentile": percentile_ranks(difficulty),
            "flag": pd.array(flags, dtype="string"),
        }
    )
    return examples, rule


def class_mass(multipliers: np.ndarray, labels: np.ndarray, class_count: int) -> np.ndarray:
    """Per-class multiplier mass ``(n, K)``; the binary single output is spread back
    onto the competing class's column."""
    if multipliers.shape[1] == 1 and class_count == 2:
        per_class = np.zeros((len(labels), 2), dtype=np.float64)
        per_class[np.arange(len(labels)), 1 - labels] = multipliers[:, 0]
        return per_class
    return multipliers.astype(np.float64)
