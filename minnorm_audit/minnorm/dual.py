"""The dual side: projected dual ascent on a batch's multipliers, the record of a
forward pass that drives it, and the window that batches queued updates.

Dual ascent, per batch after the weight step::

    mu     <- mu + dual_lr * g
    lambda <- min(C, max(0, lambda - dual_lr * g))      (C = max_multiplier, or none)

The window (:meth:`.optimizer.Minnorm.deferred_dual_updates`) applies the queued
updates of consecutive steps in one pass; the numbers are those of one update per step
as long as no example id repeats within a window. Pure functions and one record type;
:class:`~.optimizer.Minnorm` holds the state they work on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import VIOLATION_FLOOR, ConstraintForm, clamp_to_box_

# Minnorm.deferred_dual_updates() applies the queued dual updates in one pass once they
# cover this many examples (64 batches of 128): each pass is a dozen small tensor
# operations whose cost on a CPU is mostly dispatch, whatever the number of rows...
DEFERRED_WINDOW_EXAMPLES = 8192
# ...or this many examples x outputs (1 MB per float32 table): a pass over tables that
# spill out of the CPU caches costs more than the dispatch it saves (with 1000 classes
# every batch of 512 is applied at its step, as without the queue).
DEFERRED_WINDOW_ELEMENTS = 1 << 18


@dataclass
class PendingDualUpdate:
    """Constraint values of one forward pass, applied to the multipliers by ``step()``.

    ``multipliers`` is the batch's multipliers as read by ``lagrangian()`` and
    ``store_version`` the store's version then: ``step()`` reuses them instead of
    reading again when no update came in between. Updates built elsewhere (merged
    across ranks) leave them out and are read afresh.
    """

    example_ids: torch.Tensor
    constraint_values: torch.Tensor
    labels: torch.Tensor | None
    multipliers: torch.Tensor | None = None
    store_version: int | None = None


def dual_step(
    current: torch.Tensor,
    g: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    form: ConstraintForm,
    dual_lr: float,
    max_multiplier: float | torch.Tensor | None,
    num_outputs: int,
    track_violations: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One projected ascent step of a batch's multipliers ``current`` for constraint
    values ``g``. Call under no_grad.

    Returns
    -------
    (updated, violation, increment)
        The new multipliers (margin form: in ``[0, max_multiplier]``, own-label column
        0); each example's largest violation; with ``track_violations`` what this
        visit adds to the violation sums, float32 of ``g``'s shape: margin form ``-g``
        floored at ``VIOLATION_FLOOR``, equality form ``g`` itself (signed, no floor),
        else None.
    """
    increment = None
    if form == "equality":
        updated = current + dual_lr * g
        violation = g.abs().amax(dim=1)
        if track_violations:
            # Signed and unfloored: the score is |mean g|, so a target far above the
            # prediction and one as far below must count alike (no VIOLATION_FLOOR).
            increment = g.float()
        return updated, violation, increment
    # relu(current - dual_lr * g), own-label column 0 (same rounding as
    # the plain expression, without the temporaries).
    updated = g * dual_lr
    if current.dtype != updated.dtype:
        work_dtype = torch.promote_types(current.dtype, updated.dtype)
        updated, current = updated.to(work_dtype), current.to(work_dtype)
    torch.sub(current, updated, out=updated)
    # relu, and the soft-margin cap in the same pass.
    clamp_to_box_(updated, max_multiplier)
    # Largest violation max(0, max_j -g_ij) over competing classes: the
    # own-label column set to 0 stands in for the max with 0.
    violation = g.neg()
    if track_violations:  # before the own column is zeroed
        increment = violation.float().clamp(min=VIOLATION_FLOOR)
    if num_outputs > 1:
        own = labels.unsqueeze(1)  # type: ignore[union-attr]
        updated.scatter_(1, own, 0.0)
        violation.scatter_(1, own, 0.0)
        violation = violation.amax(dim=1)
    else:
        violation = violation.relu_().amax(dim=1)
    return updated, violation, increment


def window_full(queued_examples: int, window_examples: int, num_outputs: int) -> bool:
    """Whether a queue of ``queued_examples`` is due: ``window_examples`` examples, or
    ``DEFERRED_WINDOW_ELEMENTS`` examples x outputs."""
    return queued_examples >= window_examples or queued_examples * num_outputs >= DEFERRED_WINDOW_ELEMENTS


def merge_window(queued: list[PendingDualUpdate], store_version: int) -> PendingDualUpdate:
    """The queued updates of one window as one update (multipliers kept when every one
    was read at ``store_version``). The ids must be distinct: ``Minnorm`` checks that
    once per deferred block, at its end, not here on every window."""
    if len(queued) == 1:
        return queued[0]
    current = all(u.multipliers is not None and u.store_version == store_version for u in queued)
    return PendingDualUpdate(
        torch.cat([u.example_ids for u in queued]),
        torch.cat([u.constraint_values for u in queued]),
        None if queued[0].labels is None else torch.cat([u.labels for u in queued]),  # type: ignore[misc]
        torch.cat([u.multipliers for u in queued]) if current else None,  # type: ignore[misc]
        store_version if current else None,
    )
