"""The readout math of :class:`~.optimizer.Minnorm`, as pure functions of its state:
mean violations, the difficulty on the device, the multipliers' relative change and
the share of examples at the soft-margin cap. The class reads its queue out first and
passes its tensors in."""

from __future__ import annotations

import torch

from .common import VIOLATION_FLOOR, ConstraintForm
from .stores import CompactMultiplierStore, MultiplierStore


def mean_violation_rows(
    violation_sums: torch.Tensor,
    visits: torch.Tensor,
    labels: torch.Tensor,
    *,
    form: ConstraintForm,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Rows ``start:stop`` of the dense store's mean violations, float32
    ``(rows, width)``: the sum over visits divided by the visit count, with the
    own-label column (and unvisited rows) at ``VIOLATION_FLOOR`` in the multiclass
    margin form, as the compact store reads them."""
    row_visits = visits[start:stop]
    means = violation_sums[start:stop] / row_visits.clamp(min=1).unsqueeze(1).float()
    if form == "margin" and means.shape[1] > 1:
        # Labels are -1 until the first visit: no column matches, the row is unvisited.
        classes = torch.arange(means.shape[1], device=means.device)
        floor = (classes == labels[start:stop].unsqueeze(1)) | (row_visits == 0).unsqueeze(1)
        means = means.masked_fill_(floor, VIOLATION_FLOOR)
    return means


def difficulty_tensor(store: MultiplierStore, *, form: ConstraintForm) -> torch.Tensor:
    """Per-example difficulty on the store's device, float64 (MPS: float32): the largest
    multiplier (margin form) or the multipliers' Euclidean norm (equality form). The
    same numbers as ``scoring.difficulty_scores`` of the dense table."""
    dtype = torch.float32 if store.device.type == "mps" else torch.float64
    if isinstance(store, CompactMultiplierStore):
        return store.row_max().detach().to(dtype)
    multipliers = store.dense().detach()
    multipliers = multipliers.reshape(multipliers.shape[0], -1)
    if form == "equality":
        return torch.linalg.vector_norm(multipliers.to(dtype), dim=1)
    return multipliers.amax(dim=1).to(dtype)  # the max is exact in any float type


def relative_change(change_and_norm: tuple[float, float] | None) -> float:
    """``||now - before|| / ||before||`` from the store's ``change_since_snapshot()``:
    NaN before the first snapshot, inf for a change from all zeros, 0 for none."""
    if change_and_norm is None:
        return float("nan")
    change, previous_norm = change_and_norm
    if previous_norm > 0:
        return change / previous_norm
    return float("inf") if change > 0 else 0.0


def fraction_at_cap(store: MultiplierStore, visited: torch.Tensor, visited_count: int, cap: float) -> float:
    """Share of the visited examples whose largest multiplier is within ``1e-6``
    (relative) of the cap ``C`` (NaN before any visit)."""
    if not visited_count:
        return float("nan")
    # One pass over the largest multiplier of each example (capped at C).
    at_cap = store.row_max()[visited] >= cap * (1.0 - 1e-6)
    return float(at_cap.sum()) / visited_count
