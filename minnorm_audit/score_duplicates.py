"""The duplicates pass of a classification audit: exact and near copies grouped
(duplicates.py), the labels of each group compared, conflicting copies settled with the
rest of the data's evidence, and copies across splits listed as leaks.

Columns it adds to ``examples.parquet`` (see report/parquet.py's descriptions):
``split`` (split roots only), ``duplicate_group``, ``duplicate_of``, ``duplicate_distance``,
``duplicate_kind``, ``duplicate_labels``, ``duplicate_verdict``, ``duplicate_evidence``
and ``leak``; and ``summary.json["duplicates"]`` (:func:`duplicates_pass`).

A group whose members carry different labels is settled by, in order: a strict
majority of its members' labels; else (a pair, the usual case) the network's
preference between the group's labels on the copies' inputs: how far each label beat
the other on each copy, on average over training (the violation state) plus at the
end (the final outputs); the network sees near-identical inputs under two labels and
follows the rest of the data. A copy whose label the evidence contradicts is
``mislabeled`` with the supported label as suggestion; a group whose evidence is
weaker than :data:`SETTLE_LOGITS` is ``conflicting`` (a person must decide).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .data import LazyImages, LoadedDataset
from .duplicates import (
    Pairs,
    calibrated_radius,
    content_keys,
    duplicate_groups,
    exact_pairs,
    merge_pairs,
    nearest_copy,
    pairs_within,
)
from .training import FitResult

if TYPE_CHECKING:
    from .options import AuditOptions

# Near copies: closer than this fraction of the median nearest-neighbour distance, in
# the feature space below (chosen on benchmarks/duplicates.py; cleanlab Datalab's rule
# is 0.13 x the median on its own features).
NEAR_FRACTION = {"penultimate": 0.2, "pixels": 0.5, "aligned": 0.5, "inputs": 0.1}
# Images: which features the near-copy search reads (benchmarks/duplicates.py compares them).
IMAGE_FEATURES = ("pixels", "aligned")
# Pooled pixels: each image average-pooled to this side per channel, then centred and
# scaled per image (a JPEG copy's brightness shift and a crop's zoom move little).
POOL_SIDE = 8
# A tie between labels in a group is settled when the network preferred one label over
# the other by at least this many logits on average over training and copies.
SETTLE_LOGITS = 0.25
# A group with more members than this share of the examples (and at least
# LARGE_GROUP_MIN) is not a set of copies but inputs that do not tell examples apart
# (blank images, a constant placeholder row): listed, never judged.
LARGE_GROUP_SHARE = 0.01
LARGE_GROUP_MIN = 20
# Verdicts of the duplicate pass.
VERDICTS = ("agree", "mislabeled", "supported", "conflicting", "too large")


def duplicate_features(loaded: LoadedDataset, result: FitResult | None, kind: str | None = None) -> tuple[torch.Tensor, str]:
    """The rows the near-copy search compares (float32 (N, F)) and their name:
    images by ``kind`` (``"pixels"``: pooled and normalized per image; ``"aligned"``:
    the same after moving each image to its moments' frame; ``"penultimate"``: the
    trained network's), tables by their standardized inputs."""
    if loaded.kind == "images" and getattr(loaded.inputs, "ndim", 0) == 4:  # not a backbone's features
        kind = kind or IMAGE_FEATURES[0]
        if kind == "penultimate":
            if result is None or result.model is None:
                raise ValueError("penultimate features need the trained model")
            from .training.features import penultimate_features

            return torch.from_numpy(penultimate_features(result.model, loaded.inputs)), kind
        if kind == "aligned":
            return aligned_pixels(loaded.inputs), "aligned"
        return pooled_pixels(loaded.inputs), "pixels"
    values = loaded.inputs.float()
    spread = values.std(0).clamp_min(1e-6)
    return (values - values.mean(0)) / spread, "inputs"


def pooled_pixels(images: Any, side: int = POOL_SIDE, block: int = 4096) -> torch.Tensor:
    """Images (N, C, H, W) average-pooled to ``side`` x ``side`` per channel, each row
    centred and scaled to unit norm x sqrt(features): float32 (N, C x side x side)."""
    parts = []
    for start in range(0, len(images), block):
        rows = images[start:start + block].float()
        rows = torch.nn.functional.adaptive_avg_pool2d(rows, (min(side, rows.shape[2]), min(side, rows.shape[3])))
        rows = rows.reshape(rows.shape[0], -1)
        rows = rows - rows.mean(1, keepdim=True)
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-6) * rows.shape[1] ** 0.5
        parts.append(rows)
    return torch.cat(parts)


