"""Minnorm training (Bansal, Advani, Cox, Saxe 2018) as a wrapper around any torch optimizer.

The problem (see ``shared/design/ALGORITHM.md``)::

    minimize   R(W) = 1/2 * sum_l ||W_l||_F^2
    subject to every example's constraint

Two constraint families:

``"equality"`` (regression)
    ``g_i = t_i - f(x_i) = 0``; one multiplier per example and output, any sign;
    ``L = R + sum_i mu_i . g_i``.
``"margin"`` (classification)
    ``g_ij = f_{y_i}(x_i) - f_j(x_i) - m >= 0`` for every competing class ``j``;
    multipliers ``lambda_ij >= 0``; ``L = R - sum_ij lambda_ij g_ij``.
    A network with a single output is the binary form: ``g_i = s_i f(x_i) - m`` with
    ``s_i = +1`` for label 1 and ``-1`` for label 0.

Dynamics: one step of the wrapped optimizer on ``L`` (descent on the weights), then
projected dual ascent on the batch's multipliers::

    mu     <- mu + dual_lr * g
    lambda <- max(0, lambda - dual_lr * g)

Damping. Plain simultaneous descent/ascent cycles on linear SVMs and blows up on
networks. The weight step therefore uses the *augmented-Lagrangian* multiplier::

    mu_eff     = mu + damping * g
    lambda_eff = max(0, lambda - damping * g)

which is exactly the gradient of the augmented Lagrangian with penalty ``damping``.
With ``damping == dual_lr`` it equals the multiplier after its update, i.e. the
alternating scheme; ``damping > dual_lr`` adds a proportional term on top. The
default ``damping = 2 * dual_lr`` was stable for minibatch Adam on networks and
converges on the linear closed-form problems (tests/test_minnorm.py).

Minibatches: only the batch's multipliers are read and updated; the norm term is
scaled by ``batch_size / num_examples`` so that one epoch sees it once.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

ConstraintForm = Literal["margin", "equality"]

# Minnorm.deferred_dual_updates() applies the queued dual updates in one pass once they
# cover this many examples (64 batches of 128): each pass is a dozen small tensor
# operations whose cost on a CPU is mostly dispatch, whatever the number of rows...
DEFERRED_WINDOW_EXAMPLES = 8192
# ...or this many examples x outputs (1 MB per float32 table): a pass over tables that
# spill out of the CPU caches costs more than the dispatch it saves (with 1000 classes
# every batch of 512 is applied at its step, as without the queue).
DEFERRED_WINDOW_ELEMENTS = 1 << 18

_NORMALIZATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
if hasattr(nn, "RMSNorm"):
    _NORMALIZATION_TYPES = _NORMALIZATION_TYPES + (nn.RMSNorm,)


class StateMismatchError(ValueError):
    """A saved Minnorm state does not belong to this dataset or problem."""


def default_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that enter the norm term ``R(W)`` for ``model``.

    Weight matrices and convolution kernels (parameters with two or more dimensions)
    are included; biases, normalization-layer parameters and the weights of a layer
    whose output goes straight into a normalization layer are excluded, because a
    normalization makes that layer's norm free to shrink (the min-norm problem would
    be degenerate). "Straight into" is read from module registration order, which is
    the data-flow order for ``nn.Sequential`` and for torchvision's ResNet/VGG blocks.

    Parameters
    ----------
    model : torch.nn.Module

    Returns
    -------
    list of torch.nn.Parameter
    """
    leaves = [module for module in model.modules() if not list(module.children())]
    feeding_normalization: set[int] = set()
    for current, following in zip(leaves, leaves[1:]):
        if isinstance(following, _NORMALIZATION_TYPES):
            feeding_normalization.add(id(current))
    selected: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in leaves:
        if isinstance(module, _NORMALIZATION_TYPES) or id(module) in feeding_normalization:
            continue
        for parameter in module.parameters(recurse=False):
            if parameter.ndim >= 2 and id(parameter) not in seen:
                seen.add(id(parameter))
                selected.append(parameter)
    return selected


#: Lowest value one visit adds to the violation sums: an example far inside its margin
#: at one visit cannot cancel many visits at which it was violated.
VIOLATION_FLOOR = -5.0

# --------------------------------------------------------------------------- multiplier stores

StoreChoice = Literal["auto", "dense", "compact"]

#: Default memory budget for everything the trainer keeps per example (bytes).
DEFAULT_MEMORY_BUDGET_BYTES = 1_000_000_000
#: Most slots per example the compact store uses when ``slots`` is not given.
DEFAULT_MAX_SLOTS = 64
# Rows handled at once when a whole-store pass (densify, argmax, change) needs
# temporaries: 4096 x 1000 classes is 16 MB per float32 block.
_CHUNK_ROWS = 1 << 12


