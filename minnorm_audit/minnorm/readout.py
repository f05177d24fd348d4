"""What training yields, read from :class:`~.optimizer.Minnorm`: the multipliers and
their running mean (whole or a block of rows at a time), the mean violations, the
difficulty scores and suggested labels, the convergence diagnostics and the bytes held.
Every read applies the queued dual updates first."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .common import VIOLATION_FLOOR, ConstraintForm
from .stats import spearman
from .stores import CompactMultiplierStore, MultiplierStore


class ReadoutMixin:
    """The read methods of :class:`~.optimizer.Minnorm`.

    A mixin: it works on the attributes ``Minnorm.__init__`` sets up and calls
    ``flush_dual_updates()`` and ``norm_value()`` (all declared below).
    """

    form: ConstraintForm
    fitted_tolerance: float
    multipliers: MultiplierStore
    labels: torch.Tensor
    last_violation: torch.Tensor
    violation_sums: torch.Tensor | None
    visits: torch.Tensor | None
    _previous_scores: np.ndarray | None
    flush_dual_updates: Callable[[], None]  # DualAscentMixin's
    norm_value: Callable[[], float]  # Minnorm's

    def dense_multipliers(self) -> torch.Tensor:
        """The multipliers as an ``(num_examples, num_outputs)`` tensor (a new tensor of
        that full size for the compact store)."""
        self.flush_dual_updates()
        return self.multipliers.dense()

    def dense_average_multipliers(self) -> torch.Tensor:
        """The running mean over epochs (:meth:`accumulate_average`), ``(num_examples, num_outputs)``."""
        self.flush_dual_updates()
        return self.multipliers.dense_average()

    def mean_violations(self) -> torch.Tensor:
        """Mean over each example's visits of ``-g`` per class (margin form; ``g`` in
        the equality form), each visit floored at ``VIOLATION_FLOOR``: the dual ascent
        before the projection onto ``[0, max_multiplier]``, per step of ``dual_lr``.
        Needs ``track_violations=True``."""
        self.flush_dual_updates()
        if self.visits is None:
            raise RuntimeError("build Minnorm with track_violations=True to read mean violations")
        if isinstance(self.multipliers, CompactMultiplierStore):
            # Classes without a slot were never violated for long: the floor stands in.
            return self.multipliers.dense_mean_violations(self.visits, VIOLATION_FLOOR)
        assert self.violation_sums is not None
        return self.violation_sums / self.visits.clamp(min=1).unsqueeze(1).float()

    def state_rows(self, state: str, start: int, stop: int) -> torch.Tensor:
        """Examples ``start:stop`` of one state, ``(rows, num_outputs)`` in float32:
        ``"final"`` multipliers, their ``"average"`` over epochs, or the mean
        ``"violation"`` (:meth:`mean_violations`). Reading a large dataset's scores a
        block of rows at a time never builds the full examples x classes table."""
        self.flush_dual_updates()
        store = self.multipliers
        if state in ("final", "average"):
            return store.rows(start, stop, average=state == "average").float()
        if state != "violation":
            raise ValueError(f"unknown state {state!r}: use final, average or violation")
        if self.visits is None:
            raise RuntimeError("build Minnorm with track_violations=True to read mean violations")
        if isinstance(store, CompactMultiplierStore):
            return store.mean_violation_rows(self.visits, VIOLATION_FLOOR, start, stop)
        assert self.violation_sums is not None
        return self.violation_sums[start:stop] / self.visits[start:stop].clamp(min=1).unsqueeze(1).float()

    def multipliers_finite(self) -> bool:
        """True when no multiplier (nor its running mean) is NaN or inf."""
        self.flush_dual_updates()
        return self.multipliers.all_finite()

    def state_nbytes(self) -> int:
        """Bytes of per-example state held now: the store, violations, labels and the
        previous scores."""
        scores = 0 if self._previous_scores is None else self._previous_scores.nbytes
        return (
            self.multipliers.nbytes()
            + self.last_violation.numel() * self.last_violation.element_size()
            + self.labels.numel() * self.labels.element_size()
            + scores
            + sum(t.numel() * t.element_size() for t in (self.visits, self.violation_sums) if t is not None)
        )

    def difficulty(self) -> np.ndarray:
        """Per-example difficulty (higher = more suspect), see :func:`..scoring.difficulty_scores`."""
        self.flush_dual_updates()
        if isinstance(self.multipliers, CompactMultiplierStore):
            # max over competing classes: the slots hold every nonzero multiplier.
            return self.multipliers.row_max().detach().cpu().numpy().astype(np.float64)
        from ..scoring import difficulty_scores

        return difficulty_scores(self.dense_multipliers().detach().cpu().numpy(), form=self.form)

    def suggested_labels(self) -> np.ndarray:
        """The class the multipliers push each example toward (margin form)."""
        self.flush_dual_updates()
        if isinstance(self.multipliers, CompactMultiplierStore):
            maxima, classes = self.multipliers.row_argmax()
            return torch.where(maxima > 0, classes, self.labels).cpu().numpy()
        from ..scoring import suggested_labels

        return suggested_labels(
            self.dense_multipliers().detach().cpu().numpy(), self.labels.cpu().numpy()
        )

    def diagnostics(self) -> dict[str, float]:
        """Convergence figures since the previous call (call once per epoch).

        Returns
        -------
        dict
            ``max_violation``: largest constraint violation at each example's latest visit;
            ``fraction_fitted``: share of examples with all constraints within
            ``fitted_tolerance``; ``multiplier_change``: relative Frobenius change of the
            multipliers since the previous call; ``rank_stability``: Spearman correlation
            of the difficulty scores with those of the previous call;
            ``norm``: ``R(W)``.
        """
        self.flush_dual_updates()
        violation = self.last_violation
        visited = ~torch.isnan(violation)
        max_violation = float(violation[visited].max()) if bool(visited.any()) else float("nan")
        fraction_fitted = float((violation <= self.fitted_tolerance).float().mean())
        change_and_norm = self.multipliers.change_since_snapshot()
        if change_and_norm is None:
            multiplier_change = float("nan")
        else:
            change, previous_norm = change_and_norm
            multiplier_change = change / previous_norm if previous_norm > 0 else float("inf") if change > 0 else 0.0
        scores = self.difficulty()
        rank_stability = (
            float("nan") if self._previous_scores is None else spearman(scores, self._previous_scores)
        )
        self.multipliers.snapshot()
        self._previous_scores = scores
        return {
            "max_violation": max_violation,
            "fraction_fitted": fraction_fitted,
            "multiplier_change": multiplier_change,
            "rank_stability": rank_stability,
            "norm": self.norm_value(),
        }