def find_duplicates(loaded: LoadedDataset, result: FitResult | None, *, seed: int = 0,
                    features: str | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Exact and near copies among ``loaded``'s examples: ``{"pairs", "exact", "groups",
    "nearest", "distance", "record"}`` with the merged pairs, the exact pairs, the group
    per example (-1: none), each example's nearest copy (-1: none) and its distance,
    and the summary record (features, radius, median nearest-neighbour distance)."""
    started = time.perf_counter()
    count = len(loaded.targets)
    exact = exact_pairs(content_keys(loaded.inputs))
    # Images by default: two views, each with its own calibrated radius, their pairs
    # merged: pooled pixels (JPEG copies) and the same aligned on their moments
    # (shifted copies; benchmarks/duplicates.py measures each).
    names = [features] if features is not None else (list(IMAGE_FEATURES) if loaded.kind == "images" else ["inputs"])
    views = []
    near_parts = []
    for name in names:
        rows, name = duplicate_features(loaded, result, name)
        rows = rows.to(device)
        fraction = NEAR_FRACTION[name]
        radius, median = calibrated_radius(rows, fraction, seed=seed) if count > 1 else (0.0, 0.0)
        if radius > 0:
            near_parts.append(pairs_within(rows, radius))
        views.append({"features": name, "radius": radius, "median_nearest_distance": median,
                      "radius_fraction": fraction})
    pairs = merge_pairs(exact, *near_parts)
    groups = duplicate_groups(count, pairs)
    nearest, distance = nearest_copy(count, pairs)
    described = "; ".join(
        f"{view['features']} features closer than {view['radius_fraction']:g} x their median nearest-neighbour "
        f"distance ({view['median_nearest_distance']:.4g}), i.e. {view['radius']:.4g}" for view in views)
    record = {
        "features": "+".join(view["features"] for view in views),
        "views": views,
        "radius": views[0]["radius"],
        "median_nearest_distance": views[0]["median_nearest_distance"],
        "radius_fraction": views[0]["radius_fraction"],
        "rule": ("exact copies: the same decoded pixels (images) or row values (tables); near copies: "
                 f"{described} (medians estimated on up to 1,024 rows against all); groups: connected copies"),
        "seconds": time.perf_counter() - started,
    }
    return {"pairs": pairs, "exact": exact, "groups": groups, "nearest": nearest, "distance": distance,
            "record": record}


def duplicates_pass(
    examples: pd.DataFrame, loaded: LoadedDataset, result: FitResult, settings: AuditOptions
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add the split, duplicate and leak columns to a classification ``examples`` table,
    settle conflicting copies (``flag`` and ``suggested_label`` of the copies the
    evidence contradicts become ``mislabeled`` and the supported label; unsettled ones
    ``conflicting``), and return the table with summary.json's ``duplicates`` record."""
    examples = examples.copy()
    count = len(examples)
    splits = np.asarray(loaded.splits, dtype=object) if loaded.splits is not None else None
    if splits is not None:
        examples["split"] = pd.array(splits, dtype="string")
    if isinstance(loaded.inputs, LazyImages) or count < 2:
        found = None  # a streamed run would pay another pass over the files
    else:
        found = find_duplicates(loaded, result, seed=settings.train.seed, device=result.device)
    if found is None:
        _empty_columns(examples, count)
        return examples, {"checked": False, "reason": "images streamed from disk" if count >= 2 else "one example"}

    labels = loaded.targets.numpy().astype(np.int64)
    names = np.asarray(loaded.class_names, dtype=object)
    sources = np.asarray(loaded.sources, dtype=object)
    groups, nearest = found["groups"], found["nearest"]
    exact_members = np.zeros(count, dtype=bool)
    exact_members[found["exact"].first] = True
    exact_members[found["exact"].second] = True
    is_exact_nearest = np.zeros(count, dtype=bool)
    has = nearest >= 0
    is_exact_nearest[has] = found["distance"][has] == 0
    verdict = np.full(count, "", dtype=object)
    evidence = np.full(count, "", dtype=object)
    group_labels = np.full(count, "", dtype=object)
    suggested = examples["suggested_label"].to_numpy(dtype=object).copy()
    flags = examples["flag"].to_numpy(dtype=object).copy()
    preference = _label_preference(result, settings.train.margin)
    conflicting_groups = settled = unsettled = 0
    member_lists = _members(groups)
    large = max(LARGE_GROUP_MIN, int(LARGE_GROUP_SHARE * count))
    large_groups = 0
    for members in member_lists:
        member_labels = labels[members]
        present = np.unique(member_labels)
        group_labels[members] = "|".join(str(names[c]) for c in present)
        if len(members) > large:
            large_groups += 1
            verdict[members] = "too large"
            evidence[members] = (f"one of {len(members)} examples with the same or nearly the same input (over "
                                 f"{LARGE_GROUP_SHARE:.0%} of the data): the input does not tell them apart; not judged")
            continue
        if len(present) == 1:
            verdict[members] = "agree"
            continue
        conflicting_groups += 1
        winner, strength = _settle(members, member_labels, present, preference)
        if winner is None:
            unsettled += 1
            for row in members:
                other = nearest[row]
                verdict[row] = "conflicting"
                flags[row] = "conflicting"
                evidence[row] = (f"duplicate of {sources[other]} labeled {names[labels[other]]}; "
                                 f"the evidence cannot settle it ({strength})")
            continue
        settled += 1
        supporters = members[member_labels == winner]
        for row in members:
            if labels[row] == winner:
                verdict[row] = "supported"
                continue
            # The copy named: its nearest copy when that one carries the winning label.
            twin = nearest[row] if labels[nearest[row]] == winner else supporters[0]
            verdict[row] = "mislabeled"
            flags[row] = "mislabeled"
            suggested[row] = names[winner]
            evidence[row] = f"duplicate of {sources[twin]} labeled {names[winner]} ({strength})"
    in_group = groups >= 0
    examples["duplicate_group"] = pd.array(np.where(in_group, groups, 0), dtype="Int64")
    examples.loc[~in_group, "duplicate_group"] = pd.NA
    examples["duplicate_of"] = pd.array([sources[n] if n >= 0 else None for n in nearest.tolist()], dtype="string")
    # Distances of the view that found the pair (exact copies: 0).
    examples["duplicate_distance"] = found["distance"]
    examples["duplicate_kind"] = pd.array(
        [None if n < 0 else ("exact" if e else "near") for n, e in zip(nearest.tolist(), is_exact_nearest.tolist())],
        dtype="string")
    examples["duplicate_labels"] = pd.array([text or None for text in group_labels.tolist()], dtype="string")
    examples["duplicate_verdict"] = pd.array([text or None for text in verdict.tolist()], dtype="string")
    examples["duplicate_evidence"] = pd.array([text or None for text in evidence.tolist()], dtype="string")
    examples["flag"] = pd.array(flags, dtype="string")
    examples["suggested_label"] = pd.array(suggested, dtype="string")
    leak, leak_pairs = _leaks(member_lists, splits, count)
    examples["leak"] = leak
    record = dict(found["record"])
    record.update(
        checked=True,
        exact_copies=int(exact_members.sum()),
        groups=len(member_lists),
        examples_in_groups=int(in_group.sum()),
        conflicting_groups=conflicting_groups,
        settled_groups=settled,
        large_groups=large_groups,
        unsettled_groups=unsettled,
        flagged_mislabeled=int((verdict == "mislabeled").sum()),
        flagged_conflicting=int((verdict == "conflicting").sum()),
        leaks=leak_pairs,
        leak_examples=int(leak.sum()),
        settle_rule=(f"a strict majority of the group's labels; else the label the network preferred on the "
                     f"copies, on average over training, by at least {SETTLE_LOGITS:g} logits; else conflicting"),
    )
    return examples, record


