"""The flag rule: count each class's wrong labels, then flag that many from the top of
the ranking; the outlier check against the data's core; and the verdict on a network
that has not learned the data.

Pure numpy, one value per example, like scoring.py (score_run.py reads a trained run
into these functions). Measured with benchmarks/verdicts.py; the thresholds were chosen
on its tuning part only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# The hard and outlier thresholds, in robust z units (how many robust spreads, 1.4826 x
# the median absolute deviation, above the median of the class's own examples). Chosen
# on the tuning part of benchmarks/verdicts.py: hard takes under 1% of clean examples,
# the outlier test keeps planted junk (uniform noise, near-blank scans, 3% of the data)
# at 93-100% with under 2% of flips called outlier. The mislabeled flag has no
# threshold: error_groups counts, count_then_rank picks (see there for the figures).
HARD_Z = 2.5
OUTLIER_DISTANCE_Z = 2.5
# A class needs this many examples for the mixture that counts its errors.
MIN_MIXTURE_EXAMPLES = 10
# The fallback (a class without an error group) flags only where two groups fit the
# class's difficulties better than one by at least this much BIC: "strong" evidence on
# Kass & Raftery's scale (1995, J. Am. Stat. Assoc. 90:773; a BIC difference of 6,
# posterior odds of about 20:1). Below it one group explains the class, so its
# contradicted examples are the tail of the class (classes that overlap), not errors.
MIN_FALLBACK_BIC_EVIDENCE = 6.0
# A class needs this many examples for its own median and spread; smaller classes
# are measured against all examples.
MIN_CLASS_EXAMPLES = 5
# Core distances: mean chord distance (cosine geometry) to this many nearest core rows
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


def embedded_distances(block: np.ndarray, reference: np.ndarray, reference_squares: np.ndarray) -> np.ndarray:
    """Euclidean distances ``(len(block), len(reference))`` between embedded rows (for
    unit rows, the chord of the angle between them)."""
    squares = (block * block).sum(1)
    return np.sqrt(np.clip(squares[:, None] + reference_squares[None, :] - 2.0 * block @ reference.T, 0.0, None))


def nearest_mean_distances(
    features: np.ndarray, rows: np.ndarray, reference: np.ndarray, reference_embedded: np.ndarray,
    embed: Any, k: int, block_elements: int, out: np.ndarray,
) -> None:
    """``out[rows]`` = each row's mean distance to its ``k`` nearest rows among
    ``reference`` (indices into ``features``; ``reference_embedded`` those rows through
    ``embed``), a row never its own neighbour; NaN for a row with no other reference row."""
    block_rows = max(1, block_elements // len(reference))
    reference_squares = (reference_embedded * reference_embedded).sum(1)
    for start in range(0, len(rows), block_rows):
        block = rows[start:start + block_rows]
        chord = embedded_distances(embed(features[block]), reference_embedded, reference_squares)
        # A reference row is not its own neighbour.
        chord[block[:, None] == reference[None, :]] = np.inf
        keep = min(k, len(reference))
        nearest = np.partition(chord, keep - 1, axis=1)[:, :keep]
        finite = np.isfinite(nearest)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[block] = np.where(finite, nearest, 0.0).sum(1) / finite.sum(1)


def error_groups(
    difficulty: np.ndarray,
    labels: np.ndarray,
    class_count: int,
    margin: float,
    *,
    min_examples: int = MIN_MIXTURE_EXAMPLES,
    seed: int = 0,
) -> tuple[np.ndarray, list[dict[str, Any]], np.ndarray]:
    """Per given class, the examples that belong to another class: a one- or two-group
    Gaussian mixture on ``difficulty``, the second group kept only when it is real.

    Within one given class the difficulty of the correctly labeled examples forms one
    group (how far training had to push them), and examples whose label is wrong form a
    second, higher one: on average over training the network preferred another class
    for them, before or without memorizing them (a time average, so a flip the network
    memorizes in the last epochs keeps the evidence of the first ones). For each class
    with at least ``min_examples`` examples this fits one Gaussian group and two with
    one shared spread (scikit-learn's ``GaussianMixture``, ``covariance_type="tied"``,
    ``seed``) and keeps the second only
    when (1) the Bayesian information criterion prefers two groups and (2) the higher
    group's mean difficulty is above ``margin``: its examples were, on average over
    training, pushed toward another class more than the margin asks of a correct one,
    i.e. the group as a whole preferred another class. A class whose difficulties form
    one group (clean, or overlapping with a neighbour in a smooth continuum) gets no
    group and no count.

    Why one shared spread: the second group is the first shifted by the contradiction
    of a wrong label, not a wider copy of it. With a spread of its own it stretches
    over the long upper tail that a class's correct examples often have (a CNN on
    digits: the clean examples' 99th percentile 1.2-1.7 logits above their median),
    and the count doubles (benchmarks/verdicts.py, digits as images, 10% flips: 245
    flagged for 180 flips with free spreads, 161 with a shared one).

    Returns
    -------
    posterior : ndarray of float64, shape (n_examples,)
        Each example's probability of belonging to its class's error group (0 where the
        class has none).
    groups : list of dict, one per class
        ``examples``, ``error_group`` (bool), ``expected_errors`` (sum of the
        posteriors), the groups' means and weights, and both BICs.
    fallback_posterior : ndarray of float64, shape (n_examples,)
        For the classes without an error group, the upper group's posterior of the
        two-group fit all the same (0 elsewhere): the best guess there is of how
        likely an example the fallback rule flags is an error.
    """
    from sklearn.mixture import GaussianMixture

    difficulty = np.asarray(difficulty, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    posterior = np.zeros(len(difficulty))
    fallback_posterior = np.zeros(len(difficulty))
    groups: list[dict[str, Any]] = []
    for label in range(class_count):
        rows = np.flatnonzero((labels == label) & np.isfinite(difficulty))
        info: dict[str, Any] = {"examples": int(rows.size), "error_group": False, "expected_errors": 0.0}
        groups.append(info)
        if rows.size < min_examples or np.ptp(difficulty[rows]) <= 0:
            continue
        values = difficulty[rows, None]
        one = GaussianMixture(1, random_state=seed).fit(values)
        two = GaussianMixture(2, covariance_type="tied", random_state=seed, n_init=2).fit(values)
        high = int(np.argmax(two.means_[:, 0]))
        info.update(bic_one_group=float(one.bic(values)), bic_two_groups=float(two.bic(values)),
                    error_group_mean=float(two.means_[high, 0]), error_group_weight=float(two.weights_[high]),
                    main_group_mean=float(two.means_[1 - high, 0]),
                    separation=float(abs(two.means_[high, 0] - two.means_[1 - high, 0])
                                     / np.sqrt(float(np.ravel(two.covariances_)[0]))))
        spread = float(np.sqrt(np.ravel(two.covariances_)[0]))
        info["two_modes"] = bool(two_modes(info["main_group_mean"], info["error_group_mean"], spread,
                                           info["error_group_weight"]))
        belongs = two.predict_proba(values)[:, high]
        # The mixture's tail reaches below the main group; an example easier than
        # the main group's mean is not an error.
        belongs[difficulty[rows] <= info["main_group_mean"]] = 0.0
        if (info["bic_two_groups"] < info["bic_one_group"] and info["two_modes"] and info["error_group_mean"] > margin
                and info["error_group_weight"] < 0.5):
            posterior[rows] = belongs
            info.update(error_group=True, expected_errors=float(belongs.sum()))
        else:
            fallback_posterior[rows] = belongs
    return posterior, groups, fallback_posterior


def two_modes(low_mean: float, high_mean: float, spread: float, high_weight: float) -> bool:
    """Whether the two-group density ``(1 - w) N(low, s) + w N(high, s)`` has two modes:
    a dip between the groups, so that the upper group is a group of its own and not the
    upper tail of one skewed group (which a second Gaussian also fits better by BIC)."""
    grid = np.linspace(low_mean, high_mean, 512)
    density = ((1 - high_weight) * np.exp(-0.5 * ((grid - low_mean) / spread) ** 2)
               + high_weight * np.exp(-0.5 * ((grid - high_mean) / spread) ** 2))
    return bool(density.min() < density[-1] * (1 - 1e-9))


def count_then_rank(
    posterior: np.ndarray, difficulty: np.ndarray, labels: np.ndarray, suggested: np.ndarray,
) -> np.ndarray:
    """Flag, within each (given, suggested) pair of classes, as many examples as the pair
    is expected to hold errors (the rounded sum of its posteriors), from the top of the
    difficulty ranking: the count comes from the mixture, the order from the score.
    Returns a boolean mask, shape (n_examples,)."""
    posterior = np.asarray(posterior, dtype=np.float64)
    flagged = np.zeros(len(posterior), dtype=bool)
    candidates = np.flatnonzero(posterior > 0)
    if candidates.size == 0:
        return flagged
    pairs = labels[candidates].astype(np.int64) * (int(max(labels.max(), suggested.max())) + 1) + suggested[candidates]
    for pair in np.unique(pairs):
        rows = candidates[pairs == pair]
        count = int(round(float(posterior[rows].sum())))
        if count > 0:
            flagged[rows[np.argsort(-difficulty[rows], kind="stable")[:count]]] = True
    return flagged


def core_distances(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    neighbours: int = NEIGHBOURS,
    reference_rows: int = REFERENCE_ROWS,
    geometry: str = "cosine",
    seed: int = 0,
    block_elements: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's mean distance to its ``neighbours`` nearest rows of the data's core:
    the rows of a reference sample most of whose own nearest neighbours carry their
    label (more than half of them), whatever that label is.

    Junk rarely comes alone (noise images, blank scans, another domain): measured
    against every row, a cluster of it is its own neighbourhood. Junk carries arbitrary
    labels, so its neighbours (more junk) disagree with it and it is not in the core,
    and a bunch of alike junk stays far from the core; a flipped label is a real
    example of another class and sits among that class's core rows. Columns are
    standardized by the reference sample's spread, floored at a tenth of the median
    column spread (a pixel that is nearly constant in the data would otherwise blow
    noise up). ``geometry="cosine"``: rows then scaled to unit length and compared by
    the chord of their angle (in [0, 2]), for images and wide inputs, where a row's
    overall scale is brightness or contrast and every standardized row is far from the
    mean (``outlier_geometry``); ``"euclidean"``: the standardized rows as they are, for
    narrow tables, where a row near the mean has no stable direction and its magnitude
    is information. The reference sample holds up to ``reference_rows`` rows, a quota
    of every class (``seed``); a row never counts itself.

    Returns
    -------
    distance : ndarray of float64, shape (n_examples,)
    core : ndarray of bool, shape (n_examples,)
        The core rows (all in the reference sample).
    agreeing : ndarray of bool, shape (n_examples,)
        Whether most of the row's own nearest reference rows carry its label (what
        makes a reference row a core row, for every row).
    """
    features = np.asarray(features)
    labels = np.asarray(labels, dtype=np.int64)
    count = features.shape[0]
    core = np.zeros(count, dtype=bool)
    if count < 2:
        return np.zeros(count), core, np.ones(count, dtype=bool)
    rng = np.random.default_rng(seed)
    present = np.unique(labels)
    quota = max(neighbours + 1, reference_rows // max(len(present), 1))
    reference = np.sort(np.concatenate([
        rng.choice(rows, size=min(quota, rows.size), replace=False)
        for rows in (np.flatnonzero(labels == label) for label in present)
    ]))
    sample = features[reference].astype(np.float64)
    mean = sample.mean(0)
    std = sample.std(0)
    positive = std[std > 0]
    std = np.maximum(std, 0.1 * float(np.median(positive)) if positive.size else 1.0)

    if geometry not in ("cosine", "euclidean"):
        raise ValueError(f"geometry must be 'cosine' or 'euclidean', not {geometry!r}")

    def embed(block: np.ndarray) -> np.ndarray:
        block = (block.astype(np.float64) - mean) / std
        if geometry == "euclidean":
            return block
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        return block / np.where(norms > 0, norms, 1.0)

    reference_embedded = embed(sample)
    reference_squares = (reference_embedded * reference_embedded).sum(1)
    k = max(1, min(neighbours, len(reference) - 1))
    # Every row's share of its k nearest reference rows (itself excluded) that carry its label.
    agreement = np.empty(count)
    block_rows = max(1, block_elements // len(reference))
    for start in range(0, count, block_rows):
        rows = np.arange(start, min(count, start + block_rows))
        chord = embedded_distances(embed(features[rows]), reference_embedded, reference_squares)
        chord[rows[:, None] == reference[None, :]] = np.inf
        nearest = np.argpartition(chord, k - 1, axis=1)[:, :k]
        agreement[rows] = (labels[reference][nearest] == labels[rows, None]).mean(1)
    members = agreement[reference] > 0.5
    if members.sum() <= k:  # no class has neighbourhoods of its own: measure against every reference row
        members[:] = True
    core[reference[members]] = True
    distances = np.empty(count)
    nearest_mean_distances(features, np.arange(count), reference[members], reference_embedded[members], embed,
                           max(1, min(k, int(members.sum()) - 1)), block_elements, distances)
    return distances, core, agreement > 0.5


def calibrated_flags(
    difficulty: np.ndarray,
    labels: np.ndarray,
    class_count: int,
    margin: float,
    *,
    suggested: np.ndarray,
    distance: np.ndarray | None = None,
    core: np.ndarray | None = None,
    agreeing: np.ndarray | None = None,
    hard_z: float = HARD_Z,
    outlier_distance_z: float = OUTLIER_DISTANCE_Z,
    seed: int = 0,
    floor: float = 1e-9,
) -> tuple[np.ndarray, dict[str, Any]]:
    """``mislabeled`` / ``hard`` / ``outlier`` / ``ok``: count the errors, then flag them.

    1. ``mislabeled``: per given class, how many of its examples belong to another
       class (:func:`error_groups`, a mixture on the training-averaged difficulty, so a
       flip the network memorizes late still counts), then that many from the top of
       the difficulty ranking within each (given, suggested) pair
       (:func:`count_then_rank`).
    2. ``hard``: not counted as an error, but the preference for another class
       (``difficulty - margin``) is at least ``hard_z`` robust spreads (1.4826 x MAD)
       above the median of its class's examples: fitted far worse than its class.
    3. ``outlier`` (overrides both): far from the data's core (:func:`core_distances`):
       the distance at least ``outlier_distance_z`` robust spreads above the median
       distance of the core rows of its given class AND of its suggested class (a flip
       sits among the core of its true class), and its own nearest rows mostly do not
       carry its label. It belongs to no class; its suggested label means nothing.

    Parameters
    ----------
    difficulty : ndarray, shape (n_examples,)
        Training-averaged violation toward the strongest competing class, in logits.
    labels, suggested : ndarray of int, shape (n_examples,)
        Given labels and the competing class each example is pushed toward.
    class_count : int
    margin : float
        The constraints' margin (difficulty above it: another class preferred on average).
    distance, core, agreeing : ndarray, shape (n_examples,), optional
        From :func:`core_distances`; without the first two nothing is called an
        outlier. A row whose own neighbours mostly share its label (``agreeing``) is
        in a neighbourhood of its class, however far out: the tail of a small clean
        class, not junk.

    Returns
    -------
    flags : ndarray of str, shape (n_examples,)
    rule : dict
        ``mislabeled`` mask's posteriors summed (``expected_errors_among_flagged``), the
        per-class groups, medians and spreads.
    """
    difficulty = np.asarray(difficulty, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    suggested = np.asarray(suggested, dtype=np.int64)
    posterior, groups, fallback_posterior = error_groups(difficulty, labels, class_count, margin, seed=seed)
    mislabeled = count_then_rank(posterior, difficulty, labels, suggested) & (suggested != labels)
    # A class without an error group: no count to take, so an example is called
    # mislabeled only where the network contradicted its label, on average over
    # training, by a full margin (preferred another class by at least the margin a
    # correct label must win by), and only where the class is not one group (or too
    # small to tell): the contradicted tail of one group is overlap, not errors.
    for group in groups:
        one_group = ("bic_one_group" in group
                     and group["bic_one_group"] - group["bic_two_groups"] < MIN_FALLBACK_BIC_EVIDENCE)
        group["fallback"] = bool(not group["error_group"] and not one_group)
    falls_back = np.array([group["fallback"] for group in groups] + [False], dtype=bool)
    contradicted = falls_back[np.clip(labels, 0, class_count)] & (difficulty - margin >= margin) & (suggested != labels)
    mislabeled |= contradicted
    posterior = np.where(contradicted, fallback_posterior, posterior)
    preference = difficulty - margin
    medians, scales = per_class_location_scale(preference, labels, class_count, floor=floor)
    z = (preference - medians[labels]) / scales[labels]
    flags = np.full(len(labels), "ok", dtype=object)
    flags[z >= hard_z] = "hard"
    flags[mislabeled] = "mislabeled"
    rule: dict[str, Any] = {"hard_z": float(hard_z), "outlier_distance_z": float(outlier_distance_z),
                            "class_groups": groups,
                            "class_medians": medians, "class_scales": scales}
    if distance is not None and core is not None:
        distance = np.asarray(distance, dtype=np.float64)
        core = np.asarray(core, dtype=bool)
        # The null: the core rows' own distances (each row never its own neighbour).
        # (A class with fewer than MIN_CLASS_EXAMPLES core rows takes every core row's.)
        distance_medians, distance_scales = per_class_location_scale(
            distance[core], labels[core], class_count, floor=floor)
        distance_scales = np.maximum(distance_scales, MIN_RELATIVE_DISTANCE_SPREAD * distance_medians)
        far_given = (distance - distance_medians[labels]) / distance_scales[labels]
        far_suggested = (distance - distance_medians[suggested]) / distance_scales[suggested]
        with np.errstate(invalid="ignore"):
            outlier = np.fmin(far_given, far_suggested) >= outlier_distance_z
        if agreeing is not None:
            outlier &= ~np.asarray(agreeing, dtype=bool)
        flags[outlier] = "outlier"
        rule.update(distance_medians=distance_medians, distance_scales=distance_scales)
    flagged = flags == "mislabeled"
    rule["expected_errors_among_flagged"] = float(posterior[flagged].sum())
    rule["expected_errors"] = float(sum(group["expected_errors"] for group in groups))
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
