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

from .calibration import (
    MIN_FALLBACK_BIC_EVIDENCE,
    MIN_RELATIVE_DISTANCE_SPREAD,
    NEIGHBOURS,
    OUTLIER_DISTANCE_Z,
    calibrated_flags,
    core_distances,
    per_class_location_scale,
    training_verdict,
)
from .data import LoadedDataset
from .data.placement import LazyImages
from .score_duplicates import duplicates_pass
from .scoring import (
    difficulty_scores,
    flag_examples,
    label_concentration,
    percentile_ranks,
    suggested_labels,
)
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
# The outlier check's view of the inputs: images average-pooled to at most this side
# (noise and other-domain images stay far from the data at 16 x 16, and the cost stays
# small), and inputs wider than OUTLIER_MAX_FEATURES standardized and randomly
# projected down to it (cosines are kept to about 1 / sqrt(256)), so the table the
# check reads is at most examples x 256 float32. A 16 x 16 gray image fits unprojected:
# at 128 the projection blurred a cluster of 3% blank scans among 28-px digits into the
# data (92.6% of them called outlier at 256, none at 128; benchmarks/verdicts.py).
OUTLIER_IMAGE_SIDE = 16
OUTLIER_MAX_FEATURES = 256
# Images, text and inputs at least this wide are compared by angle (cosine geometry),
# narrower tables by Euclidean distance after standardizing. A standardized row of d
# independent columns has norm about sqrt(d) +- 0.7, so from a few dozen columns on no
# row sits near the mean, where its direction would be noise; in a 6-column table
# many do, and by angle they looked far from everything (clean overlapping mixtures:
# 3.9-7.2% called outlier by angle, 1.2-1.7% by distance; on 64-pixel digits angle
# is the better view: 0.6% vs 2.7% of clean rows; benchmarks/verdicts.py, tuning part).
COSINE_MIN_FEATURES = 32
# Text is read by the outlier check as counts of its hashed n-gram ids in this many
# buckets (a bag of n-grams, compared by angle).
OUTLIER_TEXT_BUCKETS = 256
# summary.json lists the per-class thresholds up to this many classes.
RULE_MAX_CLASSES = 100


@dataclass
class ClassificationScores:
    """Per-example scores of a classification run, before flagging."""

    difficulty: np.ndarray
    concentration: np.ndarray
    competing: np.ndarray
    # Violation state: how far the competing class beat every other class (the given
    # label included) on average over training, in logits (calibration.calibrated_flags).
    competitor_margin: np.ndarray | None = None
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
    distance = core = agreeing = None
    if settings.train.score_state == "violation":  # the other states keep the Otsu rule, without outliers
        features = outlier_features(loaded.inputs, settings.train.seed)
        if features is not None:
            geometry = ("cosine" if loaded.kind in ("images", "text") or features.shape[1] >= COSINE_MIN_FEATURES
                        else "euclidean")
            distance, core, agreeing = core_distances(features, labels, geometry=geometry, seed=settings.train.seed)
    flags, rule = classification_flags(scores, settings, labels=labels, class_count=len(loaded.class_names),
                                       distance=distance, core=core, agreeing=agreeing,
                                       class_names=loaded.class_names)
    rule["inconclusive"] = audit_verdict(result, labels, margins, len(loaded.class_names))
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
    # Duplicates, conflicting copies and leaks (score_duplicates.py): a separate pass after
    # the flag rule; it sets flag / suggested_label of the copies whose label the group and
    # the network contradict, and adds its own columns.
    examples, rule["duplicates"] = duplicates_pass(examples, loaded, result, settings)
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
        competitor_margin=np.empty(count, dtype=np.float64) if settings.train.score_state == "violation" else None,
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
        if scores.competitor_margin is not None:
            scores.competitor_margin[start:stop] = competitor_margins(per_class, settings.train.margin)
        if keep_class_multipliers:
            final = class_mass(result.state_rows("final", start, stop), block_labels, class_count)
            scores.class_multipliers.extend(final.astype(np.float32))
    return scores


def competitor_margins(violations: np.ndarray, margin: float) -> np.ndarray:
    """From mean violations per class (own-label column -inf): how far, on average over
    training, the strongest competing class beat every other class, the given label
    included: ``(v1 - m) - max(0, v2 - m)`` with ``v1 >= v2`` the two largest."""
    preference = violations.max(axis=1) - margin
    if violations.shape[1] < 3:  # one competing class
        return preference
    second = np.partition(violations, violations.shape[1] - 2, axis=1)[:, -2] - margin
    return preference - np.clip(second, 0.0, None)


