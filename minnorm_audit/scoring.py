"""From multipliers to per-example scores, suggested labels and flags.

Pure numpy functions on arrays, one value per example. ``difficulty``: higher means
more suspect.

The default scored state is the mean margin violation per competing class (see
``training.config.SCORE_STATES``); these functions apply to it and to multipliers alike.

Why the max over competing classes: a mislabeled example is pushed toward ONE other
class (its true one), so its multiplier mass concentrates in one column; a clean
example near several classes spreads a smaller mass. The prototype measured AUROC
0.98 for the max against 0.93 for the sum (0.76-0.88 under asymmetric noise), and
benchmarks/label_noise.py re-measures it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Statistic = Literal["max", "sum"]
# "conflicting": copies with different labels the evidence cannot settle (score_duplicates.py).
FLAGS = ("mislabeled", "hard", "outlier", "conflicting", "ok")
# The default flag rule (calibrated thresholds, outliers, the inconclusive verdict) is
# in calibration.py; flag_examples below is the Otsu split of the overrides and the
# other score states.



def difficulty_scores(
    multipliers: np.ndarray, *, form: Literal["margin", "equality"] = "margin", statistic: Statistic = "max"
) -> np.ndarray:
    """Per-example difficulty from the multipliers (higher = more suspect).

    Parameters
    ----------
    multipliers : ndarray, shape (n_examples, width)
        Margin form: ``lambda_ij >= 0`` (own-label column zero). Equality form: ``mu_i``.
    form : {"margin", "equality"}, default="margin"
    statistic : {"max", "sum"}, default="max"
        Margin form only: the largest competing multiplier, or the total mass.

    Returns
    -------
    ndarray of float64, shape (n_examples,)
        Margin form: ``max_j lambda_ij`` (or ``sum_j``); equality form: ``||mu_i||_2``.
    """
    multipliers = np.asarray(multipliers, dtype=np.float64)
    if multipliers.ndim == 1:
        multipliers = multipliers[:, None]
    if form == "equality":
        return np.linalg.norm(multipliers, axis=1)
    if statistic == "max":
        return multipliers.max(axis=1)
    if statistic == "sum":
        return multipliers.sum(axis=1)
    raise ValueError(f"statistic must be 'max' or 'sum', got {statistic!r}")


def suggested_labels(multipliers: np.ndarray, given_labels: np.ndarray) -> np.ndarray:
    """The class the multipliers push each example toward (margin form).

    ``argmax_j lambda_ij`` where any multiplier is positive, else the given label. For
    the binary single-output form, the other class where ``lambda_i > 0``.

    Parameters
    ----------
    multipliers : ndarray, shape (n_examples, n_outputs)
    given_labels : ndarray of int, shape (n_examples,)

    Returns
    -------
    ndarray of int64, shape (n_examples,)
    """
    multipliers = np.asarray(multipliers, dtype=np.float64)
    given_labels = np.asarray(given_labels, dtype=np.int64)
    if multipliers.ndim == 1:
        multipliers = multipliers[:, None]
    pushed = multipliers.max(axis=1) > 0
    if multipliers.shape[1] == 1:
        return np.where(pushed, 1 - given_labels, given_labels)
    return np.where(pushed, multipliers.argmax(axis=1), given_labels)


def label_concentration(multipliers: np.ndarray) -> np.ndarray:
    """How strongly an example's multiplier mass points at ONE competing class, in [0, 1].

    The share of the mass on the strongest competing class, rescaled so that 0 means
    spread evenly over the ``K - 1`` competing classes and 1 means all on one class
    (so one threshold works for any class count). 0 for examples with no mass; the
    binary form (one competing class) is 1 wherever the multiplier is positive.

    Parameters
    ----------
    multipliers : ndarray, shape (n_examples, K)
        Per-class multiplier mass (own-label column zero).
    """
    multipliers = np.asarray(multipliers, dtype=np.float64)
    if multipliers.ndim == 1:
        multipliers = multipliers[:, None]
    competing_classes = max(multipliers.shape[1] - 1, 1)
    total = multipliers.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, multipliers.max(axis=1) / np.where(total > 0, total, 1.0), 0.0)
    if competing_classes == 1:
        return np.where(total > 0, 1.0, 0.0)
    uniform = 1.0 / competing_classes
    return np.where(total > 0, np.clip((share - uniform) / (1.0 - uniform), 0.0, 1.0), 0.0)


def percentile_ranks(scores: np.ndarray) -> np.ndarray:
    """Rank percentile of each score in [0, 100]; ties share their average rank."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        return scores.copy()
    if scores.size == 1:
        return np.array([100.0])
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = (np.cumsum(counts) - counts) + 0.5 * (counts - 1)
    return 100.0 * average_rank[inverse] / (scores.size - 1)


