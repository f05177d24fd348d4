"""The dual side: projected dual ascent on a batch's multipliers, the record of a
forward pass that drives it, and the window that batches queued updates.

Dual ascent, per batch after the weight step::

    mu     <- mu + dual_lr * g
    lambda <- min(C, max(0, lambda - dual_lr * g))      (C = max_multiplier, or none)

The window (:meth:`.optimizer.Minnorm.deferred_dual_updates`) applies the queued
updates of consecutive steps in one pass; the numbers are those of one update per step
as long as no example id repeats within a window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .common import VIOLATION_FLOOR, ConstraintForm, _as_dtype
from .stores import CompactMultiplierStore, MultiplierStore

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
    max_multiplier: float | None,
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
    updated.clamp_(min=0.0, max=max_multiplier)
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
    was read at ``store_version``).

    Raises
    ------
    RuntimeError
        When an example id appears twice: its multipliers were read before its previous
        update was applied.
    """
    if len(queued) == 1:
        merged = queued[0]
    else:
        current = all(u.multipliers is not None and u.store_version == store_version for u in queued)
        merged = PendingDualUpdate(
            torch.cat([u.example_ids for u in queued]),
            torch.cat([u.constraint_values for u in queued]),
            None if queued[0].labels is None else torch.cat([u.labels for u in queued]),  # type: ignore[misc]
            torch.cat([u.multipliers for u in queued]) if current else None,  # type: ignore[misc]
            store_version if current else None,
        )
    ids = merged.example_ids
    if ids.numel() > 1:
        # numpy's sort is several times faster than torch's for a CPU tensor this size.
        ordered = np.sort(ids.numpy()) if ids.device.type == "cpu" else ids.sort().values
        if bool((ordered[1:] == ordered[:-1]).any()):
            raise RuntimeError(
                "an example id appeared twice within one window of deferred_dual_updates(): its "
                "multipliers were read before its previous update was applied; defer only over "
                "batches of distinct examples (one pass over a permutation)"
            )
    return merged


class DualAscentMixin:
    """The dual side of :class:`~.optimizer.Minnorm`: applying recorded updates, the
    pending updates of the current step and the deferred window.

    A mixin: it works on the attributes ``Minnorm.__init__`` sets up (declared below).
    """

    form: ConstraintForm
    num_outputs: int
    dual_lr: float
    device: torch.device
    multipliers: MultiplierStore
    labels: torch.Tensor
    last_violation: torch.Tensor
    violation_sums: torch.Tensor | None
    visits: torch.Tensor | None
    _max_multiplier: float | None
    _ones: torch.Tensor | None
    _pending: list[PendingDualUpdate]
    _pending_batch_size: int
    _queued: list[PendingDualUpdate]
    _queued_examples: int
    _window_examples: int | None

    def apply_dual_updates(self, pending: list[PendingDualUpdate]) -> None:
        """Projected dual ascent for recorded constraint values (all ranks call it
        with the same merged list in distributed training)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.apply_dual_updates(pending)
        store = self.multipliers
        for update in pending:
            ids = update.example_ids
            if update.multipliers is not None and update.store_version == store.version:
                current = update.multipliers  # read by lagrangian(); nothing changed since
            else:
                current = store.gather(ids)
            updated, violation, increment = dual_step(
                current, update.constraint_values, update.labels, form=self.form, dual_lr=self.dual_lr,
                max_multiplier=self._max_multiplier, num_outputs=self.num_outputs,
                track_violations=self.visits is not None,
            )
            if self.form != "equality":
                self.labels.index_copy_(0, ids, update.labels)
            if self.visits is not None:
                self.visits.index_add_(0, ids, self._visit_ones(ids.numel()))
                if self.violation_sums is not None:
                    self.violation_sums.index_add_(0, ids, increment)
            if isinstance(store, CompactMultiplierStore):
                store.scatter(ids, updated, increment)
            else:
                store.scatter(ids, updated)
            self.last_violation.index_copy_(0, ids, _as_dtype(violation, self.last_violation.dtype))

    @contextlib.contextmanager
    def deferred_dual_updates(self, window_examples: int = DEFERRED_WINDOW_EXAMPLES) -> Iterator[None]:
        """Within the block, :meth:`step` queues its dual update and the queue is applied
        in one pass once it holds ``window_examples`` examples (or
        ``DEFERRED_WINDOW_ELEMENTS`` examples x outputs), and when the block ends.

        The weight steps are unchanged, and the multipliers come out bit for bit as if
        every step had applied its own update, provided no example id appears twice
        within a window: a queued example is not read again before its update lands.
        Use it around one pass over a permutation of the data (one epoch), as
        ``training.fit`` does. A repeated id is found when the window is applied and
        raises ``RuntimeError``. Reading results (:meth:`diagnostics`, scores,
        :meth:`state_dict`, ...) applies the queue first.

        Why: on a CPU a dual update costs mostly the dispatch of a dozen small tensor
        operations; one pass per window makes it a small share of a training step.
        """
        if window_examples < 1:
            raise ValueError(f"window_examples must be >= 1, got {window_examples}")
        if self._window_examples is not None:
            raise RuntimeError("deferred_dual_updates() blocks cannot be nested")
        self._window_examples = int(window_examples)
        try:
            yield
        finally:
            self._window_examples = None
            self.flush_dual_updates()

    def flush_dual_updates(self) -> None:
        """Apply the queued dual updates of :meth:`deferred_dual_updates` (no-op when none)."""
        if not self._queued:
            return
        queued, self._queued, self._queued_examples = self._queued, [], 0
        self.apply_dual_updates([merge_window(queued, self.multipliers.version)])

    def _visit_ones(self, count: int) -> torch.Tensor:
        """A cached ``(count,)`` int32 tensor of ones for the visit counter."""
        ones = self._ones
        if ones is None or ones.numel() < count:
            ones = self._ones = torch.ones(max(count, 1024), dtype=torch.int32, device=self.device)
        return ones[:count]

    def take_pending(self) -> list[PendingDualUpdate]:
        """Hand over (and clear) the constraint values recorded since the last step."""
        pending, self._pending = self._pending, []
        self._pending_batch_size = 0
        return pending

    def restore_pending(self, pending: list[PendingDualUpdate]) -> None:
        """Hand back recorded updates (e.g. merged across ranks) for the next :meth:`step`,
        which scales the norm term by their example count and applies them."""
        self._pending = list(pending)
        self._pending_batch_size = sum(int(update.example_ids.numel()) for update in pending)

    def _apply_or_queue_pending(self) -> None:
        """After a weight step: apply the step's updates, or queue them inside
        :meth:`deferred_dual_updates` and apply the queue once its window is full."""
        if self._window_examples is None:
            self.apply_dual_updates(self.take_pending())
        else:
            self._queued_examples += self._pending_batch_size
            self._queued.extend(self.take_pending())
            if window_full(self._queued_examples, self._window_examples, self.num_outputs):
                self.flush_dual_updates()