def outlier_features(inputs: Any, seed: int) -> np.ndarray | None:
    """The inputs as the outlier check reads them (float32, at most examples x
    OUTLIER_MAX_FEATURES): tables as they are, images average-pooled to at most
    OUTLIER_IMAGE_SIDE, text (int64 n-gram ids) as id counts in OUTLIER_TEXT_BUCKETS
    buckets. Images streamed from disk (``LazyImages``) are decoded once more
    here, a block at a time, so the flags do not depend on where the pixels were kept
    (``--max-memory-gb``); None for fewer than two examples."""
    streamed = isinstance(inputs, LazyImages)
    if not (streamed or isinstance(inputs, torch.Tensor)) or inputs.shape[0] < 2:
        return None
    if not streamed and inputs.ndim == 2 and not inputs.is_floating_point():
        ids = inputs.long()
        counts = torch.zeros(ids.shape[0], OUTLIER_TEXT_BUCKETS)
        counts.scatter_add_(1, ids % OUTLIER_TEXT_BUCKETS, (ids != 0).float())  # id 0 is padding
        return counts.numpy()
    count = int(inputs.shape[0])
    rows = 4096 if not streamed else 256

    def take(positions: torch.Tensor | range) -> torch.Tensor:
        if streamed:
            return inputs.stack([int(position) for position in positions])
        return inputs[positions] if isinstance(positions, torch.Tensor) else inputs[positions.start:positions.stop]

    def pooled(block: torch.Tensor) -> torch.Tensor:
        block = block.float()
        if block.ndim == 4:
            side = (min(block.shape[2], OUTLIER_IMAGE_SIDE), min(block.shape[3], OUTLIER_IMAGE_SIDE))
            block = torch.nn.functional.adaptive_avg_pool2d(block, side)
        return block.reshape(block.shape[0], -1)

    blocks = [range(start, min(count, start + rows)) for start in range(0, count, rows)]
    width = pooled(take(range(0, 1))).shape[1]
    if width <= OUTLIER_MAX_FEATURES:
        return torch.cat([pooled(take(block)) for block in blocks]).numpy()
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(count, generator=generator)[:4096].sort().values
    reference = pooled(take(sample))
    mean, std = reference.mean(0), reference.std(0)
    # A column (pixel) that is nearly constant in the data would blow noise up: its
    # spread is floored at a tenth of the median column spread, as core_distances does.
    std = std.clamp_min(max(0.1 * float(std[std > 0].median()) if bool((std > 0).any()) else 1.0, 1e-6))
    projection = torch.randn(width, OUTLIER_MAX_FEATURES, generator=generator) / OUTLIER_MAX_FEATURES ** 0.5
    out = np.empty((count, OUTLIER_MAX_FEATURES), dtype=np.float32)
    for block in blocks:
        out[block.start:block.stop] = (((pooled(take(block)) - mean) / std) @ projection).numpy()
    return out


def audit_verdict(result: FitResult, labels: np.ndarray, margins: np.ndarray, class_count: int) -> dict[str, Any] | None:
    """``{"reason": ..., "training_accuracy": ..., ...}`` when the network has not
    learned the data well enough for per-example verdicts (calibration.training_verdict),
    else None. Training accuracy: the share of examples whose final margin is above 0
    (the network predicts the given label)."""
    if len(labels) == 0:
        return None
    correct = np.asarray(margins) > 0
    accuracy = float(correct.mean())
    sizes = np.bincount(labels, minlength=class_count)
    present = sizes > 0
    balanced = float((np.bincount(labels, weights=correct, minlength=class_count)[present] / sizes[present]).mean())
    reason = training_verdict(accuracy, balanced, class_count)
    if reason is None:
        return None
    fitted = result.history[-1].get("fraction_fitted") if result.history else None
    return {"reason": reason, "training_accuracy": accuracy, "balanced_accuracy": balanced,
            "fraction_fitted": None if fitted is None else float(fitted)}