def _empty_columns(examples: pd.DataFrame, count: int) -> None:
    examples["duplicate_group"] = pd.array([None] * count, dtype="Int64")
    for column in ("duplicate_of", "duplicate_kind", "duplicate_labels", "duplicate_verdict", "duplicate_evidence"):
        examples[column] = pd.array([None] * count, dtype="string")
    examples["duplicate_distance"] = np.full(count, np.nan)
    examples["leak"] = np.zeros(count, dtype=bool)


def _members(groups: np.ndarray) -> list[np.ndarray]:
    """The rows of each group, in group order."""
    rows = np.flatnonzero(groups >= 0)
    if len(rows) == 0:
        return []
    order = rows[np.argsort(groups[rows], kind="stable")]
    cuts = np.flatnonzero(np.diff(groups[order])) + 1
    return np.split(order, cuts)


def _label_preference(result: FitResult, margin: float):  # type: ignore[no-untyped-def]
    """``preference(row, label, given)``: how far ``label`` beat the row's given label in
    the network's outputs (logits; 0 for the given label): on average over training
    (the violation state) plus at the end of training (the final outputs, when the run
    kept them). The sum was right on more conflicting pairs than either part alone
    (benchmarks/duplicates.py: generated set 0.83 vs 0.68 and 0.85 settled right at
    0.25 logits, digits 0.99 either way). None when the run kept no violation state."""
    try:
        result.state_rows("violation", 0, 1)
    except ValueError:
        return None
    outputs = result.final_outputs

    def preference(row: int, label: int, given: int) -> float:
        if label == given:
            return 0.0
        violations = result.state_rows("violation", row, row + 1)[0]
        # Binary single output: one competing class, and the output is f_1 - f_0.
        averaged = float(violations[0] if violations.shape[0] == 1 else violations[label]) - margin
        if outputs is None:
            return averaged
        if outputs.shape[1] == 1:
            final = float(outputs[row, 0]) * (1.0 if label == 1 else -1.0)
        else:
            final = float(outputs[row, label] - outputs[row, given])
        return averaged + final

    return preference


