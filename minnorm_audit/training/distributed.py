"""Data-parallel Minnorm training under ``torchrun`` (DistributedDataParallel).

How a global batch is shared out, and why the result equals a single-process run:

- Every rank draws the same seeded ``randperm`` per epoch, so every rank knows every
  global batch. Each global batch is cut into ``world_size`` *contiguous* slices with
  ``tensor_split`` (sizes differ by at most one; a rank may get zero examples in a
  last batch smaller than ``world_size``). No sampler padding: an example is seen by
  exactly one rank per epoch.
- The Lagrangian's constraint term is a *sum* over examples and DDP *averages*
  gradients, so each rank's term is multiplied by ``world_size``: the averaged
  gradient is the gradient of the global batch's sum. A rank with no examples still
  runs its (empty) forward and backward so the all-reduce goes through.
- Minnorm adds the norm term scaled by ``batch / num_examples``; with the merged
  update handed back before ``step()``, that batch is the *global* one.
- Dual updates: each rank's constraint values are all-gathered (padded to the
  largest slice, stripped again), joined in rank order into one update for the whole
  global batch, and applied by every rank: all ranks hold identical multipliers, the
  ones a single process would hold for the same global batches.

Only rank 0 writes files and logs. Multi-node runs need the run folder (checkpoint,
``--resume``) on a filesystem every node sees.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..minnorm import Minnorm, PendingDualUpdate


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a ``torchrun`` launch (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def context_from_env() -> DistributedContext:
    """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as torchrun sets them."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    return DistributedContext(
        rank=int(os.environ.get("RANK", "0")),
        world_size=world_size,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def is_main_process() -> bool:
    """True on rank 0 of a torchrun launch and in every plain (single-process) run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return context_from_env().is_main


def setup(device: torch.device) -> tuple[DistributedContext, torch.device]:
    """Join the process group when launched by torchrun with ``WORLD_SIZE > 1``.

    NCCL for CUDA (each process on ``cuda:LOCAL_RANK``), gloo otherwise. Returns the
    context and the device this rank trains on. A plain run returns rank 0 of 1 and
    ``device`` unchanged.
    """
    context = context_from_env()
    if not context.enabled:
        return context, device
    if device.type == "cuda":
        device = torch.device("cuda", context.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return context, device


def teardown() -> bool:
    """Leave the process group; True when one was left, False (a no-op) when none was joined."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    # Every rank reaches this point before the group goes: destroying it while a
    # peer is still in a collective can abort gloo and fail a finished run.
    dist.barrier()
    dist.destroy_process_group()
    return True


@contextmanager
def exit_rank_after(left_group: bool) -> Iterator[None]:
    """Run the block, then end this torchrun rank with ``os._exit`` (its exit status:
    0, or the code of a ``SystemExit`` raised in the block) when ``left_group``;
    a plain run (``left_group`` False) is untouched.

    Why: ``destroy_process_group()`` does not destroy a gloo backend that
    DistributedDataParallel has wrapped a model on (torch 2.14.1: its
    ``pt_gloo_runloop`` worker threads and ``gloo_tcp_loop`` thread are still running
    after the DDP model is freed, ``destroy_process_group()`` and ``gc.collect()``).
    A normal exit then finalizes the interpreter and runs C++ static destructors
    beside those threads; on a loaded machine, where a worker thread is still
    releasing its last work when that happens, the rank aborts with "terminate
    called without an active exception" after a finished, correct run. The
    barrier in :func:`teardown` has already been passed by every rank and the
    outputs are written, so nothing remains that finalization must do: the
    streams are flushed and the process ends without it.
    """
    if not left_group:
        yield
        return
    code = 0
    try:
        yield
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more to save
            pass
    os._exit(code)


def wrap_model(model: torch.nn.Module, context: DistributedContext, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel under torchrun, else ``model`` itself.

    Buffers are not re-broadcast every forward (the default networks' buffers are the
    frozen input statistics, identical on every rank after DDP's initial broadcast).
    """
    if not context.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    try:  # torch >= 2.14 names it forward_sync_buffers (buffers are still synced at init)
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    except TypeError:
        return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


def rank_slice(global_batch: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """This rank's contiguous share of a global batch of example ids (may be empty)."""
    if not context.enabled:
        return global_batch
    return torch.tensor_split(global_batch, context.world_size)[context.rank]


def merge_pending(
    optimizer: Minnorm, global_batch: torch.Tensor, context: DistributedContext
) -> None:
    """Replace this rank's recorded dual update by the merged one of the global batch.

    Called after ``backward()`` and before ``optimizer.step()``. Ids, constraint
    values and labels are all-gathered (padded to the largest slice, stripped again)
    and joined in rank order, i.e. in the order of the global batch.
    """
    pending = optimizer.take_pending()
    if not context.enabled:
        optimizer.restore_pending(pending)
        return
    if len(pending) != 1:
        raise RuntimeError(f"expected one recorded batch per step in distributed training, got {len(pending)}")
    local = pending[0]
    sizes = [int(part.numel()) for part in torch.tensor_split(global_batch, context.world_size)]
    if int(local.example_ids.numel()) != sizes[context.rank]:
        raise RuntimeError("this rank's recorded batch is not its slice of the global batch")
    # Everything stays on the device (a host copy per step would stall a GPU's queue).
    example_ids = gather_rows(local.example_ids, sizes, context)
    constraint_values = gather_rows(local.constraint_values, sizes, context)
    labels = None if local.labels is None else gather_rows(local.labels, sizes, context)
    optimizer.restore_pending([PendingDualUpdate(example_ids, constraint_values, labels)])


def gather_rows(local_rows: torch.Tensor, sizes: list[int], context: DistributedContext) -> torch.Tensor:
    """All-gather per-rank row blocks of known ``sizes`` (padded, then stripped) in rank order."""
    if not context.enabled:
        return local_rows
    longest = max(sizes)
    padded = local_rows.new_zeros((longest, *local_rows.shape[1:]))
    padded[: local_rows.shape[0]] = local_rows
    gathered = [torch.empty_like(padded) for _ in range(context.world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])