def classification_flags(
    scores: ClassificationScores,
    settings: AuditOptions,
    *,
    labels: np.ndarray | None = None,
    class_count: int | None = None,
    distance: np.ndarray | None = None,
    core: np.ndarray | None = None,
    agreeing: np.ndarray | None = None,
    class_names: list[str] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """mislabeled / hard / outlier / ok for every example, and the rule that decided.

    The default (score state "violation", no ``--flag-fraction`` / ``--threshold``) is
    calibration.calibrated_flags: count each class's errors, then flag that many from
    the top of the ranking. With an override, the examples at or above the difficulty
    threshold are flagged: outlier when far from the data's core (as in the default
    rule), else mislabeled when the network preferred the competing class on average,
    else hard. Other score states keep the Otsu split of the multipliers.
    """
    override = settings.flag_fraction is not None or settings.threshold is not None
    margin = settings.train.margin
    if settings.train.score_state == "violation" and not override and labels is not None and class_count is not None:
        flags, rule = calibrated_flags(scores.difficulty, labels, class_count, margin, suggested=scores.competing,
                                       distance=distance, core=core, agreeing=agreeing, seed=settings.train.seed)
        return flags, describe_calibrated_rule(rule, margin, distance is not None, class_names)
    if settings.train.score_state != "violation":
        return flag_examples(
            scores.difficulty,
            scores.concentration,
            flag_fraction=settings.flag_fraction,
            threshold=settings.threshold,
            concentration_threshold=settings.concentration_threshold,
        )
    # Difficulty is in logit units here: difficulty - margin is how far, averaged over
    # training, the network preferred the competing class over the given label.
    preference = scores.difficulty - margin
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
    if distance is not None and core is not None and labels is not None and class_count is not None:
        # The outlier check of the default rule, among the flagged examples.
        medians, spreads = per_class_location_scale(distance[core], labels[core], class_count)
        spreads = np.maximum(spreads, MIN_RELATIVE_DISTANCE_SPREAD * medians)
        far = np.fmin((distance - medians[labels]) / spreads[labels],
                      (distance - medians[scores.competing]) / spreads[scores.competing])
        with np.errstate(invalid="ignore"):
            far_out = (far >= OUTLIER_DISTANCE_Z) & (flags != "ok")
        if agreeing is not None:
            far_out &= ~agreeing
        flags = np.where(far_out, "outlier", flags)
        rule["outlier_distance_z"] = OUTLIER_DISTANCE_Z
        rule["rule"] += (f"; a flagged example is an outlier instead when its distance to the data's core is at "
                         f"least {OUTLIER_DISTANCE_Z:g} robust spreads above the median of the core rows of its "
                         "given and of its competing class")
    return flags, rule


def describe_calibrated_rule(
    rule: dict[str, Any], margin: float, with_distance: bool, class_names: list[str] | None
) -> dict[str, Any]:
    """The calibrated rule as summary.json's flag_rule: the text, the figures, and per
    class (up to RULE_MAX_CLASSES) its error group (examples, expected errors) and the
    medians and spreads the hard and outlier tests use."""
    medians, scales = rule.pop("class_medians"), rule.pop("class_scales")
    groups = rule.pop("class_groups")
    distance_medians, distance_scales = rule.pop("distance_medians", None), rule.pop("distance_scales", None)
    text = (
        "mislabeled: per given class, a one- or two-group Gaussian mixture on difficulty (the training-averaged "
        "violation toward the strongest other class); a second group is kept when the BIC prefers it and its "
        f"mean difficulty is above the margin ({margin:g}: on average over training its examples preferred "
        "another class). Its expected size (the sum of the examples' posteriors) is the class's error count; "
        "that many examples are flagged from the top of the difficulty ranking within each (given, suggested) "
        "pair of classes. A class without such a group: mislabeled only where the network preferred another "
        "class by at least the margin on average (difficulty at least twice the margin), and only where two "
        f"groups still fit the class better than one by a BIC difference of at least {MIN_FALLBACK_BIC_EVIDENCE:g} "
        "(or the class is too small to tell); otherwise its contradicted tail is overlap, not errors. "
        f"hard: not counted as an error, and difficulty at least {rule['hard_z']:g} robust spreads (1.4826 x MAD) "
        "above the median of its class's examples. "
    )
    if with_distance:
        text += (f"outlier (overrides both): mean distance to the {NEIGHBOURS} nearest rows of the data's core (the "
                 "rows whose nearest neighbours mostly share their label; standardized inputs, by angle for images, text "
                 f"and inputs of {COSINE_MIN_FEATURES}+ columns, by Euclidean distance for narrower tables) at least "
                 f"{rule['outlier_distance_z']:g} robust spreads above the median distance of the core rows of its "
                 "given class and of its suggested class, and most of its own nearest rows carry other labels. ")
    else:
        text += "outlier: not checked. "
    text += "ok: everything else."
    described: dict[str, Any] = {
        "rule": text,
        "method": "count then rank: per-class mixture on difficulty for the count, the difficulty ranking for which",
        "difficulty_threshold": None,
        "difficulty_threshold_method": "per class (class_thresholds)",
        "outlier_checked": with_distance,
        **rule,
    }
    if class_names is not None and len(class_names) <= RULE_MAX_CLASSES:
        described["class_thresholds"] = [
            {"class": name, "examples": groups[c]["examples"], "error_group": groups[c]["error_group"],
             "fallback": groups[c].get("fallback", False),
             "expected_errors": groups[c]["expected_errors"],
             "median_difficulty": float(medians[c] + margin), "spread": float(scales[c]),
             "hard_from_difficulty": float(medians[c] + margin + rule["hard_z"] * scales[c]),
             **({} if distance_medians is None or not np.isfinite(distance_medians[c]) else {
                 "median_core_distance": float(distance_medians[c]), "distance_spread": float(distance_scales[c]),
                 "outlier_from_distance": float(distance_medians[c] + rule["outlier_distance_z"] * distance_scales[c]),
             })}
            for c, name in enumerate(class_names)
        ]
    return described


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
    if loaded.splits is not None:  # a split root's split per example
        examples["split"] = pd.array(loaded.splits, dtype="string")
    return examples, rule


def class_mass(multipliers: np.ndarray, labels: np.ndarray, class_count: int) -> np.ndarray:
    """Per-class multiplier mass ``(n, K)``; the binary single output is spread back
    onto the competing class's column."""
    if multipliers.shape[1] == 1 and class_count == 2:
        per_class = np.zeros((len(labels), 2), dtype=np.float64)
        per_class[np.arange(len(labels)), 1 - labels] = multipliers[:, 0]
        return per_class
    return multipliers.astype(np.float64)
