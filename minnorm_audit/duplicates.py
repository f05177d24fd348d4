"""Exact and near duplicates among the examples: content keys, a blocked radius search
and the groups they form.

- Exact copies (:func:`content_keys`): the same decoded pixels (images, at the audit's
  size) or the same row values (tables). File bytes are not compared: a PNG and its
  JPEG copy decode to different pixels and are near copies, not exact ones.
- Near copies (:func:`pairs_within`): every pair of feature rows closer than a radius,
  found block by block (no N x N matrix): a bf16 matmul screens each block with a slack
  that provably keeps every pair under the radius (the rounding bound below), and the
  few candidates are measured again in float32. On a CPU with AMX or a GPU the bf16
  product is 5x faster than float32 (measured: benchmarks/duplicates.py).
- The radius is calibrated on the data (:func:`calibrated_radius`): a fraction of the
  median nearest-neighbour distance, the form of cleanlab Datalab's near-duplicate rule
  (which uses 0.13 x the median); the fraction was chosen on benchmarks/duplicates.py.
- Groups (:func:`duplicate_groups`): connected components of the exact and near pairs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Rows per block of the radius search: a block pair is at most BLOCK x BLOCK bf16
# values (32 MB), whatever N.
BLOCK = 4096
# |error| of the bf16-screened squared distance, as a share of |q|^2 + |r|^2: inputs
# and the product rounded to bf16 (8 significant bits, relative error 2^-9 each) give
# at most 3 x 2^-9 x 2|q||r| <= 0.006 (|q|^2 + |r|^2), and the augmented columns below
# add their own rounding; 0.03 leaves room (tested against float64 in tests).
SCREEN_SLACK = 0.03
# Queries the median nearest-neighbour distance is estimated from (against all rows).
CALIBRATION_QUERIES = 1024


@dataclass
class Pairs:
    """Pairs of rows closer than a radius: ``first < second``, int64 (P,), and their
    float32 Euclidean distance (P,)."""

    first: np.ndarray
    second: np.ndarray
    distance: np.ndarray


def content_keys(inputs: Any, *, block: int = 4096) -> np.ndarray:
    """One 16-byte BLAKE2b digest per example over its content, as an object array (N,)
    of bytes: images by their decoded uint8 pixels, tables by their float32 row values
    (-0.0 read as 0.0). Equal keys are exact copies. ``inputs`` may be a tensor or any
    indexable batch source (:class:`~minnorm_audit.data.placement.LazyImages`)."""
    count = len(inputs)
    keys = np.empty(count, dtype=object)
    for start in range(0, count, block):
        rows = inputs[start:start + block]
        rows = rows.numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if rows.dtype != np.uint8:
            rows = rows.astype(np.float32) + np.float32(0.0)  # -0.0 + 0.0 == +0.0
        rows = np.ascontiguousarray(rows.reshape(rows.shape[0], -1))
        for offset, row in enumerate(rows):
            keys[start + offset] = hashlib.blake2b(row.tobytes(), digest_size=16).digest()
    return keys


def exact_pairs(keys: np.ndarray) -> Pairs:
    """Each example with an earlier example of the same key paired to the first one
    (a star per group: enough to connect it), distance 0."""
    first_of: dict[bytes, int] = {}
    firsts: list[int] = []
    seconds: list[int] = []
    for row, key in enumerate(keys.tolist()):
        first = first_of.setdefault(key, row)
        if first != row:
            firsts.append(first)
            seconds.append(row)
    return Pairs(np.asarray(firsts, dtype=np.int64), np.asarray(seconds, dtype=np.int64),
                 np.zeros(len(firsts), dtype=np.float32))


def nearest_distances(features: torch.Tensor, queries: torch.Tensor, *, block: int = BLOCK) -> torch.Tensor:
    """Float32 Euclidean distance from each row ``queries`` (int64 indices into
    ``features``, (Q,)) to its nearest other row of ``features`` (N, D), computed in
    blocks on ``features``' device (at most ``block`` x ``block`` distances at once);
    (Q,) on that device."""
    norms = (features * features).sum(1)
    best = torch.full((len(queries),), float("inf"), device=features.device)
    for q0 in range(0, len(queries), block):
        ids = queries[q0:q0 + block]
        rows = features[ids]
        for r0 in range(0, len(features), block):
            ref = features[r0:r0 + block]
            squared = torch.addmm(norms[r0:r0 + block].unsqueeze(0), rows, ref.T, alpha=-2.0)
            squared += norms[ids].unsqueeze(1)
            own = (ids >= r0) & (ids < r0 + len(ref))
            squared[own.nonzero()[:, 0], ids[own] - r0] = float("inf")  # not its own neighbour
            best[q0:q0 + block] = torch.minimum(best[q0:q0 + block], squared.amin(1))
    return best.clamp_min(0.0).sqrt()


def calibrated_radius(features: torch.Tensor, fraction: float, *, seed: int = 0,
                      queries: int = CALIBRATION_QUERIES) -> tuple[float, float]:
    """``(radius, median)``: the median nearest-neighbour distance among the rows
    (estimated from ``queries`` random rows against all of them) and ``fraction`` x it.
    Rows with an exact copy (distance 0) are left out of the median, so a dataset full
    of copies does not shrink its own radius to 0."""
    count = len(features)
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randperm(count, generator=generator)[:queries].to(features.device)
    nearest = nearest_distances(features, sample).cpu()
    positive = nearest[nearest > 0]
    median = float(positive.median()) if len(positive) else 0.0
    return fraction * median, median


def pairs_within(features: torch.Tensor, radius: float, *, block: int = BLOCK) -> Pairs:
    """Every pair of rows of ``features`` (N, D, float32, on the device the search runs
    on) closer than ``radius`` (Euclidean), without an N x N matrix.

    Blocks of ``block`` rows are compared with the blocks at or after them (the
    distance is symmetric): each comparison is one bf16 matmul of the rows augmented so
    that the product is ``q.r - a_q - b_r`` (a positive value: a candidate), a screen
    whose slack (:data:`SCREEN_SLACK`) keeps every pair under the radius; the
    candidates' distances are then computed in float32 and the ones under the radius
    kept. The result is the same set of pairs as a brute-force search (tested).
    """
    count = len(features)
    # Centred: distances are unchanged and the norms the slack scales with are smaller.
    features = features.float()
    features = features - features.mean(0)
    norms = (features * features).sum(1)
    squared_radius = float(radius) ** 2
    # q.r > (|q|^2 + |r|^2 - radius^2) / 2 - slack  <=>  |q - r|^2 < radius^2 + 2 slack,
    # with the slack a share of |q|^2 + |r|^2 (the bf16 rounding scales with them).
    half = 0.5 * (1.0 - SCREEN_SLACK) * norms
    ones = torch.ones(count, 1, device=features.device)
    left = torch.cat([features, (squared_radius / 2 - half).unsqueeze(1), ones], 1).to(torch.bfloat16)
    right = torch.cat([features, ones, -half.unsqueeze(1)], 1).to(torch.bfloat16)
    firsts: list[torch.Tensor] = []
    seconds: list[torch.Tensor] = []
    for q0 in range(0, count, block):
        for r0 in range(q0, count, block):
            # bf16 -> int16 bits: the same sign (the top bit), and integer reductions are
            # vectorized on CPU where bf16 comparisons are not (4-6x faster, measured).
            product = torch.mm(left[q0:q0 + block], right[r0:r0 + block].T).view(torch.int16)
            rows = (product.amax(1) > 0).nonzero()[:, 0]
            if len(rows) == 0:
                continue
            found = (product[rows] > 0).nonzero()
            first, second = rows[found[:, 0]] + q0, found[:, 1] + r0
            keep = second > first  # each pair once (the diagonal block), never a row with itself
            firsts.append(first[keep])
            seconds.append(second[keep])
    if not firsts or sum(len(part) for part in firsts) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return Pairs(empty, empty.copy(), np.zeros(0, dtype=np.float32))
    first, second = torch.cat(firsts), torch.cat(seconds)
    distance = torch.cat([(features[first[s:s + 65536]] - features[second[s:s + 65536]]).norm(dim=1)
                          for s in range(0, len(first), 65536)])
    keep = distance < radius
    return Pairs(first[keep].cpu().numpy(), second[keep].cpu().numpy(), distance[keep].float().cpu().numpy())


def merge_pairs(*parts: Pairs) -> Pairs:
    """The pairs of all ``parts``, each pair once (the smallest distance kept)."""
    first = np.concatenate([part.first for part in parts])
    second = np.concatenate([part.second for part in parts])
    distance = np.concatenate([part.distance for part in parts])
    low, high = np.minimum(first, second), np.maximum(first, second)
    order = np.lexsort((distance, high, low))
    low, high, distance = low[order], high[order], distance[order]
    unique = np.ones(len(low), dtype=bool)
    unique[1:] = (low[1:] != low[:-1]) | (high[1:] != high[:-1])
    return Pairs(low[unique], high[unique], distance[unique])


def duplicate_groups(count: int, pairs: Pairs) -> np.ndarray:
    """Group id per example (int64, (count,)): the connected components of ``pairs``
    numbered 0, 1, ... in order of their first member; -1 for an example in no pair."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    groups = np.full(count, -1, dtype=np.int64)
    if len(pairs.first) == 0:
        return groups
    graph = coo_matrix((np.ones(len(pairs.first)), (pairs.first, pairs.second)), shape=(count, count))
    _, component = connected_components(graph, directed=False)
    members = np.zeros(count, dtype=bool)
    members[pairs.first] = True
    members[pairs.second] = True
    # Renumber the components with a pair in order of their first member.
    seen: dict[int, int] = {}
    for row in np.flatnonzero(members).tolist():
        groups[row] = seen.setdefault(int(component[row]), len(seen))
    return groups


def nearest_copy(count: int, pairs: Pairs) -> tuple[np.ndarray, np.ndarray]:
    """For each example, its nearest copy among ``pairs`` (int64 row, -1 when none)
    and the distance to it (float64, NaN when none)."""
    nearest = np.full(count, -1, dtype=np.int64)
    distance = np.full(count, np.inf)
    for mine, other in ((pairs.first, pairs.second), (pairs.second, pairs.first)):
        order = np.argsort(-pairs.distance.astype(np.float64), kind="stable")  # nearest written last
        rows, others, dist = mine[order], other[order], pairs.distance[order].astype(np.float64)
        better = dist < distance[rows]
        # Among repeated rows numpy keeps the last write: the nearest, by the order above.
        candidate = np.full(count, np.inf)
        candidate[rows[better]] = dist[better]
        chosen = np.full(count, -1, dtype=np.int64)
        chosen[rows[better]] = others[better]
        update = candidate < distance
        distance[update] = candidate[update]
        nearest[update] = chosen[update]
    distance[nearest < 0] = np.nan
    return nearest, distance
