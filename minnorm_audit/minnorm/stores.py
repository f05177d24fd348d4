"""Where the multipliers live: one dense ``(num_examples, width)`` table, or the
``slots`` strongest competing classes of each example (see :mod:`.planner` for the
choice between them)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .common import StateMismatchError, _as_dtype

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
        self.write(example_ids, values)
        self.version += 1

    def write(self, example_ids: torch.Tensor, values: torch.Tensor) -> None:
        """:meth:`scatter` without the version bump: tensor work only, for a traced or
        captured step (whose caller bumps the version)."""
        self.values.index_copy_(0, example_ids, _as_dtype(values, self.values.dtype))

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
        self.write(example_ids, values, violation_increment)
        self.version += 1

    def write(
        self, example_ids: torch.Tensor, values: torch.Tensor, violation_increment: torch.Tensor | None = None
    ) -> None:
        """:meth:`scatter` without the version bump: tensor work only, for a traced or
        captured step (whose caller bumps the version)."""
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


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _class_index_dtype(width: int) -> torch.dtype:
    # Indices run to ``width`` (the empty-slot marker).
    return torch.int16 if width < 2**15 - 1 else torch.int32


def _describe_store(kind: str, slots: int | None) -> str:
    return f"compact multiplier store ({slots} slots)" if kind == "compact" else "dense multiplier store"