class DenseMultiplierStore:
    """All multipliers in one ``(num_examples, width)`` tensor on the training device.

    For the margin form ``width`` is the number of outputs (the column of an example's
    own label is kept at zero), for the equality form the number of targets. Next to
    the current multipliers it keeps their running mean over epochs (the "average"
    score state, :meth:`accumulate_average`) and, once :meth:`snapshot` was called, a
    copy for the epoch-to-epoch change of :meth:`Minnorm.diagnostics`.
    """

    kind = "dense"
    slots: int | None = None

    def __init__(
        self,
        num_examples: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.values = torch.zeros(num_examples, width, device=device, dtype=dtype)
        self.average = torch.zeros_like(self.values)
        self.previous: torch.Tensor | None = None
        # Bumped by every scatter: a batch gathered at the same version is still current.
        self.version = 0

    @staticmethod
    def bytes_per_example(width: int, dtype: torch.dtype = torch.float32) -> int:
        """Values, running average and the diagnostics snapshot."""
        return 3 * width * _itemsize(dtype)

    @property
    def num_examples(self) -> int:
        return self.values.shape[0]

    @property
    def width(self) -> int:
        return self.values.shape[1]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def nbytes(self) -> int:
        """Bytes held now (the snapshot counts once it exists)."""
        tensors = [self.values, self.average] + ([self.previous] if self.previous is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def gather(self, example_ids: torch.Tensor) -> torch.Tensor:
        return self.values.index_select(0, example_ids)

    def scatter(self, example_ids: torch.Tensor, values: torch.Tensor) -> None:
        self.values.index_copy_(0, example_ids, _as_dtype(values, self.values.dtype))
        self.version += 1

    def dense(self) -> torch.Tensor:
        return self.values

    def dense_average(self) -> torch.Tensor:
        return self.average

    def rows(self, start: int, stop: int, *, average: bool = False) -> torch.Tensor:
        """Examples ``start:stop`` as ``(rows, width)`` (a view)."""
        return (self.average if average else self.values)[start:stop]

    def accumulate_average(self, keep: float, add: float) -> None:
        """``average <- keep * average + add * values``."""
        self.average.mul_(keep).add_(self.values, alpha=add)

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.values).all()) and bool(torch.isfinite(self.average).all())

    def row_max(self) -> torch.Tensor:
        return self.values.amax(dim=1)

    def snapshot(self) -> None:
        if self.previous is None:
            self.previous = self.values.detach().float().clone()
        else:
            self.previous.copy_(self.values)

    def change_since_snapshot(self) -> tuple[float, float] | None:
        """``(||values - snapshot||, ||snapshot||)``, None before the first snapshot."""
        if self.previous is None:
            return None
        current = self.values.detach().float()
        return float((current - self.previous).norm()), float(self.previous.norm())

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "multipliers": self.values, "average": self.average, "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.values.copy_(state["multipliers"].to(self.device))
            if state.get("average") is not None:
                self.average.copy_(state["average"].to(self.device))
            previous = state.get("previous")
            self.previous = None if previous is None else previous.to(self.device, torch.float32).clone()
        self.version += 1