def otsu_threshold(scores: np.ndarray, *, bins: int = 256, log_scale: bool = True) -> float:
    """The threshold that best splits ``scores`` into two groups (Otsu's method on a
    histogram of ``log1p(scores)``, or of the scores themselves with
    ``log_scale=False``): the low group of fitted examples and the high group that
    needed large multipliers (or violated their margins most)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not log_scale:
        finite = scores[np.isfinite(scores)]
        if finite.size == 0 or finite.max() == finite.min():
            return float("inf")
        counts, edges = np.histogram(finite, bins=bins)
        return float(edges[_otsu_split(counts, 0.5 * (edges[:-1] + edges[1:])) + 1])
    positive = np.log1p(np.clip(scores, 0.0, None))
    if positive.size == 0 or positive.max() == positive.min():
        return float("inf")
    counts, edges = np.histogram(positive, bins=bins)
    return float(np.expm1(edges[_otsu_split(counts, 0.5 * (edges[:-1] + edges[1:])) + 1]))


def _otsu_split(counts: np.ndarray, centers: np.ndarray) -> int:
    """Index of the last histogram bin of the low group (largest between-class variance)."""
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(counts * centers)
    mass_high = mass_low[-1] - mass_low
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_low = mass_low / weight_low
        mean_high = mass_high / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return int(np.argmax(between))


def flag_examples(
    difficulty: np.ndarray,
    concentration: np.ndarray,
    *,
    flag_fraction: float | None = None,
    threshold: float | None = None,
    concentration_threshold: float = 0.1,
    log_scale: bool = True,
) -> tuple[np.ndarray, dict[str, float | str]]:
    """Turn scores into ``"mislabeled"`` / ``"hard"`` / ``"ok"``.

    Rule: an example is flagged when its difficulty is at least the threshold; a flagged
    example is ``"mislabeled"`` when at least ``concentration_threshold`` of its
    multiplier mass points at one other class (the suggested label), otherwise
    ``"hard"``. The threshold is, in order of precedence: ``threshold``; the score at
    the top ``flag_fraction`` of examples; Otsu's split of the score distribution.
    Examples with zero difficulty are never flagged.

    Parameters
    ----------
    difficulty : ndarray, shape (n_examples,)
    concentration : ndarray, shape (n_examples,)
        From :func:`label_concentration`.
    flag_fraction : float, optional
        In (0, 1].
    threshold : float, optional
    concentration_threshold : float, default=0.1
        Measured on digits with 10% flips: at 0.1 nearly all caught flips are
        called mislabeled (benchmarks/label_noise.py).

    Returns
    -------
    flags : ndarray of str, shape (n_examples,)
    rule : dict
        The thresholds used and how the difficulty threshold was chosen.
    """
    difficulty = np.asarray(difficulty, dtype=np.float64)
    concentration = np.asarray(concentration, dtype=np.float64)
    if threshold is not None:
        chosen, method = float(threshold), "set with --threshold"
    elif flag_fraction is not None:
        if not 0 < flag_fraction <= 1:
            raise ValueError(f"flag_fraction must be in (0, 1], got {flag_fraction}")
        count = max(1, int(round(flag_fraction * difficulty.size)))
        chosen = float(np.sort(difficulty)[::-1][count - 1]) if difficulty.size else float("inf")
        method = f"top {flag_fraction:g} of examples by difficulty"
    else:
        chosen = otsu_threshold(difficulty, log_scale=log_scale)
        method = "Otsu split of log(1 + difficulty)" if log_scale else "Otsu split of difficulty"
    flagged = (difficulty >= chosen) & (difficulty > 0)
    flags = np.full(difficulty.shape, "ok", dtype=object)
    flags[flagged & (concentration >= concentration_threshold)] = "mislabeled"
    flags[flagged & (concentration < concentration_threshold)] = "hard"
    rule = {
        "difficulty_threshold": chosen,
        "difficulty_threshold_method": method,
        "concentration_threshold": float(concentration_threshold),
        "rule": (
            "flagged when difficulty >= difficulty_threshold and difficulty > 0; "
            "mislabeled when label_concentration >= concentration_threshold, else hard"
        ),
    }
    return flags.astype(str), rule

