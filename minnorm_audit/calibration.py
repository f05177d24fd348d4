"""The calibrated flag rule: thresholds set by what each class's own examples show, the
outlier check, and the verdict on a network that has not learned the data.

Pure numpy, one value per example, like scoring.py (score_run.py reads a trained run
into these functions). Measured with benchmarks/verdicts.py; the thresholds were chosen
on its tuning part only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The calibrated rule's thresholds, in robust z units (how many robust spreads, 1.4826 x
# the median absolute deviation, above the median of the class's own examples). Chosen
# on the tuning part only (digits, gmm-k5-d16, gmm-k10-d32; benchmarks/verdicts.py,
# seed 0): at 2.5 the mislabeled flag had precision 0.99 / recall 0.97 on 10% flips
# and called 9% of correct-but-ambiguous rows mislabeled (a 2.0 threshold: recall
# +1%, ambiguous +1.5%; 3.0: digits recall 0.77); hard took 1% of clean examples (2.0:
# 2.7%); the outlier pair kept 77% of planted outliers at 2% of clean examples
# (distance 2.25: 85% at 3%).
# The mislabeled threshold is measured against the class's FITTED examples
# (benchmarks/flag_rules.py, tuning tables and the digits as images with the CNN, seed 0,
# mean flag F1 over symmetric/asymmetric x 10%/30% and the clean share flagged):
# every example as the null at 2.5: tables 0.921, CNN 0.511, clean up to 2.0%; fitted
# null at 2.5: 0.976, 0.786, clean up to 3.1%; at 3.0 (kept): 0.973, 0.749, clean 0.29%
# (tables) and 1.56% (CNN); re-estimated among the fitted examples without those above
# the threshold (kept): 0.974, 0.763, and on 784-feature proxies (benchmarks/highdim.py
# tuning part) 0.769 vs 0.745 fitted alone and 0.600 with every example. Trimming every
# example instead of the fitted ones: 0.970 / 0.685; dropping the "preferred on average"
# and "still violated" gates: 0.951 / 0.747 / 0.794 with more clean rows flagged.
MISLABELED_Z = 3.0
HARD_Z = 2.5
OUTLIER_DISTANCE_Z = 2.5
OUTLIER_FIT_Z = 0.5
# A class needs this many examples for its own median and spread; smaller classes
# are measured against all examples.
MIN_CLASS_EXAMPLES = 5
# The mislabeled null is re-estimated without the examples above the threshold at most
# this many times (it settles in a few).
NULL_ROUNDS = 50
# Neighbour distances: mean chord distance (cosine geometry) to this many nearest rows
# of a fixed random reference sample of at most REFERENCE_ROWS rows.
NEIGHBOURS = 10
REFERENCE_ROWS = 4096
# The spread of a class's neighbour distances is taken as at least this share of their
# median (so "far" means at least 25% farther than the class's median at z = 2.5).
MIN_RELATIVE_DISTANCE_SPREAD = 0.1
# The audit is inconclusive below these (see training_verdict).
MIN_TRAINING_ACCURACY = 0.5
MIN_BALANCED_ACCURACY_GAIN = 0.5


def robust_location_scale(values: np.ndarray, *, floor: float = 1e-9) -> tuple[float, float]:
    """Median and robust spread (1.4826 x the median absolute deviation, the standard
    deviation for normal data) of ``values``; the spread is at least ``floor``."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, float(floor)
    median = float(np.median(values))
    return median, max(1.4826 * float(np.median(np.abs(values - median))), float(floor))