class CompactMultiplierStore:
    """The ``slots`` most important competing classes of each example (margin form).

    Memory: per example and slot a class index (int16, or int32 beyond 32,767
    classes), the current multiplier, its running mean over epochs and, for the
    diagnostics, the previous epoch's class and value: 16 bytes per slot in float32,
    against ``12 * num_classes`` bytes per example for the dense store.

    How it keeps the method's meaning. The weight step and the dual step see a batch
    exactly as the dense store would: :meth:`gather` expands the slots into a dense
    ``(batch, width)`` block (classes without a slot hold 0), Minnorm computes the
    augmented-Lagrangian multipliers and the projected dual ascent on that block, and
    :meth:`scatter` keeps, per example, the ``slots`` classes with the largest
    ``max(new multiplier, running mean)``; the others are set to zero.

    The approximation, stated. Nothing changes as long as at most ``slots`` competing
    classes of an example have ever had a positive multiplier (a class whose
    multiplier went back to zero keeps its slot while its running mean is positive):
    then every multiplier, every running mean and every score equals the dense
    store's (``tests/test_store.py`` checks it to the bit). When more classes compete,
    the weakest are dropped: their multiplier restarts from zero (the proportional
    ``damping * violation`` term of the weight step still pushes on them at once, only
    their integrated memory is lost), and a class that comes back starts a new running
    mean. The score (largest competing multiplier, or its mean over epochs) and the
    suggested label are read from the strongest classes, which are exactly the ones
    kept, so they move little; ``tests/test_store.py`` bounds the effect on digits with
    2 of 9 competing classes kept.

    The "violation" score state (:meth:`track_violations`) keeps one violation sum
    per slot, and the slots then hold the active classes (multiplier or mean > 0) of
    largest sum, since the score is the largest sum (under the multiplier cap many
    multipliers tie, and a value-ordered choice would churn the slots). A class's sum
    starts when it takes a slot; a class without a slot reads as ``VIOLATION_FLOOR``.
    While no class is evicted, the scores and suggested labels match the dense table's
    where an example was violated; with 3 of 9 classes kept on digits the flipped
    examples stay on top (``tests/test_store.py``).
    """

    kind = "compact"

    def __init__(
        self,
        num_examples: int,
        width: int,
        *,
        slots: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if width < 3:
            raise ValueError("the compact store needs at least 3 classes (2 competing per example)")
        if not 1 <= slots < width:
            raise ValueError(f"slots must lie in [1, {width - 1}] for {width} classes, got {slots}")
        self.width = int(width)
        self.slots = int(slots)
        # Class ``width`` marks an empty slot: it lands in a spare column when expanded.
        self.classes = torch.full(
            (num_examples, slots), width, device=device, dtype=_class_index_dtype(width)
        )
        self.values = torch.zeros(num_examples, slots, device=device, dtype=dtype)
        self.average = torch.zeros_like(self.values)
        self.previous_classes: torch.Tensor | None = None
        self.previous_values: torch.Tensor | None = None
        # Per slot, the sum over visits of -g for that slot's class (Minnorm's
        # "violation" score state); None until track_violations().
        self.violation_sums: torch.Tensor | None = None
        self.version = 0

    @staticmethod
    def bytes_per_example(
        width: int, slots: int, dtype: torch.dtype = torch.float32, *, violations: bool = False
    ) -> int:
        """Classes, values, running average, the snapshot's classes and values, and
        with ``violations`` a float32 violation sum per slot."""
        return slots * (2 * _class_index_dtype(width).itemsize + 3 * _itemsize(dtype) + (4 if violations else 0))

    def track_violations(self) -> None:
        """Keep a violation sum per slot. Approximation: a class's sum starts when it
        takes a slot (a violated class gets a positive multiplier, hence a slot, at
        its first violated visit) and is lost when the class is evicted."""
        if self.violation_sums is None:
            self.violation_sums = torch.zeros(self.values.shape, device=self.device, dtype=torch.float32)

    @property
    def num_examples(self) -> int:
        return self.values.shape[0]

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def nbytes(self) -> int:
        tensors = [self.classes, self.values, self.average]
        if self.violation_sums is not None:
            tensors.append(self.violation_sums)
        if self.previous_classes is not None and self.previous_values is not None:
            tensors += [self.previous_classes, self.previous_values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _expand(self, classes: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Slots ``(rows, slots)`` -> dense ``(rows, width)``; empty slots fall in a spare column."""
        dense = values.new_zeros(values.shape[0], self.width + 1)
        dense.scatter_(1, classes.long(), values)
        return dense[:, : self.width]

    def gather(self, example_ids: torch.Tensor) -> torch.Tensor:
        return self._expand(self.classes.index_select(0, example_ids), self.values.index_select(0, example_ids))

    def scatter(
        self, example_ids: torch.Tensor, values: torch.Tensor, violation_increment: torch.Tensor | None = None
    ) -> None:
        """Keep the ``slots`` classes of largest ``max(values, running mean)`` per example;
        ``violation_increment`` (dense, per class) is added to the tracked violation sums."""
        values = values.to(self.values.dtype)
        classes = self.classes.index_select(0, example_ids)
        average = self._expand(classes, self.average.index_select(0, example_ids))
        key = torch.maximum(values, average)
        if self.violation_sums is not None and violation_increment is not None:
            sums = self._expand(classes, self.violation_sums.index_select(0, example_ids))
            sums = sums + violation_increment.to(sums.dtype)
            # With violations tracked the score is the largest sum, so the slots keep the
            # active classes (a multiplier or mean > 0) of largest sum: under the cap many
            # multipliers tie at the cap and a value-ordered choice would churn the slots.
            active = key != 0
            top_sums, top_classes = torch.where(active, sums, float("-inf")).topk(self.slots, dim=1, sorted=False)
            empty = ~active.gather(1, top_classes)
            self.violation_sums.index_copy_(0, example_ids, top_sums.masked_fill_(empty, 0.0))
        else:
            top_key, top_classes = key.topk(self.slots, dim=1, sorted=False)
            empty = top_key == 0  # NaN stays: check_finite must see it
        self.classes.index_copy_(0, example_ids, top_classes.masked_fill(empty, self.width).to(self.classes.dtype))
        self.values.index_copy_(0, example_ids, values.gather(1, top_classes).masked_fill_(empty, 0.0))
        self.average.index_copy_(0, example_ids, average.gather(1, top_classes).masked_fill_(empty, 0.0))
        self.version += 1

    def dense_mean_violations(self, visits: torch.Tensor, missing: float) -> torch.Tensor:
        """``(num_examples, width)`` mean violations; classes without a slot get ``missing``."""
        dense = torch.full((self.num_examples, self.width), missing, device=self.device, dtype=torch.float32)
        for start in range(0, self.num_examples, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            dense[rows] = self.mean_violation_rows(visits, missing, start, start + _CHUNK_ROWS)
        return dense

    def mean_violation_rows(self, visits: torch.Tensor, missing: float, start: int, stop: int) -> torch.Tensor:
        """Examples ``start:stop`` of :meth:`dense_mean_violations`."""
        if self.violation_sums is None:
            raise RuntimeError("call track_violations() first")
        rows = slice(start, stop)
        means = self.violation_sums[rows] / visits[rows].clamp(min=1).unsqueeze(1).float()
        block = torch.full((means.shape[0], self.width + 1), missing, device=self.device)
        block.scatter_(1, self.classes[rows].long(), means)
        return block[:, : self.width]

    def _dense_of(self, slot_values: torch.Tensor) -> torch.Tensor:
        dense = slot_values.new_zeros(self.num_examples, self.width)
        for start in range(0, self.num_examples, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            dense[rows] = self._expand(self.classes[rows], slot_values[rows])
        return dense

    def dense(self) -> torch.Tensor:
        """A new ``(num_examples, width)`` tensor: as large as the dense store."""
        return self._dense_of(self.values)

    def rows(self, start: int, stop: int, *, average: bool = False) -> torch.Tensor:
        """Examples ``start:stop`` expanded to ``(rows, width)``."""
        slot_values = self.average if average else self.values
        return self._expand(self.classes[start:stop], slot_values[start:stop])

    def dense_average(self) -> torch.Tensor:
        return self._dense_of(self.average)

    def accumulate_average(self, keep: float, add: float) -> None:
        # Slot by slot: a slot holds one class's value and mean, so this is the dense update.
        self.average.mul_(keep).add_(self.values, alpha=add)

    def all_finite(self) -> bool:
        return bool(torch.isfinite(self.values).all()) and bool(torch.isfinite(self.average).all())

    def row_max(self) -> torch.Tensor:
        """Largest multiplier per example (empty slots hold 0, multipliers are >= 0)."""
        return self.values.amax(dim=1)

    def row_argmax(self, slot_values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(max, class)`` per example; ties go to the smallest class, as ``argmax`` on
        the dense matrix does."""
        slot_values = self.values if slot_values is None else slot_values
        maxima = torch.empty(self.num_examples, dtype=slot_values.dtype, device=self.device)
        classes = torch.empty(self.num_examples, dtype=torch.long, device=self.device)
        for start in range(0, self.num_examples, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            values = slot_values[rows]
            best = values.amax(dim=1, keepdim=True)
            candidates = self.classes[rows].long().masked_fill(values != best, self.width)
            maxima[rows] = best[:, 0]
            classes[rows] = candidates.amin(dim=1)
        return maxima, classes

    def snapshot(self) -> None:
        if self.previous_classes is None or self.previous_values is None:
            self.previous_classes = self.classes.clone()
            self.previous_values = self.values.detach().float().clone()
        else:
            self.previous_classes.copy_(self.classes)
            self.previous_values.copy_(self.values)

    def change_since_snapshot(self) -> tuple[float, float] | None:
        """``(||values - snapshot||, ||snapshot||)`` of the dense matrices, in chunks."""
        if self.previous_classes is None or self.previous_values is None:
            return None
        change = previous = 0.0  # sums of squares over chunks, in Python floats (float64)
        for start in range(0, self.num_examples, _CHUNK_ROWS):
            rows = slice(start, start + _CHUNK_ROWS)
            now = self._expand(self.classes[rows], self.values[rows].float())
            before = self._expand(self.previous_classes[rows], self.previous_values[rows])
            change += float(torch.linalg.vector_norm(now.sub_(before))) ** 2
            previous += float(torch.linalg.vector_norm(self.previous_values[rows])) ** 2
        return math.sqrt(change), math.sqrt(previous)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "slots": self.slots,
            "classes": self.classes,
            "values": self.values,
            "average": self.average,
            "previous_classes": self.previous_classes,
            "previous_values": self.previous_values,
            "violation_sums": self.violation_sums,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.classes.copy_(state["classes"].to(self.device))
            self.values.copy_(state["values"].to(self.device))
            self.average.copy_(state["average"].to(self.device))
            if self.violation_sums is not None:
                if state.get("violation_sums") is None:
                    raise StateMismatchError("saved multiplier store did not track violations but this run does")
                self.violation_sums.copy_(state["violation_sums"].to(self.device))
            if state.get("previous_classes") is None or state.get("previous_values") is None:
                self.previous_classes = self.previous_values = None
            else:
                self.previous_classes = state["previous_classes"].to(self.device, self.classes.dtype).clone()
                self.previous_values = state["previous_values"].to(self.device, torch.float32).clone()
        self.version += 1


MultiplierStore = DenseMultiplierStore | CompactMultiplierStore


def _as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` without the dispatch when it is already ``dtype``."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _class_index_dtype(width: int) -> torch.dtype:
    # Indices run to ``width`` (the empty-slot marker).
    return torch.int16 if width < 2**15 - 1 else torch.int32


def per_example_overhead_bytes(dtype: torch.dtype = torch.float32) -> int:
    """What Minnorm keeps per example besides the store: the latest violation, the
    label (int64) and the current and previous difficulty scores (float64)."""
    return _itemsize(dtype) + 8 + 16


def state_bytes(
    num_examples: int,
    num_outputs: int,
    *,
    store: Literal["dense", "compact"],
    slots: int | None = None,
    dtype: torch.dtype = torch.float32,
    violations: bool = False,
) -> int:
    """Bytes of all per-example training state for a store (see :func:`choose_store`);
    ``violations``: the violation sums and visit count of the "violation" score state."""
    if store == "dense":
        per_example = DenseMultiplierStore.bytes_per_example(num_outputs, dtype) + (4 * num_outputs if violations else 0)
    else:
        if slots is None:
            raise ValueError("the compact store needs a slot count")
        per_example = CompactMultiplierStore.bytes_per_example(num_outputs, slots, dtype, violations=violations)
    return num_examples * (per_example + per_example_overhead_bytes(dtype) + (4 if violations else 0))


def choose_store(
    num_examples: int,
    num_outputs: int,
    *,
    form: ConstraintForm = "margin",
    store: StoreChoice = "auto",
    slots: int | None = None,
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    dtype: torch.dtype = torch.float32,
    violations: bool = False,
) -> tuple[Literal["dense", "compact"], int | None]:
    """Pick the multiplier store and its slot count.

    ``"auto"``: dense when all per-example state (:func:`state_bytes`) fits
    ``memory_budget_bytes``, else compact (margin form with 3 or more classes only; the
    equality and binary forms stay dense, at most ``12 * width + 28`` bytes per
    example). Compact without ``slots``: ``min(num_outputs - 1, DEFAULT_MAX_SLOTS)``
    slots, fewer if that would not fit the budget.

    Returns
    -------
    (kind, slots)
        ``("dense", None)`` or ``("compact", slots)``.

    Raises
    ------
    ValueError
        For an unknown choice, a compact store the problem cannot use, or a budget
        that cannot hold even one slot per example.
    """
    if store not in ("auto", "dense", "compact"):
        raise ValueError(f"multiplier store must be 'auto', 'dense' or 'compact', got {store!r}")
    compact_possible = form == "margin" and num_outputs >= 3
    if store == "dense" or (
        store == "auto"
        and (
            not compact_possible
            or state_bytes(num_examples, num_outputs, store="dense", dtype=dtype, violations=violations)
            <= memory_budget_bytes
        )
    ):
        return "dense", None
    if not compact_possible:
        raise ValueError("the compact multiplier store needs the margin form with 3 or more classes")
    if slots is not None:
        if not 1 <= slots < num_outputs:
            raise ValueError(f"multiplier slots must lie in [1, {num_outputs - 1}], got {slots}")
        return "compact", int(slots)
    per_slot = CompactMultiplierStore.bytes_per_example(num_outputs, 1, dtype, violations=violations)
    room = memory_budget_bytes // max(num_examples, 1) - per_example_overhead_bytes(dtype) - (4 if violations else 0)
    slots = min(num_outputs - 1, DEFAULT_MAX_SLOTS, room // per_slot)
    if slots < 1:
        raise ValueError(
            f"a memory budget of {memory_budget_bytes / 1e9:.3g} GB cannot hold one multiplier slot for "
            f"each of {num_examples:,} examples; raise the budget"
        )
    return "compact", int(slots)


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


class Minnorm(torch.optim.Optimizer):
    """Minnorm training around any ``torch.optim.Optimizer``.

    The wrapper shares ``param_groups`` and ``state`` with ``base_optimizer`` so LR
    schedulers and ``isinstance(opt, Optimizer)`` checks keep working.

    Parameters
    ----------
    base_optimizer : torch.optim.Optimizer
        Takes the weight step on the Lagrangian.
    num_examples : int
        Size of the training set; example ids are ``0 .. num_examples - 1``.
    num_outputs : int
        Width of the network's output. In the margin form one output means the binary
        form, ``K >= 2`` outputs the multiclass form.
    form : {"margin", "equality"}, default="margin"
    margin : float, default=1.0
        Required margin ``m`` of the margin form.
    dual_lr : float, default=0.1
        Step size of the dual ascent (``eta_dual``).
    damping : float, optional
        Augmented-Lagrangian penalty ``kp`` used in the weight step; ``2 * dual_lr``
        when omitted. Must be ``>= 0``.
    model : torch.nn.Module, optional
        When given, the norm term uses :func:`default_norm_parameters` of the model.
    norm_parameters : iterable of Parameter, optional
        Overrides which parameters are in the norm term. Without ``model`` or
        ``norm_parameters``, every optimized parameter with ``ndim >= 2``.
    dataset_fingerprint : str, default=""
        Stored in ``state_dict()``; ``load_state_dict`` refuses a different one.
    device : torch.device or str, optional
        Where the multipliers live; defaults to the device of the first parameter.
    fitted_tolerance : float, default=1e-3
        An example counts as fitted when its largest violation is at most this.
    multiplier_dtype : torch.dtype, default=torch.float32
        float64 for closed-form checks.
    multiplier_store : {"auto", "dense", "compact"}, default="auto"
        :class:`DenseMultiplierStore` or :class:`CompactMultiplierStore`; ``"auto"``
        takes the dense one when all per-example state fits ``memory_budget_bytes``
        (see :func:`choose_store`).
    multiplier_slots : int, optional
        Slots per example of the compact store (default: up to 64, within the budget).
    memory_budget_bytes : int, default=1_000_000_000
        Budget for everything kept per example (multipliers, their running mean, the
        diagnostics' snapshot and scores, violations, labels).
    max_multiplier : float, optional
        Upper bound ``C`` on every ``lambda_ij`` (margin form): the soft-margin problem,
        whose dual is the box ``0 <= lambda <= C`` as in a C-SVM. An example that would
        need more force than ``C`` is no longer pushed harder and is not memorized;
        ``train.fit`` sets it each epoch (see ``TrainConfig.multiplier_cap``). Settable
        as the attribute ``max_multiplier``. None (default): the hard-margin problem.
    track_violations : bool, default=False
        Keep the per-class sum of ``-g`` over visits (:meth:`mean_violations`).
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        num_examples: int,
        num_outputs: int,
        form: ConstraintForm = "margin",
        margin: float = 1.0,
        dual_lr: float = 0.1,
        damping: float | None = None,
        model: nn.Module | None = None,
        norm_parameters: Iterable[nn.Parameter] | None = None,
        dataset_fingerprint: str = "",
        device: torch.device | str | None = None,
        fitted_tolerance: float = 1e-3,
        multiplier_dtype: torch.dtype = torch.float32,
        multiplier_store: StoreChoice = "auto",
        multiplier_slots: int | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        max_multiplier: float | None = None,
        track_violations: bool = False,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError("base_optimizer must be a torch.optim.Optimizer instance")
        if form not in ("margin", "equality"):
            raise ValueError(f"form must be 'margin' or 'equality', got {form!r}")
        if num_examples < 1:
            raise ValueError(f"num_examples must be >= 1, got {num_examples}")
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        if dual_lr <= 0:
            raise ValueError(f"dual_lr must be > 0, got {dual_lr}")
        damping = 2.0 * dual_lr if damping is None else damping
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")

        self.base_optimizer = base_optimizer
        all_parameters = [p for group in base_optimizer.param_groups for p in group["params"]]
        # Optimizer.__init__ sets up hooks and bookkeeping; the groups are then replaced
        # by the base optimizer's own so both see the same learning rates (SAM's approach).
        super().__init__(all_parameters, dict(base_optimizer.defaults))
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state

        if norm_parameters is not None:
            self.norm_parameters = list(norm_parameters)
        elif model is not None:
            self.norm_parameters = default_norm_parameters(model)
        else:
            self.norm_parameters = [p for p in all_parameters if p.ndim >= 2]

        if device is None:
            device = all_parameters[0].device if all_parameters else torch.device("cpu")
        self.form: ConstraintForm = form
        self.num_outputs = int(num_outputs)
        self.margin = float(margin)
        self.dual_lr = float(dual_lr)
        self.damping = float(damping)
        self.dataset_fingerprint = str(dataset_fingerprint)
        self.fitted_tolerance = float(fitted_tolerance)
        kind, slots = choose_store(
            num_examples, num_outputs, form=form, store=multiplier_store, slots=multiplier_slots,
            memory_budget_bytes=memory_budget_bytes, dtype=multiplier_dtype, violations=track_violations,
        )
        self.multipliers: MultiplierStore
        if kind == "dense":
            self.multipliers = DenseMultiplierStore(num_examples, num_outputs, device=device, dtype=multiplier_dtype)
        else:
            assert slots is not None
            self.multipliers = CompactMultiplierStore(
                num_examples, num_outputs, slots=slots, device=device, dtype=multiplier_dtype
            )
        # Largest violation seen at each example's latest visit; NaN until first visit.
        self.last_violation = torch.full(
            (num_examples,), float("nan"), device=device, dtype=multiplier_dtype
        )
        self.labels = torch.full((num_examples,), -1, dtype=torch.long, device=device)
        self._pending: list[PendingDualUpdate] = []
        self._pending_batch_size = 0
        # Dual updates of finished steps not applied yet (see deferred_dual_updates).
        self._queued: list[PendingDualUpdate] = []
        self._queued_examples = 0
        self._window_examples: int | None = None
        self._max_multiplier: float | None = None
        self._previous_scores: np.ndarray | None = None
        self.dual_steps = 0
        self.average_epochs = 0
        # Box constraint 0 <= lambda <= max_multiplier (soft margin); None = hard margin.
        self.max_multiplier = None if max_multiplier is None else float(max_multiplier)
        # The dual ascent before projection, per example and class: the sum over visits
        # of -g (floored, see VIOLATION_FLOOR) and the visit count. Its mean is the
        # "violation" score state of train.fit: one more (n, width) table beside the
        # dense store, one float per slot inside the compact one.
        self.violation_sums: torch.Tensor | None = None
        self.visits: torch.Tensor | None = None
        self._ones: torch.Tensor | None = None  # see _visit_ones
        if track_violations:
            self.visits = torch.zeros(num_examples, device=device, dtype=torch.int32)
            if isinstance(self.multipliers, CompactMultiplierStore):
                self.multipliers.track_violations()  # one sum per slot, not per class
            else:
                self.violation_sums = torch.zeros(num_examples, num_outputs, device=device, dtype=torch.float32)

    # ------------------------------------------------------------------ constraints
    @property
    def max_multiplier(self) -> float | None:
        """Upper bound ``C`` on every ``lambda_ij`` (None: hard margin)."""
        return self._max_multiplier

    @max_multiplier.setter
    def max_multiplier(self, value: float | None) -> None:
        # Queued dual steps were taken under the bound in force then.
        self.flush_dual_updates()
        self._max_multiplier = None if value is None else float(value)

    @property
    def num_examples(self) -> int:
        return self.multipliers.num_examples

    @property
    def device(self) -> torch.device:
        return self.last_violation.device

    def constraint_values(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``g`` for a batch, shape ``(batch, num_outputs)``, in float32 or wider.

        Margin form: ``g_ij = f_y - f_j - margin`` (the own-label column is 0 and is
        ignored); binary single-output form: ``s * f - margin``. Equality form:
        ``t - f``.
        """
        outputs = self._promoted_outputs(outputs)
        if self.form == "equality":
            targets = targets.to(outputs.dtype).reshape(outputs.shape)
            return targets - outputs
        return self._margin_values(outputs, targets.long().reshape(-1))

    def _promoted_outputs(self, outputs: torch.Tensor) -> torch.Tensor:
        # Half-precision outputs (autocast) are promoted; float64 stays float64.
        if outputs.dtype not in (torch.float32, torch.float64):
            outputs = outputs.to(torch.promote_types(outputs.dtype, torch.float32))
        if outputs.ndim == 1:
            outputs = outputs.unsqueeze(1)
        if outputs.shape[1] != self.num_outputs:
            raise ValueError(
                f"the network has {outputs.shape[1]} outputs but Minnorm was built for {self.num_outputs}"
            )
        return outputs

    def _margin_values(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_outputs == 1:
            if labels.device.type == "cpu" and bool(((labels != 0) & (labels != 1)).any()):
                raise ValueError("the binary (single-output) margin form needs labels 0 or 1")
            signs = labels.to(outputs.dtype).mul(2).sub(1).unsqueeze(1)
            return signs * outputs - self.margin
        own = outputs.gather(1, labels.unsqueeze(1))
        return own - outputs - self.margin

    def _competing_mask(self, labels: torch.Tensor) -> torch.Tensor:
        """1 for every (example, competing class) pair, 0 on the own-label column."""
        if self.num_outputs == 1:
            return torch.ones(labels.shape[0], 1, device=labels.device)
        mask = torch.ones(labels.shape[0], self.num_outputs, device=labels.device)
        mask.scatter_(1, labels.unsqueeze(1), 0.0)
        return mask

    def effective_multipliers(
        self, multipliers: torch.Tensor, constraint_values: torch.Tensor, labels: torch.Tensor | None
    ) -> torch.Tensor:
        """Augmented-Lagrangian multipliers used in the weight step."""
        if self.form == "equality":
            return multipliers + self.damping * constraint_values
        # The arithmetic of lagrangian(): one add with alpha.
        effective = torch.add(multipliers, constraint_values, alpha=-self.damping).relu_()
        return effective * self._competing_mask(labels)

    def lagrangian(
        self, outputs: torch.Tensor, targets: torch.Tensor, example_ids: torch.Tensor
    ) -> torch.Tensor:
        """The batch's constraint term of the Lagrangian, to call ``backward()`` on.

        The norm term's gradient is added by :meth:`step` (scaled by the batch's share
        of the dataset), so ``lagrangian(...).backward(); step()`` is one weight step on
        ``L``. The constraint values are remembered and the batch's multipliers are
        updated by the next :meth:`step`.

        Parameters
        ----------
        outputs : Tensor, shape (batch, num_outputs) or (batch,)
        targets : Tensor
            Class indices (margin form) or real targets (equality form).
        example_ids : Tensor of int, shape (batch,)

        Returns
        -------
        Tensor
            Scalar: ``+sum mu_eff . g`` (equality) or ``-sum lambda_eff * g`` (margin).

        Notes
        -----
        The term is linear in the outputs once the multipliers are fixed, so it is
        built as ``outputs . C + constant`` with ``C = d term / d outputs`` computed
        without autograd: the gradient reaching the network is the one autograd gives
        for ``-sum lambda_eff * g`` (bit for bit: ``-lambda_eff`` on competing
        columns, the row sum on the own-label column), at two autograd nodes instead
        of seven.
        """
        # Plain attribute checks first: a no-op ``.to()`` still costs a dispatch per step.
        if example_ids.dtype != torch.long or example_ids.device != self.device:
            example_ids = example_ids.to(self.device, torch.long)
        if example_ids.ndim != 1:
            example_ids = example_ids.reshape(-1)
        outputs = self._promoted_outputs(outputs)
        detached = outputs.detach()
        store = self.multipliers
        try:
            multipliers = store.gather(example_ids)
        except IndexError:  # index_select checks the range (on a GPU: a device-side assert)
            raise IndexError(f"example ids must lie in [0, {self.num_examples})") from None
        # Worked in the wider of the two dtypes. Every tensor here is detached: no graph
        # is built.
        work_dtype = multipliers.dtype
        if work_dtype != outputs.dtype:
            work_dtype = torch.promote_types(work_dtype, outputs.dtype)
        labels: torch.Tensor | None
        if self.form == "equality":
            labels = None
            target_values = targets.to(outputs.dtype).reshape(outputs.shape)
            constraint_values = target_values - detached
            effective = _as_dtype(constraint_values * self.damping, work_dtype)
            torch.add(_as_dtype(multipliers, work_dtype), effective, out=effective)
            coefficients = effective.neg()  # d(sum mu_eff . (t - f)) / d f
            constant = (effective * target_values).sum()
            constant_scale = 1.0
        else:
            labels = targets
            if labels.dtype != torch.long or labels.device != self.device:
                labels = labels.to(self.device, torch.long)
            if labels.ndim != 1:
                labels = labels.reshape(-1)
            constraint_values = self._margin_values(detached, labels)
            # lambda - damping * g in one pass (promoted to the wider dtype), then relu.
            effective = torch.add(multipliers, constraint_values, alpha=-self.damping).relu_()
            if self.num_outputs == 1:
                # -sum lambda_eff (s f - m): d/df = -lambda_eff * s.
                signs = labels.unsqueeze(1).to(work_dtype).mul_(2).sub_(1)
                coefficients = effective.neg().mul_(signs)
                constant = effective.sum()
                constant_scale = self.margin
            else:
                # -sum_j lambda_eff_j (f_y - f_j - m): d/df_j = lambda_eff_j, d/df_y = -sum_j lambda_eff_j.
                own = labels.unsqueeze(1)
                coefficients = effective.scatter_(1, own, 0.0)
                row_sums = coefficients.sum(dim=1, keepdim=True).neg_()
                coefficients.scatter_(1, own, row_sums)
                constant = row_sums.sum()
                constant_scale = -self.margin
        self._pending.append(
            PendingDualUpdate(example_ids, constraint_values, labels, multipliers, store.version)
        )
        self._pending_batch_size += int(example_ids.numel())
        term = torch.dot(outputs.view(-1), _as_dtype(coefficients, outputs.dtype).view(-1))
        return torch.add(term, _as_dtype(constant, outputs.dtype), alpha=constant_scale)

    # ------------------------------------------------------------------ stepping
    def norm_value(self) -> float:
        """``R(W) = 1/2 sum ||W||^2`` over the norm parameters."""
        with torch.no_grad():
            return 0.5 * float(
                sum(p.detach().to(torch.promote_types(p.dtype, torch.float32)).pow(2).sum() for p in self.norm_parameters)
            )

    def _add_norm_gradient(self, scale: float) -> None:
        # Called from step(), under no_grad; .grad tensors never require grad.
        parameters = [p for p in self.norm_parameters if p.requires_grad]
        for parameter in parameters:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
        if parameters:
            torch._foreach_add_([p.grad for p in parameters], parameters, alpha=scale)

    def _norm_scale(self) -> float:
        # With no recorded batch (a step without lagrangian) the norm counts in full.
        if self._pending_batch_size == 0:
            return 1.0
        return self._pending_batch_size / self.num_examples

    def apply_dual_updates(self, pending: list[PendingDualUpdate]) -> None:
        """Projected dual ascent for recorded constraint values (all ranks call it
        with the same merged list in distributed training)."""
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.apply_dual_updates(pending)
        store = self.multipliers
        for update in pending:
            ids = update.example_ids
            g = update.constraint_values
            increment = None
            if update.multipliers is not None and update.store_version == store.version:
                current = update.multipliers  # read by lagrangian(); nothing changed since
            else:
                current = store.gather(ids)
            if self.form == "equality":
                updated = current + self.dual_lr * g
                violation = g.abs().amax(dim=1)
            else:
                # relu(current - dual_lr * g), own-label column 0 (same rounding as
                # the plain expression, without the temporaries).
                updated = g * self.dual_lr
                if current.dtype != updated.dtype:
                    work_dtype = torch.promote_types(current.dtype, updated.dtype)
                    updated, current = updated.to(work_dtype), current.to(work_dtype)
                torch.sub(current, updated, out=updated)
                # relu, and the soft-margin cap in the same pass.
                updated.clamp_(min=0.0, max=self._max_multiplier)
                # Largest violation max(0, max_j -g_ij) over competing classes: the
                # own-label column set to 0 stands in for the max with 0.
                violation = g.neg()
                if self.visits is not None:  # before the own column is zeroed
                    increment = violation.float().clamp(min=VIOLATION_FLOOR)
                if self.num_outputs > 1:
                    own = update.labels.unsqueeze(1)
                    updated.scatter_(1, own, 0.0)
                    violation.scatter_(1, own, 0.0)
                    violation = violation.amax(dim=1)
                else:
                    violation = violation.relu_().amax(dim=1)
                self.labels.index_copy_(0, ids, update.labels)
            if self.visits is not None:
                if self.form == "equality":
                    increment = g.float().clamp(min=VIOLATION_FLOOR)
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
        ``train.fit`` does. A repeated id is found when the window is applied and
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
        if len(queued) == 1:
            merged = queued[0]
        else:
            store = self.multipliers
            current = all(u.multipliers is not None and u.store_version == store.version for u in queued)
            merged = PendingDualUpdate(
                torch.cat([u.example_ids for u in queued]),
                torch.cat([u.constraint_values for u in queued]),
                None if queued[0].labels is None else torch.cat([u.labels for u in queued]),  # type: ignore[misc]
                torch.cat([u.multipliers for u in queued]) if current else None,  # type: ignore[misc]
                store.version if current else None,
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
        self.apply_dual_updates([merged])

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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One weight step of the base optimizer on ``L``, then the dual step."""
        if closure is None:
            self._add_norm_gradient(self._norm_scale())
            loss = self.base_optimizer.step()
        else:

            def closure_with_norm() -> Any:
                # Optimizers like LBFGS evaluate the closure several times; only the
                # last evaluation's constraint values drive the dual step.
                self._pending, self._pending_batch_size = [], 0
                with torch.enable_grad():
                    value = closure()
                scale = self._norm_scale()
                self._add_norm_gradient(scale)
                return value + scale * self.norm_value() if value is not None else value

            loss = self.base_optimizer.step(closure_with_norm)
        self.dual_steps += 1
        if self._window_examples is None:
            self.apply_dual_updates(self.take_pending())
        else:
            self._queued_examples += self._pending_batch_size
            self._queued.extend(self.take_pending())
            if (
                self._queued_examples >= self._window_examples
                or self._queued_examples * self.num_outputs >= DEFERRED_WINDOW_ELEMENTS
            ):
                self.flush_dual_updates()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------ running mean
    def accumulate_average(self) -> None:
        """Fold the current multipliers into their running mean over epochs (call once
        per epoch; the mean is the "average" score state of ``train.fit``)."""
        self.flush_dual_updates()
        count = self.average_epochs
        with torch.no_grad():
            self.multipliers.accumulate_average(count / (count + 1), 1 / (count + 1))
        self.average_epochs = count + 1

    # ------------------------------------------------------------------ outputs
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
        """Per-example difficulty (higher = more suspect), see :func:`scores.difficulty_scores`."""
        self.flush_dual_updates()
        if isinstance(self.multipliers, CompactMultiplierStore):
            # max over competing classes: the slots hold every nonzero multiplier.
            return self.multipliers.row_max().detach().cpu().numpy().astype(np.float64)
        from .scores import difficulty_scores

        return difficulty_scores(self.dense_multipliers().detach().cpu().numpy(), form=self.form)

    def suggested_labels(self) -> np.ndarray:
        """The class the multipliers push each example toward (margin form)."""
        self.flush_dual_updates()
        if isinstance(self.multipliers, CompactMultiplierStore):
            maxima, classes = self.multipliers.row_argmax()
            return torch.where(maxima > 0, classes, self.labels).cpu().numpy()
        from .scores import suggested_labels

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

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"base": base_optimizer.state_dict(), "minnorm": {...}}``; tensors and plain
        values only, so it loads with ``torch.load(weights_only=True)``.

        Like ``torch.optim``'s, the tensors are the live ones (no copy: the compact
        store exists to keep memory down); save them before training on, or clone.
        """
        self.flush_dual_updates()
        return {
            "base": self.base_optimizer.state_dict(),
            "minnorm": {
                "form": self.form,
                "num_examples": self.num_examples,
                "num_outputs": self.num_outputs,
                "margin": self.margin,
                "dual_lr": self.dual_lr,
                "damping": self.damping,
                "dataset_fingerprint": self.dataset_fingerprint,
                "store": self.multipliers.state_dict(),
                "last_violation": self.last_violation,
                "labels": self.labels,
                "dual_steps": self.dual_steps,
                "average_epochs": self.average_epochs,
                "max_multiplier": self.max_multiplier,
                "violation_sums": self.violation_sums,
                "visits": self.visits,
                "previous_scores": None if self._previous_scores is None else torch.from_numpy(self._previous_scores),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a state saved by :meth:`state_dict`, refusing one from another
        dataset or problem with a clear message."""
        if "base" not in state_dict or "minnorm" not in state_dict:
            raise StateMismatchError("not a Minnorm state: expected keys 'base' and 'minnorm'")
        saved = state_dict["minnorm"]
        for key, mine in (
            ("form", self.form),
            ("num_examples", self.num_examples),
            ("num_outputs", self.num_outputs),
            ("dataset_fingerprint", self.dataset_fingerprint),
        ):
            if saved[key] != mine:
                raise StateMismatchError(
                    f"saved Minnorm state has {key}={saved[key]!r} but this run has {mine!r}: "
                    "it belongs to another dataset or problem"
                )
        store_state = saved.get("store") or {"kind": "dense", "multipliers": saved["multipliers"]}
        saved_store = (store_state["kind"], store_state.get("slots"))
        if saved_store != (self.multipliers.kind, self.multipliers.slots):
            raise StateMismatchError(
                f"saved Minnorm state uses the {_describe_store(*saved_store)} but this run the "
                f"{_describe_store(self.multipliers.kind, self.multipliers.slots)}: choose the same "
                "multiplier store (and slots) to resume"
            )
        self.base_optimizer.load_state_dict(state_dict["base"])
        # load_state_dict of the base rebuilds its param_groups list; share it again.
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._queued, self._queued_examples = [], 0  # updates of the state being replaced
        self.margin = float(saved["margin"])
        self.dual_lr = float(saved["dual_lr"])
        self.damping = float(saved["damping"])
        self.multipliers.load_state_dict(store_state)
        with torch.no_grad():
            self.last_violation.copy_(saved["last_violation"].to(self.device))
            self.labels.copy_(saved["labels"].to(self.device))
        self.dual_steps = int(saved["dual_steps"])
        self.average_epochs = int(saved.get("average_epochs", 0))
        self.max_multiplier = saved.get("max_multiplier", self.max_multiplier)
        if self.visits is not None:
            if saved.get("visits") is None:
                raise StateMismatchError("saved Minnorm state did not track violations but this run does")
            with torch.no_grad():
                if self.violation_sums is not None:
                    self.violation_sums.copy_(saved["violation_sums"].to(self.device))
                self.visits.copy_(saved["visits"].to(self.device))
        previous_scores = saved.get("previous_scores")
        self._previous_scores = None if previous_scores is None else previous_scores.numpy().copy()
        self._pending, self._pending_batch_size = [], 0


def _describe_store(kind: str, slots: int | None) -> str:
    return f"compact multiplier store ({slots} slots)" if kind == "compact" else "dense multiplier store"


def spearman(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for constant input."""
    first_ranks = _average_ranks(np.asarray(first, dtype=np.float64))
    second_ranks = _average_ranks(np.asarray(second, dtype=np.float64))
    if first_ranks.std() == 0 or second_ranks.std() == 0:
        return float("nan")
    return float(np.corrcoef(first_ranks, second_ranks)[0, 1])


def _average_ranks(values: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts
    return (first_rank + 0.5 * (counts - 1))[inverse].astype(np.float64)


def relative_error(estimate: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> float:
    """``||estimate - reference|| / ||reference||``."""
    estimate = np.asarray(estimate, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    return float(np.linalg.norm(estimate - reference) / max(np.linalg.norm(reference), math.ulp(1.0)))
