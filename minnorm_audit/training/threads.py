"""How many CPU threads an audit computes with, and flushed denormals while it runs.

Why the thread count is chosen, not left to torch: torch starts one OpenMP thread per
physical core, and every operator ends at a barrier where its threads wait for the
slowest one. When other processes keep the cores busy, one of those threads is off its
core for a scheduler slice (milliseconds) at almost every barrier, so small operators
take a slice each instead of microseconds: a 4,331 x 26 table trained in 41 s with
torch's default threads and 1.1 s on one thread while other processes ran (issue 24).
A second thread pays only when each step's operators are large enough that splitting
them gains more than the barriers can lose; the default 2 x 512 MLP at batch 128 gains
nothing from a second thread even on an idle machine.

The rule (:func:`choose_threads`): one thread per :data:`WORK_PER_THREAD` multiply-adds
of a training step's forward pass (batch size x the network's multiply-adds for one
example), at least one, at most the cores this process may use (shared out among the
torchrun ranks of a node). The default MLP at batch 128 does 0.04 GMAC (26 features)
to 0.09 GMAC (784 features) a step: one thread. The default CNN on 32 x 32 RGB images
does 1.3 GMAC a step: every core on up to 5 cores' worth; a resnet18 on 224-pixel
images, 233 GMAC: every core.

Who wins: ``threads=`` / ``--threads`` as given, else ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS`` when the user set them (torch has already read them), else the rule.

Denormals: under the norm term the weights, their Adam moments and the dual state decay
toward zero and some entries end in the subnormal range, where every x86 floating-point
operation on them takes ~100 cycles instead of ~4: 60 epochs of that table took 21.5 s
against 5.5 s for 40 epochs. Flushed to zero they cost nothing; values below 1.2e-38
(float32) take no part in any score, and the scores agree (tests/test_threads.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Forward multiply-adds per training step that make one thread's share; see the module
# docstring. 2.5e8 is ~0.1 s of a step (forward and backward) on one core at ~15 GFLOP/s:
# a slice lost at each barrier is then a few percent of the step, not several times it.
WORK_PER_THREAD = 2.5e8

# The variables torch reads its intra-op thread count from at start-up.
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count of a run and where it came from.

    ``source`` is ``"given"`` (``threads=`` / ``--threads``), the name of the environment
    variable the user set, or ``"chosen"`` (:func:`choose_threads`' rule);
    ``step_multiply_adds`` is the forward work of one training step the rule used
    (None when the count was given).
    """

    threads: int
    source: str
    step_multiply_adds: float | None = None

    def to_record(self) -> dict[str, Any]:
        return {"threads": self.threads, "threads_source": self.source,
                "step_multiply_adds": self.step_multiply_adds}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), shared out among the
    torchrun ranks on this node (``LOCAL_WORLD_SIZE``); at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return max(cores // ranks, 1)


def forward_multiply_adds(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-adds of ``model``'s forward pass on ``example`` (a batch of one, on any
    device) counted over its Linear and Conv layers from their output shapes; the
    elementwise layers, pooling and normalization are not counted (a few percent)."""
    total = 0.0

    def count(module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if not isinstance(output, torch.Tensor):
            return
        if isinstance(module, nn.Linear):
            total += output.numel() * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            kernel = 1
            for size in module.kernel_size:
                kernel *= size
            total += output.numel() * (module.in_channels // module.groups) * kernel

    handles = [module.register_forward_hook(count) for module in model.modules()
               if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))]
    was_training = model.training
    try:
        model.eval()  # no batch-norm statistics updated by this count
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total


def choose_threads(requested: int | None, step_multiply_adds: float | None = None,
                   *, cores: int | None = None) -> ThreadChoice:
    """The intra-op thread count for a run (see the module docstring for the rule).

    Parameters
    ----------
    requested : int or None
        ``threads=`` / ``--threads``; None lets the environment or the rule decide.
    step_multiply_adds : float, optional
        Forward multiply-adds of one training step (batch size x
        :func:`forward_multiply_adds`); None: one thread.
    cores : int, optional
        The most threads the rule gives; default :func:`usable_cores`.

    Raises
    ------
    ValueError
        ``requested`` below 1.
    """
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"threads must be at least 1, got {requested}")
        return ThreadChoice(int(requested), "given")
    for name in THREAD_ENV_VARS:
        if os.environ.get(name, "").strip():
            # torch read it at start-up; keep what the user asked for.
            return ThreadChoice(torch.get_num_threads(), name)
    cores = usable_cores() if cores is None else max(int(cores), 1)
    work = float(step_multiply_adds or 0.0)
    return ThreadChoice(min(max(int(work // WORK_PER_THREAD), 1), cores), "chosen", work)


@contextmanager
def cpu_compute(threads: int) -> Iterator[None]:
    """Compute with ``threads`` intra-op threads and denormals flushed to zero inside the
    block; the caller's thread count and denormal mode are restored after it.

    ``torch.set_flush_denormal`` is a no-op on CPUs without the SSE3 DAZ/FTZ flags;
    GPUs are unaffected (they flush on their own terms).
    """
    previous_threads = torch.get_num_threads()
    # torch reports only whether the flag could be set; the previous mode is found by
    # whether a float32 subnormal survives (it reads as 0 while flushing).
    previous_flush = bool(torch.tensor(1e-40, dtype=torch.float32).item() == 0.0)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(previous_flush)
        torch.set_num_threads(previous_threads)