def per_class_location_scale(
    values: np.ndarray, labels: np.ndarray, class_count: int, *, min_count: int = MIN_CLASS_EXAMPLES,
    floor: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`robust_location_scale` of ``values`` among each class's examples, ``(K,)``
    each; a class with fewer than ``min_count`` examples gets the figures of all examples."""
    values = np.asarray(values, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    overall = robust_location_scale(values, floor=floor)
    medians = np.full(class_count, overall[0])
    scales = np.full(class_count, overall[1])
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(class_count + 1))
    for label in range(class_count):
        rows = order[bounds[label]:bounds[label + 1]]
        if rows.size >= min_count:
            medians[label], scales[label] = robust_location_scale(values[rows], floor=floor)
    return medians, scales


def fitted_null(
    preference: np.ndarray, labels: np.ndarray, class_count: int, fitted: np.ndarray,
    medians: np.ndarray, scales: np.ndarray, threshold: float, *, floor: float = 1e-9,
    max_rounds: int = NULL_ROUNDS,
) -> tuple[np.ndarray, np.ndarray]:
    """Per class, the median and robust spread of the preference among the class's
    fitted examples that are not themselves above ``threshold``, ``(K,)`` each.

    Starts from the fitted examples (the network predicts their given label at the
    end) and re-estimates without the ones at or above ``threshold`` robust spreads
    until nothing changes (at most ``max_rounds`` times): a wide network memorizes
    many flipped labels by the end (784-feature digits, 30% flips: 84% of them), so
    "fitted" alone still lets them into the null. A class with fewer than
    MIN_CLASS_EXAMPLES such examples keeps ``medians`` / ``scales`` (every example).
    """
    null_medians, null_scales = medians, scales
    keep = fitted
    for _ in range(max_rounds):
        found = per_class_location_scale(preference[keep], labels[keep], class_count, floor=floor)
        enough = np.bincount(labels[keep], minlength=class_count) >= MIN_CLASS_EXAMPLES
        new_medians, new_scales = np.where(enough, found[0], medians), np.where(enough, found[1], scales)
        if np.allclose(new_medians, null_medians) and np.allclose(new_scales, null_scales):
            break
        null_medians, null_scales = new_medians, new_scales
        keep = fitted & ((preference - null_medians[labels]) / null_scales[labels] < threshold)
    return null_medians, null_scales


def neighbour_distances(
    features: np.ndarray,
    labels: np.ndarray | None = None,
    classes: np.ndarray | None = None,
    *,
    neighbours: int = NEIGHBOURS,
    reference_rows: int = REFERENCE_ROWS,
    seed: int = 0,
    block_elements: int = 1 << 22,
) -> np.ndarray:
    """Each row's mean chord distance to its ``neighbours`` nearest rows of a reference
    sample, after standardizing every column and scaling every row to unit length;
    with ``labels`` and ``classes``, to the nearest reference rows *labeled*
    ``classes[i]`` (the class the row is measured against).

    The chord distance ``sqrt(2 - 2 cos)`` is in [0, 2]: a row pointing the way no
    other row points (independent noise, another domain) sits at about sqrt(2) from
    everything, while a row of the data sits near rows like it. Measuring against one
    class's rows keeps a bunch of similar outliers from being each other's neighbours
    (their random labels split them up). The reference sample holds up to
    ``reference_rows`` rows, at least ``neighbours + 1`` of every class where the
    class has them, drawn with ``seed``; a row in it does not count itself. Memory is
    bounded by ``block_elements`` distances at a time.

    Parameters
    ----------
    features : ndarray, shape (n_examples, n_features)
    labels : ndarray of int, shape (n_examples,), optional
        The given labels (which reference rows belong to which class).
    classes : ndarray of int, shape (n_examples,), optional
        The class each row is measured against (default: ``labels``).

    Returns
    -------
    ndarray of float64, shape (n_examples,)
        NaN for a row whose class has no other reference row.
    """
    features = np.asarray(features)
    count = features.shape[0]
    if count < 2:
        return np.zeros(count)
    rng = np.random.default_rng(seed)
    if labels is None:
        reference = rng.choice(count, size=min(reference_rows, count), replace=False)
    else:
        labels = np.asarray(labels, dtype=np.int64)
        classes = labels if classes is None else np.asarray(classes, dtype=np.int64)
        present = np.unique(labels)
        quota = max(neighbours + 1, reference_rows // max(len(present), 1))
        reference = np.concatenate([
            rng.choice(rows, size=min(quota, rows.size), replace=False)
            for rows in (np.flatnonzero(labels == label) for label in present)
        ])
    reference.sort()
    sample = features[reference].astype(np.float64)
    mean = sample.mean(0)
    std = sample.std(0)
    std = np.where(std > 0, std, 1.0)

    def unit_rows(block: np.ndarray) -> np.ndarray:
        block = (block.astype(np.float64) - mean) / std
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        return block / np.where(norms > 0, norms, 1.0)

    reference_unit = unit_rows(sample)
    k = max(1, min(neighbours, len(reference) - 1))
    distances = np.empty(count)
    if labels is None:
        nearest_mean_distances(features, np.arange(count), reference, reference_unit, unit_rows, k,
                               block_elements, distances)
        return distances
    # Each row against the reference rows of its class only: the same neighbours as
    # masking all the others, at 1/K of the work.
    reference_labels = labels[reference]
    for label in np.unique(classes):
        columns = np.flatnonzero(reference_labels == label)
        rows = np.flatnonzero(classes == label)
        if columns.size == 0:
            distances[rows] = np.nan
            continue
        nearest_mean_distances(features, rows, reference[columns], reference_unit[columns], unit_rows, k,
                               block_elements, distances)
    return distances


def nearest_mean_distances(
    features: np.ndarray, rows: np.ndarray, reference: np.ndarray, reference_unit: np.ndarray,
    unit_rows: Any, k: int, block_elements: int, out: np.ndarray,
) -> None:
    """``out[rows]`` = each row's mean chord distance to its ``k`` nearest rows among
    ``reference`` (indices into ``features``; ``reference_unit`` their unit vectors), a
    row never its own neighbour; NaN for a row with no other reference row."""
    block_rows = max(1, block_elements // len(reference))
    for start in range(0, len(rows), block_rows):
        block = rows[start:start + block_rows]
        cosine = unit_rows(features[block]) @ reference_unit.T
        chord = np.sqrt(np.clip(2.0 - 2.0 * cosine, 0.0, None))
        # A reference row is not its own neighbour.
        chord[block[:, None] == reference[None, :]] = np.inf
        keep = min(k, len(reference))
        nearest = np.partition(chord, keep - 1, axis=1)[:, :keep]
        finite = np.isfinite(nearest)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[block] = np.where(finite, nearest, 0.0).sum(1) / finite.sum(1)


def distance_scores(
    distance: np.ndarray,
    labels: np.ndarray,
    class_count: int,
    *,
    competing_distance: np.ndarray | None = None,
    competing: np.ndarray | None = None,
    floor: float = 1e-9,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How far each example is from the rows of its class, in robust spreads above the
    median distance of that class's own examples (:func:`per_class_location_scale`);
    with the competing class's distances, the smaller of the two: far from the given
    class's rows AND from the competing class's (a flipped label sits among the rows
    of its true class). Returns the z-scores and the per-class medians and spreads."""
    distance = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    medians, scales = per_class_location_scale(distance, labels, class_count, floor=floor)
    # A class whose rows all point the same way (a few near-identical rows) has almost
    # no spread; a row must still be clearly farther than the class's median to count.
    scales = np.maximum(scales, MIN_RELATIVE_DISTANCE_SPREAD * medians)
    z = (distance - medians[labels]) / scales[labels]
    if competing_distance is not None and competing is not None:
        competing = np.asarray(competing, dtype=np.int64)
        competing_z = (np.asarray(competing_distance, dtype=np.float64) - medians[competing]) / scales[competing]
        z = np.fmin(z, np.where(competing == labels, z, competing_z))
    return z, medians, scales


def calibrated_flags(
    preference: np.ndarray,
    competitor_margin: np.ndarray,
    still_violated: np.ndarray,
    labels: np.ndarray,
    class_count: int,
    *,
    distance: np.ndarray | None = None,
    competing_distance: np.ndarray | None = None,
    competing: np.ndarray | None = None,
    fitted: np.ndarray | None = None,
    mislabeled_z: float = MISLABELED_Z,
    hard_z: float = HARD_Z,
    outlier_distance_z: float = OUTLIER_DISTANCE_Z,
    outlier_fit_z: float = OUTLIER_FIT_Z,
    floor: float = 1e-9,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``mislabeled`` / ``hard`` / ``outlier`` / ``ok`` from calibrated thresholds, not
    from a forced split: every threshold is set by what the examples of the same class
    show, so a clean dataset gets almost nothing flagged.

    The statistics (logits, from the mean margin violations over training):

    - ``preference``: how far, on average over training, the network preferred the
      strongest competing class over the given label (``difficulty - margin``);
    - ``competitor_margin``: how far that class beat *every* other class, the given
      label included (the preference less any second competitor above the given
      label): large only when the network settled on one other class;
    - per given class ``c``: the median and robust spread (1.4826 x MAD) of the
      preference among the examples labeled ``c``, the class's own null; ``z`` is an
      example's preference in robust spreads above its class's median;
    - for the ``mislabeled`` test, the same null among the examples labeled ``c`` that
      the network predicts as ``c`` at the end (``fitted``), re-estimated without the
      ones above the threshold (:func:`fitted_null`): the flipped labels are kept out
      of the null that should describe the class's correct labels. With
      every example in it, 30% flips inflate the spread until most of them stay
      under the threshold (tuning tables, 30% noise: recall 0.77 -> 0.96 symmetric,
      0.78 -> 0.95 asymmetric; benchmarks/flag_rules.py).

    Rule, in order (a later verdict overrides an earlier one):

    1. ``hard``: ``z >= hard_z``: the network fitted the example far worse than the
       examples of its class (not fitted, or inside its margin on average).
    2. ``mislabeled``: the competitor margin is above 0 (the network preferred the
       suggested class over the given label and over every other class, on average
       over training), is at least ``mislabeled_z`` robust spreads (of the class's
       fitted examples) above their median, and ``still_violated`` (at the end of
       training the given label still has not beaten the suggested class by the
       margin: the network has not settled on the given label).
    3. ``outlier``: the example is far from the rows of its given class, and, when
       it was called mislabeled, from those of the suggested class too (its
       neighbour distances, :func:`neighbour_distances`, each at least
       ``outlier_distance_z`` robust spreads above the median distance of that
       class's own examples) and the
       network did not fit it like a typical member of its class
       (``z >= outlier_fit_z``). It belongs to no class; its suggested label means
       nothing. The distance is calibrated per class like the rest: a class that
       is sparse in the inputs (e.g. one sitting at the data's centre, where the
       cosine geometry spreads its rows) does not become a class of outliers.

    Parameters
    ----------
    preference, competitor_margin : ndarray, shape (n_examples,)
    still_violated : ndarray of bool, shape (n_examples,)
        Whether the constraint toward the suggested class is violated at the end.
    labels : ndarray of int, shape (n_examples,)
    class_count : int
    distance : ndarray, shape (n_examples,), optional
        Neighbour distances to the rows of the given class; without them nothing
        is called an outlier.
    competing_distance : ndarray, shape (n_examples,), optional
        Neighbour distances to the rows of the competing class.
    competing : ndarray of int, shape (n_examples,), optional
        The competing class of every example (the given label when none).
    fitted : ndarray of bool, shape (n_examples,), optional
        Whether the network predicts the given label at the end (final margin > 0);
        without it, or for a class with fewer than MIN_CLASS_EXAMPLES fitted
        examples, the mislabeled null is every example of the class.

    Returns
    -------
    flags : ndarray of str, shape (n_examples,)
    rule : dict
        The thresholds, and per class the medians and spreads of the preference
        (``class_medians``, ``class_scales``; among the fitted examples:
        ``mislabeled_medians``, ``mislabeled_scales``) and of the distance
        (``distance_medians``, ``distance_scales``).
    """
    preference = np.asarray(preference, dtype=np.float64)
    competitor_margin = np.asarray(competitor_margin, dtype=np.float64)
    still_violated = np.asarray(still_violated, dtype=bool)
    labels = np.asarray(labels, dtype=np.int64)
    medians, scales = per_class_location_scale(preference, labels, class_count, floor=floor)
    z = (preference - medians[labels]) / scales[labels]
    null_medians, null_scales = medians, scales
    if fitted is not None:
        null_medians, null_scales = fitted_null(preference, labels, class_count, np.asarray(fitted, dtype=bool),
                                                medians, scales, mislabeled_z, floor=floor)
    competitor_z = (competitor_margin - null_medians[labels]) / null_scales[labels]
    flags = np.full(preference.shape, "ok", dtype=object)
    flags[z >= hard_z] = "hard"
    mislabeled = (competitor_margin > 0) & (competitor_z >= mislabeled_z) & still_violated
    flags[mislabeled] = "mislabeled"
    rule: dict[str, Any] = {
        "mislabeled_z": float(mislabeled_z),
        "hard_z": float(hard_z),
        "outlier_distance_z": float(outlier_distance_z),
        "outlier_fit_z": float(outlier_fit_z),
    }
    if distance is not None:
        # A mislabeled example is measured against its suggested class's rows as well:
        # a flipped label sits among the rows of its true class. (Not every example:
        # a bunch of similar outliers that the network sends to one class would be
        # each other's neighbours there.)
        distance_z, distance_medians, distance_scales = distance_scores(
            distance, labels, class_count, competing_distance=competing_distance,
            competing=None if competing is None else np.where(mislabeled, competing, labels), floor=floor)
        with np.errstate(invalid="ignore"):
            flags[(distance_z >= outlier_distance_z) & (z >= outlier_fit_z)] = "outlier"
        rule.update(distance_medians=distance_medians, distance_scales=distance_scales)
    rule.update(class_medians=medians, class_scales=scales, mislabeled_medians=null_medians,
                mislabeled_scales=null_scales)
    return flags.astype(str), rule


def training_verdict(
    training_accuracy: float,
    balanced_accuracy: float,
    class_count: int,
    *,
    min_accuracy: float = MIN_TRAINING_ACCURACY,
    min_balanced_gain: float = MIN_BALANCED_ACCURACY_GAIN,
) -> str | None:
    """Why the network has not learned the data well enough for per-example verdicts
    (one sentence), or None when it has.

    A label audit rests on a network that learned what the majority of the labels
    say; if it did not, every large violation is as likely the network's failure as
    the label's. Inconclusive when, at the end of training:

    - the network predicts the given label for fewer than ``min_accuracy`` of the
      examples (most labels unexplained: untrained, or most labels wrong); 200 digit
      images after 2 epochs: 22%, finished audits of the benchmark: 79-100% with 10%
      of the labels flipped;
    - its balanced accuracy on the given labels (mean recall over the classes) is
      less than ``min_balanced_gain`` of the way from chance (1 / classes) to 1: near
      chance, e.g. a network that predicts the largest class for everything (two
      classes: below 75%, ten: below 55%).

    The share of examples at their margin (``fraction_fitted``) is recorded but not
    used: under the norm term it rises and then falls again as training goes on (the
    minimum-norm solution keeps many examples exactly at the margin), so it does not
    say whether the network learned the data.
    """
    chance = 1.0 / max(class_count, 1)
    if training_accuracy < min_accuracy:
        return (f"the network predicts the given label for only {training_accuracy:.1%} of the examples "
                f"(below {min_accuracy:.0%}): it has not learned the data")
    needed = chance + min_balanced_gain * (1.0 - chance)
    if balanced_accuracy < needed:
        return (f"the network's balanced accuracy on the given labels is {balanced_accuracy:.1%}, near chance "
                f"({chance:.1%} for {class_count} classes; {needed:.1%} needed)")
    return None