def _settle(members: np.ndarray, member_labels: np.ndarray, present: np.ndarray, preference) -> tuple[int | None, str]:  # type: ignore[no-untyped-def]
    """The label a group with different labels supports, and why (or None and why not)."""
    counts = np.array([(member_labels == c).sum() for c in present])
    top = counts.max()
    if (counts == top).sum() == 1:
        return int(present[np.argmax(counts)]), f"{top} of {len(members)} copies carry it"
    tied = present[counts == top]
    if preference is None:
        return None, "a tie, and this run kept no training-averaged preferences"
    # Each copy's preference for each tied label, centred per copy (comparable across
    # copies with different given labels), averaged over the copies.
    table = np.array([[preference(int(row), int(label), int(given)) for label in tied]
                      for row, given in zip(members, member_labels)])
    table -= table.mean(1, keepdims=True)
    score = table.mean(0)
    order = np.argsort(-score)
    gap = float(score[order[0]] - score[order[1]])
    if gap < SETTLE_LOGITS:
        return None, f"a tie; the network's preference between the labels is {gap:.2f} logits"
    return int(tied[order[0]]), f"the network preferred it by {gap:.2f} logits (over training and at the end)"


def _leaks(member_lists: list[np.ndarray], splits: np.ndarray | None, count: int) -> tuple[np.ndarray, dict[str, int]]:
    """Per example, whether a copy of it lies in another split; and the number of copy
    pairs across each pair of splits (``"test/train"``: names sorted)."""
    leak = np.zeros(count, dtype=bool)
    counts: dict[str, int] = {}
    if splits is None:
        return leak, counts
    for members in member_lists:
        member_splits = splits[members]
        if len(set(member_splits.tolist())) < 2:
            continue
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                if member_splits[a] != member_splits[b]:
                    leak[members[a]] = leak[members[b]] = True
                    key = "/".join(sorted((str(member_splits[a]), str(member_splits[b]))))
                    counts[key] = counts.get(key, 0) + 1
    return leak, dict(sorted(counts.items()))


def aligned_pixels(images: Any, side: int = POOL_SIDE, block: int = 2048) -> torch.Tensor:
    """Images (N, C, H, W) moved and scaled to a canonical frame, then pooled like
    :func:`pooled_pixels`: float32 (N, C x side x side).

    The frame is the image's moments: each pixel weighs by how far its gray level lies
    from the median of the image's border (the background), the weighted centroid goes to the centre
    and the radius of gyration to a fixed share of the side. A shifted copy has the
    same moments moved, and a crop resized back the same moments moved and scaled, so
    their canonical images match up to resampling (digits: copy distances fall from
    0.9-2.4 to under 0.2 median nearest-neighbour distances, benchmarks/duplicates.py).
    """
    parts = []
    for start in range(0, len(images), block):
        rows = images[start:start + block].float()
        count, _, height, width = rows.shape
        gray = rows.mean(1)
        border = torch.cat([gray[:, 0], gray[:, -1], gray[:, :, 0], gray[:, :, -1]], 1)
        weight = (gray - border.median(1).values[:, None, None]).abs()
        weight = weight / weight.sum((1, 2), keepdim=True).clamp_min(1e-6)
        # Pixel centres in [-1, 1] (grid_sample's frame, align_corners=False).
        ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2 - 1
        xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2 - 1
        cy = (weight.sum(2) * ys).sum(1)
        cx = (weight.sum(1) * xs).sum(1)
        spread = ((weight * ((ys[None, :, None] - cy[:, None, None]) ** 2
                             + (xs[None, None, :] - cx[:, None, None]) ** 2)).sum((1, 2))).sqrt().clamp_min(1e-3)
        scale = spread / 0.5  # the radius of gyration becomes a quarter of the side
        theta = torch.zeros(count, 2, 3)
        theta[:, 0, 0] = scale
        theta[:, 1, 1] = scale
        theta[:, 0, 2] = cx
        theta[:, 1, 2] = cy
        # Sampled at twice the pooled side (not the full image): 4-16x fewer samples, and
        # the pooling below still averages 2 x 2 samples per cell.
        sampled = [count, rows.shape[1], min(height, 2 * side), min(width, 2 * side)]
        grid = torch.nn.functional.affine_grid(theta, sampled, align_corners=False)
        moved = torch.nn.functional.grid_sample(rows, grid, mode="bilinear", padding_mode="border",
                                                align_corners=False)
        parts.append(moved)
    return pooled_pixels(torch.cat(parts), side)
