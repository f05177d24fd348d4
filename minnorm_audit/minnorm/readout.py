"""What training yields, read from :class:`~.optimizer.Minnorm`: the multipliers and
their running mean (whole or a block of rows at a time), the mean violations, the
difficulty scores and suggested labels, the convergence diagnostics and the bytes held.
Every read applies the queued dual updates first."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .common import VIOLATION_FLOOR, ConstraintForm
from .stats import spearman_tensors
from .stores import CompactMultiplierStore, MultiplierStore


class ReadoutMixin:
    """The read methods of :class:`~.optimizer.Minnorm`.

    A mixin: it works on the attributes ``Minnorm.__init__`` sets up and calls
    ``flush_dual_updates()`` and ``norm_value()`` (all declared below).
    """

    form: ConstraintForm
    num_outputs: int
    fitted_tolerance: float
    max_multiplier: float | None  # Minnorm's property
    multipliers: MultiplierStore
    labels: torch.Tensor
    last_violation: torch.Tensor
    violation_sums: torch.Tensor | None
    visits: torch.Tensor | None
    _previous_scores: torch.Tensor | None  # float64 (MPS: float32), on the multipliers' device
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
        """Mean over each example's visits of ``-g`` per class: the dual ascent before
        the projection onto ``[0, max_multiplier]``, per step of ``dual_lr``.

        Returns
        -------
        Tensor, float32, shape (num_examples, num_outputs), on the multipliers' device
            Margin form: each visit's ``-g_ij`` floored at ``VIOLATION_FLOOR`` (units of
            the outputs, like the margin). With ``K >= 2`` outputs the own-label column
            reads ``VIOLATION_FLOOR`` ("never a competing class"), and so does every
            column of an example not visited yet, in both stores (the compact store's
            classes without a slot read it too). Binary single output: the one column
            is the competing class (0 before the first visit). Equality form: the mean
            of the signed ``g = t - f``, unfloored (0 before the first visit).

        Raises
        ------
        RuntimeError
            Without ``track_violations=True``.
        """
        self.flush_dual_updates()
        if self.visits is None:
            raise RuntimeError("build Minnorm with track_violations=True to read mean violations")
        if isinstance(self.multipliers, CompactMultiplierStore):
            # Classes without a slot were never violated for long: the floor stands in.
            return self.multipliers.dense_mean_violations(self.visits, VIOLATION_FLOOR)
        return self._dense_mean_violation_rows(0, self.multipliers.num_examples)

    def _dense_mean_violation_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the dense store's mean violations, with the own-label
        column (and unvisited rows) at ``VIOLATION_FLOOR`` in the multiclass margin form,
        as the compact store reads them."""
        assert self.violation_sums is not None and self.visits is not None
        visits = self.visits[start:stop]
        means = self.violation_sums[start:stop] / visits.clamp(min=1).unsqueeze(1).float()
        if self.form == "margin" and means.shape[1] > 1:
            # Labels are -1 until the first visit: no column matches, the row is unvisited.
            classes = torch.arange(means.shape[1], device=means.device)
            floor = (classes == self.labels[start:stop].unsqueeze(1)) | (visits == 0).unsqueeze(1)
            means = means.masked_fill_(floor, VIOLATION_FLOOR)
        return means

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
        return self._dense_mean_violation_rows(start, stop)

    def multipliers_finite(self) -> bool:
        """True when no multiplier (nor its running mean) is NaN or inf."""
        self.flush_dual_updates()
        return self.multipliers.all_finite()

    def state_nbytes(self) -> int:
        """Bytes of per-example state held now: the store, violations, labels and the
        previous scores."""
        scores = 0 if self._previous_scores is None else self._previous_scores.numel() * self._previous_scores.element_size()
        return (
            self.multipliers.nbytes()
            + self.last_violation.numel() * self.last_violation.element_size()
            + self.labels.numel() * self.labels.element_size()
            + scores
            + sum(t.numel() * t.element_size() for t in (self.visits, self.violation_sums) if t is not None)
        )

    def check_recorded_labels(self) -> None:
        """Binary (single-output) margin form: refuse labels other than 0 and 1 among
        the labels recorded at the dual steps, whatever their device.

        ``lagrangian()`` refuses such labels at once when they come on the CPU; on
        another device a check per batch would stall the host once per step, so this
        one pass over the recorded labels runs at the per-epoch reads instead
        (:meth:`diagnostics`, :meth:`difficulty`, :meth:`suggested_labels`).

        Raises
        ------
        ValueError
            Naming the first offending example and its label.
        """
        self.flush_dual_updates()
        if self.form != "margin" or self.num_outputs != 1:
            return
        labels = self.labels
        # -1 marks "not visited yet"; a visited example has a finite last violation.
        bad = (labels != 0) & (labels != 1) & ~torch.isnan(self.last_violation)
        if bool(bad.any()):
            example = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"the binary (single-output) margin form needs labels 0 or 1, but example {example} "
                f"was trained with label {int(labels[example])}"
            )

    def difficulty(self) -> np.ndarray:
        """Per-example difficulty (higher = more suspect), see :func:`..scoring.difficulty_scores`."""
        self.check_recorded_labels()
        if isinstance(self.multipliers, CompactMultiplierStore):
            # max over competing classes: the slots hold every nonzero multiplier.
            return self.multipliers.row_max().detach().cpu().numpy().astype(np.float64)
        from ..scoring import difficulty_scores

        return difficulty_scores(self.dense_multipliers().detach().cpu().numpy(), form=self.form)

    def _difficulty_tensor(self) -> torch.Tensor:
        """:meth:`difficulty` as a tensor on the multipliers' device (float64; MPS:
        float32), for the per-epoch rank stability."""
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # type: ignore[attr-defined]
        if isinstance(self.multipliers, CompactMultiplierStore):
            return self.multipliers.row_max().detach().to(dtype)
        multipliers = self.multipliers.dense().detach()
        multipliers = multipliers.reshape(multipliers.shape[0], -1)
        if self.form == "equality":
            return torch.linalg.vector_norm(multipliers.to(dtype), dim=1)
        return multipliers.amax(dim=1).to(dtype)  # the max is exact in any float type

    def suggested_labels(self) -> np.ndarray:
        """The class the multipliers push each example toward (margin form)."""
        self.check_recorded_labels()
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
            ``norm``: ``R(W)``; ``max_multiplier``: the cap ``C`` in force (margin form;
            NaN without a cap and in the equality form); ``fraction_at_cap``: share of
            the visited examples whose largest multiplier is within ``1e-6`` (relative)
            of ``C``, i.e. sits at the soft-margin box (NaN without a cap or before any
            visit; a share near 1 from the second epoch on means ``C`` is so small
            that the method is a plain hinge loss).

        Raises
        ------
        ValueError
            Binary form with recorded labels other than 0 and 1
            (:meth:`check_recorded_labels`).
        """
        self.check_recorded_labels()
        violation = self.last_violation
        visited = ~torch.isnan(violation)
        visited_count = int(visited.sum())
        max_violation = float(violation[visited].max()) if visited_count else float("nan")
        cap = self.max_multiplier if self.form == "margin" else None
        max_multiplier = fraction_at_cap = float("nan")
        if cap is not None:
            max_multiplier = float(cap)
            if visited_count:
                # One pass over the largest multiplier of each example (capped at C).
                at_cap = self.multipliers.row_max()[visited] >= cap * (1.0 - 1e-6)
                fraction_at_cap = float(at_cap.sum()) / visited_count
        fraction_fitted = float((violation <= self.fitted_tolerance).float().mean())
        change_and_norm = self.multipliers.change_since_snapshot()
        if change_and_norm is None:
            multiplier_change = float("nan")
        else:
            change, previous_norm = change_and_norm
            multiplier_change = change / previous_norm if previous_norm > 0 else float("inf") if change > 0 else 0.0
        # On the device: no examples x classes table comes to the host, one scalar does.
        scores = self._difficulty_tensor()
        rank_stability = (
            float("nan") if self._previous_scores is None else spearman_tensors(scores, self._previous_scores)
        )
        self.multipliers.snapshot()
        self._previous_scores = scores
        return {
            "max_violation": max_violation,
            "fraction_fitted": fraction_fitted,
            "multiplier_change": multiplier_change,
            "rank_stability": rank_stability,
            "norm": self.norm_value(),
            "max_multiplier": max_multiplier,
            "fraction_at_cap": fraction_at_cap,
        }
