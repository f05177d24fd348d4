"""The memory planner: bytes of all per-example training state for a store, the choice
between the dense and the compact multiplier store, and building the chosen one."""

from __future__ import annotations

from typing import Literal

import torch

from .common import ConstraintForm
from .stores import CompactMultiplierStore, DenseMultiplierStore, MultiplierStore, _itemsize

StoreChoice = Literal["auto", "dense", "compact"]

#: Default memory budget for everything the trainer keeps per example (bytes).
DEFAULT_MEMORY_BUDGET_BYTES = 1_000_000_000
#: Most slots per example the compact store uses when ``slots`` is not given.
DEFAULT_MAX_SLOTS = 64


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


def build_store(
    num_examples: int,
    num_outputs: int,
    *,
    form: ConstraintForm,
    store: StoreChoice,
    slots: int | None,
    memory_budget_bytes: int,
    dtype: torch.dtype,
    violations: bool,
    device: torch.device | str | None,
) -> MultiplierStore:
    """The store :func:`choose_store` picks (``violations``: budget for the violation
    sums too), empty, on ``device``."""
    kind, slots = choose_store(
        num_examples, num_outputs, form=form, store=store, slots=slots,
        memory_budget_bytes=memory_budget_bytes, dtype=dtype, violations=violations,
    )
    if kind == "dense":
        return DenseMultiplierStore(num_examples, num_outputs, device=device, dtype=dtype)
    assert slots is not None
    return CompactMultiplierStore(num_examples, num_outputs, slots=slots, device=device, dtype=dtype)
