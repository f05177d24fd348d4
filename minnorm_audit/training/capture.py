"""fit()'s capturable epoch: fixed-shape batches through ``Minnorm.static_step``,
captured in one CUDA graph on a GPU after a warm-up, run eagerly elsewhere.

Why: on a GPU the Minnorm step is a few hundred small kernels whose launch cost, not
their arithmetic, sets the step time at batch 128; one graph replay launches them all
at once (the last GPU measurement: 0.132 s per 50k-image epoch captured vs 0.394 s
eager, ARCHITECTURE.md, Scale).

The last batch of an epoch is padded to the batch size, not wrapped into the next
epoch's permutation: its missing rows are filled with the epoch's first ids, which
its first batch already visited and which differ from the last batch's own (when the
dataset holds at least one batch). Those rows pass through the network but the step
masks them (no gradient, no dual update, no visit; ``Minnorm.static_step``). Padding
keeps what the rest of the run relies on: every example exactly once per epoch (the
running mean, the visit counts, the resume checkpoint at epoch ends), where wrapping
would move the epoch boundary and repeat ids inside one batch.

A captured graph bakes in the learning rate (fit() keeps it constant) and the
addresses of every tensor it touches: the weights, the gradients (zeroed in place),
the optimizer state (torch's ``capturable`` form, built so by ``setup.py`` on CUDA)
and the Minnorm state (all updated in place; the cap is ``Minnorm.cap_tensor``).
``MINNORM_AUDIT_CUDA_GRAPH=0`` turns capture off (the step then runs eagerly, for
comparisons and debugging).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn

from ..minnorm import Minnorm
from .predict import autocast_context

#: Eager steps before capture (CUDA's lazy initialisations happen in them, on a side stream).
WARMUP_STEPS = 3


def capture_wanted(device: torch.device, num_examples: int, batch_size: int, distributed: bool) -> bool:
    """Whether fit() captures its step: on CUDA, one process, at least one full batch,
    unless ``MINNORM_AUDIT_CUDA_GRAPH=0``."""
    if os.environ.get("MINNORM_AUDIT_CUDA_GRAPH", "1").strip() == "0":
        return False
    return device.type == "cuda" and not distributed and num_examples >= batch_size


def padded_batches(order: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """An epoch's permutation as batches of exactly ``batch_size`` ids and their masks.

    Returns
    -------
    (ids, valid)
        Lists of ``ceil(n / batch_size)`` int64 and bool tensors of ``batch_size``
        each; the last batch's missing rows hold the permutation's first ids, marked
        False in ``valid``.

    Raises
    ------
    ValueError
        When the permutation is shorter than one batch (padding would repeat the
        last batch's own ids): such a dataset is trained eagerly.
    """
    count = int(order.numel())
    if count < batch_size:
        raise ValueError(f"{count} examples cannot fill one batch of {batch_size}: train it eagerly")
    steps = math.ceil(count / batch_size)
    padding = steps * batch_size - count
    ids = torch.cat([order, order[:padding]]) if padding else order
    valid = torch.ones(steps * batch_size, dtype=torch.bool)
    valid[count:] = False
    return list(ids.view(steps, batch_size)), list(valid.view(steps, batch_size))


class StaticStep:
    """``optimizer.static_step`` for ``model``: eager, or captured in a CUDA graph.

    With ``capture``, the first :data:`WARMUP_STEPS` calls run eagerly on a side
    stream, the next one captures the step on static input buffers and every call
    from then on copies its batch into them and replays the graph. The Python
    counters the step leaves alone (``dual_steps``, the store's version) are bumped
    here after every step.
    """

    def __init__(self, model: nn.Module, optimizer: Minnorm, *, capture: bool) -> None:
        self.model = model
        self.optimizer = optimizer
        self.capture = capture
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: tuple[torch.Tensor, ...] | None = None

    def _forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with autocast_context(inputs.device):
            return self.model(inputs)

    def _eager(self, inputs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
        self.optimizer.static_step(self._forward, inputs, targets, ids, valid)  # type: ignore[arg-type]
        self.optimizer.count_static_step()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
        self.calls += 1
        if not self.capture:
            self._eager(inputs, targets, ids, valid)
            return
        if self.graph is None and self.calls <= WARMUP_STEPS:
            self._on_side_stream(lambda: self._eager(inputs, targets, ids, valid))
            return
        if self.graph is None:
            self._capture(inputs, targets, ids, valid)
        assert self.graph is not None and self.static is not None
        for buffer, value in zip(self.static, (inputs, targets, ids, valid)):
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        self.optimizer.count_static_step()

    @staticmethod
    def _on_side_stream(work: Callable[[], None]) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            work()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self, inputs: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> None:
        self.static = tuple(value.clone() for value in (inputs, targets, ids, valid))
        graph = torch.cuda.CUDAGraph()
        # Capture records the kernels without running them; the replay that follows runs this batch.
        with torch.cuda.graph(graph):
            self.optimizer.static_step(self._forward, *self.static)  # type: ignore[arg-type]
        self.graph = graph
